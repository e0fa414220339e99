// notify: the count exchange before a fresh dispatch. One block:
//   1. the entry barrier (every peer finished its previous op),
//   2. this rank writes its per-rank counts and each rank's per-expert counts into slot[rank] of
//      every rank's NotifyArea, then publishes done = e,
//   3. while that is in flight, each token's slot among this rank's rows to every rank (send_pos),
//   4. after every peer's done: the full count matrix, the rank prefix matrix, the rows this rank
//      receives, the per-expert received counts, the busiest receiver's and sender's row counts,
//      and the worst-case check every rank agrees on.
#include <cub/block/block_scan.cuh>

#include "device/sync.cuh"
#include "kernels/ht_params.hpp"
#include "kernels/launch.cuh"

namespace epx::kernels {
namespace {

constexpr int kThreads = 1024;
using BlockScan = cub::BlockScan<int, kThreads>;

__device__ void compute_send_pos(const NotifyParams& p, BlockScan::TempStorage& scan_storage) {
  const int R = p.ctx.num_ranks;
  for (int r = 0; r < R; ++r) {
    int running = 0;
    for (int base = 0; base < p.num_tokens; base += kThreads) {
      const int t = base + threadIdx.x;
      const int flag = t < p.num_tokens && p.is_token_in_rank[static_cast<int64_t>(t) * R + r] ? 1 : 0;
      int prefix, total;
      BlockScan(scan_storage).ExclusiveSum(flag, prefix, total);
      if (t < p.num_tokens) p.send_pos[static_cast<int64_t>(t) * R + r] = flag ? running + prefix : -1;
      running += total;
      __syncthreads();
    }
    // The layout inputs must agree with each other: a mismatch would misplace rows on a peer.
    if (threadIdx.x == 0 && running != p.num_tokens_per_rank[r])
      device::record_error(p.ctx, DeviceErrorKind::kInvalidArgument, Phase::kInputCheck, r, -1,
                           p.num_tokens_per_rank[r], running);
  }
}

__global__ void __launch_bounds__(kThreads, 1) notify_kernel(const __grid_constant__ NotifyParams p) {
  __shared__ BlockScan::TempStorage scan_storage;
  __shared__ int counts[kMaxPeers][kMaxPeers];
  const device::OpContext& ctx = p.ctx;
  const int R = ctx.num_ranks, me = ctx.rank, E_loc = p.num_experts_per_rank;
  const uint64_t e = device::op_begin(ctx);

  if (device::wait_peers_ready(ctx, e)) {
    // 2. Counts to every rank r: the whole per-rank row, and r's experts' counts.
    for (int r = 0; r < R; ++r) {
      NotifySlot* slot = &ctx.notify(r)->slot[me];
      for (int i = threadIdx.x; i < R; i += blockDim.x) slot->tokens_per_rank[i] = p.num_tokens_per_rank[i];
      for (int j = threadIdx.x; j < E_loc; j += blockDim.x)
        slot->tokens_per_expert[j] = p.num_tokens_per_expert[r * E_loc + j];
    }
    device::signal_sends_done(ctx, e);
  }

  // 3. Local work that needs nothing from peers.
  compute_send_pos(p, scan_storage);

  // 4. Everything below reads what the peers wrote.
  if (!device::wait_all_done(ctx, e, Phase::kCountExchange)) {
    device::op_end(ctx, e);
    return;
  }
  const NotifyArea* area = ctx.notify(me);
  for (int i = threadIdx.x; i < R * R; i += blockDim.x) {
    const int s = i / R, r = i % R;
    counts[s][r] = area->slot[s].tokens_per_rank[r];
    p.count_matrix[i] = counts[s][r];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < R * R; i += blockDim.x) {
    const int s = i / R, r = i % R;
    int sum = 0;
    for (int k = 0; k <= s; ++k) sum += counts[k][r];
    p.rank_prefix_matrix[i] = sum;
  }
  if (p.num_recv_tokens_per_expert != nullptr) {
    for (int j = threadIdx.x; j < E_loc; j += blockDim.x) {
      int sum = 0;
      for (int s = 0; s < R; ++s) sum += area->slot[s].tokens_per_expert[j];
      const int a = p.expert_alignment;
      p.num_recv_tokens_per_expert[j] = (sum + a - 1) / a * a;
    }
  }
  if (threadIdx.x == 0) {
    // Every rank sees the same matrix, so every rank takes the same decisions. Rows that do not fit
    // the row region are no error: dispatch and combine then stream through rings (bounded).
    long long max_rows = 0, max_sent = 0;
    int worst_rank = 0;
    for (int r = 0; r < R; ++r) {
      long long rows = 0, sent = 0;
      for (int s = 0; s < R; ++s) {
        rows += counts[s][r];
        sent += counts[r][s];
      }
      if (rows > max_rows) { max_rows = rows; worst_rank = r; }
      if (sent > max_sent) max_sent = sent;
    }
    int num_recv = 0;
    for (int s = 0; s < R; ++s) num_recv += counts[s][me];
    int status = 0;
    if (p.num_worst_tokens > 0 && max_rows > p.num_worst_tokens) {
      status = static_cast<int>(DeviceErrorKind::kInvalidArgument);
      device::record_error(ctx, DeviceErrorKind::kInvalidArgument, Phase::kCapacity, worst_rank, -1, max_rows,
                           p.num_worst_tokens);
    }
    // A negative count tells dispatch and combine to skip the op on every rank alike.
    *p.num_recv = status == 0 ? num_recv : -1;
    // The host reads the mailbox after this kernel's stream completed (HostMailbox).
    if (p.mailbox != nullptr) {
      p.mailbox->num_recv = num_recv;
      p.mailbox->max_rows = max_rows;
      p.mailbox->max_sent_rows = max_sent;
    }
  }
  device::op_end(ctx, e);
}

}  // namespace

void launch_notify(const NotifyParams& p, cudaStream_t stream) {
  notify_kernel<<<1, kThreads, 0, stream>>>(p);
}

void load_notify_kernels() { load_kernel(notify_kernel, "notify_kernel"); }

}  // namespace epx::kernels
