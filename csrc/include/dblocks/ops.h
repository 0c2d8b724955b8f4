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

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* DBLOCKS_OPS_H */
