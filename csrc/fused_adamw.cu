// One AdamW step over flat float32 buffers: see dblocks_fused_adamw_f32 in dblocks/ops.h.
//
// Memory bound: each element reads param, grad, exp_avg and exp_avg_sq (16 bytes) and writes param, exp_avg
// and exp_avg_sq (12 bytes, 14 with the bf16 copy), once each, with 16-byte vector accesses when the buffers
// allow. The per-step scalars (bias corrections, step size) are computed once on the host in float64 and
// passed as kernel arguments, so a new lr or step costs nothing. The element-wise math follows the operation
// order of torch.optim.AdamW (the single-tensor path), so results agree to fp32 rounding; FMA contraction is
// the only difference.
#include <cmath>
#include <cstdint>

#include "dblocks/ops.h"
#include "dtype.cuh"
#include "launch.cuh"
#include "status.h"

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = dblocks::grid_cap(8192);  // a grid-stride loop covers the rest (~60 an SM)

struct Step {
    float decay;      // 1 - lr * weight_decay
    float w1;         // 1 - beta1, the lerp weight of exp_avg
    float beta2;
    float w2;         // 1 - beta2
    float bc2_sqrt;   // sqrt(1 - beta2^step)
    float eps;
    float neg_step;   // -lr / (1 - beta1^step)
};

__device__ __forceinline__ void update(float& p, float g, float& m, float& v, const Step& s) {
    p = p * s.decay;
    // torch.lerp's formula: the weight (1 - beta1) is below 0.5 for any usual beta1
    m = s.w1 < 0.5f ? m + s.w1 * (g - m) : g - (g - m) * (1.0f - s.w1);
    v = v * s.beta2 + s.w2 * g * g;
    const float denom = sqrtf(v) / s.bc2_sqrt + s.eps;
    p = p + s.neg_step * (m / denom);
}

template <int V>
__global__ void __launch_bounds__(kThreads)
    adamw_kernel(float* __restrict__ param, const float* __restrict__ grad, float* __restrict__ exp_avg,
                 float* __restrict__ exp_avg_sq, __nv_bfloat16* __restrict__ param_bf16, int64_t n, Step s,
                 const float* __restrict__ grad_scale, const float* __restrict__ found_inf) {
    if (found_inf && *found_inf != 0.0f) return;  // the mixed-precision skip: leave every buffer as it is
    const float scale = grad_scale ? *grad_scale : 1.0f;
    const int64_t stride = int64_t(gridDim.x) * kThreads * V;
    for (int64_t i = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * V; i < n; i += stride) {
        if (V == 4 && i + 4 <= n) {
            float4 p = *reinterpret_cast<const float4*>(param + i);
            const float4 g = *reinterpret_cast<const float4*>(grad + i);
            float4 m = *reinterpret_cast<const float4*>(exp_avg + i);
            float4 v = *reinterpret_cast<const float4*>(exp_avg_sq + i);
            update(p.x, grad_scale ? g.x / scale : g.x, m.x, v.x, s);
            update(p.y, grad_scale ? g.y / scale : g.y, m.y, v.y, s);
            update(p.z, grad_scale ? g.z / scale : g.z, m.z, v.z, s);
            update(p.w, grad_scale ? g.w / scale : g.w, m.w, v.w, s);
            *reinterpret_cast<float4*>(param + i) = p;
            *reinterpret_cast<float4*>(exp_avg + i) = m;
            *reinterpret_cast<float4*>(exp_avg_sq + i) = v;
            if (param_bf16) {
                const __nv_bfloat162 lo = __floats2bfloat162_rn(p.x, p.y), hi = __floats2bfloat162_rn(p.z, p.w);
                uint2 packed;
                packed.x = *reinterpret_cast<const uint32_t*>(&lo);
                packed.y = *reinterpret_cast<const uint32_t*>(&hi);
                *reinterpret_cast<uint2*>(param_bf16 + i) = packed;
            }
        } else {  // the scalar path, and the tail of the vector path
            for (int64_t j = i; j < i + V && j < n; ++j) {
                float p = param[j], m = exp_avg[j], v = exp_avg_sq[j];
                update(p, grad_scale ? grad[j] / scale : grad[j], m, v, s);
                param[j] = p, exp_avg[j] = m, exp_avg_sq[j] = v;
                if (param_bf16) param_bf16[j] = __float2bfloat16_rn(p);
            }
        }
    }
}

bool finite_at_least_zero(double x) { return std::isfinite(x) && x >= 0.0f; }

}  // namespace

extern "C" int dblocks_fused_adamw_f32(float* param, const float* grad, float* exp_avg, float* exp_avg_sq,
                                       uint16_t* param_bf16, int64_t n, double lr, double beta1, double beta2,
                                       double eps, double weight_decay, int64_t step, const float* grad_scale,
                                       const float* found_inf, void* stream) {
    if (n < 0 || step < 1 || !(beta1 >= 0.0 && beta1 < 1.0) || !(beta2 >= 0.0 && beta2 < 1.0) ||
        !finite_at_least_zero(lr) || !finite_at_least_zero(eps) || !finite_at_least_zero(weight_decay) ||
        (n > 0 && (!param || !grad || !exp_avg || !exp_avg_sq)))
        return DBLOCKS_ERR_INVALID_ARGUMENT;
    if (n == 0) return DBLOCKS_OK;

    // As torch.optim.AdamW computes them: Python floats (float64), rounded to float32 where they meet a tensor.
    const double bc1 = 1.0 - std::pow(beta1, double(step));
    const double bc2 = 1.0 - std::pow(beta2, double(step));
    const Step s{float(1.0 - lr * weight_decay), float(1.0 - beta1), float(beta2), float(1.0 - beta2),
                 float(std::sqrt(bc2)),          float(eps),         float(-(lr / bc1))};

    auto* bf16 = reinterpret_cast<__nv_bfloat16*>(param_bf16);
    const auto st = static_cast<cudaStream_t>(stream);
    const bool vector = dblocks::aligned(16, param, grad, exp_avg, exp_avg_sq) && dblocks::aligned(8, bf16);
    const int64_t per_block = int64_t(kThreads) * (vector ? 4 : 1);
    const int64_t blocks = (n + per_block - 1) / per_block;
    const unsigned grid = unsigned(blocks < kMaxBlocks ? blocks : kMaxBlocks);
    dblocks::launch(vector ? adamw_kernel<4> : adamw_kernel<1>, grid, kThreads, 0, st, param, grad, exp_avg,
                    exp_avg_sq, bf16, n, s, grad_scale, found_inf);
    return dblocks::check_launch();
}
