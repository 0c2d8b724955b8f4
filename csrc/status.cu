// Version, status texts and the per-thread CUDA error text of the dblocks C API.
#include <cstdio>

#include "dblocks/ops.h"
#include "status.h"

namespace {
thread_local char last_cuda_error[256] = "";
}

namespace dblocks {

int record_cuda_error(cudaError_t err) {
    std::snprintf(last_cuda_error, sizeof last_cuda_error, "%s: %s", cudaGetErrorName(err),
                  cudaGetErrorString(err));
    return DBLOCKS_ERR_CUDA;
}

int check_launch() {
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? DBLOCKS_OK : record_cuda_error(err);
}

}  // namespace dblocks

extern "C" {

int dblocks_version(void) { return DBLOCKS_VERSION; }

int dblocks_cuda_runtime_version(void) {
    int version = 0;
    return cudaRuntimeGetVersion(&version) == cudaSuccess ? version : CUDART_VERSION;
}

const char* dblocks_error_string(int code) {
    switch (code) {
        case DBLOCKS_OK: return "no error";
        case DBLOCKS_ERR_INVALID_ARGUMENT: return "invalid argument";
        case DBLOCKS_ERR_CUDA: return "CUDA error";
        default: return "unknown error code";
    }
}

const char* dblocks_last_cuda_error(void) { return last_cuda_error; }

}  // extern "C"
