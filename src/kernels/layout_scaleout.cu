// get_dispatch_layout's scale-out output: num_tokens_per_rdma_rank [N nodes], a token counted once
// per node that holds any of its destination ranks (docs/scaleout.md §4).
#include "epx/limits.hpp"
#include "kernels/launch.cuh"
#include "kernels/scaleout_params.hpp"

namespace epx::kernels {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) rdma_rank_count_kernel(const __grid_constant__ RdmaRankCountParams p) {
  __shared__ int node_counts[kMaxNodes];
  const int num_nodes = p.num_ranks / p.node_size;
  for (int i = threadIdx.x; i < num_nodes; i += blockDim.x) node_counts[i] = 0;
  __syncthreads();
  for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < p.num_tokens; t += gridDim.x * blockDim.x) {
    const bool* in_rank = p.is_token_in_rank + static_cast<int64_t>(t) * p.num_ranks;
    for (int node = 0; node < num_nodes; ++node) {
      bool in_node = false;
      for (int local = 0; local < p.node_size; ++local) in_node |= in_rank[node * p.node_size + local];
      if (in_node) atomicAdd(&node_counts[node], 1);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < num_nodes; i += blockDim.x)
    if (node_counts[i]) atomicAdd(&p.num_tokens_per_rdma_rank[i], node_counts[i]);
}

}  // namespace

void launch_rdma_rank_counts(const RdmaRankCountParams& p, cudaStream_t stream) {
  cudaMemsetAsync(p.num_tokens_per_rdma_rank, 0, sizeof(int) * (p.num_ranks / p.node_size), stream);
  const int blocks = p.num_tokens > 0 ? (p.num_tokens + kThreads - 1) / kThreads : 1;
  rdma_rank_count_kernel<<<blocks < 128 ? blocks : 128, kThreads, 0, stream>>>(p);
}

void load_layout_scaleout_kernels() { load_kernel(rdma_rank_count_kernel, "rdma_rank_count_kernel"); }

}  // namespace epx::kernels
