// High-throughput dispatch: one-sided writes into final slots, then a copy-out.
// Every sender knows each token's final row on every destination from the count exchange (rows are
// ordered by source rank, then source token). Roles of each block, in order:
//   send:     a warp per token writes the token once per destination rank: straight into this
//             rank's outputs for local rows, into the destination's row region for remote rows;
//   signal:   the last block to finish publishes done = e to every peer;
//   receive:  after source s's done, copy s's rows from the row region into the outputs;
//   pad:      worst-case mode: rows past the received count get idx -1, weights 0, src -1, x 0.
#include "device/copy.cuh"
#include "kernels/ht_params.hpp"

namespace epx::kernels {
namespace {

using namespace epx::device;
constexpr int kUnroll = 4;

__device__ void send_token(const DispatchParams& p, int t, const int* slot_base, int lane) {
  const OpContext& ctx = p.ctx;
  const int R = ctx.num_ranks, me = ctx.rank;
  // Destination row of this token on every rank (null where it is not sent). Indexed by
  // compile-time constants only, so everything stays in registers.
  char* dst_x[kMaxPeers];
  int64_t dst_row[kMaxPeers];
#pragma unroll
  for (int r = 0; r < kMaxPeers; ++r) {
    const int pos = r < R ? p.send_pos[static_cast<int64_t>(t) * R + r] : -1;
    dst_row[r] = pos >= 0 ? slot_base[r] + pos : -1;
    dst_x[r] = pos < 0 ? nullptr
               : r == me ? p.recv_x + dst_row[r] * p.rows.row_bytes
                         : p.rows.row(ctx.rows(r), dst_row[r]);
  }
  warp_copy_multicast<kUnroll>(p.x + t * p.x_row_stride_bytes, dst_x, p.rows.row_bytes, lane);

  // Metadata: scales, top-k rewritten to the destination's local ids, source index.
  const int E_loc = p.num_experts_per_rank;
  const RowLayout& L = p.rows;
#pragma unroll 1
  for (int r = 0; r < R; ++r) {
    const int64_t row = p.send_pos[static_cast<int64_t>(t) * R + r] >= 0 ? slot_base[r] + p.send_pos[static_cast<int64_t>(t) * R + r] : -1;
    if (row < 0) continue;
    const bool local = r == me;
    char* base = local ? nullptr : ctx.rows(r);
    float* scales = local ? p.recv_x_scales + row * L.num_scales : L.scales(base, row);
    for (int j = lane; j < L.num_scales; j += kWarpSize)
      scales[j] = p.x_scales[t * p.scale_token_stride + j * p.scale_hidden_stride];
    for (int k = lane; k < L.num_topk_idx; k += kWarpSize) {
      const int64_t e = p.topk_idx[t * p.topk_stride + k];
      const int64_t first = static_cast<int64_t>(r) * E_loc;
      const int local_e = (e >= first && e < first + E_loc) ? static_cast<int>(e - first) : -1;
      const float w = (p.topk_weights != nullptr && local_e >= 0) ? p.topk_weights[t * p.weight_stride + k] : 0.f;
      if (local) {
        if (p.recv_topk_idx) p.recv_topk_idx[row * p.num_topk + k] = local_e;
        if (p.recv_topk_weights) p.recv_topk_weights[row * p.num_topk + k] = w;
      } else {
        L.topk_idx(base, row)[k] = local_e;
        if (L.num_topk_weights) L.topk_weights(base, row)[k] = w;
      }
    }
    if (lane == 0) {
      if (!local) *L.src_idx(base, row) = t;
      else if (p.recv_src_idx) p.recv_src_idx[row] = t;
    }
  }
}

// Copies rows [first, first + num) of the local row region (written by one source) to the outputs.
__device__ void copy_out(const DispatchParams& p, int64_t first, int64_t num) {
  const RowLayout& L = p.rows;
  char* base = p.ctx.rows(p.ctx.rank);
  const size_t tid = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const size_t nthreads = static_cast<size_t>(gridDim.x) * blockDim.x;
  coop_copy(p.recv_x + first * L.row_bytes, L.row(base, first), num * L.row_bytes, tid, nthreads);
  if (L.num_scales)
    coop_copy(p.recv_x_scales + first * L.num_scales, L.scales(base, first), num * L.num_scales * 4, tid, nthreads);
  const int K = L.num_topk_idx;
  for (size_t i = tid; i < static_cast<size_t>(num) * K; i += nthreads) {
    if (p.recv_topk_idx) p.recv_topk_idx[first * K + i] = L.topk_idx(base, first)[i];
    if (p.recv_topk_weights) p.recv_topk_weights[first * K + i] = L.num_topk_weights ? L.topk_weights(base, first)[i] : 0.f;
  }
  if (p.recv_src_idx) coop_copy(p.recv_src_idx + first, L.src_idx(base, first), num * 4, tid, nthreads);
}

__device__ void pad_rows(const DispatchParams& p, int64_t first) {
  const int64_t num = p.out_rows - first;
  if (num <= 0) return;
  const RowLayout& L = p.rows;
  const size_t tid = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const size_t nthreads = static_cast<size_t>(gridDim.x) * blockDim.x;
  coop_zero(p.recv_x + first * L.row_bytes, num * L.row_bytes, tid, nthreads);
  if (L.num_scales) coop_zero(p.recv_x_scales + first * L.num_scales, num * L.num_scales * 4, tid, nthreads);
  const int K = p.num_topk;
  for (size_t i = tid; i < static_cast<size_t>(num) * K; i += nthreads) {
    if (p.recv_topk_idx) p.recv_topk_idx[first * K + i] = -1;
    if (p.recv_topk_weights) p.recv_topk_weights[first * K + i] = 0.f;
  }
  if (p.recv_src_idx) coop_fill(p.recv_src_idx + first, -1, num, tid, nthreads);
}

__global__ void __launch_bounds__(kMaxHtThreads) dispatch_kernel(const __grid_constant__ DispatchParams p) {
  __shared__ int slot_base[kMaxPeers];  // first row of this rank's rows on each destination
  __shared__ int recv_base[kMaxPeers + 1];  // first row of each source's rows here
  const OpContext& ctx = p.ctx;
  const int R = ctx.num_ranks, me = ctx.rank;
  const uint64_t e = op_begin(ctx);
  const int num_recv = *p.num_recv;
  if (num_recv < 0 || !rows_fit(ctx, p.count_matrix, p.rows.capacity, /*by_receiver=*/true)) {  // the count exchange failed a check on every rank alike: skip the op
    op_end(ctx, e);
    return;
  }
  if (threadIdx.x < R) {
    int sum = 0;
    for (int s = 0; s < me; ++s) sum += p.count_matrix[s * R + threadIdx.x];
    slot_base[threadIdx.x] = sum;
  }
  if (threadIdx.x == 0) {
    recv_base[0] = 0;
    for (int s = 0; s < R; ++s) recv_base[s + 1] = recv_base[s] + p.count_matrix[s * R + me];
  }
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
  for (int i = 1; i < R; ++i) {
    const int s = (me + i) % R;
    if (!wait_peer_done(ctx, e, s, Phase::kReceive)) return;
    copy_out(p, recv_base[s], recv_base[s + 1] - recv_base[s]);
  }
  pad_rows(p, num_recv);
  op_end(ctx, e);
}

}  // namespace

void launch_dispatch(const DispatchParams& p, int num_blocks, int num_threads, cudaStream_t stream) {
  dispatch_kernel<<<num_blocks, num_threads, 0, stream>>>(p);
}

}  // namespace epx::kernels
