// Reading a handle's send positions (send_pos[t, r]: the row of token t among this rank's rows to
// rank r, -1 where t does not go to r), shared by the kernels that stream rows in token order.
#pragma once
#include <cstdint>

#include "device/copy.cuh"  // kWarpSize
#include "device/sync.cuh"

namespace epx::kernels {

using device::kWarpSize;

// A progress word of a streaming op: (op epoch << 32) | count, so words grow across ops and nothing
// is reset between them.
__device__ __forceinline__ uint64_t tagged_count(uint64_t e, int64_t count) {
  return (e << 32) | static_cast<uint64_t>(count);
}
__device__ __forceinline__ int count_of(uint64_t word) { return static_cast<int>(word & 0xffffffffu); }

// A peer's range [lo, hi) announced for op e as two progress words (its start, and the next
// range's start): waits until both are published, then reads them (acquire). False if a wait
// failed (the error is recorded).
__device__ __forceinline__ bool wait_range(const device::OpContext& ctx, const uint64_t* lo_word,
                                           const uint64_t* hi_word, uint64_t e, Phase phase, int peer,
                                           int& lo, int& hi) {
  const device::Seen l = device::wait_geq(ctx, lo_word, tagged_count(e, 0), phase, peer);
  if (!l.ok) return false;
  const device::Seen h = device::wait_geq(ctx, hi_word, tagged_count(e, 0), phase, peer);
  if (!h.ok) return false;
  lo = count_of(l.value);
  hi = count_of(h.value);
  return true;
}

// Rows this rank sends to r from its tokens [0, t0): the position of the last such token + 1. One
// warp (every lane gets the result); scans backwards 32 tokens at a time.
__device__ __forceinline__ int rows_before(const int* send_pos, int num_ranks, int r, int t0, int lane) {
  for (int base = t0 - 1; base >= 0; base -= kWarpSize) {
    const int t = base - lane;
    const int pos = t >= 0 ? send_pos[static_cast<int64_t>(t) * num_ranks + r] : -1;
    const unsigned hits = __ballot_sync(0xffffffffu, pos >= 0);
    if (hits != 0) return __shfl_sync(0xffffffffu, pos, __ffs(hits) - 1) + 1;  // lowest lane = highest t
  }
  return 0;
}

}  // namespace epx::kernels
