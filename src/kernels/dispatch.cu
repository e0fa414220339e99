// High-throughput dispatch: one-sided writes into final slots, copied out as they land.
// Every sender knows each token's final row on every destination from the count exchange (rows are
// ordered by source rank, then source token). Block b's warps split into two parts, each with a
// named barrier of its own, so the copy-out overlaps the sends:
//   send (warps [0, S = warps - K), K = p.copy_warps): a warp per token writes b's tokens once per
//     destination rank: straight into this rank's outputs for local rows, into the destination's
//     row region for remote rows; every kDispatchPublishRounds rounds of S tokens it tells each
//     destination how far b's rows to it are written;
//   copy-out (warps [S, warps)): copies out the rows that block b of every source has published
//     so far, then (worst-case mode) pads: rows past the received count get idx -1, weights 0,
//     src -1, x 0.
// Words (in RingCtl, tagged with the op epoch like the ring combine's; docs/protocol.md):
//   bound[s][b] on r: first row of r's row region holding s's block-b tokens (bound[s][B]: the end);
//   tail[s][b][0] on r: end of the rows s's block b has written to r so far.
// Bounded (p.ring_slots = Q > 0: the rows do not all fit the row region): r's row region is cut
// into R x B rings of Q slots, ring (s, b) holding s's block-b rows to r: row j (in r's output
// order, bound[s][b] <= j < bound[s][b + 1]) lands in slot (s B + b) Q + (j - bound[s][b]) % Q.
// The copy warps return slots through a consumer head
//   head[r][b] on s: end of the rows of ring (s, b) on r that r's block b has copied out,
// and before each round a block's senders wait until every destination's head leaves room for the
// round's rows. A sender only waits for slots of rows it already published, and the copy warps
// always drain what is published, so no wait closes a cycle (docs/protocol.md, "dispatch, bounded").
// The output rows, and so the output order, are the unbounded dispatch's.
#include "kernels/dispatch_common.cuh"
#include "kernels/launch.cuh"
#include "kernels/positions.cuh"

namespace epx::kernels {
namespace {

using namespace epx::device;

// The senders (warps [0, S), named barrier 1): block b's tokens, progress published
// every kDispatchPublishRounds rounds of S tokens. Bounded (Q > 0): before each publication round,
// room for its rows in every destination's ring. False when a wait failed (the error is recorded).
__device__ bool send_and_publish(const DispatchParams& p, uint64_t e, const int* slot_base, int S) {
  __shared__ int ring_start[kMaxPeers];  // first row of block b's rows on each destination
  __shared__ int round_end[kMaxPeers];   // end of the current round's rows on each destination
  const OpContext& ctx = p.ctx;
  const int R = ctx.num_ranks, me = ctx.rank, b = blockIdx.x, B = gridDim.x, Q = p.ring_slots;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const TokenRange tokens = block_tokens(p.num_tokens);
  const int t_begin = tokens.begin, t_end = tokens.end;
  // Where block b's rows start on every destination (and, from the last block, where they end).
  if (warp == 0) {
    for (int r = 0; r < R; ++r) {
      if (r == me) continue;
      const int start = slot_base[r] + rows_before(p.send_pos, R, r, t_begin, lane);
      if (lane == 0) {
        ring_start[r] = start;
        st_release_sys(&ctx.ring_ctl(r)->bound[me][b], tagged_count(e, start));
        if (b == B - 1) st_release_sys(&ctx.ring_ctl(r)->bound[me][B], tagged_count(e, slot_base[r] + p.count_matrix[me * R + r]));
      }
    }
  }
  // Warp 0: the end of the round's rows to every destination, into round_end.
  auto round_ends = [&](int t1) {
    int end[kMaxPeers];
#pragma unroll
    for (int r = 0; r < kMaxPeers; ++r)
      end[r] = r < R && r != me ? slot_base[r] + rows_before(p.send_pos, R, r, t1, lane) : 0;
    if (lane < kMaxPeers) {
      int mine = 0;
#pragma unroll
      for (int r = 0; r < kMaxPeers; ++r)
        if (lane == r) mine = end[r];
      round_end[lane] = mine;
    }
    __syncwarp();
  };
  const RingCtl* own = ctx.ring_ctl(me);
  for (int t0 = t_begin; t0 < t_end; t0 += S * kDispatchPublishRounds) {
    const int t1 = min(t_end, t0 + S * kDispatchPublishRounds);
    if (Q > 0) {
      // Room in every ring: receiver r copied out all of block b's rows to it but the last Q
      // before the round's end. Those rows were published in earlier rounds (a round holds at most
      // Q / 2 rows: plan::dispatch_ring), so this waits only for copies r's block b can always make.
      bool ok = true;
      if (warp == 0) {
        round_ends(t1);
        const int need = lane < R && lane != me ? round_end[lane] - Q : 0;
        if (lane < R && lane != me && need > ring_start[lane])
          ok = wait_geq(ctx, &own->head[lane][b], tagged_count(e, need), Phase::kSend, lane).ok;
      }
      if (!bar_red_and(1, S * kWarpSize, ok)) return false;  // and the slots are free before any warp writes
    }
    for (int t = t0 + warp; t < t1; t += S) send_token(p, t, slot_base, lane, Q > 0 ? ring_start : nullptr);
    bar_sync(1, S * kWarpSize);  // every sender warp's rows of [t0, t1) before warp 0's fence
    if (warp == 0) {
      if (Q == 0) round_ends(t1);
      if (lane == 0) {
        fence_acq_rel_sys();  // cumulative over the barrier: a release of the whole round's rows
        for (int r = 0; r < R; ++r)
          if (r != me) st_relaxed_sys(&ctx.ring_ctl(r)->tail[me][b][0], tagged_count(e, round_end[r]));
      }
    }
  }
  return true;
}

// The copy-out (warps [S, warps), named barrier 2): the rows of block b of every source,
// as far as each has published, in turns. No turn waits for anything but a source's progress, so
// none can block another; bounded, each turn then returns the copied slots to the source (head).
__device__ bool copy_out_as_published(const DispatchParams& p, uint64_t e, int S, int num_recv) {
  __shared__ int lo[kMaxPeers], next[kMaxPeers], hi[kMaxPeers], avail[kMaxPeers];
  __shared__ int status;  // 0 running, 1 all copied, 2 failed
  const OpContext& ctx = p.ctx;
  const int R = ctx.num_ranks, me = ctx.rank, b = blockIdx.x, B = gridDim.x, Q = p.ring_slots;
  const int threads = static_cast<int>(blockDim.x) - S * kWarpSize, tid = static_cast<int>(threadIdx.x) - S * kWarpSize;
  RingCtl* ctl = ctx.ring_ctl(me);
  bool ok = true;
  if (tid < R && tid != me) {
    ok = wait_range(ctx, &ctl->bound[tid][b], &ctl->bound[tid][b + 1], e, Phase::kReceive, tid, next[tid], hi[tid]);
    lo[tid] = next[tid];
  } else if (tid < kMaxPeers) {
    lo[tid] = next[tid] = hi[tid] = 0;
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
        if (Q == 0) {
          copy_out(p, next[s], next[s], avail[s] - next[s], tid, threads);
        } else {
          // Ring (s, b): at most Q rows are published and not yet returned, in at most two runs.
          const int64_t ring = (static_cast<int64_t>(s) * B + b) * Q;
          for (int j = next[s]; j < avail[s];) {
            const int i_ring = (j - lo[s]) % Q, n = min(avail[s] - j, Q - i_ring);
            copy_out(p, j, ring + i_ring, n, tid, threads);
            j += n;
          }
        }
        progressed = true;
      }
      if (avail[s] < hi[s] && pending < 0) pending = s;
    }
    if (tid == 0) {
      if (pending < 0) status = 1;
      else if (progressed) clock.progressed();
      else if (idle_poll(ctx, clock, Phase::kReceive, pending, avail[pending], hi[pending]) != Idle::kWait) status = 2;
    }
    bar_sync(2, threads);  // every thread read avail/next, and (bounded) copied its part of the rows
    if (tid < R && tid != me) {
      // Release: this block's loads of the returned slots come before the source's next writes.
      if (Q > 0 && avail[tid] > next[tid]) st_release_sys(&ctx.ring_ctl(tid)->head[me][b], tagged_count(e, avail[tid]));
      next[tid] = avail[tid];
    }
    if (status != 0) break;
  }
  if (status == 2) return false;
  pad_rows(p, num_recv, static_cast<size_t>(b) * threads + tid, static_cast<size_t>(gridDim.x) * threads);
  return true;
}

__global__ void __launch_bounds__(kMaxHtThreads) dispatch_kernel(const __grid_constant__ DispatchParams p) {
  __shared__ int slot_base[kMaxPeers];  // first row of this rank's rows on each destination
  uint64_t e;
  int num_recv;
  if (!dispatch_begin(p, e, num_recv, slot_base)) return;
  const int S = static_cast<int>(blockDim.x) / kWarpSize - p.copy_warps;
  if (static_cast<int>(threadIdx.x) < S * kWarpSize) send_and_publish(p, e, slot_base, S);
  else copy_out_as_published(p, e, S, num_recv);
  op_end(p.ctx, e);
}

}  // namespace

void launch_dispatch(const DispatchParams& p, int num_blocks, int num_threads, cudaStream_t stream) {
  dispatch_kernel<<<num_blocks, num_threads, 0, stream>>>(p);
}

void load_dispatch_kernels() {
  load_kernel(dispatch_kernel, "dispatch_kernel");
}

}  // namespace epx::kernels
