// The race check of the CPU emulator, with the GPU's rules: only __syncthreads orders the threads of a block,
// nothing orders two blocks of a launch, shuffles order no memory, a launch orders everything before it.
// Kernels compiled with -fsanitize=thread call the __tsan_* hooks that emu_race.cpp serves (no libtsan: its
// thread slots are too few for 256-thread blocks); the runtime tells it which thread runs.
#pragma once

#include <cstddef>
#include <cstdint>

namespace dblocks::emu::race {

void set_stack_range(const void* base, size_t bytes);  // fiber stacks: thread-private, never checked
void launch_begin();
void launch_end();
void block_begin(uint64_t block);
void block_end(const void* dynamic_smem, size_t bytes);
void forget(const void* p, size_t bytes);  // a shared array freed at the end of its block
void thread_switch(int thread);            // -1: the host (scheduler) runs
void barrier();                            // a __syncthreads of the running block completed

}  // namespace dblocks::emu::race
