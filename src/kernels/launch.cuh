// Host-side launch helpers shared by the kernels' launchers.
#pragma once
#include <cuda_runtime.h>

#include "epx/error.hpp"

namespace epx::kernels {

// Loads `kernel` into the current context now (load_kernels in ht_params.hpp says why); a device
// without an image for it is an error naming it.
template <typename Kernel>
void load_kernel(Kernel* kernel, const char* name) {
  cudaFuncAttributes attr{};
  const cudaError_t st = cudaFuncGetAttributes(&attr, kernel);
  if (st != cudaSuccess) {
    cudaGetLastError();
    EPX_FAIL(::epx::ErrorKind::kCuda, "loading kernel ", name, ": ", cudaGetErrorString(st));
  }
}

// Launches `kernel` with every block resident at once (cooperative launch attribute): for kernels
// whose blocks wait for each other. A grid the device cannot hold fails the launch (the thread's
// last CUDA error, which the caller's after_launch raises) instead of hanging.
template <typename Params>
void launch_cooperative(void (*kernel)(Params), int num_blocks, int num_threads, cudaStream_t stream, const Params& p) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(num_blocks));
  cfg.blockDim = dim3(static_cast<unsigned>(num_threads));
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  (void)cudaLaunchKernelEx(&cfg, kernel, p);
}

}  // namespace epx::kernels
