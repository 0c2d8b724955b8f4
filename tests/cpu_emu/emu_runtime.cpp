// The CPU emulator's runtime: runs each launch's blocks one after another, and the threads of a block as
// fibers (ucontext) that switch only at __syncthreads, __syncwarp and shuffles. That gives real barriers and
// real warp exchanges, and exact control of the order in which threads and blocks run (forward, reverse,
// random), so that a result which depends on it shows up as a difference between schedules.
//
// Launch limits are an H100's: 1024 threads a block, grid.y/z <= 65535, 48 KiB of dynamic shared memory
// unless cudaFuncSetAttribute opted the kernel in (up to 227 KiB), 48 KiB of static shared memory.
// Misuse aborts with the source line: a barrier that not all threads of the block reach (some exited, or
// wait at another barrier), a shuffle whose mask names an exited or missing lane, a deadlock.
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "cuda_emu.h"
#include "emu_race.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace dblocks::emu {
namespace {

constexpr int kWarp = 32;
constexpr size_t kStaticSmemLimit = 48 * 1024;
constexpr size_t kDynamicSmemDefault = 48 * 1024;
constexpr int kSmemOptinMax = 227 * 1024;  // an H100's cudaDevAttrMaxSharedMemoryPerBlockOptin
constexpr int kSmCount = 132;

enum Schedule { kForward = 0, kReverse = 1, kRandom = 2 };

struct Config {
    int schedule = kForward;
    uint64_t seed = 0;
    size_t stack_bytes = 256 * 1024;  // sanitizers need deep frames
};

Config& config() {
    static Config c = [] {
        Config c;
        if (const char* s = std::getenv("DBLOCKS_EMU_SCHEDULE")) {
            c.schedule = !std::strcmp(s, "reverse") ? kReverse : !std::strcmp(s, "random") ? kRandom : kForward;
        }
        if (const char* s = std::getenv("DBLOCKS_EMU_SEED")) c.seed = std::strtoull(s, nullptr, 10);
        return c;
    }();
    return c;
}

[[noreturn]] void fail(const char* fmt, ...) {
    std::fflush(stdout);
    std::fprintf(stderr, "dblocks cpu_emu: ");
    va_list ap;
    va_start(ap, fmt);
    std::vfprintf(stderr, fmt, ap);
    va_end(ap);
    std::fprintf(stderr, "\n");
    std::fflush(stderr);
    std::abort();
}

enum class State { kReady, kBarrier, kWarp, kDone };

struct Thread {
    ucontext_t ctx;
    char* stack = nullptr;
    State state = State::kReady;
    Site site{"", 0};  // where it waits
    uint3 idx;
    int linear = 0;
    // the pending warp exchange
    unsigned mask = 0;
    uint64_t payload = 0, result = 0;
    int src = 0;
    void* fake_stack = nullptr;
};

struct Warp {
    unsigned arrived = 0, mask = 0;
    bool is_shuffle = false;
    Site site{"", 0};
};

struct Block {
    std::vector<Thread> threads;
    std::vector<Warp> warps;
    unsigned exists_mask_last = 0;  // lanes that exist in the last warp
    int done = 0, at_barrier = 0;
    Site barrier_site{"", 0};
    int first_exited = -1;
    struct Array {
        const void* key;
        void* p;
        size_t bytes;
    };
    std::vector<Array> shared;
    void* dynamic = nullptr;
    size_t dynamic_bytes = 0, static_bytes = 0, smem_limit = 0;
};

struct Launch {
    void (*body)(void*);
    void* ctx;
    Block* block = nullptr;
    Thread* current = nullptr;
    ucontext_t scheduler;
    const void* sched_stack_bottom = nullptr;
    size_t sched_stack_size = 0;
    uint3 block_idx;
};

thread_local Launch* g_launch = nullptr;
thread_local cudaError_t g_last_error = cudaSuccess;
std::mutex g_attr_mutex;
std::map<const void*, int> g_max_dynamic_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel

// Fiber stacks, reused across launches; the lowest page of each is a guard.
struct StackPool {
    char* base = nullptr;
    size_t count = 0, bytes = 0;
    char* get(size_t i, size_t stack_bytes) {
        if (i >= count || stack_bytes != bytes) {
            if (base) munmap(base, count * bytes);
            count = std::max<size_t>(i + 1, 1024);
            bytes = stack_bytes;
            void* p = mmap(nullptr, count * bytes, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (p == MAP_FAILED) fail("cannot map %zu fiber stacks", count);
            base = static_cast<char*>(p);
            const size_t page = size_t(sysconf(_SC_PAGESIZE));
            for (size_t k = 0; k < count; ++k) mprotect(base + k * bytes, page, PROT_NONE);
            race::set_stack_range(base, count * bytes);
        }
        return base + i * bytes;
    }
};
thread_local StackPool g_stacks;

void describe(const Thread& t, char* out, size_t n) {
    std::snprintf(out, n, "thread (%u,%u,%u) of block (%u,%u,%u)", t.idx.x, t.idx.y, t.idx.z, blockIdx.x,
                  blockIdx.y, blockIdx.z);
}

// Back to the scheduler; returns when the scheduler resumes this thread.
void yield() {
    Launch& L = *g_launch;
    Thread* t = L.current;
#if EMU_ASAN
    __sanitizer_start_switch_fiber(&t->fake_stack, L.sched_stack_bottom, L.sched_stack_size);
#endif
    swapcontext(&t->ctx, &L.scheduler);
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(t->fake_stack, &L.sched_stack_bottom, &L.sched_stack_size);
#endif
}

void thread_exit_checks(Block& B, Thread& t) {
    char who[96];
    describe(t, who, sizeof who);
    if (B.at_barrier > 0)
        fail("%s exited while %d threads wait at __syncthreads() at %s:%d (a barrier only some threads reach)",
             who, B.at_barrier, B.barrier_site.file, B.barrier_site.line);
    Warp& w = B.warps[t.linear / kWarp];
    const unsigned bit = 1u << (t.linear % kWarp);
    if (w.arrived && (w.mask & bit))
        fail("%s (lane %d) exited while its warp waits for it at %s at %s:%d", who, t.linear % kWarp,
             w.is_shuffle ? "a shuffle" : "__syncwarp", w.site.file, w.site.line);
}

void fiber_main() {
    Launch& L = *g_launch;
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &L.sched_stack_bottom, &L.sched_stack_size);
#endif
    L.body(L.ctx);
    Block& B = *L.block;
    Thread& t = *L.current;
    thread_exit_checks(B, t);
    t.state = State::kDone;
    ++B.done;
    if (B.first_exited < 0) B.first_exited = t.linear;
#if EMU_ASAN
    __sanitizer_start_switch_fiber(nullptr, L.sched_stack_bottom, L.sched_stack_size);
#endif
    setcontext(&L.scheduler);
}

Block& current_block(Site site, const char* what) {
    if (!g_launch || !g_launch->current) fail("%s at %s:%d called outside a kernel", what, site.file, site.line);
    return *g_launch->block;
}

// A warp rendezvous of the lanes in `mask`; the last lane to arrive hands every lane its `src` lane's payload.
void warp_rendezvous(Site site, unsigned mask, bool is_shuffle) {
    Block& B = current_block(site, "a warp intrinsic");
    Thread& t = *g_launch->current;
    const int warp = t.linear / kWarp, lane = t.linear % kWarp;
    Warp& w = B.warps[warp];
    char who[96];
    describe(t, who, sizeof who);
    const unsigned exists = warp == int(B.warps.size()) - 1 ? B.exists_mask_last : 0xffffffffu;
    if (!(mask & (1u << lane)))
        fail("%s calls a warp intrinsic at %s:%d with a mask 0x%08x without its lane %d", who, site.file, site.line,
             mask, lane);
    if (mask & ~exists)
        fail("%s: the mask 0x%08x at %s:%d names lanes the block does not have", who, mask, site.file, site.line);
    for (int l = 0; l < kWarp; ++l) {
        if (!(mask & (1u << l))) continue;
        const Thread& o = B.threads[size_t(warp) * kWarp + l];
        if (o.state == State::kDone)
            fail("%s: %s at %s:%d names lane %d, which has exited", who, is_shuffle ? "a shuffle" : "__syncwarp",
                 site.file, site.line, l);
    }
    if (w.arrived == 0) {
        w.mask = mask;
        w.site = site;
        w.is_shuffle = is_shuffle;
    } else if (w.mask != mask || w.site.line != site.line || std::strcmp(w.site.file, site.file) ||
               w.is_shuffle != is_shuffle) {
        fail("%s reaches a warp intrinsic at %s:%d (mask 0x%08x) while lanes of its warp wait at %s:%d (mask "
             "0x%08x): diverged warp intrinsics",
             who, site.file, site.line, mask, w.site.file, w.site.line, w.mask);
    }
    w.arrived |= 1u << lane;
    t.state = State::kWarp;
    t.site = site;
    if (w.arrived == mask) {
        for (int l = 0; l < kWarp; ++l) {
            if (!(mask & (1u << l))) continue;
            Thread& o = B.threads[size_t(warp) * kWarp + l];
            if (is_shuffle) {
                const int src = (o.src >= 0 && o.src < kWarp) ? o.src : l;
                if (!(mask & (1u << src)))
                    fail("lane %d of warp %d reads lane %d in a shuffle at %s:%d, which is not in the mask 0x%08x",
                         l, warp, src, site.file, site.line, mask);
                o.result = B.threads[size_t(warp) * kWarp + src].payload;
            }
            o.state = State::kReady;
        }
        w.arrived = 0;
    }
    yield();
}

}  // namespace

int lane_id() { return g_launch && g_launch->current ? g_launch->current->linear % kWarp : 0; }

uint64_t shuffle(Site site, unsigned mask, uint64_t payload, int src) {
    current_block(site, "a shuffle");
    Thread& t = *g_launch->current;
    t.payload = payload;
    t.src = src;
    warp_rendezvous(site, mask, true);
    return t.result;
}

void syncwarp(Site site, unsigned mask) { warp_rendezvous(site, mask, false); }

void syncthreads(Site site) {
    Block& B = current_block(site, "__syncthreads()");
    Thread& t = *g_launch->current;
    char who[96];
    describe(t, who, sizeof who);
    if (B.first_exited >= 0)
        fail("%s reaches __syncthreads() at %s:%d after thread %d of its block exited (a barrier only some "
             "threads reach)",
             who, site.file, site.line, B.first_exited);
    if (B.at_barrier == 0) {
        B.barrier_site = site;
    } else if (B.barrier_site.line != site.line || std::strcmp(B.barrier_site.file, site.file)) {
        fail("%s reaches __syncthreads() at %s:%d while %d threads of its block wait at %s:%d", who, site.file,
             site.line, B.at_barrier, B.barrier_site.file, B.barrier_site.line);
    }
    ++B.at_barrier;
    t.state = State::kBarrier;
    t.site = site;
    if (B.at_barrier == int(B.threads.size())) {
        for (Thread& o : B.threads) o.state = State::kReady;
        B.at_barrier = 0;
        race::barrier();
    }
    yield();
}

void* shared_array(const void* key, size_t bytes, Site site) {
    Block& B = current_block(site, "a __shared__ declaration");
    for (const auto& a : B.shared)
        if (a.key == key) return a.p;
    B.static_bytes += bytes;
    if (B.static_bytes > kStaticSmemLimit)
        fail("%zu bytes of static shared memory at %s:%d: above the 48 KiB a block may declare", B.static_bytes,
             site.file, site.line);
    if (B.static_bytes + B.dynamic_bytes > B.smem_limit)
        fail("%zu bytes of static + %zu of dynamic shared memory at %s:%d: above the kernel's limit of %zu",
             B.static_bytes, B.dynamic_bytes, site.file, site.line, B.smem_limit);
    void* p = std::malloc(bytes ? bytes : 1);
    std::memset(p, 0xff, bytes);
    B.shared.push_back({key, p, bytes});
    return p;
}

void* dynamic_shared(Site site) {
    Block& B = current_block(site, "extern __shared__");
    return B.dynamic;
}

cudaError_t launch_erased(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes, void (*body)(void*),
                          void* ctx) {
    if (g_launch) fail("a kernel launch from inside a kernel (dynamic parallelism is not emulated)");
    const uint64_t threads = uint64_t(block.x) * block.y * block.z;
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0 || threads > 1024 || block.x > 1024 ||
        block.y > 1024 || block.z > 64 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
        return g_last_error = cudaErrorInvalidConfiguration;
    size_t smem_limit = kDynamicSmemDefault;
    {
        std::lock_guard<std::mutex> lock(g_attr_mutex);
        auto it = g_max_dynamic_smem.find(kernel);
        if (it != g_max_dynamic_smem.end()) smem_limit = std::max<size_t>(smem_limit, size_t(it->second));
    }
    if (smem_bytes > smem_limit) return g_last_error = cudaErrorInvalidValue;

    const Config cfg = config();
    static std::atomic<uint64_t> launches{0};
    std::mt19937_64 rng(cfg.seed * 0x9E3779B97F4A7C15ull + launches.fetch_add(1));
    const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
    std::vector<uint64_t> block_order(blocks);
    for (uint64_t i = 0; i < blocks; ++i) block_order[i] = cfg.schedule == kReverse ? blocks - 1 - i : i;
    if (cfg.schedule == kRandom) std::shuffle(block_order.begin(), block_order.end(), rng);

    Launch L;
    L.body = body;
    L.ctx = ctx;
    g_launch = &L;
    gridDim = grid;
    blockDim = block;
    race::launch_begin();
    std::vector<int> order(threads);
    for (uint64_t b : block_order) {
        Block B;
        B.threads.resize(threads);
        B.warps.resize((threads + kWarp - 1) / kWarp);
        B.exists_mask_last = threads % kWarp ? (1u << (threads % kWarp)) - 1 : 0xffffffffu;
        B.smem_limit = smem_limit;
        B.dynamic_bytes = smem_bytes;
        B.dynamic = std::malloc(smem_bytes ? smem_bytes : 1);
        std::memset(B.dynamic, 0xff, smem_bytes);
        blockIdx = uint3{unsigned(b % grid.x), unsigned(b / grid.x % grid.y), unsigned(b / grid.x / grid.y)};
        L.block = &B;
        race::block_begin(b);
        for (uint64_t i = 0; i < threads; ++i) {
            Thread& t = B.threads[i];
            t.linear = int(i);
            t.idx = uint3{unsigned(i % block.x), unsigned(i / block.x % block.y), unsigned(i / block.x / block.y)};
            t.stack = g_stacks.get(i, cfg.stack_bytes);
            getcontext(&t.ctx);
            t.ctx.uc_stack.ss_sp = t.stack;
            t.ctx.uc_stack.ss_size = cfg.stack_bytes;
            t.ctx.uc_link = nullptr;
            makecontext(&t.ctx, fiber_main, 0);
        }
        for (uint64_t i = 0; i < threads; ++i) order[i] = cfg.schedule == kReverse ? int(threads - 1 - i) : int(i);
        while (B.done < int(threads)) {
            if (cfg.schedule == kRandom) std::shuffle(order.begin(), order.end(), rng);
            bool progress = false;
            for (int i : order) {
                Thread& t = B.threads[size_t(i)];
                if (t.state != State::kReady) continue;
                progress = true;
                L.current = &t;
                threadIdx = t.idx;
                race::thread_switch(i);
#if EMU_ASAN
                void* fake = nullptr;
                __sanitizer_start_switch_fiber(&fake, t.stack, cfg.stack_bytes);
#endif
                swapcontext(&L.scheduler, &t.ctx);
#if EMU_ASAN
                __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
                L.current = nullptr;
                race::thread_switch(-1);
            }
            if (!progress) {
                const Thread* w = nullptr;
                for (const Thread& t : B.threads)
                    if (t.state != State::kDone) w = &t;
                fail("deadlock in block (%u,%u,%u): %d of %llu threads exited, thread %d waits at %s:%d",
                     blockIdx.x, blockIdx.y, blockIdx.z, B.done, (unsigned long long)threads, w->linear,
                     w->site.file, w->site.line);
            }
        }
        race::block_end(B.dynamic, smem_bytes);
        for (const auto& a : B.shared) {
            race::forget(a.p, a.bytes);
            std::free(a.p);
        }
        std::free(B.dynamic);
    }
    race::launch_end();
    g_launch = nullptr;
    return cudaSuccess;
}

}  // namespace dblocks::emu

// ---------------------------------------------------------------------------------------------------------
// The part of the CUDA runtime API that csrc/ calls, answered as an H100 would.

using dblocks::emu::g_last_error;

extern "C" {

cudaError_t cudaGetLastError(void) {
    const cudaError_t e = g_last_error;
    g_last_error = cudaSuccess;
    return e;
}

cudaError_t cudaPeekAtLastError(void) { return g_last_error; }

cudaError_t cudaGetDevice(int* device) {
    *device = 0;
    return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
    if (device != 0) return g_last_error = cudaErrorInvalidDevice;
    switch (attr) {
        case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = dblocks::emu::kSmemOptinMax; return cudaSuccess;
        case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 * 1024; return cudaSuccess;
        case cudaDevAttrMultiProcessorCount: *value = dblocks::emu::kSmCount; return cudaSuccess;
        case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
        default: return g_last_error = cudaErrorInvalidValue;
    }
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
    if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return g_last_error = cudaErrorInvalidValue;
    if (value < 0 || value > dblocks::emu::kSmemOptinMax) return g_last_error = cudaErrorInvalidValue;
    std::lock_guard<std::mutex> lock(dblocks::emu::g_attr_mutex);
    dblocks::emu::g_max_dynamic_smem[func] = value;
    return cudaSuccess;
}

const char* cudaGetErrorName(cudaError_t error) {
    switch (error) {
        case cudaSuccess: return "cudaSuccess";
        case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
        case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
        case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
        default: return "cudaErrorUnknown";
    }
}

const char* cudaGetErrorString(cudaError_t error) {
    switch (error) {
        case cudaSuccess: return "no error";
        case cudaErrorInvalidValue: return "invalid argument";
        case cudaErrorInvalidConfiguration: return "invalid configuration argument";
        case cudaErrorInvalidDevice: return "invalid device ordinal";
        default: return "unknown error";
    }
}

cudaError_t cudaRuntimeGetVersion(int* version) {
    *version = CUDART_VERSION;
    return cudaSuccess;
}

// For the tests: 0 forward, 1 reverse, 2 random (with `seed`), for every launch that follows.
void dblocks_emu_set_schedule(int schedule, uint64_t seed) {
    dblocks::emu::config().schedule = schedule;
    dblocks::emu::config().seed = seed;
}

}  // extern "C"
