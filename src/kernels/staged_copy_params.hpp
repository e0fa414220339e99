// Parameter struct and launcher of the staged copy kernel (src/host/staged_copy.cpp): a plain
// device-side byte copy, used where a cudaMemcpyAsync would wait for other streams' kernels.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>

namespace epx::kernels {

// Copies `num_bytes` from `src` to `dst`; either side may be mapped pinned host memory (its
// device pointer). 16-byte words when both pointers and the size allow it, else bytes.
struct StagedCopyParams {
  const void* src;
  void* dst;
  size_t num_bytes;
};
void launch_staged_copy(const StagedCopyParams& p, cudaStream_t stream);
void load_staged_copy_kernels();

}  // namespace epx::kernels
