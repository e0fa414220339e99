// Device helpers shared by the low-latency kernels (ll_dispatch.cu, ll_combine.cu).
#pragma once
#include "device/sync.cuh"
#include "kernels/ll_params.hpp"

namespace epx::kernels {

// Shared by both ops: wait until every peer consumed this rank's previous writes into buffer b,
// and the end-of-send signal.
namespace ll {
__device__ __forceinline__ bool wait_consumed(const LlCommon& c, uint64_t last) {
  bool ok = true;
  if (threadIdx.x < c.ctx.num_ranks && !c.masked(threadIdx.x))
    ok = device::wait_geq(c.ctx, &c.sync(c.ctx.rank)->consumed[c.buffer_idx][threadIdx.x], last,
                          Phase::kEntryBarrier, threadIdx.x, c.mask_of(threadIdx.x)).ok;
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
