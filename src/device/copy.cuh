// Vectorized copies: 16-byte accesses, several loads in flight per lane before the stores.
#pragma once
#include <cstdint>

#include "device/ptx.cuh"

namespace epx::device {

constexpr int kWarpSize = 32;

// One warp copies `num_bytes` (multiple of 16, 16-byte aligned) from `src` to every non-null
// destination. Each chunk is loaded once and stored to every destination. Every round (the last,
// partial one included) issues all of a lane's kUnroll loads before its first store.
template <int kUnroll, int kMaxDst>
__device__ __forceinline__ void warp_copy_multicast(const void* src, char* const (&dst)[kMaxDst],
                                                    int num_bytes, int lane) {
  const int4* s = static_cast<const int4*>(src);
  const int num_vec = num_bytes / 16;
  constexpr int kStep = kUnroll * kWarpSize;
  for (int i = lane; i < num_vec; i += kStep) {
    int4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (i + u * kWarpSize < num_vec) v[u] = ld_nc_na_v4(s + i + u * kWarpSize);
#pragma unroll
    for (int d = 0; d < kMaxDst; ++d) {
      if (dst[d] != nullptr) {
        int4* o = reinterpret_cast<int4*>(dst[d]);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
          if (i + u * kWarpSize < num_vec) st_na_v4(o + i + u * kWarpSize, v[u]);
      }
    }
  }
}

// Threads [tid, tid + nthreads*k) of a cooperative group copy `num_bytes` (multiple of 4) from
// `src` to `dst`, up to kUnroll 16-byte loads in flight per thread (every round). Uses 16-byte accesses when both are
// 16-byte aligned and the size allows. `src` is memory a peer wrote before a completed acquire:
// plain loads (no .nc).
template <int kUnroll = 4>
__device__ __forceinline__ void coop_copy(void* dst, const void* src, size_t num_bytes, size_t tid,
                                          size_t nthreads) {
  if (num_bytes == 0) return;
  const bool vec = ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) | num_bytes) & 15) == 0;
  if (vec) {
    const int4* s = static_cast<const int4*>(src);
    int4* d = static_cast<int4*>(dst);
    const size_t n = num_bytes / 16;
    for (size_t i = tid; i < n; i += kUnroll * nthreads) {
      int4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (i + u * nthreads < n) v[u] = s[i + u * nthreads];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (i + u * nthreads < n) st_na_v4(d + i + u * nthreads, v[u]);
    }
  } else {
    const int* s = static_cast<const int*>(src);
    int* d = static_cast<int*>(dst);
    for (size_t i = tid; i < num_bytes / 4; i += nthreads) d[i] = s[i];
  }
}

// Same, filling with zero bytes.
__device__ __forceinline__ void coop_zero(void* dst, size_t num_bytes, size_t tid, size_t nthreads) {
  if ((reinterpret_cast<uintptr_t>(dst) & 15) == 0 && (num_bytes & 15) == 0) {
    int4* d = static_cast<int4*>(dst);
    for (size_t i = tid; i < num_bytes / 16; i += nthreads) d[i] = make_int4(0, 0, 0, 0);
  } else {
    int* d = static_cast<int*>(dst);
    for (size_t i = tid; i < num_bytes / 4; i += nthreads) d[i] = 0;
  }
}

// Fill `n` ints with `value`.
__device__ __forceinline__ void coop_fill(int* dst, int value, size_t n, size_t tid, size_t nthreads) {
  for (size_t i = tid; i < n; i += nthreads) dst[i] = value;
}

}  // namespace epx::device
