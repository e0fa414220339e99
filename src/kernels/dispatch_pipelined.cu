// Pipelined high-throughput dispatch (Config::pipelined_dispatch): the push and the copy-out of
// dispatch.cu overlap. Warp roles in every block:
//   senders (p.send_warps of each block's warps, or whole blocks: pipeline_roles.cuh): batches of kBatch consecutive tokens, batch b by sender warp
//     b % num_senders, so the token front advances in order; a warp sends its batch (send_token),
//     fences, and counts the rows it wrote into each (destination, chunk) counter; the warp that
//     completes a chunk publishes chunk_flags[me][c] = e on that destination. Then worst-case padding.
//   copiers (the other warps): items (chunk c, source s) in c-major order; wait for the chunk's
//     flag, then copy its rows (contiguous in the row region and in the outputs) out.
#include "kernels/dispatch_common.cuh"
#include "kernels/pipeline_roles.cuh"

namespace epx::kernels {
namespace {

constexpr int kBatch = 8;

__device__ __forceinline__ int chunk_rows_of(const DispatchParams& p, int src, int dst) {
  return combine_chunk_rows(p.count_matrix[src * p.ctx.num_ranks + dst]);
}

// Lane 0: after the warp's rows of tokens [t0, t1) are fenced, count them per (destination, chunk)
// and publish every chunk this completes.
__device__ void count_rows(const DispatchParams& p, int t0, int t1, uint64_t e) {
  const OpContext& ctx = p.ctx;
  const int R = ctx.num_ranks, me = ctx.rank;
  for (int r = 0; r < R; ++r) {
    if (r == me) continue;
    const int rows = p.count_matrix[me * R + r], per_chunk = chunk_rows_of(p, me, r);
    int c_open = -1, n_open = 0;
    auto flush = [&]() {
      if (n_open == 0) return;
      const int target = min(per_chunk, rows - c_open * per_chunk);
      unsigned int* counter = &ctx.ws->chunk_rows_done[r][c_open];
      if (atomicAdd(counter, static_cast<unsigned int>(n_open)) + n_open == static_cast<unsigned int>(target)) {
        *counter = 0;  // complete: nobody else touches it in this op
        fence_acq_rel_sys();
        st_release_sys(&ctx.chunk_flags(r)->flag[me][c_open], e);
      }
      n_open = 0;
    };
    for (int t = t0; t < t1; ++t) {
      const int pos = p.send_pos[static_cast<int64_t>(t) * R + r];
      if (pos < 0) continue;
      const int c = pos / per_chunk;
      if (c != c_open) {
        flush();
        c_open = c;
      }
      ++n_open;
    }
    flush();
  }
}

__device__ void send_batches(const DispatchParams& p, const int* slot_base, uint64_t e, int sender_warp,
                             int num_sender_warps, int lane) {
  const int num_batches = (p.num_tokens + kBatch - 1) / kBatch;
  for (int b = sender_warp; b < num_batches; b += num_sender_warps) {
    const int t0 = b * kBatch, t1 = min(p.num_tokens, t0 + kBatch);
    for (int t = t0; t < t1; ++t) send_token(p, t, slot_base, lane);
    // The warp barrier orders every lane's row stores before lane 0's fence, whose cumulativity
    // orders them (sys) before the counts that may publish them.
    __syncwarp();
    if (lane == 0) {
      fence_acq_rel_sys();
      count_rows(p, t0, t1, e);
    }
    __syncwarp();
  }
}

// False if a wait failed (the error is recorded).
__device__ bool copy_chunks(const DispatchParams& p, const int* recv_base, uint64_t e, int copy_warp,
                            int num_copy_warps, int lane) {
  const OpContext& ctx = p.ctx;
  const int R = ctx.num_ranks, me = ctx.rank;
  int max_chunks = 0;
  for (int s = 0; s < R; ++s) {
    const int n = recv_base[s + 1] - recv_base[s];
    max_chunks = max(max_chunks, (n + chunk_rows_of(p, s, me) - 1) / chunk_rows_of(p, s, me));
  }
  ChunkFlags* flags = ctx.chunk_flags(me);
  for (int item = copy_warp; item < max_chunks * R; item += num_copy_warps) {
    // Sources rotated so ranks do not all start on the same peer.
    const int c = item / R, s = (me + 1 + item % R) % R;
    const int n = recv_base[s + 1] - recv_base[s], per_chunk = chunk_rows_of(p, s, me);
    const int first = c * per_chunk;
    if (s == me || first >= n) continue;
    if (!warp_wait_flag_geq(ctx, &flags->flag[s][c], e, Phase::kReceive, s, lane)) return false;
    copy_out(p, recv_base[s] + first, min(per_chunk, n - first), lane, kWarpSize);
  }
  return true;
}

__global__ void __launch_bounds__(kMaxHtThreads) dispatch_pipelined_kernel(const __grid_constant__ DispatchParams p) {
  __shared__ int slot_base[kMaxPeers];
  __shared__ int recv_base[kMaxPeers + 1];
  const OpContext& ctx = p.ctx;
  const uint64_t e = op_begin(ctx);
  const int num_recv = *p.num_recv;
  if (num_recv < 0 || !rows_fit(ctx, p.count_matrix, p.rows.capacity, /*by_receiver=*/true)) {
    op_end(ctx, e);
    return;
  }
  compute_slot_and_recv_base(p, slot_base, recv_base);
  if (!wait_peers_ready(ctx, e)) return;

  const int lane = threadIdx.x % kWarpSize;
  const WarpRole role = pipeline_role(p.send_blocks, p.send_warps);
  if (role.sends) {
    send_batches(p, slot_base, e, role.index, role.count, lane);
    pad_rows(p, num_recv, static_cast<size_t>(role.index) * kWarpSize + lane, static_cast<size_t>(role.count) * kWarpSize);
  } else {
    copy_chunks(p, recv_base, e, role.index, role.count, lane);
  }
  op_end(ctx, e);
}

}  // namespace

void launch_dispatch_pipelined(const DispatchParams& p, int num_blocks, int num_threads, cudaStream_t stream) {
  dispatch_pipelined_kernel<<<num_blocks, num_threads, 0, stream>>>(p);
}

}  // namespace epx::kernels
