// Pipelined high-throughput combine (Config::pipelined_combine): the push and the reduce of
// combine.cu overlap. Warp roles in every block:
//   senders (p.send_warps of each block's warps, or whole blocks: pipeline_roles.cuh): a row per warp in (chunk c, source s, row) order over all
//     sender warps, so every source's low positions go first; the warp fences, counts the row on
//     Workspace::chunk_rows_done[s][c], and the warp completing chunk c publishes
//     chunk_flags[me][c] = e on source s;
//   reducers (the other warps): tokens in increasing order; before reducing token t, wait for the
//     chunk holding each of its contributions (positions grow with t, so the wait front advances
//     with the senders), then reduce exactly as combine.cu (same order, same bits).
#include "kernels/combine_common.cuh"
#include "kernels/pipeline_roles.cuh"

namespace epx::kernels {
namespace {

// Rows go out one per warp in (chunk, source, row-in-chunk) order over all sender warps of the
// grid, so every source's front advances in position order; after each row the warp fences and
// counts it on its (source, chunk) counter, and the warp that completes a chunk publishes its flag.
__device__ void send_rows_pipelined(const CombineParams& p, const int* recv_base, const int* dst_base, uint64_t e,
                                   int sender_warp, int num_sender_warps, int lane) {
  const OpContext& ctx = p.ctx;
  const int R = ctx.num_ranks, me = ctx.rank;
  int max_chunks = 0, slots = 0;  // slots: row slots per (chunk, source) item, the largest chunk
  for (int s = 0; s < R; ++s) {
    const int n = recv_base[s + 1] - recv_base[s], per = combine_chunk_rows(n);
    max_chunks = max(max_chunks, (n + per - 1) / per);
    slots = max(slots, per);
  }
  const int64_t total = static_cast<int64_t>(max_chunks) * R * slots;
  for (int64_t g = sender_warp; g < total; g += num_sender_warps) {
    const int item = static_cast<int>(g / slots), k = static_cast<int>(g % slots);
    const int c = item / R, s = item % R;
    if (s == me) continue;
    const int n = recv_base[s + 1] - recv_base[s], per = combine_chunk_rows(n);
    const int pos = c * per + k;
    if (k >= per || pos >= n) continue;
    const int64_t i = recv_base[s] + pos, slot = dst_base[s] + pos;
    char* base = ctx.rows(s);
    char* dst[1] = {p.rows.row(base, slot)};
    warp_copy_multicast<kSendUnroll>(p.x + i * p.x_stride, dst, p.rows.row_bytes, lane);
    if (p.rows.num_topk_weights)
      for (int kk = lane; kk < p.num_topk; kk += kWarpSize)
        p.rows.topk_weights(base, slot)[kk] = p.topk_weights[i * p.weight_stride + kk];
    // The warp barrier orders every lane's stores before lane 0's fence, whose cumulativity orders
    // them (sys) before the count that may publish them: one fence per row, not 32.
    __syncwarp();
    if (lane == 0) {
      fence_acq_rel_sys();
      unsigned int* counter = &ctx.ws->chunk_rows_done[s][c];
      const unsigned int target = static_cast<unsigned int>(min(per, n - c * per));
      if (atomicAdd(counter, 1u) + 1 == target) {
        *counter = 0;  // complete: nobody else touches it in this op
        fence_acq_rel_sys();
        st_release_sys(&ctx.chunk_flags(s)->flag[me][c], e);
      }
    }
  }
}

// False if a wait failed (the error is recorded).
template <int kR, int kU>
__device__ bool reduce_tokens_pipelined(const CombineParams& p, const int* recv_base, const int* send_base,
                                        uint64_t e, int reducer_warp, int num_reducer_warps, int lane,
                                        int* seen /* [kMaxPeers] of this warp, in shared memory */) {
  const OpContext& ctx = p.ctx;
  const int R = ctx.num_ranks, me = ctx.rank;
  // seen[r]: highest chunk of rank r this warp already saw complete.
  if (lane < kMaxPeers) seen[lane] = -1;
  __syncwarp();
  ChunkFlags* flags = ctx.chunk_flags(me);
  for (int t = reducer_warp; t < p.num_tokens; t += num_reducer_warps) {
    for (int r = 0; r < R; ++r) {
      if (r == me) continue;
      const int pos = p.send_pos[static_cast<int64_t>(t) * R + r];
      if (pos < 0) continue;
      const int c = pos / combine_chunk_rows(p.count_matrix[me * R + r]);
      if (c <= seen[r]) continue;
      if (!warp_wait_flag_geq(ctx, &flags->flag[r][c], e, Phase::kReduce, r, lane)) return false;
      if (lane == 0) seen[r] = c;
      __syncwarp();
    }
    reduce_token<kR, kU>(p, t, recv_base, send_base, lane);
  }
  return true;
}

template <int kR, int kU>
__global__ void __launch_bounds__(kMaxHtThreads) combine_pipelined_kernel(const __grid_constant__ CombineParams p) {
  __shared__ int recv_base[kMaxPeers + 1];
  __shared__ int dst_base[kMaxPeers];
  __shared__ int send_base[kMaxPeers];
  __shared__ int seen[kMaxHtThreads / kWarpSize][kMaxPeers];
  const OpContext& ctx = p.ctx;
  compute_send_base(p, send_base);
  uint64_t e = 0;
  if (!combine_begin(p, e, recv_base, dst_base)) return;

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const WarpRole role = pipeline_role(p.send_blocks, p.send_warps);
  if (role.sends)
    send_rows_pipelined(p, recv_base, dst_base, e, role.index, role.count, lane);
  else
    reduce_tokens_pipelined<kR, kU>(p, recv_base, send_base, e, role.index, role.count, lane, seen[warp]);
  op_end(ctx, e);
}

}  // namespace

void launch_combine_pipelined(const CombineParams& p, int num_blocks, int num_threads, cudaStream_t stream) {
  by_rank_bucket(p.ctx.num_ranks, [&](auto b) {
    combine_pipelined_kernel<decltype(b)::kR, decltype(b)::kU><<<num_blocks, num_threads, 0, stream>>>(p);
  });
}

}  // namespace epx::kernels
