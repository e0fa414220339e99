// Pieces of the dispatch kernel (dispatch.cu): sending one token to its final rows, copying received
// rows out of the row region, padding worst-case rows.
#pragma once
#include "device/copy.cuh"
#include "device/sync.cuh"
#include "kernels/ht_params.hpp"

namespace epx::kernels {

using namespace epx::device;
constexpr int kDispatchUnroll = 4;

// slot_base[r]: first row of this rank's rows on destination r. Block-wide (ends with a barrier).
__device__ __forceinline__ void compute_slot_base(const DispatchParams& p, int* slot_base) {
  const int R = p.ctx.num_ranks, me = p.ctx.rank;
  if (threadIdx.x < R) {
    int sum = 0;
    for (int s = 0; s < me; ++s) sum += p.count_matrix[s * R + threadIdx.x];
    slot_base[threadIdx.x] = sum;
  }
  __syncthreads();
}

// Prologue of the dispatch kernel: this op's epoch `e` and rows received `num_recv`; false (after
// op_end) when the op is skipped on every rank alike (failed count exchange, or rows that do not
// fit); else slot_base is filled and every peer is ready (false also when that wait failed).
__device__ __forceinline__ bool dispatch_begin(const DispatchParams& p, uint64_t& e, int& num_recv, int* slot_base) {
  e = op_begin(p.ctx);
  num_recv = *p.num_recv;
  check_skip_is_recorded(p.ctx, num_recv);
  // The bounded dispatch (p.ring_slots > 0) streams through rings: any row count fits.
  if (num_recv < 0 || (p.ring_slots == 0 && !rows_fit(p.ctx, p.count_matrix, p.rows.capacity, /*by_receiver=*/true))) {
    op_end(p.ctx, e);
    return false;
  }
  compute_slot_base(p, slot_base);
  return wait_peers_ready(p.ctx, e);
}

// The tokens [begin, end) block `blockIdx.x` sends: contiguous ranges, in block order.
struct TokenRange {
  int begin, end;
};
__device__ __forceinline__ TokenRange block_tokens(int num_tokens) {
  const int per_block = (num_tokens + gridDim.x - 1) / gridDim.x;
  const int begin = min(num_tokens, static_cast<int>(blockIdx.x) * per_block);
  return {begin, min(num_tokens, begin + per_block)};
}

// Where the row `row` (in destination r's output order) lands in r's row region: that row, or
// (bounded: ring_start = the first row of this block's rows on each destination) its slot in ring
// (this rank, this block) of p.ring_slots rows.
__device__ __forceinline__ int64_t region_row(const DispatchParams& p, const int* ring_start, int r, int64_t row) {
  if (ring_start == nullptr) return row;
  const int64_t Q = p.ring_slots;
  return (static_cast<int64_t>(p.ctx.rank) * gridDim.x + blockIdx.x) * Q + (row - ring_start[r]) % Q;
}

// ring_start: null (every row has its final slot in the row region), or the bounded dispatch's.
__device__ __forceinline__ void send_token(const DispatchParams& p, int t, const int* slot_base, int lane,
                                           const int* ring_start = nullptr) {
  const OpContext& ctx = p.ctx;
  const int R = ctx.num_ranks, me = ctx.rank;
  // Destination row of this token on every rank (null where it is not sent). Indexed by
  // compile-time constants only, so everything stays in registers.
  char* dst_x[kMaxPeers];
#pragma unroll
  for (int r = 0; r < kMaxPeers; ++r) {
    const int pos = r < R ? p.send_pos[static_cast<int64_t>(t) * R + r] : -1;
    const int64_t row = slot_base[r] + pos;
    dst_x[r] = pos < 0 ? nullptr
               : r == me ? p.recv_x + row * p.rows.row_bytes
                         : p.rows.row(ctx.rows(r), region_row(p, ring_start, r, row));
  }
  warp_copy_multicast<kDispatchUnroll>(p.x + t * p.x_row_stride_bytes, dst_x, p.rows.row_bytes, lane);

  // Metadata: scales, top-k rewritten to the destination's local ids, source index.
  const int E_loc = p.num_experts_per_rank;
  const RowLayout& L = p.rows;
#pragma unroll 1
  for (int r = 0; r < R; ++r) {
    const int pos = p.send_pos[static_cast<int64_t>(t) * R + r];
    if (pos < 0) continue;
    const bool local = r == me;
    const int64_t row = local ? slot_base[r] + pos : region_row(p, ring_start, r, slot_base[r] + pos);
    char* base = local ? nullptr : ctx.rows(r);
    uint32_t* scales = local ? p.recv_x_scales + row * L.num_scales : reinterpret_cast<uint32_t*>(L.scales(base, row));
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

// Threads [tid, nthreads) copy rows [slot, slot + num) of the local row region (written by one
// source) to the output rows [first, first + num): the same rows, or a ring's slots (bounded).
__device__ __forceinline__ void copy_out(const DispatchParams& p, int64_t first, int64_t slot, int64_t num, size_t tid,
                                         size_t nthreads) {
  const RowLayout& L = p.rows;
  char* base = p.ctx.rows(p.ctx.rank);
  coop_copy<8>(p.recv_x + first * L.row_bytes, L.row(base, slot), num * L.row_bytes, tid, nthreads);
  if (L.num_scales)
    coop_copy(p.recv_x_scales + first * L.num_scales, L.scales(base, slot), num * L.num_scales * 4, tid, nthreads);
  const int K = L.num_topk_idx;
  for (size_t i = tid; i < static_cast<size_t>(num) * K; i += nthreads) {
    if (p.recv_topk_idx) p.recv_topk_idx[first * K + i] = L.topk_idx(base, slot)[i];
    if (p.recv_topk_weights) p.recv_topk_weights[first * K + i] = L.num_topk_weights ? L.topk_weights(base, slot)[i] : 0.f;
  }
  if (p.recv_src_idx) coop_copy(p.recv_src_idx + first, L.src_idx(base, slot), num * 4, tid, nthreads);
}

__device__ __forceinline__ void pad_rows(const DispatchParams& p, int64_t first, size_t tid, size_t nthreads) {
  const int64_t num = p.out_rows - first;
  if (num <= 0) return;
  const RowLayout& L = p.rows;
  coop_zero(p.recv_x + first * L.row_bytes, num * L.row_bytes, tid, nthreads);
  if (L.num_scales) coop_zero(p.recv_x_scales + first * L.num_scales, num * L.num_scales * 4, tid, nthreads);
  const int K = p.num_topk;
  for (size_t i = tid; i < static_cast<size_t>(num) * K; i += nthreads) {
    if (p.recv_topk_idx) p.recv_topk_idx[first * K + i] = -1;
    if (p.recv_topk_weights) p.recv_topk_weights[first * K + i] = 0.f;
  }
  if (p.recv_src_idx) coop_fill(p.recv_src_idx + first, -1, num, tid, nthreads);
}

}  // namespace epx::kernels
