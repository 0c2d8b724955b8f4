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
    m.def("version", &dblocks_version,
          "API version of the compiled library: major*10000 + minor*100 + patch (0.1.0 -> 100).");
    m.def("cuda_runtime_version", &dblocks_cuda_runtime_version,
          "CUDA runtime version linked (statically) into the module, e.g. 13000 for 13.0.");
}
