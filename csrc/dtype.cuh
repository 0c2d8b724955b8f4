// Element types behind the `int dtype` arguments of the C API, and the dispatch to templated kernels.
// Internal to dblocks_ops (not part of the public header).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "dblocks/ops.h"

namespace dblocks {

// Loads and stores in float32, whatever the storage type.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

inline bool valid_dtype(int dtype) {
    return dtype == DBLOCKS_FLOAT32 || dtype == DBLOCKS_BFLOAT16 || dtype == DBLOCKS_FLOAT16;
}

// Calls f(T{}) with T the storage type of `dtype` (which must be valid_dtype).
template <typename F>
auto dispatch_dtype(int dtype, F&& f) {
    switch (dtype) {
        case DBLOCKS_BFLOAT16: return f(__nv_bfloat16{});
        case DBLOCKS_FLOAT16: return f(__half{});
        default: return f(float{});
    }
}

// True when every pointer is aligned to `bytes` (null pointers count as aligned).
inline bool aligned(std::uintptr_t) { return true; }
template <typename... Ptrs>
inline bool aligned(std::uintptr_t bytes, const void* p, Ptrs... rest) {
    return (reinterpret_cast<std::uintptr_t>(p) % bytes == 0) && aligned(bytes, rest...);
}

}  // namespace dblocks
