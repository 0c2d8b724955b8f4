// The one way kernels of dblocks_ops are launched and declare shared memory, so that the same sources build
// for a GPU (nvcc) and for the CPU emulator of tests/cpu_emu (g++, -DDBLOCKS_CPU_EMULATION), with no text
// rewriting: only this header differs between the two builds.
//   dblocks::launch(kernel, grid, block, smem_bytes, stream, args...)   kernel<<<grid, block, smem, stream>>>
//   DBLOCKS_SHARED(float, name, [8][32]);     a static __shared__ array
//   DBLOCKS_DYNAMIC_SHARED(float4, name);     the launch's dynamic shared memory, as `name[]`
// Grid caps: every kernel's maximum grid goes through dblocks::grid_cap, which a build may lower with
// -DDBLOCKS_GRID_CAP=n so that small inputs already run the grid-stride loops (tests/cpu_emu does, with 2).
#pragma once

#include <cstdint>

#ifdef DBLOCKS_CPU_EMULATION
#include "cuda_emu.h"  // tests/cpu_emu: threadIdx, __syncthreads, shuffles and launches on CPU fibers
#else
#include <cuda_runtime.h>

#include <utility>

#define DBLOCKS_SHARED(type, name, dims) __shared__ type name dims
#define DBLOCKS_DYNAMIC_SHARED(type, name) extern __shared__ type name[]

namespace dblocks {

// Arguments are converted to the kernel's parameter types here, as the <<<>>> syntax would do.
template <typename... Params, typename... Args>
inline void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                   Args&&... args) {
    kernel<<<grid, block, smem_bytes, stream>>>(static_cast<Params>(std::forward<Args>(args))...);
}

}  // namespace dblocks
#endif

namespace dblocks {

// `cap`, the kernel's own maximum grid, or the build's DBLOCKS_GRID_CAP if that is lower.
constexpr int64_t grid_cap(int64_t cap) {
#ifdef DBLOCKS_GRID_CAP
    return cap < int64_t(DBLOCKS_GRID_CAP) ? cap : int64_t(DBLOCKS_GRID_CAP);
#else
    return cap;
#endif
}

}  // namespace dblocks
