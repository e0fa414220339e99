// Ring combine: the push and the reduce overlap through bounded, reused rings (the row-region
// combine writes every row once and reduces only after all of them arrived, so it is slower from
// 3 ranks: docs/performance.md). It is also the bounded combine: a combine whose returned rows do
// not fit the row region takes it at any rank count. Block c is channel c: its warps [0, S)
// (S = p.ring_send_warps) are the channel's sender and the others its receiver, each part with its
// own named barrier, so every SM sends and reduces.
//   receiver (rank s, channel c): owns s's tokens [lo_c, hi_c) (lo_c = c * N / C). First it tells
//     every peer r where its channel starts among s's rows to r: bound[s][c] on r (the last channel
//     also writes bound[s][C], the end). Then, a batch of one token per warp at a time, in token
//     order: for each contribution from a peer r, wait until the tail word of the sender warp that
//     wrote it covers it, reduce in rank order exactly as combine.cu (same bits), and after the
//     batch tell each peer how many of its rows are consumed (head[s][c] on r).
//   sender (rank r, channel c): serves every peer s with W of its S warps. Warp w streams rows w,
//     w + W, ... of the rows r received from s whose positions lie in [bound[s][c],
//     bound[s][c + 1]) into ring (r, c) on s, ring_chunk rows at a time: wait for room (head),
//     write, release its own tail word. No warp waits for another.
// Every flag is (op epoch << 32) | count, so nothing is reset between ops; a peer's previous op is
// over (entry barrier) before any of this op's rows are written, so every ring starts empty.
#include <algorithm>

#include "kernels/combine_common.cuh"
#include "kernels/launch.cuh"
#include "kernels/positions.cuh"

namespace epx::kernels {
namespace {

// Row vectors per lane in flight in a ring sender: 12 (6 KB per warp), faster than 8 and 14
// (docs/performance.md); the sender is not inlined so it gets its own registers (inlined beside
// the receive, 12 spills).
constexpr int kRingSendUnroll = 12;

// The warps [first, first + count) of a block that play one part (send or receive), with their own
// named barrier.
struct WarpGroup {
  int first, count, barrier;
  __device__ int warp() const { return static_cast<int>(threadIdx.x) / kWarpSize - first; }
  __device__ int thread() const { return static_cast<int>(threadIdx.x) - first * kWarpSize; }
  __device__ void sync() const { bar_sync(barrier, count * kWarpSize); }
  __device__ bool sync_and(bool pred) const { return bar_red_and(barrier, count * kWarpSize, pred); }
};

// The warps [first, first + count) of the sending warps a block gives the g-th peer after the
// sender (both sides compute it alike): every warp works, the first warps % peers peers get one more.
struct PeerWarps {
  int first, count;
};
__device__ __forceinline__ PeerWarps ring_peer_warps(int peers, int g, int warps) {
  const int q = warps / peers, extra = warps % peers;
  return {g * q + min(g, extra), q + (g < extra ? 1 : 0)};
}

// Rows a sending warp writes per release: Tuning.ring_chunk (src/host/tuning.hpp), or when 0 8 rows
// per round of the peer's W warps, the best of the chunk sweeps in docs/performance.md.
__device__ __forceinline__ int ring_chunk(const CombineParams& p, int W) {
  return p.ring_chunk > 0 ? p.ring_chunk : max(1, 8 / W);
}

// False if a wait failed (the error is recorded); the caller still reaches every barrier.
// g: the receiving warps; send_warps: the sending warps of a block of every rank.
template <int kR, int kU>
__device__ bool receive(const CombineParams& p, uint64_t e, int c, const int* recv_base, WarpGroup g, int send_warps) {
  __shared__ int first[kMaxPeers];      // stream index 0 of each peer's rows for this channel
  __shared__ int peer_warps[kMaxPeers];  // W of each peer's sender warps
  __shared__ int consumed[kMaxPeers];   // rows of each peer consumed so far
  __shared__ int seen[kMaxRingWarps][kMaxPeers][kMaxRingWarps];  // per warp: tail counts it acquired
  __shared__ int failed;
  const OpContext& ctx = p.ctx;
  const int R = ctx.num_ranks, me = ctx.rank, C = p.ring_channels, Q = p.ring_slots;
  const int warp = g.warp(), lane = threadIdx.x % kWarpSize, warps = g.count, tid = g.thread();
  const int N = p.num_tokens;
  const int lo = static_cast<int>(static_cast<int64_t>(c) * N / C), hi = static_cast<int>(static_cast<int64_t>(c + 1) * N / C);
  if (tid == 0) failed = 0;
  // Channel bounds to every peer: warp r computes rank r's.
  for (int r = warp; r < R; r += warps) {
    if (r == me) continue;
    const int start = rows_before(p.send_pos, R, r, lo, lane);
    if (lane == 0) {
      first[r] = start;
      peer_warps[r] = ring_peer_warps(R - 1, (me - r - 1 + R) % R, send_warps).count;
      st_release_sys(&ctx.ring_ctl(r)->bound[me][c], tagged_count(e, start));
      if (c == C - 1) st_release_sys(&ctx.ring_ctl(r)->bound[me][C], tagged_count(e, p.count_matrix[me * R + r]));
    }
  }
  for (int i = tid; i < kMaxRingWarps * kMaxPeers * kMaxRingWarps; i += warps * kWarpSize) (&seen[0][0][0])[i] = 0;
  if (tid < kMaxPeers) consumed[tid] = 0;
  g.sync();

  char* base = ctx.rows(me);
  RingCtl* ctl = ctx.ring_ctl(me);
  for (int batch = lo; batch < hi; batch += warps) {
    const int t = batch + warp;
    bool ok = true;
    if (t < hi && !failed) {
      // Wait for every peer's row of t: stream index i = position - first, written by the peer's
      // warp i % W as its (i / W)-th row.
      for (int r = 0; r < R && ok; ++r) {
        if (r == me) continue;
        const int pos = p.send_pos[static_cast<int64_t>(t) * R + r];
        if (pos < 0) continue;
        const int idx = pos - first[r], W = peer_warps[r], w = idx % W, need = idx / W + 1;
        if (need > seen[warp][r][w]) {  // every lane reads it before lane 0 may update it below
          const uint64_t* tail = &ctl->tail[r][c][w];
          if (lane == 0) {
            const Seen got = wait_geq(ctx, tail, tagged_count(e, need), Phase::kReduce, r);
            ok = got.ok;
            if (ok) seen[warp][r][w] = count_of(got.value);
          }
          __syncwarp();
          ok = __shfl_sync(0xffffffffu, ok, 0);
          (void)ld_acquire_sys(tail);  // every lane: its loads of the row come after
        }
      }
      if (ok) {
        reduce_token_with<kR, kU>(p, t, lane, [&](int r, bool weights) -> const void* {
          if (r == me) return own_contribution(p, t, recv_base, weights);
          const int pos = p.send_pos[static_cast<int64_t>(t) * R + r];
          if (pos < 0) return nullptr;
          const int64_t slot = (static_cast<int64_t>(r) * C + c) * Q + (pos - first[r]) % Q;
          if (weights) return p.rows.num_topk_weights ? p.rows.topk_weights(base, slot) : nullptr;
          return p.rows.row(base, slot);
        });
        if (lane < R && lane != me) {
          const int pos = p.send_pos[static_cast<int64_t>(t) * R + lane];
          if (pos >= 0) atomicMax(&consumed[lane], pos - first[lane] + 1);
        }
      } else if (lane == 0) {
        failed = 1;
      }
    }
    g.sync();
    if (failed) return false;
    // The batch's rows are read: tell each peer (release orders those loads before the reuse).
    // Read before the next barrier: warps of the next batch raise `consumed` for rows that other
    // warps of that batch may not have read yet.
    const int rows_done = tid < R ? consumed[tid] : 0;
    g.sync();
    if (tid < R && tid != me) st_release_sys(&ctx.ring_ctl(tid)->head[me][c], tagged_count(e, rows_done));
  }
  return true;
}

// The sending warps of channel c.
__device__ __noinline__ bool send(const CombineParams& p, uint64_t e, int c, const int* recv_base, WarpGroup wg) {
  __shared__ int lo[kMaxPeers], hi[kMaxPeers];
  __shared__ int failed;
  const OpContext& ctx = p.ctx;
  const int R = ctx.num_ranks, me = ctx.rank, C = p.ring_channels, Q = p.ring_slots;
  const int warp = wg.warp(), lane = threadIdx.x % kWarpSize, warps = wg.count;
  const int peers = R - 1;
  RingCtl* ctl = ctx.ring_ctl(me);
  bool ok = true;
  const int t = wg.thread();
  if (t == 0) failed = 0;
  if (t < R && t != me) ok = wait_range(ctx, &ctl->bound[t][c], &ctl->bound[t][c + 1], e, Phase::kReduce, t, lo[t], hi[t]);
  if (!wg.sync_and(ok)) return false;

  // This warp's peer: the g-th after me.
  int g = 0, w = warp, W = 0;
  for (; g < peers; ++g) {
    const PeerWarps pw = ring_peer_warps(peers, g, warps);
    if (warp < pw.first + pw.count) {
      w = warp - pw.first;
      W = pw.count;
      break;
    }
  }
  if (g < peers) {
    const int s = (me + 1 + g) % R;
    const int n = hi[s] - lo[s], step = ring_chunk(p, W) * W;
    char* dst_base = ctx.rows(s);
    uint64_t* tail = &ctx.ring_ctl(s)->tail[me][c][w];
    const uint64_t* head = &ctl->head[s][c];
    int written = 0;  // rows of this warp published
    for (int i0 = w; i0 < n; i0 += step) {
      const int last = min(n - 1, i0 + step - W);  // stream index of the chunk's last row
      // Room for rows up to `last`: the receiver consumed at least last + 1 - Q rows.
      if (last + 1 > Q) {
        if (lane == 0) ok = wait_geq(ctx, head, tagged_count(e, last + 1 - Q), Phase::kReduce, s).ok;
        if (!__shfl_sync(0xffffffffu, ok, 0)) break;
        (void)ld_acquire_sys(head);  // the receiver's loads of the old rows came first
      }
      for (int i = i0; i <= last; i += W) {
        const int64_t row = recv_base[s] + lo[s] + i;
        if (lane == 0 && i + W < n) prefetch_l2_bulk(p.x + (row + W) * p.x_stride, p.rows.row_bytes);  // the next row
        const int64_t slot = (static_cast<int64_t>(me) * C + c) * Q + i % Q;
        char* dst[1] = {p.rows.row(dst_base, slot)};
        warp_copy_multicast<kRingSendUnroll>(p.x + row * p.x_stride, dst, p.rows.row_bytes, lane);
        if (p.rows.num_topk_weights)
          for (int kk = lane; kk < p.num_topk; kk += kWarpSize)
            p.rows.topk_weights(dst_base, slot)[kk] = p.topk_weights[row * p.weight_stride + kk];
        ++written;
      }
      // Every lane's rows before lane 0's fence and tail (cumulativity through the warp barrier).
      __syncwarp();
      if (lane == 0) {
        fence_acq_rel_sys();  // with the relaxed store, a release pattern (one fence, not two)
        st_relaxed_sys(tail, tagged_count(e, written));
      }
    }
    if (lane == 0 && !ok) failed = 1;
  }
  wg.sync();
  return failed == 0;
}

template <int kR, int kU>
__global__ void __launch_bounds__(kMaxHtThreads, 1) combine_rings_kernel(const __grid_constant__ CombineParams p) {
  __shared__ int recv_base[kMaxPeers + 1];
  __shared__ int dst_base[kMaxPeers];
  const OpContext& ctx = p.ctx;
  const uint64_t e = op_begin(ctx);
  check_skip_is_recorded(ctx, *p.num_recv);
  if (*p.num_recv < 0) {  // the count exchange failed a check on every rank alike: skip the op
    op_end(ctx, e);
    return;
  }
  compute_recv_and_dst_base(p, recv_base, dst_base);
  if (!wait_peers_ready(ctx, e)) return;
  // Block c is channel c: warps [0, sw) send, the rest receive.
  const int warps = blockDim.x / kWarpSize, sw = p.ring_send_warps, c = blockIdx.x;
  if (static_cast<int>(threadIdx.x) < sw * kWarpSize) send(p, e, c, recv_base, WarpGroup{0, sw, 1});
  else receive<kR, kU>(p, e, c, recv_base, WarpGroup{sw, warps - sw, 2}, sw);
  op_end(ctx, e);
}

}  // namespace

void launch_combine_rings(const CombineParams& p, int num_blocks, int num_threads, cudaStream_t stream) {
  // Rings serve 2 ranks only when the returned rows do not fit the row region (plan::ring_plan,
  // bounded): those run on the 4-rank bucket, so the 2-rank bucket is not instantiated.
  by_rank_bucket(std::max(p.ctx.num_ranks, 3), [&](auto b) {
    if constexpr (decltype(b)::kR >= 3)
      combine_rings_kernel<decltype(b)::kR, decltype(b)::kU><<<num_blocks, num_threads, 0, stream>>>(p);
  });
}

void load_combine_rings_kernels() {
  for_each_rank_bucket([](auto b) {
    if constexpr (decltype(b)::kR >= 3)
      load_kernel(combine_rings_kernel<decltype(b)::kR, decltype(b)::kU>, "combine_rings_kernel");
  });
}

}  // namespace epx::kernels
