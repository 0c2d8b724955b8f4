// See emu_race.h. Shadow state per byte: the last write and up to kReaders reads since it, each tagged with
// (block, thread, barrier epoch of its block). Two accesses of different threads, one of them a write, race
// unless they are in the same block and a barrier lies between them. The first race aborts with the code
// addresses of both accesses (tests/cpu_emu maps them to source lines with addr2line).
#include "emu_race.h"

#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <unordered_map>

namespace dblocks::emu::race {
namespace {

constexpr int kReaders = 4;

struct Access {
    uint64_t block;
    int thread;  // -1: none
    uint32_t epoch;
    const void* pc;
};

struct Cell {
    Access write{0, -1, 0, nullptr};
    Access reads[kReaders];
    int n_reads = 0;
};

struct State {
    bool in_launch = false;
    int thread = -1;
    uint64_t block = 0;
    uint32_t epoch = 0;
    uintptr_t stack_lo = 0, stack_hi = 0;
    std::unordered_map<uintptr_t, Cell> shadow;
};
thread_local State g;

bool ordered(const Access& a, uint64_t block, int thread, uint32_t epoch) {
    return a.thread < 0 || (a.block == block && (a.thread == thread || a.epoch != epoch));
}

void where(const char* label, const Access& a) {
    Dl_info info{};
    const bool found = dladdr(a.pc, &info) && info.dli_fname;
    const uintptr_t off = found ? uintptr_t(a.pc) - uintptr_t(info.dli_fbase) : uintptr_t(a.pc);
    std::fprintf(stderr, "  %s by thread %d of block %llu (barrier epoch %u) at pc %s+0x%lx\n", label, a.thread,
                 (unsigned long long)a.block, a.epoch, found ? info.dli_fname : "?", (unsigned long)(off - 1));
}

[[noreturn]] void report(uintptr_t addr, bool is_write, const Access& now, const Access& before,
                         bool before_write) {
    std::fflush(stdout);
    std::fprintf(stderr,
                 "dblocks cpu_emu: data race on address 0x%lx (GPU rules: only __syncthreads orders a block's "
                 "threads; nothing orders blocks)\n", (unsigned long)addr);
    where(is_write ? "write" : "read", now);
    where(before_write ? "previous write" : "previous read", before);
    std::fflush(stderr);
    std::abort();
}

void access(const void* p, size_t n, bool is_write, const void* pc) {
    if (!g.in_launch || g.thread < 0) return;
    const uintptr_t a = uintptr_t(p);
    if (a >= g.stack_lo && a < g.stack_hi) return;
    const Access now{g.block, g.thread, g.epoch, pc};
    for (size_t i = 0; i < n; ++i) {
        Cell& c = g.shadow[a + i];
        if (!ordered(c.write, g.block, g.thread, g.epoch)) report(a + i, is_write, now, c.write, true);
        if (is_write) {
            for (int r = 0; r < c.n_reads; ++r)
                if (!ordered(c.reads[r], g.block, g.thread, g.epoch)) report(a + i, true, now, c.reads[r], false);
            c.write = now;
            c.n_reads = 0;
        } else {
            bool seen = false;
            for (int r = 0; r < c.n_reads && !seen; ++r)
                seen = c.reads[r].block == g.block && c.reads[r].thread == g.thread && c.reads[r].epoch == g.epoch;
            if (!seen && c.n_reads < kReaders) c.reads[c.n_reads++] = now;
        }
    }
}

}  // namespace

void set_stack_range(const void* base, size_t bytes) {
    g.stack_lo = uintptr_t(base);
    g.stack_hi = uintptr_t(base) + bytes;
}
void launch_begin() {
    g.shadow.clear();
    g.in_launch = true;
}
void launch_end() {
    g.in_launch = false;
    g.shadow.clear();
}
void block_begin(uint64_t block) {
    g.block = block;
    g.epoch = 0;
}
void forget(const void* p, size_t bytes) {
    if (g.shadow.empty()) return;
    for (size_t i = 0; i < bytes; ++i) g.shadow.erase(uintptr_t(p) + i);
}
void block_end(const void* dynamic_smem, size_t bytes) { forget(dynamic_smem, bytes); }
void thread_switch(int thread) { g.thread = thread; }
void barrier() { ++g.epoch; }

}  // namespace dblocks::emu::race

// The hooks gcc's -fsanitize=thread instrumentation calls.
using dblocks::emu::race::access;
#define EMU_PC __builtin_return_address(0)
extern "C" {
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit(void*) {}
void __tsan_vptr_update(void*, void*) {}
void __tsan_vptr_read(void*) {}
#define EMU_RW(n)                                                                    \
    void __tsan_read##n(void* p) { access(p, n, false, EMU_PC); }                   \
    void __tsan_write##n(void* p) { access(p, n, true, EMU_PC); }                   \
    void __tsan_unaligned_read##n(void* p) { access(p, n, false, EMU_PC); }         \
    void __tsan_unaligned_write##n(void* p) { access(p, n, true, EMU_PC); }         \
    void __tsan_read##n##_pc(void* p, void* pc) { access(p, n, false, pc); }        \
    void __tsan_write##n##_pc(void* p, void* pc) { access(p, n, true, pc); }
EMU_RW(1)
EMU_RW(2)
EMU_RW(4)
EMU_RW(8)
EMU_RW(16)
void __tsan_read_range(void* p, long n) { access(p, size_t(n), false, EMU_PC); }
void __tsan_write_range(void* p, long n) { access(p, size_t(n), true, EMU_PC); }
}
