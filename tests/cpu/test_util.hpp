// Small helpers shared by the CPU tests.
#pragma once
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>

#include "reference/reference.hpp"

namespace epx::test_util {

inline float from_bits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// bf16 bits of a value the test knows to be exactly representable (so no rounding is involved).
inline uint16_t bf(float f) {
  const uint16_t b = ref::float_to_bf16(f);
  EXPECT_EQ(ref::bf16_to_float(b), f) << f << " is not exact in bf16: fix the test data";
  return b;
}

}  // namespace epx::test_util
