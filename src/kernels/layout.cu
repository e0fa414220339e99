// get_dispatch_layout: per-rank and per-expert token counts and the token -> rank mask.
#include "device/sync.cuh"
#include "kernels/ht_params.hpp"
#include "kernels/launch.cuh"

namespace epx::kernels {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) layout_kernel(const __grid_constant__ LayoutParams p) {
  extern __shared__ int smem[];
  int* expert_counts = smem;                  // [E]
  int* rank_counts = smem + p.num_experts;    // [R]
  for (int i = threadIdx.x; i < p.num_experts + p.num_ranks; i += blockDim.x) smem[i] = 0;
  __syncthreads();

  const int experts_per_rank = p.num_experts / p.num_ranks;
  for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < p.num_tokens; t += gridDim.x * blockDim.x) {
    unsigned int rank_mask = 0;
    for (int k = 0; k < p.num_topk; ++k) {
      const int64_t e = p.topk_idx[t * p.topk_stride + k];
      if (e < -1 || e >= p.num_experts) {
        device::record_error(p.ctx, DeviceErrorKind::kInvalidArgument, Phase::kInputCheck, -1, t,
                             static_cast<unsigned long long>(e), p.num_experts);
        continue;
      }
      if (e < 0) continue;
      atomicAdd(&expert_counts[e], 1);
      rank_mask |= 1u << (e / experts_per_rank);
    }
    for (int r = 0; r < p.num_ranks; ++r) {
      const bool in = (rank_mask >> r) & 1u;
      p.is_token_in_rank[static_cast<int64_t>(t) * p.num_ranks + r] = in;
      if (in) atomicAdd(&rank_counts[r], 1);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < p.num_experts; i += blockDim.x)
    if (expert_counts[i]) atomicAdd(&p.num_tokens_per_expert[i], expert_counts[i]);
  for (int i = threadIdx.x; i < p.num_ranks; i += blockDim.x)
    if (rank_counts[i]) atomicAdd(&p.num_tokens_per_rank[i], rank_counts[i]);
}

}  // namespace

void launch_layout(const LayoutParams& p, cudaStream_t stream) {
  cudaMemsetAsync(p.num_tokens_per_rank, 0, sizeof(int) * p.num_ranks, stream);
  cudaMemsetAsync(p.num_tokens_per_expert, 0, sizeof(int) * p.num_experts, stream);
  const int blocks = p.num_tokens > 0 ? (p.num_tokens + kThreads - 1) / kThreads : 1;
  const size_t smem = sizeof(int) * (p.num_experts + p.num_ranks);
  layout_kernel<<<blocks < 128 ? blocks : 128, kThreads, smem, stream>>>(p);
}

void load_layout_kernels() { load_kernel(layout_kernel, "layout_kernel"); }

}  // namespace epx::kernels
