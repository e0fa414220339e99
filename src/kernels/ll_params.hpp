// Parameter structs and launchers of the low-latency kernels (send and receive halves of dispatch
// and combine; the receive halves are what a hook launches later).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/ll_layout.hpp"
#include "device/sync.cuh"

namespace epx::kernels {

struct LlCommon {
  device::OpContext ctx;  // ctx.peers point at each rank's symmetric buffer base
  size_t region_offset;   // where the low-latency region starts in the symmetric buffer
  LlLayout layout;
  LlWorkspace* ws;
  int buffer_idx;
  bool shrink;  // DeepEP's shrink mode: masked ranks are skipped, a timeout masks instead of failing
  __device__ char* region(int r) const { return ctx.peers[r] + region_offset; }
  __device__ LlSync* sync(int r) const { return reinterpret_cast<LlSync*>(region(r)); }
  __device__ bool masked(int r) const { return shrink && device::ld_volatile(&ws->mask[r]) != 0; }
  // The mask word a wait for rank r passes to wait_flag_geq (null outside shrink mode).
  __device__ int* mask_of(int r) const { return shrink ? &ws->mask[r] : nullptr; }
};

struct LlDispatchParams {
  LlCommon c;
  int num_tokens;
  const uint16_t* x;  // [N, H] bf16
  int64_t x_stride;
  const int64_t* topk_idx;  // [N, K]
  int64_t topk_stride;
  bool use_fp8, round_scale, ue8m0;
  // Receive outputs.
  uint8_t* recv_x;        // [E_loc, R*T, H] fp8 or bf16
  void* recv_scales;      // f32 [E_loc, S, R*T] storage (column-major view) or int32 packed UE8M0
  int* recv_count;        // [E_loc]
  int* src_info;          // [E_loc, R*T]
  int* src_topk_slot;     // [E_loc, R*T]
  int64_t* layout_range;  // [E_loc, R]
  int* cumulative_stats;  // [E_loc] or null
  int64_t* wait_stats;    // [R] or null
  int blocks_per_expert;  // receive: blocks sharing each local expert's copies (grid % it == 0)
};
void launch_ll_dispatch_send(const LlDispatchParams& p, int num_blocks, cudaStream_t stream);
void launch_ll_dispatch_recv(const LlDispatchParams& p, int num_blocks, cudaStream_t stream);
// Non-hook mode: send and receive in one launch (num_blocks <= the SM count, co-resident).
void launch_ll_dispatch_fused(const LlDispatchParams& p, int num_blocks, cudaStream_t stream);

struct LlCombineParams {
  LlCommon c;
  const uint16_t* x;  // [E_loc, R*T, H] bf16 expert outputs
  const int* src_info;
  const int* src_topk_slot;
  const int64_t* layout_range;
  int num_tokens;
  const int64_t* topk_idx;  // [N, K]
  int64_t topk_stride;
  const float* topk_weights;  // [N, K]
  int64_t weight_stride;
  uint16_t* out;  // [N, H]
  int64_t out_stride;
};
void launch_ll_combine_send(const LlCombineParams& p, int num_blocks, cudaStream_t stream);
void launch_ll_combine_recv(const LlCombineParams& p, int num_blocks, cudaStream_t stream);
void launch_ll_combine_fused(const LlCombineParams& p, int num_blocks, cudaStream_t stream);

// Shared by both ops: wait until every peer consumed this rank's previous writes into buffer b,
// and the end-of-send signal.
namespace ll {
__device__ __forceinline__ bool wait_consumed(const LlCommon& c, uint64_t last) {
  bool ok = true;
  if (threadIdx.x < c.ctx.num_ranks && !c.masked(threadIdx.x))
    ok = device::wait_flag_geq(c.ctx, &c.sync(c.ctx.rank)->consumed[c.buffer_idx][threadIdx.x], last,
                               Phase::kEntryBarrier, threadIdx.x, c.mask_of(threadIdx.x));
  return __syncthreads_and(ok);
}

// Last sending block: header, then data[b][me] = n on every rank, then the op bookkeeping.
__device__ __forceinline__ void finish_send(const LlCommon& c, uint64_t n, int num_tokens) {
  const int b = c.buffer_idx;
  if (!device::last_block_to_arrive<device::ArriveFence::kSys>(&c.ws->arrive_send[b])) return;
  // One fence orders every block's rows and the headers before all R flags (a release pattern;
  // st.release per flag fenced R times).
  for (int r = 0; r < c.ctx.num_ranks; ++r)
    if (!c.masked(r)) c.sync(r)->num_tokens[b][c.ctx.rank] = num_tokens;
  device::fence_acq_rel_sys();
  for (int r = 0; r < c.ctx.num_ranks; ++r)
    if (!c.masked(r)) device::st_relaxed_sys(&c.sync(r)->data[b][c.ctx.rank], n);
  c.ws->counter = n;
  c.ws->last_op[b] = n;
  c.ws->pending[b] = n;
}

// Last receiving block: tell every source its writes into buffer b for op n are consumed. What
// the flag orders are this GPU's loads of the staging (before the source's next writes), so the
// blocks meet at gpu scope; only the last block's fence and releases are system scope (causality
// is transitive). The blocks' output writes are ordered by the stream, not by this flag.
__device__ __forceinline__ void finish_recv(const LlCommon& c, uint64_t n) {
  const int b = c.buffer_idx;
  if (!device::last_block_to_arrive<device::ArriveFence::kGpu>(&c.ws->arrive_recv[b])) return;
  device::fence_acq_rel_sys();
  for (int s = 0; s < c.ctx.num_ranks; ++s)
    if (!c.masked(s)) device::st_relaxed_sys(&c.sync(s)->consumed[b][c.ctx.rank], n);
}
}  // namespace ll

}  // namespace epx::kernels
