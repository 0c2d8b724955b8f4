// AdaLN modulation (DiT), optionally behind the gated residual of AdaLN-Zero: see dblocks_adaln_forward and
// dblocks_adaln_backward in dblocks/ops.h.
//
// Forward: one warp per (n, t) row, kFwdWarps rows a block. Lane l owns the columns [l*V + k*32*V, +V), V
// elements being one 16-byte vector of T when D and the pointers allow it (else V = 1), so every access of a
// row is coalesced. A row of up to kFwdMaxVecs vectors a lane stays in registers between the three passes
// (sum, centered sum of squares, output); longer rows are read again (L1/L2 hits).
// Backward: block (n, c) walks chunk c of sample n's rows, one warp a row; dx (and dy) need only row
// reductions (warp shuffles). The column sums over t (dshift, dscale, dgate) are accumulated per warp in
// shared memory, summed over the block's warps into (N, chunks, D) float32 partials in the workspace, and a
// second kernel sums those over the chunks in a fixed order: deterministic, no atomics.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "dblocks/ops.h"
#include "dtype.cuh"
#include "launch.cuh"
#include "status.h"

namespace {

using dblocks::from_float;
using dblocks::to_float;

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kVecBytes = 16;           // the widest load a thread can issue
constexpr int kFwdWarps = 8;            // rows (warps) of a forward block
constexpr int kFwdMaxVecs = 16;         // forward row cache: at most 256 bytes of a row a lane
constexpr int kBwdMaxWarps = 8;         // warps of a backward block, fewer when shared memory is short
constexpr int kBwdMaxVecs = 8;          // backward row cache: x and dh, at most 2 x 128 bytes a lane
// Backward blocks in all: a few per SM (132 on an H100). A build may lower it (tests/cpu_emu does, to 3).
#ifdef DBLOCKS_BWD_TARGET_BLOCKS
constexpr int64_t kBwdTargetBlocks = DBLOCKS_BWD_TARGET_BLOCKS;
#else
constexpr int64_t kBwdTargetBlocks = 512;
#endif
constexpr int64_t kBwdMinRowsPerChunk = 4;    // a chunk's partials cost about as much as a row
constexpr int64_t kSmemDefaultBytes = 48 * 1024;  // dynamic shared memory without an opt-in
constexpr int kFinalizeWarps = 8;       // warps of a block of the final sum over chunks
constexpr int64_t kMaxBlocks = dblocks::grid_cap(int64_t(1) << 20);  // grid-stride loops cover the rest

// ---------------------------------------------------------------------------------------------------------
// Device helpers

// V consecutive elements, aligned to their size: a single vector load or store.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
    T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
    return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& v) {
    *reinterpret_cast<Pack<T, V>*>(p) = v;
}

// V modulation values as float32: one vector load when `vec` (their pointers and stride are aligned for
// it), else V scalar loads. They are re-read for every row of their sample: L1/L2 hits.
template <typename U, int V>
__device__ __forceinline__ void load_mod(const U* p, bool vec, float (&out)[V]) {
    if (vec) {
        const Pack<U, V> q = load_pack<U, V>(p);
#pragma unroll
        for (int i = 0; i < V; ++i) out[i] = to_float(q.v[i]);
    } else {
#pragma unroll
        for (int i = 0; i < V; ++i) out[i] = to_float(p[i]);
    }
}

// Sum over the warp, the same bits in every lane (each butterfly step adds the same two values).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
    return v;
}

// Calls f(k, col) for each of this lane's vectors of a row: columns [col, col + V), col = (k*32 + lane)*V.
// kVecs > 0: an unrolled loop over at most kVecs vectors (k is a compile-time index into a register
// cache); kVecs == 0: a plain loop over the whole row (k is always 0).
template <int kVecs, int V, typename F>
__device__ __forceinline__ void for_each_pack(int64_t D, int lane, F&& f) {
    if constexpr (kVecs > 0) {
#pragma unroll
        for (int k = 0; k < kVecs; ++k) {
            const int64_t col = (int64_t(k) * kWarpSize + lane) * V;
            if (col < D) f(k, col);
        }
    } else {
        for (int64_t col = int64_t(lane) * V; col < D; col += kWarpSize * V) f(0, col);
    }
}

// Shared-memory column sums: V consecutive floats, as float4 when V allows (then 16-byte aligned). With V = 8
// the lanes are 32 bytes apart: a 2-way bank conflict, cheap next to the global memory traffic.
template <int V>
__device__ __forceinline__ void smem_zero(float* s) {
    if constexpr (V % 4 == 0) {
#pragma unroll
        for (int q = 0; q < V / 4; ++q) reinterpret_cast<float4*>(s)[q] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    } else {
#pragma unroll
        for (int i = 0; i < V; ++i) s[i] = 0.0f;
    }
}

template <int V>
__device__ __forceinline__ void smem_add(float* s, const float (&v)[V]) {
    if constexpr (V % 4 == 0) {
#pragma unroll
        for (int q = 0; q < V / 4; ++q) {
            float4 a = reinterpret_cast<float4*>(s)[q];
            a.x += v[4 * q];
            a.y += v[4 * q + 1];
            a.z += v[4 * q + 2];
            a.w += v[4 * q + 3];
            reinterpret_cast<float4*>(s)[q] = a;
        }
    } else {
#pragma unroll
        for (int i = 0; i < V; ++i) s[i] += v[i];
    }
}

// ---------------------------------------------------------------------------------------------------------
// Forward

template <typename T, typename U, int V, int kVecs, bool kGated>
__global__ void __launch_bounds__(kFwdWarps * kWarpSize)
    adaln_forward_kernel(const T* __restrict__ x, const T* __restrict__ y, const U* __restrict__ gate,
                         const U* __restrict__ shift, const U* __restrict__ scale, T* __restrict__ x_new,
                         T* __restrict__ h, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                         int64_t rows, int64_t seq_len, int64_t D, int64_t mod_stride, bool mod_vec, float eps) {
    using P = Pack<T, V>;
    const int lane = threadIdx.x % kWarpSize;
    const int64_t row_stride = int64_t(gridDim.x) * kFwdWarps;
    for (int64_t row = int64_t(blockIdx.x) * kFwdWarps + threadIdx.x / kWarpSize; row < rows; row += row_stride) {
        const int64_t base = row * D;
        const int64_t mod_base = (row / seq_len) * mod_stride;
        P cache[kVecs > 0 ? kVecs : 1];

        // Pass 1: the row (gated: x + gate*y, rounded to T and stored as x_new) and its sum. The statistics
        // are those of x_new as stored, since the backward re-reads the stored x_new.
        float sum = 0.0f;
        for_each_pack<kVecs, V>(D, lane, [&](int k, int64_t col) {
            P v = load_pack<T, V>(x + base + col);
            if constexpr (kGated) {
                const P yv = load_pack<T, V>(y + base + col);
                float g[V];
                load_mod<U, V>(gate + mod_base + col, mod_vec, g);
#pragma unroll
                for (int i = 0; i < V; ++i) v.v[i] = from_float<T>(to_float(v.v[i]) + g[i] * to_float(yv.v[i]));
                store_pack<T, V>(x_new + base + col, v);
            }
            if constexpr (kVecs > 0) cache[k] = v;
#pragma unroll
            for (int i = 0; i < V; ++i) sum += to_float(v.v[i]);
        });
        const float mean = warp_sum(sum) / float(D);

        // The row again, from registers or from memory (x_new was written by this very thread).
        auto row_pack = [&](int k, int64_t col) -> P {
            if constexpr (kVecs > 0) {
                (void)col;
                return cache[k];
            } else {
                (void)k;
                return load_pack<T, V>((kGated ? x_new : x) + base + col);
            }
        };

        // Pass 2: the centered sum of squares. Two passes rather than E[x^2] - E[x]^2, which cancels
        // catastrophically when |mean| >> std (as in a residual stream that drifted).
        float sq = 0.0f;
        for_each_pack<kVecs, V>(D, lane, [&](int k, int64_t col) {
            const P v = row_pack(k, col);
#pragma unroll
            for (int i = 0; i < V; ++i) {
                const float d = to_float(v.v[i]) - mean;
                sq += d * d;
            }
        });
        const float rstd = 1.0f / sqrtf(warp_sum(sq) / float(D) + eps);

        // Pass 3: h = (x - mean) * rstd * (1 + scale) + shift.
        for_each_pack<kVecs, V>(D, lane, [&](int k, int64_t col) {
            const P v = row_pack(k, col);
            float sh[V], sc[V];
            load_mod<U, V>(shift + mod_base + col, mod_vec, sh);
            load_mod<U, V>(scale + mod_base + col, mod_vec, sc);
            P out;
#pragma unroll
            for (int i = 0; i < V; ++i)
                out.v[i] = from_float<T>((to_float(v.v[i]) - mean) * rstd * (1.0f + sc[i]) + sh[i]);
            store_pack<T, V>(h + base + col, out);
        });
        if (lane == 0) {
            if (mean_out) mean_out[row] = mean;
            if (rstd_out) rstd_out[row] = rstd;
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Backward

// Block (n, c), c < chunks, takes rows [c * rows_per_chunk, min(T, (c + 1) * rows_per_chunk)) of sample n;
// warp w of the block takes rows w, w + warps, ... of the chunk. Shared memory: for each warp, kSums arrays of
// D floats (the warp's column sums of dh, dh * xhat and, gated, dx * y). Each lane zeroes, accumulates and,
// until the barrier, touches only its own columns, so the row loop needs no synchronization; after it the
// block sums the warps in a fixed order into partials[j][n][c][:] (j = shift, scale, gate).
template <typename T, typename U, int V, int kVecs, bool kGated>
__global__ void __launch_bounds__(kBwdMaxWarps * kWarpSize)
    adaln_backward_kernel(const T* __restrict__ dh, const T* __restrict__ dx_new, const T* __restrict__ x,
                          const T* __restrict__ y, const U* __restrict__ gate, const U* __restrict__ scale,
                          const float* __restrict__ mean, const float* __restrict__ rstd, T* __restrict__ dx,
                          T* __restrict__ dy, float* __restrict__ partials, int64_t N, int64_t seq_len,
                          int64_t D, int64_t mod_stride, bool mod_vec, int64_t chunks, int64_t rows_per_chunk) {
    using P = Pack<T, V>;
    constexpr int kSums = kGated ? 3 : 2;
    DBLOCKS_DYNAMIC_SHARED(float4, smem_f4);  // float4: 16-byte aligned for smem_add
    float* smem = reinterpret_cast<float*>(smem_f4);

    const int lane = threadIdx.x % kWarpSize;
    const int warp = threadIdx.x / kWarpSize;
    const int warps = blockDim.x / kWarpSize;
    float* acc_shift = smem + int64_t(warp) * kSums * D;  // this warp's column sums
    float* acc_scale = acc_shift + D;
    float* acc_gate = acc_shift + 2 * D;  // gated only
    const int64_t blocks = N * chunks;
    const int64_t part_stride = blocks * D;  // one (N, chunks, D) array of partials

    for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {
        const int64_t n = b / chunks;
        const int64_t t_begin = (b - n * chunks) * rows_per_chunk;
        const int64_t t_end = min(seq_len, t_begin + rows_per_chunk);
        const U* scale_n = scale + n * mod_stride;
        const U* gate_n = kGated ? gate + n * mod_stride : nullptr;

        for_each_pack<kVecs, V>(D, lane, [&](int, int64_t col) {
#pragma unroll
            for (int j = 0; j < kSums; ++j) smem_zero<V>(acc_shift + j * D + col);
        });

        for (int64_t t = t_begin + warp; t < t_end; t += warps) {
            const int64_t row = n * seq_len + t;
            const int64_t base = row * D;
            const float mu = mean[row];
            const float rs = rstd[row];
            P x_cache[kVecs > 0 ? kVecs : 1];
            P dh_cache[kVecs > 0 ? kVecs : 1];

            // Pass 1: the row sums of g = dh * (1 + scale) and g * xhat; the column sums of dh, dh * xhat.
            float sum_g = 0.0f, sum_gx = 0.0f;
            for_each_pack<kVecs, V>(D, lane, [&](int k, int64_t col) {
                const P xv = load_pack<T, V>(x + base + col);
                const P dv = load_pack<T, V>(dh + base + col);
                if constexpr (kVecs > 0) {
                    x_cache[k] = xv;
                    dh_cache[k] = dv;
                }
                float sc[V], d[V], d_xhat[V];
                load_mod<U, V>(scale_n + col, mod_vec, sc);
#pragma unroll
                for (int i = 0; i < V; ++i) {
                    const float xhat = (to_float(xv.v[i]) - mu) * rs;
                    d[i] = to_float(dv.v[i]);
                    const float g = d[i] * (1.0f + sc[i]);
                    sum_g += g;
                    sum_gx += g * xhat;
                    d_xhat[i] = d[i] * xhat;
                }
                smem_add<V>(acc_shift + col, d);
                smem_add<V>(acc_scale + col, d_xhat);
            });
            const float mean_g = warp_sum(sum_g) / float(D);
            const float mean_gx = warp_sum(sum_gx) / float(D);

            // Pass 2: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ dx_new); gated: dy = dx * gate and
            // the column sums of dx * y.
            for_each_pack<kVecs, V>(D, lane, [&](int k, int64_t col) {
                P xv, dv;
                if constexpr (kVecs > 0) {
                    xv = x_cache[k];
                    dv = dh_cache[k];
                } else {
                    (void)k;
                    xv = load_pack<T, V>(x + base + col);
                    dv = load_pack<T, V>(dh + base + col);
                }
                float sc[V], grad[V];
                load_mod<U, V>(scale_n + col, mod_vec, sc);
#pragma unroll
                for (int i = 0; i < V; ++i) {
                    const float xhat = (to_float(xv.v[i]) - mu) * rs;
                    const float g = to_float(dv.v[i]) * (1.0f + sc[i]);
                    grad[i] = rs * (g - mean_g - xhat * mean_gx);
                }
                if constexpr (kGated) {
                    if (dx_new) {
                        const P e = load_pack<T, V>(dx_new + base + col);
#pragma unroll
                        for (int i = 0; i < V; ++i) grad[i] += to_float(e.v[i]);
                    }
                    const P yv = load_pack<T, V>(y + base + col);
                    float gt[V], dx_y[V];
                    load_mod<U, V>(gate_n + col, mod_vec, gt);
                    P dyv;
#pragma unroll
                    for (int i = 0; i < V; ++i) {
                        dx_y[i] = grad[i] * to_float(yv.v[i]);
                        dyv.v[i] = from_float<T>(grad[i] * gt[i]);
                    }
                    smem_add<V>(acc_gate + col, dx_y);
                    store_pack<T, V>(dy + base + col, dyv);
                }
                P dxv;
#pragma unroll
                for (int i = 0; i < V; ++i) dxv.v[i] = from_float<T>(grad[i]);
                store_pack<T, V>(dx + base + col, dxv);
            });
        }

        __syncthreads();  // every warp's column sums are complete
        float* part = partials + b * D;
        for (int64_t col = threadIdx.x; col < D; col += blockDim.x) {
#pragma unroll
            for (int j = 0; j < kSums; ++j) {
                float s = 0.0f;
                for (int w = 0; w < warps; ++w) s += smem[(int64_t(w) * kSums + j) * D + col];
                part[j * part_stride + col] = s;
            }
        }
        __syncthreads();  // the sums are read before the next chunk zeroes them
    }
}

// dshift, dscale (and dgate) [n, col] = the sums over the chunks c of partials[j][n][c][col]. Block (n, tile)
// takes 32 columns of sample n, lane = column (coalesced); warp w sums the chunks w, w + kFinalizeWarps, ...
// in increasing order, then warp j adds the warps' sums of output j in warp order. A fixed order throughout:
// deterministic, and chunks / kFinalizeWarps dependent loads a thread instead of chunks.
template <typename U, bool kGated>
__global__ void __launch_bounds__(kFinalizeWarps * kWarpSize)
    adaln_backward_finalize_kernel(const float* __restrict__ partials, U* __restrict__ dshift,
                                   U* __restrict__ dscale, U* __restrict__ dgate, int64_t N, int64_t chunks,
                                   int64_t D) {
    constexpr int kSums = kGated ? 3 : 2;
    DBLOCKS_SHARED(float, warp_sums, [kSums][kFinalizeWarps][kWarpSize]);
    const int lane = threadIdx.x % kWarpSize;
    const int warp = threadIdx.x / kWarpSize;
    const int64_t tiles = (D + kWarpSize - 1) / kWarpSize;
    const int64_t part_stride = N * chunks * D;  // one (N, chunks, D) array of partials

    for (int64_t b = blockIdx.x; b < N * tiles; b += gridDim.x) {
        const int64_t n = b / tiles;
        const int64_t col = (b - n * tiles) * kWarpSize + lane;
        float s[kSums] = {};
        if (col < D) {
            const float* p = partials + n * chunks * D + col;
#pragma unroll 4
            for (int64_t c = warp; c < chunks; c += kFinalizeWarps) {
#pragma unroll
                for (int j = 0; j < kSums; ++j) s[j] += p[j * part_stride + c * D];
            }
        }
#pragma unroll
        for (int j = 0; j < kSums; ++j) warp_sums[j][warp][lane] = s[j];
        __syncthreads();
        if (warp < kSums && col < D) {
            float total = 0.0f;
#pragma unroll
            for (int w = 0; w < kFinalizeWarps; ++w) total += warp_sums[warp][w][lane];
            U* out = warp == 0 ? dshift : warp == 1 ? dscale : dgate;
            out[n * D + col] = from_float<U>(total);
        }
        __syncthreads();  // warp_sums are read before the next tile overwrites them
    }
}

// ---------------------------------------------------------------------------------------------------------
// Host side

int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }

unsigned grid_size(int64_t blocks) { return unsigned(std::min(blocks, kMaxBlocks)); }

// Sizes whose element counts (N*T*D, N*mod_stride, the workspace's up to 3*N*T*D) fit int64 with room.
bool sizes_valid(int64_t N, int64_t T, int64_t D, int64_t mod_stride) {
    constexpr int64_t kLimit = INT64_MAX / 4;
    return N >= 1 && T >= 1 && D >= 1 && mod_stride >= D && T <= kLimit / N && D <= kLimit / (N * T) &&
           mod_stride <= kLimit / N;
}

// Calls f(std::integral_constant<int, kVecs>) with the smallest power of two kVecs >= needed (the row
// cache, in 16-byte vectors a lane), or with 0 (no cache, rows re-read) when that exceeds kMax.
template <int kMax, typename F>
int dispatch_vecs(int64_t needed, F&& f) {
    static_assert(kMax >= 8, "the buckets below go up to 8 at least");
    if (needed <= 1) return f(std::integral_constant<int, 1>{});
    if (needed <= 2) return f(std::integral_constant<int, 2>{});
    if (needed <= 4) return f(std::integral_constant<int, 4>{});
    if (needed <= 8) return f(std::integral_constant<int, 8>{});
    if constexpr (kMax >= 16) {
        if (needed <= 16) return f(std::integral_constant<int, 16>{});
    }
    return f(std::integral_constant<int, 0>{});
}

// The modulation is in the activations' dtype or in float32: 5 (T, U) pairs are compiled, not 9 (every
// instantiation costs build time, and a caller converts the small (N, D) vectors of any other pair).
bool types_valid(int dtype, int mod_dtype) {
    return dblocks::valid_dtype(dtype) && (mod_dtype == dtype || mod_dtype == DBLOCKS_FLOAT32);
}

// Calls f(T{}, U{}) for a pair that passed types_valid.
template <typename F>
int dispatch_types(int dtype, int mod_dtype, F&& f) {
    return dblocks::dispatch_dtype(dtype, [&](auto t_tag) {
        using T = decltype(t_tag);
        return mod_dtype == dtype ? f(T{}, T{}) : f(T{}, float{});
    });
}

struct ForwardArgs {
    const void *x, *y, *gate, *shift, *scale;
    void *x_new, *h;
    float *mean, *rstd;
    int64_t N, T, D, mod_stride;
    float eps;
    cudaStream_t stream;
};

template <typename T, typename U, int V, int kVecs, bool kGated>
int launch_forward(const ForwardArgs& a, bool mod_vec) {
    const int64_t rows = a.N * a.T;
    dblocks::launch(adaln_forward_kernel<T, U, V, kVecs, kGated>, grid_size(ceil_div(rows, kFwdWarps)),
                    kFwdWarps * kWarpSize, 0, a.stream, static_cast<const T*>(a.x), static_cast<const T*>(a.y),
                    static_cast<const U*>(a.gate), static_cast<const U*>(a.shift), static_cast<const U*>(a.scale),
                    static_cast<T*>(a.x_new), static_cast<T*>(a.h), a.mean, a.rstd, rows, a.T, a.D, a.mod_stride,
                    mod_vec, a.eps);
    return dblocks::check_launch();
}

template <typename T, typename U, bool kGated>
int forward(const ForwardArgs& a) {
    constexpr int V = kVecBytes / sizeof(T);
    // Vectors need every row start 16-byte aligned: D a multiple of V and aligned base pointers. The
    // modulation vectors are loaded as vectors too when their pointers and row stride allow it.
    if (a.D % V == 0 && dblocks::aligned(kVecBytes, a.x, a.y, a.x_new, a.h)) {
        const bool mod_vec = a.mod_stride % V == 0 && dblocks::aligned(V * sizeof(U), a.gate, a.shift, a.scale);
        return dispatch_vecs<kFwdMaxVecs>(ceil_div(a.D, kWarpSize * V), [&](auto vecs) {
            return launch_forward<T, U, V, decltype(vecs)::value, kGated>(a, mod_vec);
        });
    }
    return launch_forward<T, U, 1, 0, kGated>(a, true);
}

// The backward's split of T into chunks: about kBwdTargetBlocks blocks in all (a fixed target, not the
// device's SM count, so that the workspace size needs no device query), chunks of at least
// kBwdMinRowsPerChunk rows (or all T), then only as many chunks as that chunk length needs, so that none is
// empty. A function of N and T alone.
struct Chunking {
    int64_t chunks, rows_per_chunk;
};

Chunking backward_chunking(int64_t N, int64_t T) {
    const int64_t wanted = std::min(ceil_div(kBwdTargetBlocks, N), ceil_div(T, kBwdMinRowsPerChunk));
    const int64_t rows_per_chunk = ceil_div(T, wanted);
    return {ceil_div(T, rows_per_chunk), rows_per_chunk};
}

struct BackwardArgs {
    const void *dh, *dx_new, *x, *y, *gate, *scale;
    const float *mean, *rstd;
    void *dx, *dy, *dshift, *dscale, *dgate;
    float* workspace;
    int64_t N, T, D, mod_stride;
    cudaStream_t stream;
};

template <typename T, typename U, int V, int kVecs, bool kGated>
int launch_backward(const BackwardArgs& a, bool mod_vec) {
    constexpr int kSums = kGated ? 3 : 2;
    const Chunking ch = backward_chunking(a.N, a.T);
    // As many warps as fit the default 48 KiB of shared memory (and the chunk has rows); one at least.
    const int64_t warp_bytes = a.D * kSums * int64_t(sizeof(float));
    const int warps = int(std::max<int64_t>(
        1, std::min<int64_t>({kSmemDefaultBytes / warp_bytes, kBwdMaxWarps, ch.rows_per_chunk})));
    const int64_t smem_bytes = warps * warp_bytes;
    const auto kernel = adaln_backward_kernel<T, U, V, kVecs, kGated>;
    if (smem_bytes > kSmemDefaultBytes) {  // D above 4096 (gated) or 6144: opt in to more, if the GPU has it
        // Every caller sets the same value, the device's opt-in maximum, rather than its own size: two host
        // threads with different D could otherwise interleave set, set, launch and fail the first launch.
        int device = 0, optin = 0;
        cudaError_t err = cudaGetDevice(&device);
        if (err == cudaSuccess)
            err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
        if (err == cudaSuccess && smem_bytes > optin) err = cudaErrorInvalidValue;  // D too large for this GPU
        if (err == cudaSuccess)
            err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin);
        if (err != cudaSuccess) {
            cudaGetLastError();  // clear it, so that it does not fail the next launch's check
            return dblocks::record_cuda_error(err);
        }
    }
    dblocks::launch(kernel, grid_size(a.N * ch.chunks), warps * kWarpSize, size_t(smem_bytes), a.stream,
                    static_cast<const T*>(a.dh), static_cast<const T*>(a.dx_new), static_cast<const T*>(a.x),
                    static_cast<const T*>(a.y), static_cast<const U*>(a.gate), static_cast<const U*>(a.scale),
                    a.mean, a.rstd, static_cast<T*>(a.dx), static_cast<T*>(a.dy), a.workspace, a.N, a.T, a.D,
                    a.mod_stride, mod_vec, ch.chunks, ch.rows_per_chunk);
    if (const int code = dblocks::check_launch(); code != DBLOCKS_OK) return code;
    dblocks::launch(adaln_backward_finalize_kernel<U, kGated>, grid_size(a.N * ceil_div(a.D, kWarpSize)),
                    kFinalizeWarps * kWarpSize, 0, a.stream, a.workspace, static_cast<U*>(a.dshift),
                    static_cast<U*>(a.dscale), static_cast<U*>(a.dgate), a.N, ch.chunks, a.D);
    return dblocks::check_launch();
}

template <typename T, typename U, bool kGated>
int backward(const BackwardArgs& a) {
    constexpr int V = kVecBytes / sizeof(T);
    if (a.D % V == 0 && dblocks::aligned(kVecBytes, a.dh, a.dx_new, a.x, a.y, a.dx, a.dy)) {
        const bool mod_vec = a.mod_stride % V == 0 && dblocks::aligned(V * sizeof(U), a.gate, a.scale);
        return dispatch_vecs<kBwdMaxVecs>(ceil_div(a.D, kWarpSize * V), [&](auto vecs) {
            return launch_backward<T, U, V, decltype(vecs)::value, kGated>(a, mod_vec);
        });
    }
    return launch_backward<T, U, 1, 0, kGated>(a, true);
}

}  // namespace

extern "C" int dblocks_adaln_forward(const void* x, const void* y, const void* gate, const void* shift,
                                     const void* scale, void* x_new, void* h, float* mean, float* rstd,
                                     int64_t N, int64_t T, int64_t D, int64_t mod_stride, int dtype,
                                     int mod_dtype, float eps, void* stream) {
    const bool gated = y != nullptr;
    if (!sizes_valid(N, T, D, mod_stride) || !(eps > 0.0f) || !std::isfinite(eps) ||
        !types_valid(dtype, mod_dtype))
        return DBLOCKS_ERR_INVALID_ARGUMENT;
    if (!x || !shift || !scale || !h || (gated && (!gate || !x_new))) return DBLOCKS_ERR_INVALID_ARGUMENT;

    // Not gated: gate and x_new are ignored (passed on as null).
    const ForwardArgs a{x, y, gated ? gate : nullptr, shift, scale,
                        gated ? x_new : nullptr, h, mean, rstd,
                        N, T, D, mod_stride, eps, static_cast<cudaStream_t>(stream)};
    return dispatch_types(dtype, mod_dtype, [&](auto t_tag, auto u_tag) {
        using T_ = decltype(t_tag);
        using U_ = decltype(u_tag);
        return gated ? forward<T_, U_, true>(a) : forward<T_, U_, false>(a);
    });
}

extern "C" int64_t dblocks_adaln_backward_workspace(int64_t N, int64_t T, int64_t D, int gated) {
    if (!sizes_valid(N, T, D, D)) return 0;  // the backward rejects these sizes
    return N * backward_chunking(N, T).chunks * D * (gated ? 3 : 2);
}

extern "C" int dblocks_adaln_backward(const void* dh, const void* dx_new, const void* x, const void* y,
                                      const void* gate, const void* scale, const float* mean,
                                      const float* rstd, void* dx, void* dy, void* dshift, void* dscale,
                                      void* dgate, float* workspace, int64_t N, int64_t T, int64_t D,
                                      int64_t mod_stride, int dtype, int mod_dtype, void* stream) {
    const bool gated = y != nullptr;
    if (!sizes_valid(N, T, D, mod_stride) || !types_valid(dtype, mod_dtype)) return DBLOCKS_ERR_INVALID_ARGUMENT;
    if (!dh || !x || !scale || !mean || !rstd || !dx || !dshift || !dscale || !workspace ||
        (gated && (!gate || !dy || !dgate)))
        return DBLOCKS_ERR_INVALID_ARGUMENT;

    // Not gated: the gated-only pointers are ignored (passed on as null).
    const BackwardArgs a{dh, gated ? dx_new : nullptr, x, y, gated ? gate : nullptr, scale, mean, rstd,
                         dx, gated ? dy : nullptr, dshift, dscale, gated ? dgate : nullptr, workspace,
                         N, T, D, mod_stride, static_cast<cudaStream_t>(stream)};
    return dispatch_types(dtype, mod_dtype, [&](auto t_tag, auto u_tag) {
        using T_ = decltype(t_tag);
        using U_ = decltype(u_tag);
        return gated ? backward<T_, U_, true>(a) : backward<T_, U_, false>(a);
    });
}
