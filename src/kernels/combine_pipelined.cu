// Pipelined high-throughput combine (Config::pipelined_combine): the push and the reduce of
// combine.cu overlap. Warp roles in every block:
//   senders (3/4 of the warps): work items (chunk c, source s) in c-major order, so every source's
//     low positions go first; a warp writes the chunk's rows into the source's row region, fences,
//     and publishes chunk_flags[me][c] = e on the source;
//   reducers (1/4 of the warps): tokens in increasing order; before reducing token t, wait for the
//     chunk holding each of its contributions (positions grow with t, so the wait front advances
//     with the senders), then reduce exactly as combine.cu (same order, same bits).
#include "kernels/combine_common.cuh"

namespace epx::kernels {
namespace {

__device__ void send_chunks(const CombineParams& p, const int* recv_base, const int* dst_base, uint64_t e,
                            int sender_warp, int num_sender_warps, int lane) {
  const OpContext& ctx = p.ctx;
  const int R = ctx.num_ranks, me = ctx.rank;
  int max_chunks = 0;
  for (int s = 0; s < R; ++s) {
    const int n = recv_base[s + 1] - recv_base[s];
    const int chunks = (n + combine_chunk_rows(n) - 1) / combine_chunk_rows(n);
    max_chunks = max(max_chunks, chunks);
  }
  for (int item = sender_warp; item < max_chunks * R; item += num_sender_warps) {
    const int c = item / R, s = item % R;
    const int n = recv_base[s + 1] - recv_base[s];
    const int rows_per_chunk = combine_chunk_rows(n);
    const int first = c * rows_per_chunk;
    if (s == me || first >= n) continue;
    const int last = min(n, first + rows_per_chunk);
    char* base = ctx.rows(s);
    for (int pos = first; pos < last; ++pos) {
      const int64_t i = recv_base[s] + pos, slot = dst_base[s] + pos;
      char* dst[1] = {p.rows.row(base, slot)};
      warp_copy_multicast<kUnroll>(p.x + i * p.x_stride, dst, p.rows.row_bytes, lane);
      if (p.rows.num_topk_weights)
        for (int k = lane; k < p.num_topk; k += kWarpSize)
          p.rows.topk_weights(base, slot)[k] = p.topk_weights[i * p.weight_stride + k];
    }
    // Every lane's stores are ordered (sys) before lane 0's release of the chunk flag.
    fence_acq_rel_sys();
    __syncwarp();
    if (lane == 0) st_release_sys(&ctx.chunk_flags(s)->flag[me][c], e);
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
      // Every lane acquires, so each lane's later loads of the chunk are ordered after it.
      const bool ok = wait_flag_geq(ctx, &flags->flag[r][c], e, Phase::kReduce, r);
      if (!__all_sync(0xffffffffu, ok)) return false;
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

  const int warps = blockDim.x / kWarpSize, warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int num_senders = max(1, warps * 3 / 4), num_reducers = warps - num_senders;
  if (warp < num_senders) {
    send_chunks(p, recv_base, dst_base, e, blockIdx.x * num_senders + warp, gridDim.x * num_senders, lane);
  } else {
    reduce_tokens_pipelined<kR, kU>(p, recv_base, send_base, e, blockIdx.x * num_reducers + (warp - num_senders),
                                    gridDim.x * num_reducers, lane, seen[warp]);
  }
  op_end(ctx, e);
}

}  // namespace

void launch_combine_pipelined(const CombineParams& p, int num_blocks, int num_threads, cudaStream_t stream) {
  by_rank_bucket(p.ctx.num_ranks, [&](auto b) {
    combine_pipelined_kernel<decltype(b)::kR, decltype(b)::kU><<<num_blocks, num_threads, 0, stream>>>(p);
  });
}

}  // namespace epx::kernels
