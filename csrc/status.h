// Internal helpers shared by the kernels of dblocks_ops (not part of the public C API).
#pragma once

#include <cuda_runtime.h>

namespace dblocks {

// Remembers `err` as this thread's last CUDA error and returns DBLOCKS_ERR_CUDA.
int record_cuda_error(cudaError_t err);

// Returns DBLOCKS_OK, or records and reports the error of the kernel launch just made.
int check_launch();

}  // namespace dblocks
