// pybind11 module dblocks_fast._C: thin bindings over the C API in dblocks/ops.h.
// Tensors cross as raw device pointers and the stream as a Python int, so no framework
// (and no PyTorch) is needed here; dblocks_fast/_C_loader.py adapts torch tensors.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "dblocks/ops.h"

namespace py = pybind11;

namespace {

// Turns a dblocks status code into a RuntimeError carrying the library's error text.
void check(int code, const char* function) {
    if (code == DBLOCKS_OK) return;
    std::string message = std::string(function) + ": " + dblocks_error_string(code);
    if (code == DBLOCKS_ERR_CUDA) message += std::string(": ") + dblocks_last_cuda_error();
    throw std::runtime_error(message);
}

template <typename T>
T* as_ptr(std::uintptr_t address) {
    return reinterpret_cast<T*>(address);
}

void edm_coefficients_f32(std::uintptr_t sigma, int64_t n, float sigma_data, std::uintptr_t c_skip,
                          std::uintptr_t c_out, std::uintptr_t c_in, std::uintptr_t c_noise,
                          std::uintptr_t weight, std::uintptr_t stream) {
    int code;
    {
        py::gil_scoped_release no_gil;
        code = dblocks_edm_coefficients_f32(as_ptr<const float>(sigma), n, sigma_data,
                                            as_ptr<float>(c_skip), as_ptr<float>(c_out),
                                            as_ptr<float>(c_in), as_ptr<float>(c_noise),
                                            as_ptr<float>(weight), as_ptr<void>(stream));
    }
    check(code, "edm_coefficients_f32");
}

// Runs a C entry point without the GIL (kernels only launch, but a launch can wait on a full queue).
template <typename F>
void call(const char* function, F&& f) {
    int code;
    {
        py::gil_scoped_release no_gil;
        code = f();
    }
    check(code, function);
}

void adaln_forward(std::uintptr_t x, std::uintptr_t y, std::uintptr_t gate, std::uintptr_t shift,
                   std::uintptr_t scale, std::uintptr_t x_new, std::uintptr_t h, std::uintptr_t mean,
                   std::uintptr_t rstd, int64_t N, int64_t T, int64_t D, int64_t mod_stride, int dtype,
                   int mod_dtype, float eps, std::uintptr_t stream) {
    call("adaln_forward", [&] {
        return dblocks_adaln_forward(as_ptr<const void>(x), as_ptr<const void>(y), as_ptr<const void>(gate),
                                     as_ptr<const void>(shift), as_ptr<const void>(scale), as_ptr<void>(x_new),
                                     as_ptr<void>(h), as_ptr<float>(mean), as_ptr<float>(rstd), N, T, D,
                                     mod_stride, dtype, mod_dtype, eps, as_ptr<void>(stream));
    });
}

void adaln_backward(std::uintptr_t dh, std::uintptr_t dx_new, std::uintptr_t x, std::uintptr_t y,
                    std::uintptr_t gate, std::uintptr_t scale, std::uintptr_t mean, std::uintptr_t rstd,
                    std::uintptr_t dx, std::uintptr_t dy, std::uintptr_t dshift, std::uintptr_t dscale,
                    std::uintptr_t dgate, std::uintptr_t workspace, int64_t N, int64_t T, int64_t D,
                    int64_t mod_stride, int dtype, int mod_dtype, std::uintptr_t stream) {
    call("adaln_backward", [&] {
        return dblocks_adaln_backward(
            as_ptr<const void>(dh), as_ptr<const void>(dx_new), as_ptr<const void>(x), as_ptr<const void>(y),
            as_ptr<const void>(gate), as_ptr<const void>(scale), as_ptr<const float>(mean),
            as_ptr<const float>(rstd), as_ptr<void>(dx), as_ptr<void>(dy), as_ptr<void>(dshift),
            as_ptr<void>(dscale), as_ptr<void>(dgate), as_ptr<float>(workspace), N, T, D, mod_stride, dtype,
            mod_dtype, as_ptr<void>(stream));
    });
}

void edm_l2_loss_forward(std::uintptr_t z, std::uintptr_t f, std::uintptr_t y, std::uintptr_t sigma,
                         std::uintptr_t per_sample, std::uintptr_t loss, std::uintptr_t r,
                         std::uintptr_t workspace, int64_t N, int64_t M, float sigma_data, int dtype,
                         std::uintptr_t stream) {
    call("edm_l2_loss_forward", [&] {
        return dblocks_edm_l2_loss_forward(as_ptr<const void>(z), as_ptr<const void>(f), as_ptr<const void>(y),
                                           as_ptr<const float>(sigma), as_ptr<float>(per_sample),
                                           as_ptr<float>(loss), as_ptr<float>(r), as_ptr<float>(workspace), N,
                                           M, sigma_data, dtype, as_ptr<void>(stream));
    });
}

void edm_l2_loss_backward(std::uintptr_t r, std::uintptr_t sigma, std::uintptr_t g_loss, std::uintptr_t g_per,
                          int64_t g_per_stride, std::uintptr_t dz, std::uintptr_t df, std::uintptr_t dy,
                          int64_t N, int64_t M, float sigma_data, int dtype, std::uintptr_t stream) {
    call("edm_l2_loss_backward", [&] {
        return dblocks_edm_l2_loss_backward(as_ptr<const float>(r), as_ptr<const float>(sigma),
                                            as_ptr<const float>(g_loss), as_ptr<const float>(g_per),
                                            g_per_stride, as_ptr<void>(dz), as_ptr<void>(df), as_ptr<void>(dy),
                                            N, M, sigma_data, dtype, as_ptr<void>(stream));
    });
}

void fused_adamw_f32(std::uintptr_t param, std::uintptr_t grad, std::uintptr_t exp_avg, std::uintptr_t exp_avg_sq,
                     std::uintptr_t param_bf16, int64_t n, double lr, double beta1, double beta2, double eps,
                     double weight_decay, int64_t step, std::uintptr_t grad_scale, std::uintptr_t found_inf,
                     std::uintptr_t stream) {
    call("fused_adamw_f32", [&] {
        return dblocks_fused_adamw_f32(as_ptr<float>(param), as_ptr<const float>(grad), as_ptr<float>(exp_avg),
                                       as_ptr<float>(exp_avg_sq), as_ptr<uint16_t>(param_bf16), n, lr, beta1,
                                       beta2, eps, weight_decay, step, as_ptr<const float>(grad_scale),
                                       as_ptr<const float>(found_inf), as_ptr<void>(stream));
    });
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() =
        "CUDA kernels of dblocks_fast (C library dblocks_ops, header dblocks/ops.h).\n\n"
        "Functions take raw device pointers and a cudaStream_t as Python ints (0 = NULL), launch\n"
        "asynchronously on that stream and raise RuntimeError with the library's error text.\n"
        "Use dblocks_fast._C_loader for torch-tensor wrappers.";

    m.def("edm_coefficients_f32", &edm_coefficients_f32, py::arg("sigma_ptr"), py::arg("n"),
          py::arg("sigma_data"), py::arg("c_skip_ptr"), py::arg("c_out_ptr"), py::arg("c_in_ptr"),
          py::arg("c_noise_ptr"), py::arg("weight_ptr"), py::arg("stream"),
          "EDM preconditioning coefficients of n float32 noise levels on the device.\n\n"
          "c_skip = sd^2/(sigma^2+sd^2), c_out = sigma*sd/sqrt(sigma^2+sd^2),\n"
          "c_in = 1/sqrt(sigma^2+sd^2), c_noise = ln(sigma)/4, weight = (sigma^2+sd^2)/(sigma*sd)^2\n"
          "with sd = sigma_data. Output pointers of 0 are skipped. Raises RuntimeError on invalid\n"
          "arguments (n < 0, sigma_ptr 0 with n > 0, sigma_data not finite > 0) or a CUDA error.");
    m.attr("FLOAT32") = int(DBLOCKS_FLOAT32);
    m.attr("BFLOAT16") = int(DBLOCKS_BFLOAT16);
    m.attr("FLOAT16") = int(DBLOCKS_FLOAT16);

    m.def("adaln_forward", &adaln_forward, py::arg("x_ptr"), py::arg("y_ptr"), py::arg("gate_ptr"),
          py::arg("shift_ptr"), py::arg("scale_ptr"), py::arg("x_new_ptr"), py::arg("h_ptr"), py::arg("mean_ptr"),
          py::arg("rstd_ptr"), py::arg("N"), py::arg("T"), py::arg("D"), py::arg("mod_stride"), py::arg("dtype"),
          py::arg("mod_dtype"), py::arg("eps"), py::arg("stream"),
          "AdaLN modulation h = LN(x') * (1 + scale) + shift, x' = x + gate * y when y_ptr != 0, else x.\n\n"
          "x, y, x_new, h: contiguous (N, T, D) of dtype; gate, shift, scale: (N, D) of mod_dtype with row\n"
          "stride mod_stride; mean, rstd: float32 (N*T) statistics for the backward (0 to skip).\n"
          "dtype codes: FLOAT32, BFLOAT16, FLOAT16. See dblocks_adaln_forward in dblocks/ops.h.");
    m.def("adaln_backward_workspace", &dblocks_adaln_backward_workspace, py::arg("N"), py::arg("T"), py::arg("D"),
          py::arg("gated"),
          "float32 elements of workspace adaln_backward needs for this shape (no device query).");
    m.def("adaln_backward", &adaln_backward, py::arg("dh_ptr"), py::arg("dx_new_ptr"), py::arg("x_ptr"),
          py::arg("y_ptr"), py::arg("gate_ptr"), py::arg("scale_ptr"), py::arg("mean_ptr"), py::arg("rstd_ptr"),
          py::arg("dx_ptr"), py::arg("dy_ptr"), py::arg("dshift_ptr"), py::arg("dscale_ptr"), py::arg("dgate_ptr"),
          py::arg("workspace_ptr"), py::arg("N"), py::arg("T"), py::arg("D"), py::arg("mod_stride"),
          py::arg("dtype"), py::arg("mod_dtype"), py::arg("stream"),
          "Backward of adaln_forward: dx (and dy) of dtype, dshift, dscale (and dgate) (N, D) of mod_dtype,\n"
          "reduced over T deterministically. Gated when y_ptr != 0 (then x_ptr is the forward's x_new).\n"
          "See dblocks_adaln_backward in dblocks/ops.h.");
    m.def("edm_l2_loss_workspace", &dblocks_edm_l2_loss_workspace, py::arg("N"), py::arg("M"),
          "float32 elements of workspace edm_l2_loss_forward needs for N samples of M elements.");
    m.def("edm_l2_loss_forward", &edm_l2_loss_forward, py::arg("z_ptr"), py::arg("f_ptr"), py::arg("y_ptr"),
          py::arg("sigma_ptr"), py::arg("per_sample_ptr"), py::arg("loss_ptr"), py::arg("r_ptr"),
          py::arg("workspace_ptr"), py::arg("N"), py::arg("M"), py::arg("sigma_data"), py::arg("dtype"),
          py::arg("stream"),
          "EDM-weighted L2 loss of D = c_skip z + c_out f against y: per_sample (N) and loss (1) float32,\n"
          "and r = 2 w (D - y) / M (float32 (N, M)) for the backward when r_ptr != 0.\n"
          "See dblocks_edm_l2_loss_forward in dblocks/ops.h.");
    m.def("edm_l2_loss_backward", &edm_l2_loss_backward, py::arg("r_ptr"), py::arg("sigma_ptr"),
          py::arg("g_loss_ptr"), py::arg("g_per_ptr"), py::arg("g_per_stride"), py::arg("dz_ptr"),
          py::arg("df_ptr"), py::arg("dy_ptr"), py::arg("N"), py::arg("M"), py::arg("sigma_data"),
          py::arg("dtype"), py::arg("stream"),
          "Backward of the EDM loss: dD = (g_loss / N + g_per[n]) r; dz = c_skip dD, df = c_out dD,\n"
          "dy = -dD, each written when its pointer is not 0. See dblocks_edm_l2_loss_backward.");
    m.def("fused_adamw_f32", &fused_adamw_f32, py::arg("param_ptr"), py::arg("grad_ptr"), py::arg("exp_avg_ptr"),
          py::arg("exp_avg_sq_ptr"), py::arg("param_bf16_ptr"), py::arg("n"), py::arg("lr"), py::arg("beta1"),
          py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("step"), py::arg("grad_scale_ptr"),
          py::arg("found_inf_ptr"), py::arg("stream"),
          "One AdamW step (torch.optim.AdamW's update) over n elements of flat float32 buffers, each read\n"
          "and written once; optionally writes a bfloat16 copy of the new param. Skips the update when\n"
          "*found_inf != 0; divides grad by *grad_scale when given. See dblocks_fused_adamw_f32.");
    m.def("version", &dblocks_version,
          "API version of the compiled library: major*10000 + minor*100 + patch (0.1.0 -> 100).");
    m.def("cuda_runtime_version", &dblocks_cuda_runtime_version,
          "CUDA runtime version linked (statically) into the module, e.g. 13000 for 13.0.");
}
