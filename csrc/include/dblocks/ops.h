/*
 * dblocks/ops.h: C API of the dblocks_fast CUDA kernels (library dblocks_ops).
 *
 * Plain C99, usable from C, C++ and ctypes/cffi; it needs no CUDA header. Every kernel entry
 * point takes raw CUDA device pointers and a stream given as `void*` (a cudaStream_t; NULL is
 * the legacy default stream), so any framework can call it. Kernels run asynchronously on that
 * stream: a fault inside a kernel shows up at the next synchronizing CUDA call, not here.
 * Entry points return 0 (DBLOCKS_OK) or a dblocks_status code; they are thread-safe.
 */
#ifndef DBLOCKS_OPS_H
#define DBLOCKS_OPS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Version of this API: major * 10000 + minor * 100 + patch (0.1.0 -> 100). */
#define DBLOCKS_VERSION 100

typedef enum dblocks_status {
    DBLOCKS_OK = 0,
    DBLOCKS_ERR_INVALID_ARGUMENT = 1, /* a check below failed; no CUDA call was made */
    DBLOCKS_ERR_CUDA = 2              /* the CUDA runtime failed; see dblocks_last_cuda_error() */
} dblocks_status;

/* DBLOCKS_VERSION of the compiled library (compare with the header's to detect a mismatch). */
int dblocks_version(void);

/* CUDA runtime version the library links statically, as cudaRuntimeGetVersion reports it
 * (e.g. 13000 for 13.0). Needs no GPU and no driver. */
int dblocks_cuda_runtime_version(void);

/* Static English text for a dblocks_status code ("unknown error code" for any other value). */
const char* dblocks_error_string(int code);

/* Text of the CUDA error behind the last DBLOCKS_ERR_CUDA returned on the calling thread, as
 * "<cudaError name>: <description>", e.g. "cudaErrorNoDevice: no CUDA-capable device is
 * detected"; "" if none. Thread-local; valid until the next failing call on this thread. */
const char* dblocks_last_cuda_error(void);

/*
 * EDM preconditioning coefficients (Karras et al. 2022) for n noise levels sigma[i] > 0, with
 * sd = sigma_data (the standard deviation of the clean data, same units as sigma):
 *   c_skip = sd^2 / (sigma^2 + sd^2)          c_out  = sigma * sd / sqrt(sigma^2 + sd^2)
 *   c_in   = 1 / sqrt(sigma^2 + sd^2)         c_noise = 0.25 * ln(sigma)
 *   weight = (sigma^2 + sd^2) / (sigma * sd)^2   (the loss weight lambda(sigma))
 * All arrays are float32 device arrays of n elements. Computed in float64 internally, then
 * rounded once to float32. Any output pointer may be NULL to skip that output; an output may be
 * `sigma` itself (in place) but outputs must not overlap each other. sigma <= 0 gives inf/nan.
 * Errors: DBLOCKS_ERR_INVALID_ARGUMENT if n < 0, sigma is NULL while n > 0, or sigma_data is
 * not a finite value > 0 (checked first, also for n == 0); then n == 0 or all outputs NULL
 * returns DBLOCKS_OK with no CUDA call; DBLOCKS_ERR_CUDA if the kernel launch fails (no device,
 * no driver, bad stream, ...).
 */
int dblocks_edm_coefficients_f32(const float* sigma, int64_t n, float sigma_data, float* c_skip,
                                 float* c_out, float* c_in, float* c_noise, float* weight,
                                 void* stream);

/*
 * Element types of tensors passed as `void*` (the `dtype` arguments below). Half types travel as
 * their 16-bit patterns; all arithmetic is float32 (coefficients float64).
 */
typedef enum dblocks_dtype {
    DBLOCKS_FLOAT32 = 0,
    DBLOCKS_BFLOAT16 = 1,
    DBLOCKS_FLOAT16 = 2
} dblocks_dtype;

/*
 * AdaLN modulation (DiT), optionally behind the gated residual of AdaLN-Zero:
 *   not gated (y == NULL):  h = LN(x) * (1 + scale) + shift
 *   gated:                  x_new = x + gate * y,  h = LN(x_new) * (1 + scale) + shift
 * LN is LayerNorm over the last dimension D without affine parameters, variance + eps.
 * x, y, x_new, h: contiguous (N, T, D) tensors of `dtype`. gate, shift, scale: (N, D) of `mod_dtype`
 * (`dtype` itself or DBLOCKS_FLOAT32)
 * with unit column stride and row stride `mod_stride` elements (>= D; the chunks of one (N, k*D)
 * modulation vector are passed as pointers into it with mod_stride = k*D). mean, rstd: float32
 * (N*T) outputs, the statistics the backward needs; either may be NULL to skip it.
 * gate and x_new are required when y is given and ignored otherwise.
 * Errors: DBLOCKS_ERR_INVALID_ARGUMENT for N, T or D < 1, mod_stride < D, N*T*D or N*mod_stride
 * above INT64_MAX / 4, eps not > 0, an unknown dtype or pair of dtypes, or a NULL required pointer;
 * DBLOCKS_ERR_CUDA if the launch fails (also when D needs more shared memory than the GPU has in
 * the backward: about 19K columns gated on an H100).
 */
int dblocks_adaln_forward(const void* x, const void* y, const void* gate, const void* shift,
                          const void* scale, void* x_new, void* h, float* mean, float* rstd,
                          int64_t N, int64_t T, int64_t D, int64_t mod_stride, int dtype,
                          int mod_dtype, float eps, void* stream);

/* float32 elements of workspace dblocks_adaln_backward needs (depends on N, T, D and gated only). */
int64_t dblocks_adaln_backward_workspace(int64_t N, int64_t T, int64_t D, int gated);

/*
 * Backward of dblocks_adaln_forward. dh: gradient of h. x: the forward's x (not gated) or its
 * output x_new (gated). mean, rstd: the forward's statistics. Gated only: dx_new (gradient of
 * x_new; may be NULL for zero), y, gate, and the outputs dy, dgate.
 * Outputs: dx, dy (N, T, D) contiguous of `dtype`; dshift, dscale, dgate (N, D) contiguous of
 * `mod_dtype`. workspace: float32 device memory of dblocks_adaln_backward_workspace(...) elements.
 * dshift, dscale and dgate are reduced over T in a fixed order: the result is deterministic.
 * Errors as for the forward, and for a NULL workspace, output or statistic.
 */
int dblocks_adaln_backward(const void* dh, const void* dx_new, const void* x, const void* y,
                           const void* gate, const void* scale, const float* mean,
                           const float* rstd, void* dx, void* dy, void* dshift, void* dscale,
                           void* dgate, float* workspace, int64_t N, int64_t T, int64_t D,
                           int64_t mod_stride, int dtype, int mod_dtype, void* stream);

/*
 * EDM-weighted L2 loss of the denoiser D = c_skip z + c_out f against the clean target y:
 *   per_sample[n] = w(sigma_n) * mean_j (D_nj - y_nj)^2,   loss = mean_n per_sample[n]
 * (coefficients as in dblocks_edm_coefficients_f32). z, f, y: contiguous (N, M) of `dtype`;
 * sigma: float32 (N). Outputs: per_sample float32 (N), loss float32 (one value), and r, if not
 * NULL, the float32 (N, M) gradient 2 w (D - y) / M of per_sample with respect to D, saved for
 * the backward. workspace: float32 of dblocks_edm_l2_loss_workspace(N, M) elements. The sums are
 * reduced in a fixed order (deterministic).
 */
int64_t dblocks_edm_l2_loss_workspace(int64_t N, int64_t M);
int dblocks_edm_l2_loss_forward(const void* z, const void* f, const void* y, const float* sigma,
                                float* per_sample, float* loss, float* r, float* workspace,
                                int64_t N, int64_t M, float sigma_data, int dtype, void* stream);

/*
 * Backward of the loss: dD = (g_loss / N + g_per[n]) * r, then dz = c_skip dD, df = c_out dD,
 * dy = -dD, each written (contiguous (N, M) of `dtype`) only when its pointer is not NULL.
 * g_loss: float32 gradient of loss (one value) or NULL for 0; g_per: float32 gradient of
 * per_sample with stride g_per_stride elements (0 for a broadcast value), or NULL for 0.
 */
int dblocks_edm_l2_loss_backward(const float* r, const float* sigma, const float* g_loss,
                                 const float* g_per, int64_t g_per_stride, void* dz, void* df,
                                 void* dy, int64_t N, int64_t M, float sigma_data, int dtype,
                                 void* stream);

/*
 * One AdamW step (Loshchilov & Hutter; torch.optim.AdamW's update, in float32) over n elements of
 * flat float32 buffers, each read once and written once:
 *   g = grad / *grad_scale                    (grad_scale NULL: g = grad)
 *   param = param * (1 - lr * weight_decay)
 *   exp_avg += (1 - beta1) * (g - exp_avg);   exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) g^2
 *   param -= lr / (1 - beta1^step) * exp_avg / (sqrt(exp_avg_sq) / sqrt(1 - beta2^step) + eps)
 * and, when param_bf16 is not NULL, the updated param rounded to bfloat16 (nearest even) there.
 * The scalars are float64 and rounded to float32 where they meet the buffers, as torch does with
 * Python floats. found_inf: NULL, or a float32 device flag; when it is nonzero the call changes nothing (the
 * mixed-precision skip; the caller then does not count the step). lr, betas, eps, weight_decay
 * and step (>= 1, the step being taken) are plain arguments: changing them needs no new memory
 * and no recompilation. Buffers may have any alignment (16-byte aligned ones use vector loads)
 * and must not overlap. Errors: DBLOCKS_ERR_INVALID_ARGUMENT for n < 0, step < 1, a NULL buffer
 * with n > 0, betas outside [0, 1), lr, eps or weight_decay negative or not finite.
 */
int dblocks_fused_adamw_f32(float* param, const float* grad, float* exp_avg, float* exp_avg_sq,
                            uint16_t* param_bf16, int64_t n, double lr, double beta1, double beta2,
                            double eps, double weight_decay, int64_t step, const float* grad_scale,
                            const float* found_inf, void* stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* DBLOCKS_OPS_H */
