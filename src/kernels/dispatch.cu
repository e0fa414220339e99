// High-throughput dispatch: one-sided writes into final slots, then a copy-out.
// Every sender knows each token's final row on every destination from the count exchange (rows are
// ordered by source rank, then source token). Roles of each block, in order:
//   send:     a warp per token writes the token once per destination rank: straight into this
//             rank's outputs for local rows, into the destination's row region for remote rows;
//   signal:   the last block to finish publishes done = e to every peer;
//   receive:  after source s's done, copy s's rows from the row region into the outputs;
//   pad:      worst-case mode: rows past the received count get idx -1, weights 0, src -1, x 0.
// Split blocks (p.copy_warps = K > 0, dispatch_split_kernel): the copy-out overlaps the sends. In
// block b, warps [0, S = warps - K) send b's tokens and, every kPublishRounds rounds of S tokens,
// tell each destination how far b's rows to it are written; warps [S, warps) copy out the rows
// that block b of every source has published so far. Words (in RingCtl, tagged with the op epoch
// like the ring combine's; docs/protocol.md):
//   bound[s][b] on r: first row of r's row region holding s's block-b tokens (bound[s][B]: the end);
//   tail[s][b][0] on r: end of the rows s's block b has written to r so far.
#include "kernels/dispatch_common.cuh"
#include "kernels/launch.cuh"
#include "kernels/positions.cuh"

namespace epx::kernels {
namespace {

using namespace epx::device;

__global__ void __launch_bounds__(kMaxHtThreads) dispatch_kernel(const __grid_constant__ DispatchParams p) {
  __shared__ int slot_base[kMaxPeers];  // first row of this rank's rows on each destination
  __shared__ int recv_base[kMaxPeers + 1];  // first row of each source's rows here
  const OpContext& ctx = p.ctx;
  uint64_t e;
  int num_recv;
  if (!dispatch_begin(p, e, num_recv, slot_base, recv_base)) return;

  // Send: contiguous token ranges per block, a warp per token.
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  const TokenRange tokens = block_tokens(p.num_tokens);
  for (int t = tokens.begin + warp; t < tokens.end; t += warps) send_token(p, t, slot_base, lane);
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

// Rounds of S tokens a split block's senders write between two publications of their progress.
constexpr int kPublishRounds = 2;

// Split blocks' senders (warps [0, S), named barrier 1): block b's tokens, progress published.
__device__ void send_and_publish(const DispatchParams& p, uint64_t e, const int* slot_base, int S) {
  const OpContext& ctx = p.ctx;
  const int R = ctx.num_ranks, me = ctx.rank, b = blockIdx.x, B = gridDim.x;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const TokenRange tokens = block_tokens(p.num_tokens);
  const int t_begin = tokens.begin, t_end = tokens.end;
  // Where block b's rows start on every destination (and, from the last block, where they end).
  if (warp == 0) {
    for (int r = 0; r < R; ++r) {
      if (r == me) continue;
      const int start = slot_base[r] + rows_before(p.send_pos, R, r, t_begin, lane);
      if (lane == 0) {
        st_release_sys(&ctx.ring_ctl(r)->bound[me][b], tagged_count(e, start));
        if (b == B - 1) st_release_sys(&ctx.ring_ctl(r)->bound[me][B], tagged_count(e, slot_base[r] + p.count_matrix[me * R + r]));
      }
    }
  }
  for (int t0 = t_begin; t0 < t_end; t0 += S * kPublishRounds) {
    const int t1 = min(t_end, t0 + S * kPublishRounds);
    for (int t = t0 + warp; t < t1; t += S) send_token(p, t, slot_base, lane);
    bar_sync(1, S * kWarpSize);  // every sender warp's rows of [t0, t1) before warp 0's fence
    if (warp == 0) {
      int end[kMaxPeers];
#pragma unroll
      for (int r = 0; r < kMaxPeers; ++r)
        end[r] = r < R && r != me ? slot_base[r] + rows_before(p.send_pos, R, r, t1, lane) : 0;
      if (lane == 0) {
        fence_acq_rel_sys();  // cumulative over the barrier: a release of the whole round's rows
#pragma unroll
        for (int r = 0; r < kMaxPeers; ++r)
          if (r < R && r != me) st_relaxed_sys(&ctx.ring_ctl(r)->tail[me][b][0], tagged_count(e, end[r]));
      }
    }
  }
}

// Split blocks' copy-out (warps [S, warps), named barrier 2): the rows of block b of every source,
// as far as each has published, in turns. Senders never wait on this, so no turn can block another.
__device__ bool copy_out_as_published(const DispatchParams& p, uint64_t e, int S, int num_recv) {
  __shared__ int next[kMaxPeers], hi[kMaxPeers], avail[kMaxPeers];
  __shared__ int status;  // 0 running, 1 all copied, 2 failed
  const OpContext& ctx = p.ctx;
  const int R = ctx.num_ranks, me = ctx.rank, b = blockIdx.x;
  const int threads = static_cast<int>(blockDim.x) - S * kWarpSize, tid = static_cast<int>(threadIdx.x) - S * kWarpSize;
  RingCtl* ctl = ctx.ring_ctl(me);
  bool ok = true;
  if (tid < R && tid != me) {
    ok = wait_range(ctx, &ctl->bound[tid][b], &ctl->bound[tid][b + 1], e, Phase::kReceive, tid, next[tid], hi[tid]);
  } else if (tid < kMaxPeers) {
    next[tid] = hi[tid] = 0;
  }
  if (tid == 0) status = 0;
  if (!bar_red_and(2, threads, ok)) return false;
  WaitClock clock;
  while (true) {
    // Thread s looks at source s's progress (acquire); the barrier orders the copies after it.
    if (tid < R && tid != me) {
      const uint64_t v = next[tid] < hi[tid] ? ld_acquire_sys(&ctl->tail[tid][b][0]) : 0;
      avail[tid] = v >= tagged_count(e, 0) ? min(hi[tid], count_of(v)) : next[tid];
    }
    bar_sync(2, threads);
    bool progressed = false;
    int pending = -1;  // the first source not yet all copied
    for (int i = 1; i < R; ++i) {
      const int s = (me + i) % R;
      if (avail[s] > next[s]) {
        copy_out(p, next[s], avail[s] - next[s], tid, threads);
        progressed = true;
      }
      if (avail[s] < hi[s] && pending < 0) pending = s;
    }
    if (tid == 0) {
      if (pending < 0) status = 1;
      else if (progressed) clock.progressed();
      else if (idle_poll(ctx, clock, Phase::kReceive, pending, avail[pending], hi[pending]) != Idle::kWait) status = 2;
    }
    bar_sync(2, threads);  // every thread read avail/next before they move on
    if (tid < R && tid != me) next[tid] = avail[tid];
    if (status != 0) break;
  }
  if (status == 2) return false;
  pad_rows(p, num_recv, static_cast<size_t>(b) * threads + tid, static_cast<size_t>(gridDim.x) * threads);
  return true;
}

__global__ void __launch_bounds__(kMaxHtThreads) dispatch_split_kernel(const __grid_constant__ DispatchParams p) {
  __shared__ int slot_base[kMaxPeers];
  __shared__ int recv_base[kMaxPeers + 1];
  uint64_t e;
  int num_recv;
  if (!dispatch_begin(p, e, num_recv, slot_base, recv_base)) return;
  const int S = static_cast<int>(blockDim.x) / kWarpSize - p.copy_warps;
  if (static_cast<int>(threadIdx.x) < S * kWarpSize) send_and_publish(p, e, slot_base, S);
  else copy_out_as_published(p, e, S, num_recv);
  op_end(p.ctx, e);
}

}  // namespace

void launch_dispatch(const DispatchParams& p, int num_blocks, int num_threads, cudaStream_t stream) {
  if (p.copy_warps > 0) dispatch_split_kernel<<<num_blocks, num_threads, 0, stream>>>(p);
  else dispatch_kernel<<<num_blocks, num_threads, 0, stream>>>(p);
}

void load_dispatch_kernels() {
  load_kernel(dispatch_kernel, "dispatch_kernel");
  load_kernel(dispatch_split_kernel, "dispatch_split_kernel");
}

}  // namespace epx::kernels
