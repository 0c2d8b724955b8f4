// EDM-weighted L2 loss and its backward: see dblocks_edm_l2_loss_* in dblocks/ops.h.
//
// Forward: a (chunks, N) grid; block (c, n) reads kChunk elements of z, f and y of sample n once, with 16-byte
// vector loads where the rows allow, writes one partial sum of (D - y)^2 and, when asked, r = 2 w (D - y) / M
// for the backward. One block then reduces the partials in a fixed order (no atomics: the loss is the same
// bit for bit on every run). Backward: dD = (g_loss / N + g_per[n]) r, scaled into dz, df and dy in one pass.
#include <cmath>
#include <cstdint>

#include "dblocks/ops.h"
#include "dtype.cuh"
#include "launch.cuh"
#include "status.h"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kChunk = 4096;       // elements of a sample one block handles: 16 KiB of each fp32 input
constexpr int64_t kMaxGridY = dblocks::grid_cap(65535);  // samples beyond: a loop over blockIdx.y

struct Coefficients {
    float c_skip, one_minus_c_skip, c_out;
    double w;
};

// Computed in float64 and rounded once; 1 - c_skip = sigma^2 / (sigma^2 + sd^2) is formed directly, never as
// a difference, so D - y stays accurate at small sigma (see `error` below).
__device__ __forceinline__ Coefficients coefficients(float sigma, double sd) {
    const double s = sigma, s2 = s * s, sd2 = sd * sd, den = s2 + sd2;
    return {float(sd2 / den), float(s2 / den), float(s * sd * rsqrt(den)), den / (s2 * sd2)};
}

// D - y = c_skip z + c_out f - y, regrouped as c_skip (z - y) + c_out f - (1 - c_skip) y: at small sigma
// c_skip z and y agree to ~sigma / |y|, and this order keeps those digits (w ~ 2.5e5 at sigma = 0.002 would
// magnify the cancellation of the textbook order).
__device__ __forceinline__ float error(const Coefficients& k, float z, float f, float y) {
    return k.c_skip * (z - y) + k.c_out * f - k.one_minus_c_skip * y;
}

// Sum over the block; the result is valid in thread 0. `shared` holds kWarps floats.
__device__ __forceinline__ float block_sum(float v, float* shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = threadIdx.x < kWarps ? shared[threadIdx.x] : 0.0f;
    if (warp == 0)
        for (int o = kWarps / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();  // `shared` may be reused right after
    return v;
}

// V elements of type T as one aligned vector (V * sizeof(T) is 16 bytes on the vector path, or V = 1).
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
    T v[V];
};

// Store a Vec at dst (aligned to its size). On the GPU a 16-byte Vec goes out as one 128-bit store of four
// packed 32-bit words: copying the struct compiled to 16-bit stores for __half/__nv_bfloat16 (class types)
// and mostly 32-bit ones for float. The CPU emulator, which leaves __CUDA_ARCH__ undefined, runs the plain
// copy.
#if defined(__CUDA_ARCH__)
__device__ __forceinline__ uint32_t word_at(const float* x) { return __float_as_uint(x[0]); }
__device__ __forceinline__ uint32_t word_at(const __half* x) {
    return uint32_t(__half_as_ushort(x[0])) | (uint32_t(__half_as_ushort(x[1])) << 16);
}
__device__ __forceinline__ uint32_t word_at(const __nv_bfloat16* x) {
    return uint32_t(__bfloat16_as_ushort(x[0])) | (uint32_t(__bfloat16_as_ushort(x[1])) << 16);
}
#endif

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* dst, const Vec<T, V>& v) {
#if defined(__CUDA_ARCH__)
    if constexpr (sizeof(T) * V == 16) {
        constexpr int P = 4 / sizeof(T);  // elements a word
        // inline PTX: nvcc split a plain uint4 store of these words into 32-bit ones
        asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(dst), "r"(word_at(v.v)),
                     "r"(word_at(v.v + P)), "r"(word_at(v.v + 2 * P)), "r"(word_at(v.v + 3 * P))
                     : "memory");
    } else
#endif
    {
        *reinterpret_cast<Vec<T, V>*>(dst) = v;
    }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    loss_forward_kernel(const T* __restrict__ z, const T* __restrict__ f, const T* __restrict__ y,
                        const float* __restrict__ sigma, float* __restrict__ r, float* __restrict__ partials,
                        int64_t N, int64_t M, int64_t chunks, double sd) {
    DBLOCKS_SHARED(float, shared, [kWarps]);
    const int64_t begin = int64_t(blockIdx.x) * kChunk;
    const int64_t end = begin + kChunk < M ? begin + kChunk : M;
    for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
        const Coefficients k = coefficients(sigma[n], sd);
        const float r_scale = float(2.0 * k.w / double(M));
        const int64_t row = n * M;
        float acc = 0.0f;
        for (int64_t i = begin + int64_t(threadIdx.x) * V; i < end; i += int64_t(kThreads) * V) {
            const auto zv = *reinterpret_cast<const Vec<T, V>*>(z + row + i);
            const auto fv = *reinterpret_cast<const Vec<T, V>*>(f + row + i);
            const auto yv = *reinterpret_cast<const Vec<T, V>*>(y + row + i);
            Vec<float, V> rv;
#pragma unroll
            for (int j = 0; j < V; ++j) {
                const float e = error(k, dblocks::to_float(zv.v[j]), dblocks::to_float(fv.v[j]),
                                      dblocks::to_float(yv.v[j]));
                acc += e * e;
                rv.v[j] = r_scale * e;
            }
            if (r) {
                // r rows are 16-byte aligned only when M * 4 is; store element by element otherwise
                if (V > 1 && M % 4 == 0 && V % 4 == 0) {
#pragma unroll
                    for (int j = 0; j < V; j += 4)
                        *reinterpret_cast<float4*>(r + row + i + j) =
                            make_float4(rv.v[j], rv.v[j + 1], rv.v[j + 2], rv.v[j + 3]);
                } else {
#pragma unroll
                    for (int j = 0; j < V; ++j) r[row + i + j] = rv.v[j];
                }
            }
        }
        acc = block_sum(acc, shared);
        if (threadIdx.x == 0) partials[n * chunks + blockIdx.x] = acc;
    }
}

// One block: per_sample[n] = w * (sum of sample n's partials) / M, loss = mean of per_sample, in fixed order.
__global__ void __launch_bounds__(kThreads)
    loss_reduce_kernel(const float* __restrict__ partials, const float* __restrict__ sigma,
                       float* __restrict__ per_sample, float* __restrict__ loss, int64_t N, int64_t M,
                       int64_t chunks, double sd) {
    DBLOCKS_SHARED(float, shared, [kWarps]);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int64_t n = warp; n < N; n += kWarps) {
        float acc = 0.0f;
        for (int64_t c = lane; c < chunks; c += 32) acc += partials[n * chunks + c];
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if (lane == 0) per_sample[n] = float(coefficients(sigma[n], sd).w * double(acc) / double(M));
    }
    __syncthreads();  // per_sample is written by other warps: make it visible to the whole block
    float total = 0.0f;
    for (int64_t n = threadIdx.x; n < N; n += kThreads) total += per_sample[n];
    total = block_sum(total, shared);
    if (threadIdx.x == 0) *loss = total / float(N);
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    loss_backward_kernel(const float* __restrict__ r, const float* __restrict__ sigma,
                         const float* __restrict__ g_loss, const float* __restrict__ g_per, int64_t g_per_stride,
                         T* __restrict__ dz, T* __restrict__ df, T* __restrict__ dy, int64_t N, int64_t M,
                         double sd) {
    const int64_t begin = int64_t(blockIdx.x) * kChunk;
    const int64_t end = begin + kChunk < M ? begin + kChunk : M;
    const float from_loss = g_loss ? *g_loss / float(N) : 0.0f;
    for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
        const Coefficients k = coefficients(sigma[n], sd);
        const float coef = from_loss + (g_per ? g_per[n * g_per_stride] : 0.0f);
        const int64_t row = n * M;
        for (int64_t i = begin + int64_t(threadIdx.x) * V; i < end; i += int64_t(kThreads) * V) {
            float rv[V];
            if (V % 4 == 0) {  // the vector path: r + row + i is 16-byte aligned
#pragma unroll
                for (int j = 0; j < V; j += 4) {
                    const float4 q = *reinterpret_cast<const float4*>(r + row + i + j);
                    rv[j] = q.x, rv[j + 1] = q.y, rv[j + 2] = q.z, rv[j + 3] = q.w;
                }
            } else {
#pragma unroll
                for (int j = 0; j < V; ++j) rv[j] = r[row + i + j];
            }
            Vec<T, V> zv, fv, yv;
#pragma unroll
            for (int j = 0; j < V; ++j) {
                const float d = coef * rv[j];
                zv.v[j] = dblocks::from_float<T>(k.c_skip * d);
                fv.v[j] = dblocks::from_float<T>(k.c_out * d);
                yv.v[j] = dblocks::from_float<T>(-d);
            }
            if (dz) store_vec(dz + row + i, zv);
            if (df) store_vec(df + row + i, fv);
            if (dy) store_vec(dy + row + i, yv);
        }
    }
}

int64_t num_chunks(int64_t M) { return (M + kChunk - 1) / kChunk; }

dim3 grid_of(int64_t N, int64_t M) {
    return dim3(unsigned(num_chunks(M)), unsigned(N < kMaxGridY ? N : kMaxGridY));
}

bool valid_shape(int64_t N, int64_t M, float sigma_data, int dtype) {
    // chunks go in grid.x (at most 2^31 - 1): M up to 8.8e12 elements a sample
    return N >= 1 && M >= 1 && num_chunks(M) < (int64_t(1) << 31) && sigma_data > 0.0f &&
           std::isfinite(sigma_data) && dblocks::valid_dtype(dtype);
}

}  // namespace

extern "C" int64_t dblocks_edm_l2_loss_workspace(int64_t N, int64_t M) {
    return N >= 1 && M >= 1 ? N * num_chunks(M) : 0;
}

extern "C" int dblocks_edm_l2_loss_forward(const void* z, const void* f, const void* y, const float* sigma,
                                           float* per_sample, float* loss, float* r, float* workspace,
                                           int64_t N, int64_t M, float sigma_data, int dtype, void* stream) {
    if (!valid_shape(N, M, sigma_data, dtype) || !z || !f || !y || !sigma || !per_sample || !loss || !workspace)
        return DBLOCKS_ERR_INVALID_ARGUMENT;
    const auto s = static_cast<cudaStream_t>(stream);
    const int64_t chunks = num_chunks(M);
    const int code = dblocks::dispatch_dtype(dtype, [&](auto tag) {
        using T = decltype(tag);
        constexpr int V = 16 / sizeof(T);
        // vector loads need every row start 16-byte aligned: M a multiple of V and aligned base pointers
        if (M % V == 0 && dblocks::aligned(16, z, f, y, r))
            dblocks::launch(loss_forward_kernel<T, V>, grid_of(N, M), kThreads, 0, s, static_cast<const T*>(z),
                            static_cast<const T*>(f), static_cast<const T*>(y), sigma, r, workspace, N, M, chunks,
                            double(sigma_data));
        else
            dblocks::launch(loss_forward_kernel<T, 1>, grid_of(N, M), kThreads, 0, s, static_cast<const T*>(z),
                            static_cast<const T*>(f), static_cast<const T*>(y), sigma, r, workspace, N, M, chunks,
                            double(sigma_data));
        return dblocks::check_launch();
    });
    if (code != DBLOCKS_OK) return code;
    dblocks::launch(loss_reduce_kernel, 1, kThreads, 0, s, workspace, sigma, per_sample, loss, N, M, chunks,
                    double(sigma_data));
    return dblocks::check_launch();
}

extern "C" int dblocks_edm_l2_loss_backward(const float* r, const float* sigma, const float* g_loss,
                                            const float* g_per, int64_t g_per_stride, void* dz, void* df,
                                            void* dy, int64_t N, int64_t M, float sigma_data, int dtype,
                                            void* stream) {
    if (!valid_shape(N, M, sigma_data, dtype) || !r || !sigma || g_per_stride < 0)
        return DBLOCKS_ERR_INVALID_ARGUMENT;
    if (!dz && !df && !dy) return DBLOCKS_OK;
    const auto s = static_cast<cudaStream_t>(stream);
    return dblocks::dispatch_dtype(dtype, [&](auto tag) {
        using T = decltype(tag);
        constexpr int V = 16 / sizeof(T);
        if (M % V == 0 && dblocks::aligned(16, r, dz, df, dy))
            dblocks::launch(loss_backward_kernel<T, V>, grid_of(N, M), kThreads, 0, s, r, sigma, g_loss, g_per,
                            g_per_stride, static_cast<T*>(dz), static_cast<T*>(df), static_cast<T*>(dy), N, M,
                            double(sigma_data));
        else
            dblocks::launch(loss_backward_kernel<T, 1>, grid_of(N, M), kThreads, 0, s, r, sigma, g_loss, g_per,
                            g_per_stride, static_cast<T*>(dz), static_cast<T*>(df), static_cast<T*>(dy), N, M,
                            double(sigma_data));
        return dblocks::check_launch();
    });
}
