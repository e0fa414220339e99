// High-throughput combine: push each received row back to its source's row region, then every
// rank reduces its own tokens. Roles of each block, in order:
//   send:    a warp per received row writes it (and its top-k weights) to slot
//            (rows of this rank before it) + (row's position among this rank's rows) of the source;
//            rows that came from this rank itself stay where they are;
//   signal:  the last block publishes done = e to every peer;
//   reduce:  after every peer's done, a warp per token sums its contributions in rank order in
//            fp32 (own rows read straight from x), adds the biases, rounds to bf16.
#include "kernels/combine_common.cuh"
#include "kernels/launch.cuh"

namespace epx::kernels {
namespace {

using namespace epx::device;

__device__ void send_rows(const CombineParams& p, const int* recv_base, const int* dst_base, int num_recv) {
  const OpContext& ctx = p.ctx;
  const int R = ctx.num_ranks, me = ctx.rank;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  // Only rows from other ranks travel (own rows are reduced in place): spread those evenly.
  const int num_own = recv_base[me + 1] - recv_base[me];
  const int num_remote = num_recv - num_own;
  const int per_block = (num_remote + gridDim.x - 1) / gridDim.x;
  const int v_begin = blockIdx.x * per_block;
  const int v_end = min(num_remote, v_begin + per_block);
  for (int v = v_begin + warp; v < v_end; v += warps) {
    const int i = v < recv_base[me] ? v : v + num_own;
    int s = 0;
    while (s + 1 < R && i >= recv_base[s + 1]) ++s;
    const int64_t slot = dst_base[s] + (i - recv_base[s]);
    char* base = ctx.rows(s);
    char* dst[1] = {p.rows.row(base, slot)};
    warp_copy_multicast<kSendUnroll>(p.x + i * p.x_stride, dst, p.rows.row_bytes, lane);
    if (p.rows.num_topk_weights)
      for (int k = lane; k < p.num_topk; k += kWarpSize)
        p.rows.topk_weights(base, slot)[k] = p.topk_weights[i * p.weight_stride + k];
  }
}

template <int kR, int kU>
__device__ void reduce_tokens(const CombineParams& p, const int* recv_base) {
  __shared__ int send_base[kMaxPeers];
  compute_send_base(p, send_base);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int global_warp = blockIdx.x * (blockDim.x / kWarpSize) + warp;
  const int num_warps = gridDim.x * (blockDim.x / kWarpSize);
  for (int t = global_warp; t < p.num_tokens; t += num_warps) reduce_token<kR, kU>(p, t, recv_base, send_base, lane);
}

template <int kR, int kU>
__global__ void __launch_bounds__(kMaxHtThreads) combine_kernel(const __grid_constant__ CombineParams p) {
  __shared__ int recv_base[kMaxPeers + 1];  // first received row from each source
  __shared__ int dst_base[kMaxPeers];       // first slot of this rank's rows on each source
  const OpContext& ctx = p.ctx;
  uint64_t e = 0;
  if (!combine_begin(p, e, recv_base, dst_base)) return;
  send_rows(p, recv_base, dst_base, recv_base[ctx.num_ranks]);
  signal_sends_done(ctx, e);
  if (!wait_all_done(ctx, e, Phase::kReduce)) return;
  reduce_tokens<kR, kU>(p, recv_base);
  op_end(ctx, e);
}

}  // namespace

void launch_combine(const CombineParams& p, int num_blocks, int num_threads, cudaStream_t stream) {
  by_rank_bucket(p.ctx.num_ranks, [&](auto b) {
    combine_kernel<decltype(b)::kR, decltype(b)::kU><<<num_blocks, num_threads, 0, stream>>>(p);
  });
}

void load_combine_kernels() {
  for_each_rank_bucket([](auto b) { load_kernel(combine_kernel<decltype(b)::kR, decltype(b)::kU>, "combine_kernel"); });
}

}  // namespace epx::kernels
