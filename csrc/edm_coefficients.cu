// EDM preconditioning coefficients: see dblocks_edm_coefficients_f32 in dblocks/ops.h.
#include <cmath>
#include <cstdint>

#include "dblocks/ops.h"
#include "launch.cuh"
#include "status.h"

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = dblocks::grid_cap(65536);  // beyond this a grid-stride loop covers the rest

// float64 inside: the result is within about 0.5 ulp of float32, whatever sigma is.
__global__ void edm_coefficients_kernel(const float* sigma, int64_t n, double sd, float* c_skip,
                                        float* c_out, float* c_in, float* c_noise,
                                        float* weight) {
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
        const double s = sigma[i];  // read before any write: an output may alias sigma
        const double total = s * s + sd * sd;
        const double inv_norm = rsqrt(total);
        if (c_skip) c_skip[i] = float(sd * sd / total);
        if (c_out) c_out[i] = float(s * sd * inv_norm);
        if (c_in) c_in[i] = float(inv_norm);
        if (c_noise) c_noise[i] = float(0.25 * log(s));
        if (weight) weight[i] = float(total / ((s * sd) * (s * sd)));
    }
}

}  // namespace

extern "C" int dblocks_edm_coefficients_f32(const float* sigma, int64_t n, float sigma_data,
                                            float* c_skip, float* c_out, float* c_in,
                                            float* c_noise, float* weight, void* stream) {
    if (n < 0 || (sigma == nullptr && n > 0) || !(sigma_data > 0.0f) || !std::isfinite(sigma_data))
        return DBLOCKS_ERR_INVALID_ARGUMENT;
    if (n == 0 || !(c_skip || c_out || c_in || c_noise || weight)) return DBLOCKS_OK;

    const int64_t blocks = (n + kThreads - 1) / kThreads;
    const unsigned grid = unsigned(blocks < kMaxBlocks ? blocks : kMaxBlocks);
    dblocks::launch(edm_coefficients_kernel, grid, kThreads, 0, static_cast<cudaStream_t>(stream), sigma, n,
                    double(sigma_data), c_skip, c_out, c_in, c_noise, weight);
    return dblocks::check_launch();
}
