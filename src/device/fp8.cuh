// fp8 e4m3 casts with per-128-channel scales (the contract of the CPU reference, bit for bit):
//   amax = max(|x|) over the block, at least 1e-4
//   round_scale: scale_inv = 2^ceil(log2(amax / 448)), scale = 2^-that; else scale_inv = amax / 448,
//   scale = 448 / amax;  q = e4m3_rn_satfinite(x * scale);  x ~= q * scale_inv.
#pragma once
#include <cuda_fp8.h>

#include <cstdint>

namespace epx::device {

constexpr float kFp8Max = 448.0f;

// ceil(log2(f)) for a positive normal float, exactly (from its bits).
__device__ __forceinline__ int ceil_log2_exact(float f) {
  const uint32_t bits = __float_as_uint(f);
  return static_cast<int>((bits >> 23) & 0xffu) - 127 + ((bits & 0x7fffffu) != 0 ? 1 : 0);
}

struct Fp8Scale {
  float scale;      // multiply x by this before the cast
  float scale_inv;  // stored: x ~= q * scale_inv
};

__device__ __forceinline__ Fp8Scale fp8_scale(float amax, bool round_scale) {
  amax = fmaxf(amax, 1e-4f);
  Fp8Scale s;
  if (round_scale) {
    const int e = ceil_log2_exact(amax / kFp8Max);
    s.scale_inv = ldexpf(1.0f, e);
    s.scale = ldexpf(1.0f, -e);
  } else {
    s.scale_inv = amax / kFp8Max;
    s.scale = kFp8Max / amax;
  }
  return s;
}

__device__ __forceinline__ uint8_t to_e4m3(float v) {
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
}

// UE8M0 byte of a power-of-two scale_inv: its biased exponent.
__device__ __forceinline__ uint32_t ue8m0_byte(float scale_inv) { return (__float_as_uint(scale_inv) >> 23) & 0xffu; }

}  // namespace epx::device
