/* Compiled by tests/test_csrc.py as plain C99 against the installed header, linked with nvcc: the C API
 * works from C, and every argument check returns its code before any CUDA call (no GPU needed). */
#include <stdio.h>
#include "dblocks/ops.h"

int main(void) {
    float sigma = 1.0f, out = 0.0f;
    if (dblocks_version() != DBLOCKS_VERSION) return 1;
    if (dblocks_edm_coefficients_f32(&sigma, -1, 0.5f, &out, 0, 0, 0, 0, 0) != DBLOCKS_ERR_INVALID_ARGUMENT)
        return 2;
    if (dblocks_edm_coefficients_f32(NULL, 4, 0.5f, &out, 0, 0, 0, 0, 0) != DBLOCKS_ERR_INVALID_ARGUMENT)
        return 3;
    if (dblocks_edm_coefficients_f32(&sigma, 1, 0.0f, &out, 0, 0, 0, 0, 0) != DBLOCKS_ERR_INVALID_ARGUMENT)
        return 4;
    if (dblocks_edm_coefficients_f32(NULL, 0, 0.5f, NULL, NULL, NULL, NULL, NULL, NULL) != DBLOCKS_OK)
        return 5;
    /* the kernels' argument checks come before any CUDA call: these need no GPU */
    {
        const int bad = DBLOCKS_ERR_INVALID_ARGUMENT;
        float buf[8] = {0};
        if (dblocks_adaln_forward(buf, NULL, NULL, buf, buf, NULL, buf, NULL, NULL, 0, 1, 4, 4, DBLOCKS_FLOAT32,
                                  DBLOCKS_FLOAT32, 1e-6f, NULL) != bad)
            return 10; /* N = 0 */
        if (dblocks_adaln_forward(buf, NULL, NULL, buf, buf, NULL, buf, NULL, NULL, 1, 1, 4, 3, DBLOCKS_FLOAT32,
                                  DBLOCKS_FLOAT32, 1e-6f, NULL) != bad)
            return 11; /* mod_stride < D */
        if (dblocks_adaln_forward(buf, buf, NULL, buf, buf, buf, buf, NULL, NULL, 1, 1, 4, 4, DBLOCKS_FLOAT32,
                                  DBLOCKS_FLOAT32, 1e-6f, NULL) != bad)
            return 12; /* gated without a gate */
        if (dblocks_adaln_forward(buf, NULL, NULL, buf, buf, NULL, buf, NULL, NULL, 1, 1, 4, 4, 7,
                                  DBLOCKS_FLOAT32, 1e-6f, NULL) != bad)
            return 13; /* unknown dtype */
        if (dblocks_adaln_backward(buf, NULL, buf, NULL, NULL, buf, buf, buf, buf, NULL, buf, buf, NULL, NULL, 1,
                                   1, 4, 4, DBLOCKS_FLOAT32, DBLOCKS_FLOAT32, NULL) != bad)
            return 14; /* no workspace */
        if (dblocks_adaln_backward_workspace(0, 1, 4, 0) != 0 || dblocks_adaln_backward_workspace(2, 3, 5, 1) < 2 * 5 * 3)
            return 15;
        if (dblocks_edm_l2_loss_workspace(3, 4097) != 6 || dblocks_edm_l2_loss_workspace(0, 5) != 0) return 16;
        if (dblocks_edm_l2_loss_forward(buf, buf, buf, buf, buf, buf, NULL, buf, 2, 4, 0.0f, DBLOCKS_FLOAT32,
                                        NULL) != bad)
            return 17; /* sigma_data = 0 */
        if (dblocks_edm_l2_loss_backward(buf, buf, NULL, NULL, -1, buf, NULL, NULL, 2, 4, 0.5f, DBLOCKS_BFLOAT16,
                                         NULL) != bad)
            return 18; /* negative g_per stride */
        if (dblocks_edm_l2_loss_backward(buf, buf, NULL, NULL, 0, NULL, NULL, NULL, 2, 4, 0.5f, DBLOCKS_FLOAT16,
                                         NULL) != DBLOCKS_OK)
            return 19; /* nothing to write: no CUDA call */
        if (dblocks_fused_adamw_f32(buf, buf, buf, buf, NULL, 4, 1e-3, 0.9, 1.0, 1e-8, 0.0, 1, NULL, NULL, NULL) != bad)
            return 20; /* beta2 = 1 */
        if (dblocks_fused_adamw_f32(buf, buf, buf, buf, NULL, 4, 1e-3, 0.9, 0.999, 1e-8, 0.0, 0, NULL, NULL, NULL) != bad)
            return 21; /* step 0 */
        if (dblocks_fused_adamw_f32(NULL, NULL, NULL, NULL, NULL, 0, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1, NULL, NULL,
                                    NULL) != DBLOCKS_OK)
            return 22; /* n = 0: nothing to do */
    }
    printf("version=%d cudart=%d %s\n", dblocks_version(), dblocks_cuda_runtime_version(),
           dblocks_error_string(DBLOCKS_ERR_INVALID_ARGUMENT));
    return 0;
}
