// Staged copy: one grid-stride copy between device memory and mapped pinned host memory
// (staged_copy_params.hpp; the host side is src/host/staged_copy.cpp).
#include <cstdint>

#include "kernels/launch.cuh"
#include "kernels/staged_copy_params.hpp"

namespace epx::kernels {
namespace {

constexpr int kCopyThreads = 256;
// Few blocks: the copy runs beside the peers' kernels within this rank's SM share.
constexpr int kMaxCopyBlocks = 8;

__global__ void staged_copy_kernel(const __grid_constant__ StagedCopyParams p) {
  const size_t first = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const size_t step = static_cast<size_t>(gridDim.x) * blockDim.x;
  const bool words = ((reinterpret_cast<uintptr_t>(p.src) | reinterpret_cast<uintptr_t>(p.dst) | p.num_bytes) & 15) == 0;
  if (words) {
    const uint4* src = static_cast<const uint4*>(p.src);
    uint4* dst = static_cast<uint4*>(p.dst);
    for (size_t i = first; i < p.num_bytes / 16; i += step) dst[i] = src[i];
    return;
  }
  const unsigned char* src = static_cast<const unsigned char*>(p.src);
  unsigned char* dst = static_cast<unsigned char*>(p.dst);
  for (size_t i = first; i < p.num_bytes; i += step) dst[i] = src[i];
}

}  // namespace

void launch_staged_copy(const StagedCopyParams& p, cudaStream_t stream) {
  const size_t per_block = static_cast<size_t>(kCopyThreads) * 16 * 4;
  const size_t blocks = (p.num_bytes + per_block - 1) / per_block;
  const int num_blocks = static_cast<int>(blocks < 1 ? 1 : blocks > kMaxCopyBlocks ? kMaxCopyBlocks : blocks);
  staged_copy_kernel<<<num_blocks, kCopyThreads, 0, stream>>>(p);
}

void load_staged_copy_kernels() { load_kernel(staged_copy_kernel, "staged_copy_kernel"); }

}  // namespace epx::kernels
