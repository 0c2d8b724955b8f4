// The device side of the CPU emulator: what csrc/launch.cuh includes instead of the CUDA launch machinery when
// csrc/ is compiled by g++ with -DDBLOCKS_CPU_EMULATION (the CUDA 13 headers in host mode give __half,
// __nv_bfloat16 with NVIDIA's own conversions, float4, dim3 and the runtime's types).
//
// Every thread of a block runs as a fiber (emu_runtime.cpp). __syncthreads and the warp shuffles are real
// rendezvous of those fibers; misuse (a barrier some threads never reach, a shuffle naming an exited lane)
// aborts with the file and line. Shared memory is a fresh NaN-filled allocation per array and block.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#define __launch_bounds__(...)

// The built-in variables: set by the runtime before it resumes a thread's fiber.
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

namespace dblocks::emu {

struct Site {
    const char* file;
    int line;
};

void syncthreads(Site site);
void syncwarp(Site site, unsigned mask);
// One rendezvous of the lanes in `mask`: returns the 8-byte payload of lane `src` (a lane outside [0, 32)
// or, for up/down, outside this lane's `width` segment, reads its own payload, as the hardware does).
uint64_t shuffle(Site site, unsigned mask, uint64_t payload, int src);
int lane_id();

template <typename T>
T shfl_as(Site site, unsigned mask, T v, int src) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffles move at most 8 bytes");
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    bits = shuffle(site, mask, bits, src);
    std::memcpy(&v, &bits, sizeof(T));
    return v;
}

template <typename T>
T shfl_sync(Site site, unsigned mask, T v, int src, int width = 32) {
    const int lane = lane_id();
    return shfl_as(site, mask, v, (lane & ~(width - 1)) + (src & (width - 1)));
}
template <typename T>
T shfl_xor_sync(Site site, unsigned mask, T v, int lane_mask, int width = 32) {
    const int lane = lane_id();
    const int src = lane ^ lane_mask;
    return shfl_as(site, mask, v, (src & ~(width - 1)) == (lane & ~(width - 1)) ? src : lane);
}
template <typename T>
T shfl_down_sync(Site site, unsigned mask, T v, unsigned delta, int width = 32) {
    const int lane = lane_id();
    const int src = lane + int(delta);
    return shfl_as(site, mask, v, (src & ~(width - 1)) == (lane & ~(width - 1)) ? src : lane);
}
template <typename T>
T shfl_up_sync(Site site, unsigned mask, T v, unsigned delta, int width = 32) {
    const int lane = lane_id();
    const int src = lane - int(delta);
    return shfl_as(site, mask, v, src >= (lane & ~(width - 1)) ? src : lane);
}

// Shared memory of the running block: one allocation per declaration (keyed by `key`, a static of the
// declaring function), filled with NaN bytes (0xff: NaN in fp32, fp16 and bf16).
void* shared_array(const void* key, size_t bytes, Site site);
void* dynamic_shared(Site site);

// Launches: the host calls run `body(ctx)` once per thread of every block.
cudaError_t launch_erased(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes, void (*body)(void*),
                          void* ctx);

}  // namespace dblocks::emu

#define __syncthreads() ::dblocks::emu::syncthreads({__FILE__, __LINE__})
#define __syncwarp(...) ::dblocks::emu::syncwarp({__FILE__, __LINE__}, __VA_ARGS__)
#define __shfl_sync(...) ::dblocks::emu::shfl_sync({__FILE__, __LINE__}, __VA_ARGS__)
#define __shfl_xor_sync(...) ::dblocks::emu::shfl_xor_sync({__FILE__, __LINE__}, __VA_ARGS__)
#define __shfl_down_sync(...) ::dblocks::emu::shfl_down_sync({__FILE__, __LINE__}, __VA_ARGS__)
#define __shfl_up_sync(...) ::dblocks::emu::shfl_up_sync({__FILE__, __LINE__}, __VA_ARGS__)

#define DBLOCKS_SHARED(type, name, dims)                                                                   \
    using name##_emu_t = type dims;                                                                        \
    static const char name##_emu_key = 0;                                                                  \
    name##_emu_t& name = *static_cast<name##_emu_t*>(                                                     \
        ::dblocks::emu::shared_array(&name##_emu_key, sizeof(name##_emu_t), {__FILE__, __LINE__}))
#define DBLOCKS_DYNAMIC_SHARED(type, name) \
    type* const name = static_cast<type*>(::dblocks::emu::dynamic_shared({__FILE__, __LINE__}))

// cuda_runtime.h's typed overload, which it declares only for nvcc.
template <typename... P>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
    return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}

// Device math the CUDA headers declare only for nvcc.
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
template <typename A, typename B>
inline auto min(A a, B b) -> std::common_type_t<A, B> {
    return b < a ? b : a;
}
template <typename A, typename B>
inline auto max(A a, B b) -> std::common_type_t<A, B> {
    return a < b ? b : a;
}

namespace dblocks {

// The emulated <<<grid, block, smem, stream>>>: the arguments are converted to the kernel's parameter types
// once, and every thread calls the kernel with its own copy, as on a GPU. The stream is ignored: the launch
// runs to completion before it returns (a stream orders launches anyway).
template <typename... Params, typename... Args>
inline void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                   Args&&... args) {
    (void)stream;
    struct Ctx {
        void (*kernel)(Params...);
        std::tuple<std::decay_t<Params>...> params;
    } ctx{kernel, std::tuple<std::decay_t<Params>...>(static_cast<Params>(std::forward<Args>(args))...)};
    auto body = [](void* p) {
        auto* c = static_cast<Ctx*>(p);
        std::apply(c->kernel, c->params);
    };
    emu::launch_erased(reinterpret_cast<const void*>(kernel), grid, block, smem_bytes, body, &ctx);
}

}  // namespace dblocks
