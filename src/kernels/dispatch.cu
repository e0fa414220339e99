// High-throughput dispatch: one-sided writes into final slots, then a copy-out.
// Every sender knows each token's final row on every destination from the count exchange (rows are
// ordered by source rank, then source token). Roles of each block, in order:
//   send:     a warp per token writes the token once per destination rank: straight into this
//             rank's outputs for local rows, into the destination's row region for remote rows;
//   signal:   the last block to finish publishes done = e to every peer;
//   receive:  after source s's done, copy s's rows from the row region into the outputs;
//   pad:      worst-case mode: rows past the received count get idx -1, weights 0, src -1, x 0.
#include "kernels/dispatch_common.cuh"

namespace epx::kernels {
namespace {

using namespace epx::device;

__global__ void __launch_bounds__(kMaxHtThreads) dispatch_kernel(const __grid_constant__ DispatchParams p) {
  __shared__ int slot_base[kMaxPeers];  // first row of this rank's rows on each destination
  __shared__ int recv_base[kMaxPeers + 1];  // first row of each source's rows here
  const OpContext& ctx = p.ctx;
  const uint64_t e = op_begin(ctx);
  const int num_recv = *p.num_recv;
  if (num_recv < 0 || !rows_fit(ctx, p.count_matrix, p.rows.capacity, /*by_receiver=*/true)) {  // the count exchange failed a check on every rank alike: skip the op
    op_end(ctx, e);
    return;
  }
  compute_slot_and_recv_base(p, slot_base, recv_base);
  if (!wait_peers_ready(ctx, e)) return;

  // Send: contiguous token ranges per block, a warp per token.
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  const int per_block = (p.num_tokens + gridDim.x - 1) / gridDim.x;
  const int t_begin = blockIdx.x * per_block;
  const int t_end = min(p.num_tokens, t_begin + per_block);
  for (int t = t_begin + warp; t < t_end; t += warps) send_token(p, t, slot_base, lane);
  signal_sends_done(ctx, e);

  // Receive: sources in rotated order so ranks do not all wait on the same peer.
  const int R = ctx.num_ranks, me = ctx.rank;
  const size_t grid_tid = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const size_t grid_threads = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (int i = 1; i < R; ++i) {
    const int s = (me + i) % R;
    if (!wait_peer_done(ctx, e, s, Phase::kReceive)) return;
    copy_out(p, recv_base[s], recv_base[s + 1] - recv_base[s], grid_tid, grid_threads);
  }
  pad_rows(p, num_recv, grid_tid, grid_threads);
  op_end(ctx, e);
}

}  // namespace

void launch_dispatch(const DispatchParams& p, int num_blocks, int num_threads, cudaStream_t stream) {
  dispatch_kernel<<<num_blocks, num_threads, 0, stream>>>(p);
}

}  // namespace epx::kernels
