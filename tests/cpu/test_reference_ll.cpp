// CPU tests of the low-latency reference model (src/reference/reference_ll): hand-worked fp8
// quantization, dispatch and combine cases whose expected values are written out literally, error
// handling, and a randomized dispatch -> combine round trip checked against independent sums.
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iostream>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "epx/error.hpp"
#include "reference/reference.hpp"
#include "cpu/test_util.hpp"
#include "reference/reference_ll.hpp"

namespace {

using epx::ref::bf16_to_float;
using epx::ref::float_to_bf16;
using epx::ref::LlDispatchResult;
using epx::ref::LlRankInput;

using epx::test_util::bf;
using epx::test_util::from_bits;

// A 128-multiple bf16 row of zeros with the given leading values.
std::vector<uint16_t> bf_row(int hidden, const std::vector<float>& leading) {
  std::vector<uint16_t> row(hidden, bf(0.0f));
  for (size_t i = 0; i < leading.size(); ++i) row[i] = bf(leading[i]);
  return row;
}

// Runs fn and expects an InvalidArgument epx::Error whose message names every one of `names`.
void expect_invalid_argument(const std::function<void()>& fn, const std::vector<std::string>& names) {
  try {
    fn();
  } catch (const epx::Error& e) {
    EXPECT_EQ(e.kind(), epx::ErrorKind::kInvalidArgument) << e.what();
    for (const std::string& name : names)
      EXPECT_NE(std::string(e.what()).find(name), std::string::npos)
          << "message does not name " << name << ": " << e.what();
    return;
  }
  ADD_FAILURE() << "no epx::Error thrown; expected one naming " << names.front();
}

// ---------------------------------------------------------------------------------------------
// fp8 e4m3 conversion and exact log2

TEST(RefLlFp8, ConversionRoundsTiesToEvenAndSaturates) {
  using epx::ref::float_to_fp8_e4m3;
  EXPECT_EQ(float_to_fp8_e4m3(1.0f), 0x38);
  EXPECT_EQ(float_to_fp8_e4m3(1.0625f), 0x38);   // tie between 1 (m=0) and 1.125 (m=1): even, down
  EXPECT_EQ(float_to_fp8_e4m3(1.1875f), 0x3A);   // tie between 1.125 (m=1) and 1.25 (m=2): even, up
  EXPECT_EQ(float_to_fp8_e4m3(-1.1875f), 0xBA);
  EXPECT_EQ(float_to_fp8_e4m3(std::ldexp(1.5f, -9)), 0x02);  // subnormal tie 1.5 * 2^-9: up to 2
  EXPECT_EQ(float_to_fp8_e4m3(std::ldexp(1.0f, -10)), 0x00);  // subnormal tie 0.5 * 2^-9: down to 0
  EXPECT_EQ(float_to_fp8_e4m3(-0.0f), 0x80);
  EXPECT_EQ(float_to_fp8_e4m3(448.0f), 0x7E);
  EXPECT_EQ(float_to_fp8_e4m3(464.0f), 0x7E);    // would round past 448: saturates
  EXPECT_EQ(float_to_fp8_e4m3(1000.0f), 0x7E);
  EXPECT_EQ(float_to_fp8_e4m3(-1e30f), 0xFE);
  EXPECT_EQ(float_to_fp8_e4m3(INFINITY), 0x7E);
  EXPECT_EQ(float_to_fp8_e4m3(-INFINITY), 0xFE);
  EXPECT_EQ(float_to_fp8_e4m3(NAN), 0x7F);
}

TEST(RefLlFp8, DecodeIsExactAndInvertsConversion) {
  using epx::ref::fp8_e4m3_to_float;
  EXPECT_EQ(fp8_e4m3_to_float(0x38), 1.0f);
  EXPECT_EQ(fp8_e4m3_to_float(0x7E), 448.0f);
  EXPECT_EQ(fp8_e4m3_to_float(0xFE), -448.0f);
  EXPECT_EQ(fp8_e4m3_to_float(0x3A), 1.25f);
  EXPECT_EQ(fp8_e4m3_to_float(0x01), std::ldexp(1.0f, -9));  // smallest subnormal
  EXPECT_EQ(fp8_e4m3_to_float(0x08), std::ldexp(1.0f, -6));  // smallest normal
  EXPECT_TRUE(std::signbit(fp8_e4m3_to_float(0x80)));
  EXPECT_TRUE(std::isnan(fp8_e4m3_to_float(0x7F)));
  EXPECT_TRUE(std::isnan(fp8_e4m3_to_float(0xFF)));
  for (int q = 0; q < 256; ++q) {
    if ((q & 0x7F) == 0x7F) continue;  // the NaNs
    EXPECT_EQ(epx::ref::float_to_fp8_e4m3(fp8_e4m3_to_float(static_cast<uint8_t>(q))), q);
  }
}

TEST(RefLlFp8, CeilLog2IsExact) {
  using epx::ref::ceil_log2_exact;
  EXPECT_EQ(ceil_log2_exact(1.0f), 0);
  EXPECT_EQ(ceil_log2_exact(2.0f), 1);
  EXPECT_EQ(ceil_log2_exact(3.0f), 2);
  EXPECT_EQ(ceil_log2_exact(0.5f), -1);
  EXPECT_EQ(ceil_log2_exact(0.75f), 0);
  EXPECT_EQ(ceil_log2_exact(std::nextafter(1.0f, 2.0f)), 1);  // log2 just above 0
  EXPECT_EQ(ceil_log2_exact(std::nextafter(1.0f, 0.0f)), 0);  // log2 just below 0
  EXPECT_EQ(ceil_log2_exact(FLT_MAX), 128);
  EXPECT_EQ(ceil_log2_exact(INFINITY), 128);
  EXPECT_EQ(ceil_log2_exact(FLT_MIN), -126);
  EXPECT_EQ(ceil_log2_exact(from_bits(0x00400000)), -127);  // subnormal 2^-127
  EXPECT_EQ(ceil_log2_exact(from_bits(0x00000001)), -149);  // 2^-149
  EXPECT_EQ(ceil_log2_exact(from_bits(0x00000003)), -147);  // 3 * 2^-149
  EXPECT_EQ(ceil_log2_exact(from_bits(0x00400001)), -126);  // just above 2^-127
  for (float bad : {0.0f, -1.0f, NAN})
    expect_invalid_argument([&] { epx::ref::ceil_log2_exact(bad); }, {"f"});
}

// ---------------------------------------------------------------------------------------------
// Row quantization

TEST(RefLlQuant, PerBlockScalesWithKnownAmax) {
  // Block 0: amax 3.5, so scale = 448 / 3.5 = 128 and scale_inv = 2^-7 (both exact).
  // Block 1: amax 448, so scale = 1 and the values meet e4m3 rounding unchanged.
  std::vector<uint16_t> row = bf_row(256, {1.0f, -3.5f, 0.5f, 0.0f, 0.25f});
  const std::vector<float> block1 = {448.0f, 1.0625f, 1.1875f, std::ldexp(1.5f, -9),
                                     std::ldexp(1.0f, -10), -1.0625f};
  for (size_t i = 0; i < block1.size(); ++i) row[128 + i] = bf(block1[i]);
  const epx::ref::Fp8Row q = epx::ref::quantize_row_fp8(row.data(), 256, false);
  ASSERT_EQ(q.q.size(), 256u);
  EXPECT_EQ(q.scale_inv, (std::vector<float>{std::ldexp(1.0f, -7), 1.0f}));
  EXPECT_TRUE(q.exponent.empty());
  const std::vector<uint8_t> head0(q.q.begin(), q.q.begin() + 6);
  EXPECT_EQ(head0, (std::vector<uint8_t>{0x70, 0xFE, 0x68, 0x00, 0x60, 0x00}));  // 128 -448 64 0 32 0
  const std::vector<uint8_t> head1(q.q.begin() + 128, q.q.begin() + 135);
  EXPECT_EQ(head1, (std::vector<uint8_t>{0x7E, 0x38, 0x3A, 0x02, 0x00, 0xB8, 0x00}));
}

TEST(RefLlQuant, ZeroBlockUsesAmaxFloor) {
  std::vector<uint16_t> row = bf_row(128, {});
  row[7] = 0x8000;  // -0 keeps its sign through the scaling
  const epx::ref::Fp8Row plain = epx::ref::quantize_row_fp8(row.data(), 128, false);
  EXPECT_EQ(plain.scale_inv, std::vector<float>{1e-4f / 448.0f});
  const epx::ref::Fp8Row pow2 = epx::ref::quantize_row_fp8(row.data(), 128, true);
  EXPECT_EQ(pow2.exponent, std::vector<int>{-22});  // 1e-4 / 448 = 2^-22.09
  EXPECT_EQ(pow2.scale_inv, std::vector<float>{std::ldexp(1.0f, -22)});
  for (const epx::ref::Fp8Row* q : {&plain, &pow2}) {
    std::vector<uint8_t> expected(128, 0x00);
    expected[7] = 0x80;
    EXPECT_EQ(q->q, expected);
  }
}

TEST(RefLlQuant, RoundScaleExponentIsCeilOfLog2) {
  // amax 448 -> f = 1 exactly -> e = 0; amax 450 (449 is not a bf16) -> f > 1 -> e = 1;
  // amax 0.4375 = 448 * 2^-10 -> e = -10; one bf16 step above -> e = -9.
  std::vector<uint16_t> row = bf_row(512, {});
  const float amax[4] = {448.0f, 450.0f, 0.4375f, 0.439453125f};
  for (int c = 0; c < 4; ++c) row[c * 128] = bf(amax[c]);
  const epx::ref::Fp8Row q = epx::ref::quantize_row_fp8(row.data(), 512, true);
  EXPECT_EQ(q.exponent, (std::vector<int>{0, 1, -10, -9}));
  EXPECT_EQ(q.scale_inv, (std::vector<float>{1.0f, 2.0f, std::ldexp(1.0f, -10), std::ldexp(1.0f, -9)}));
  // 448 -> 448; 450 / 2 = 225 -> 224; 0.4375 * 2^10 = 448; 0.439453125 * 2^9 = 225 -> 224.
  EXPECT_EQ((std::vector<uint8_t>{q.q[0], q.q[128], q.q[256], q.q[384]}),
            (std::vector<uint8_t>{0x7E, 0x76, 0x7E, 0x76}));
  // Without round_scale the scale is amax / 448 itself.
  const epx::ref::Fp8Row plain = epx::ref::quantize_row_fp8(row.data(), 512, false);
  EXPECT_EQ(plain.scale_inv[1], 450.0f / 448.0f);
  EXPECT_EQ(plain.q[128], 0x7E);
}

TEST(RefLlQuant, ScaleIsDividedFromAmaxNotTheReciprocalOfScaleInv) {
  // amax 1.078125: scale = 448 / amax = 415.536224 (fp32), while 1 / (amax / 448) = 415.536255.
  // 0.202148438 * 415.536224 = 84 exactly, an e4m3 tie between 80 (0x6A, even) and 88 (0x6B); the
  // reciprocal scale would land just above the tie and give 0x6B.
  const std::vector<uint16_t> row = bf_row(128, {1.078125f, 0.202148438f});
  const epx::ref::Fp8Row q = epx::ref::quantize_row_fp8(row.data(), 128, false);
  EXPECT_EQ(q.scale_inv, std::vector<float>{1.078125f / 448.0f});
  EXPECT_EQ(q.q[1], 0x6A);
}

TEST(RefLlQuant, NanIsIgnoredByAmaxAndStaysNan) {
  std::vector<uint16_t> row = bf_row(128, {0.0f, 2.0f, 1.0f});
  row[0] = 0x7FC0;  // bf16 NaN
  const epx::ref::Fp8Row q = epx::ref::quantize_row_fp8(row.data(), 128, false);
  EXPECT_EQ(q.scale_inv, std::vector<float>{2.0f / 448.0f});  // amax 2, not NaN
  EXPECT_EQ((std::vector<uint8_t>{q.q[0], q.q[1], q.q[2]}), (std::vector<uint8_t>{0x7F, 0x7E, 0x76}));
}

TEST(RefLlQuant, RejectsBadHiddenAndNullRow) {
  const std::vector<uint16_t> row(256, 0);
  expect_invalid_argument([&] { epx::ref::quantize_row_fp8(row.data(), 100, false); }, {"hidden"});
  expect_invalid_argument([&] { epx::ref::quantize_row_fp8(row.data(), 0, false); }, {"hidden"});
  expect_invalid_argument([&] { epx::ref::quantize_row_fp8(nullptr, 128, false); }, {"row"});
}

TEST(RefLlUe8m0, PacksBiasedExponentsLittleEndian) {
  const int e4[4] = {-22, 0, 1, 5};  // bytes 105, 127, 128, 132
  EXPECT_EQ(epx::ref::pack_ue8m0(e4, 4), 0x84807F69u);
  const int e2[2] = {1, -1};  // bytes 128, 126; the missing bytes are 0
  EXPECT_EQ(epx::ref::pack_ue8m0(e2, 2), 0x00007E80u);
  EXPECT_EQ(epx::ref::pack_ue8m0(nullptr, 0), 0u);
  const int range[2] = {-127, 128};  // the whole byte range
  EXPECT_EQ(epx::ref::pack_ue8m0(range, 2), 0x0000FF00u);
  expect_invalid_argument([&] { epx::ref::pack_ue8m0(e4, 5); }, {"n"});
  const int too_big[1] = {129};
  expect_invalid_argument([&] { epx::ref::pack_ue8m0(too_big, 1); }, {"exponents"});
  const int too_small[1] = {-128};
  expect_invalid_argument([&] { epx::ref::pack_ue8m0(too_small, 1); }, {"exponents"});
}

// ---------------------------------------------------------------------------------------------
// Hand-worked dispatch: R = 2, E = 4 (E_loc = 2), T = 3, K = 2, H = 128.
//   rank 0 topk_idx: t0 [1, 2]  t1 [3, -1]  t2 [0, 1]
//   rank 1 topk_idx: t0 [2, 0]  t1 [-1, 1]  t2 [-1, -1]
// Rank 0 receives  expert 0: (s0 t2 k0) (s1 t0 k1);  expert 1: (s0 t0 k0) (s0 t2 k1) (s1 t1 k1).
// Rank 1 receives  expert 2: (s0 t0 k1) (s1 t0 k0);  expert 3: (s0 t1 k0).
// Token (s, t) holds x[0] = 2^p with p = 3s + t + 1, x[1] = -1 and 1 elsewhere: its amax is 2^p, so
// every scale is exact and its fp8 bytes can be written out.

constexpr int kR = 2, kE = 4, kEloc = 2, kT = 3, kK = 2, kH = 128, kSlots = kR * kT;

int hand_p(int s, int t) { return 3 * s + t + 1; }

std::vector<uint16_t> hand_row(int s, int t) {
  std::vector<uint16_t> row(kH, bf(1.0f));
  row[0] = bf(std::ldexp(1.0f, hand_p(s, t)));
  row[1] = bf(-1.0f);
  return row;
}

std::vector<LlRankInput> hand_inputs() {
  const std::vector<std::vector<int64_t>> topk = {{1, 2, 3, -1, 0, 1}, {2, 0, -1, 1, -1, -1}};
  std::vector<LlRankInput> inputs(kR);
  for (int s = 0; s < kR; ++s) {
    inputs[s].num_tokens = kT;
    inputs[s].topk_idx = topk[s];
    for (int t = 0; t < kT; ++t) {
      const std::vector<uint16_t> row = hand_row(s, t);
      inputs[s].x.insert(inputs[s].x.end(), row.begin(), row.end());
    }
  }
  return inputs;
}

LlDispatchResult hand_dispatch(int rank, bool use_fp8, bool round_scale, bool ue8m0) {
  return epx::ref::ll_dispatch(hand_inputs(), rank, kT, kH, kK, kE, use_fp8, round_scale, ue8m0);
}

struct HandRow { int j, row, s, t; };
// The received rows of each rank (as in the table above), in (local expert, row) order.
const std::vector<HandRow> kHandRows[kR] = {
    {{0, 0, 0, 2}, {0, 1, 1, 0}, {1, 0, 0, 0}, {1, 1, 0, 2}, {1, 2, 1, 1}},
    {{0, 0, 0, 0}, {0, 1, 1, 0}, {1, 0, 0, 1}}};

void expect_hand_metadata(const LlDispatchResult& d, int rank) {
  const std::vector<int32_t> count[kR] = {{2, 3}, {2, 1}};
  const std::vector<int32_t> src_info[kR] = {{2, 0, -1, -1, -1, -1, 0, 2, 1, -1, -1, -1},
                                             {0, 0, -1, -1, -1, -1, 1, -1, -1, -1, -1, -1}};
  const std::vector<int32_t> slot[kR] = {{0, 1, -1, -1, -1, -1, 0, 1, 1, -1, -1, -1},
                                         {1, 0, -1, -1, -1, -1, 0, -1, -1, -1, -1, -1}};
  // [j][s] = (first row << 32) | count; rank 1 expert 3 gets nothing from source 1 (first row 1).
  const std::vector<int64_t> range[kR] = {{(0ll << 32) | 1, (1ll << 32) | 1, (0ll << 32) | 2, (2ll << 32) | 1},
                                          {(0ll << 32) | 1, (1ll << 32) | 1, (0ll << 32) | 1, (1ll << 32) | 0}};
  EXPECT_EQ(d.num_ranks, kR);
  EXPECT_EQ(d.num_local_experts, kEloc);
  EXPECT_EQ(d.recv_count, count[rank]);
  EXPECT_EQ(d.src_info, src_info[rank]);
  EXPECT_EQ(d.src_topk_slot, slot[rank]);
  EXPECT_EQ(d.layout_range, range[rank]);
}

TEST(RefLlDispatch, HandWorkedBf16) {
  for (int rank = 0; rank < kR; ++rank) {
    SCOPED_TRACE("rank " + std::to_string(rank));
    const LlDispatchResult d = hand_dispatch(rank, false, true, true);  // scale flags ignored
    expect_hand_metadata(d, rank);
    EXPECT_EQ(d.row_bytes, 2 * kH);
    EXPECT_EQ(d.num_scale_columns, 0);
    EXPECT_TRUE(d.recv_scales.empty());
    EXPECT_TRUE(d.recv_scales_ue8m0.empty());
    std::vector<uint8_t> expected(size_t{kEloc} * kSlots * 2 * kH, 0);  // padding rows stay 0
    for (const HandRow& r : kHandRows[rank]) {
      const std::vector<uint16_t> row = hand_row(r.s, r.t);
      uint8_t* dst = expected.data() + (static_cast<size_t>(r.j) * kSlots + r.row) * 2 * kH;
      for (int h = 0; h < kH; ++h) {
        dst[2 * h] = static_cast<uint8_t>(row[h] & 0xFF);  // little-endian, as on the GPU
        dst[2 * h + 1] = static_cast<uint8_t>(row[h] >> 8);
      }
    }
    EXPECT_EQ(d.recv_x, expected);
  }
}

// fp8 bytes of a hand row, byte 0 being its amax 2^p; rest[p] is the byte of the value 1.
std::vector<uint8_t> hand_fp8_row(int p, uint8_t amax_byte, const uint8_t* rest) {
  std::vector<uint8_t> q(kH, rest[p]);
  q[0] = amax_byte;
  q[1] = static_cast<uint8_t>(0x80 | rest[p]);  // -1
  return q;
}

std::vector<uint8_t> hand_fp8_recv_x(int rank, uint8_t amax_byte, const uint8_t* rest) {
  std::vector<uint8_t> expected(size_t{kEloc} * kSlots * kH, 0);
  for (const HandRow& r : kHandRows[rank]) {
    const std::vector<uint8_t> q = hand_fp8_row(hand_p(r.s, r.t), amax_byte, rest);
    std::copy(q.begin(), q.end(), expected.begin() + (static_cast<size_t>(r.j) * kSlots + r.row) * kH);
  }
  return expected;
}

TEST(RefLlDispatch, HandWorkedFp8FloatScales) {
  // scale = 448 / 2^p: 2^p -> 448 (0x7E) and 1 -> 1.75 * 2^(8-p), e4m3 exponent field 15 - p.
  const uint8_t rest[7] = {0, 0x76, 0x6E, 0x66, 0x5E, 0x56, 0x4E};
  const LlDispatchResult d = hand_dispatch(0, true, false, false);
  expect_hand_metadata(d, 0);
  EXPECT_EQ(d.row_bytes, kH);
  EXPECT_EQ(d.num_scale_columns, 1);
  EXPECT_EQ(d.recv_x, hand_fp8_recv_x(0, 0x7E, rest));
  // Expert 0 rows: p = 3, 4; expert 1 rows: p = 1, 3, 5.
  const float s = 448.0f;
  EXPECT_EQ(d.recv_scales, (std::vector<float>{8 / s, 16 / s, 0, 0, 0, 0, 2 / s, 8 / s, 32 / s, 0, 0, 0}));
  EXPECT_TRUE(d.recv_scales_ue8m0.empty());
}

TEST(RefLlDispatch, HandWorkedFp8PowerOfTwoScales) {
  // scale_inv = 2^(p-8): 2^p -> 256 (0x78) and 1 -> 2^(8-p), e4m3 exponent field 15 - p.
  const uint8_t rest[7] = {0, 0x70, 0x68, 0x60, 0x58, 0x50, 0x48};
  // Rank 1: expert 2 rows p = 1, 4; expert 3 row p = 2.
  const LlDispatchResult round = hand_dispatch(1, true, true, false);
  expect_hand_metadata(round, 1);
  EXPECT_EQ(round.recv_x, hand_fp8_recv_x(1, 0x78, rest));
  EXPECT_EQ(round.recv_scales, (std::vector<float>{std::ldexp(1.0f, -7), std::ldexp(1.0f, -4), 0, 0, 0, 0,
                                                   std::ldexp(1.0f, -6), 0, 0, 0, 0, 0}));
  // UE8M0 implies round_scale (passed false here): same bytes, scales as biased exponents p + 119.
  const LlDispatchResult ue = hand_dispatch(1, true, false, true);
  expect_hand_metadata(ue, 1);
  EXPECT_EQ(ue.num_scale_columns, 1);
  EXPECT_EQ(ue.recv_x, round.recv_x);
  EXPECT_TRUE(ue.recv_scales.empty());
  EXPECT_EQ(ue.recv_scales_ue8m0,
            (std::vector<uint32_t>{0x78, 0x7B, 0, 0, 0, 0, 0x79, 0, 0, 0, 0, 0}));
}

// R = 1, E = 1, T = 2: two tokens, several scale columns, to pin the column-major scale layout.
std::vector<LlRankInput> blocky_inputs(int hidden, const std::vector<std::vector<int>>& amax_log2) {
  std::vector<LlRankInput> inputs(1);
  inputs[0].num_tokens = static_cast<int>(amax_log2.size());
  for (const std::vector<int>& blocks : amax_log2) {
    std::vector<uint16_t> row(hidden, bf(0.0f));
    for (size_t c = 0; c < blocks.size(); ++c) row[c * 128] = bf(std::ldexp(1.0f, blocks[c]));
    inputs[0].x.insert(inputs[0].x.end(), row.begin(), row.end());
    inputs[0].topk_idx.push_back(0);
  }
  return inputs;
}

TEST(RefLlDispatch, ScalesAreColumnMajor) {
  const LlDispatchResult d =
      epx::ref::ll_dispatch(blocky_inputs(256, {{1, 2}, {3, 4}}), 0, 2, 256, 1, 1, true, false, false);
  // (row, c) at c * (R*T) + row: [c0 r0, c0 r1, c1 r0, c1 r1].
  const float s = 448.0f;
  EXPECT_EQ(d.recv_scales, (std::vector<float>{2 / s, 8 / s, 4 / s, 16 / s}));
}

TEST(RefLlDispatch, Ue8m0WordsAreColumnMajorAndZeroPadded) {
  // H = 640: 5 blocks -> 2 words per row, the second holding one byte. Block amax 2^a gives
  // e = a - 8 and byte a + 119.
  const LlDispatchResult d = epx::ref::ll_dispatch(
      blocky_inputs(640, {{0, 1, 2, 3, 4}, {5, 6, 7, 8, 9}}), 0, 2, 640, 1, 1, true, false, true);
  EXPECT_EQ(d.num_scale_columns, 2);
  EXPECT_EQ(d.recv_scales_ue8m0, (std::vector<uint32_t>{0x7A797877, 0x7F7E7D7C, 0x7B, 0x80}));
}

TEST(RefLlErrors, DispatchRejectsBadArguments) {
  auto dispatch = [](std::vector<LlRankInput> in, int rank, int t, int h, int k, int e) {
    epx::ref::ll_dispatch(in, rank, t, h, k, e, true, false, false);
  };
  const std::vector<LlRankInput> good = hand_inputs();
  EXPECT_NO_THROW(dispatch(good, 0, kT, kH, kK, kE));
  expect_invalid_argument([&] { dispatch(good, 0, 2, kH, kK, kE); },
                          {"inputs[0].x", "num_max_dispatch_tokens_per_rank"});  // N = 3 > T = 2
  expect_invalid_argument([&] { dispatch(good, 0, -1, kH, kK, kE); },
                          {"num_max_dispatch_tokens_per_rank"});
  expect_invalid_argument([&] { dispatch(good, 2, kT, kH, kK, kE); }, {"rank"});
  expect_invalid_argument([&] { dispatch(good, -1, kT, kH, kK, kE); }, {"rank"});
  expect_invalid_argument([&] { dispatch(good, 0, kT, kH, kK, 3); }, {"num_experts"});  // 3 % 2
  expect_invalid_argument([&] { dispatch(good, 0, kT, 100, kK, kE); }, {"hidden"});
  expect_invalid_argument([&] { dispatch(good, 0, kT, kH, -1, kE); }, {"num_topk"});
  expect_invalid_argument([&] { dispatch({}, 0, kT, kH, kK, kE); }, {"inputs"});
  auto bad = good;
  bad[1].topk_idx[3] = 4;  // E = 4
  expect_invalid_argument([&] { dispatch(bad, 0, kT, kH, kK, kE); }, {"inputs[1].topk_idx"});
  bad = good;
  bad[0].topk_idx[0] = -2;
  expect_invalid_argument([&] { dispatch(bad, 0, kT, kH, kK, kE); }, {"inputs[0].topk_idx"});
  bad = good;
  bad[0].topk_idx[1] = 1;  // token 0 would be [1, 1]
  expect_invalid_argument([&] { dispatch(bad, 0, kT, kH, kK, kE); }, {"inputs[0].topk_idx", "twice"});
  bad = good;
  bad[1].x.pop_back();
  expect_invalid_argument([&] { dispatch(bad, 0, kT, kH, kK, kE); }, {"inputs[1].x"});
  bad = good;
  bad[0].topk_idx.push_back(0);
  expect_invalid_argument([&] { dispatch(bad, 0, kT, kH, kK, kE); }, {"inputs[0].topk_idx"});
}

// ---------------------------------------------------------------------------------------------
// Hand-worked combine on the bf16 hand dispatch. Row `row` of local expert j on rank r holds
// v = 100r + 10j + row + 1 (exact in bf16) at even h and -v at odd h; padding rows hold NaN, so
// reading one would show.

std::vector<std::vector<uint16_t>> hand_y(const std::vector<LlDispatchResult>& d) {
  std::vector<std::vector<uint16_t>> y(kR);
  for (int r = 0; r < kR; ++r) {
    y[r].assign(size_t{kEloc} * kSlots * kH, 0x7FC0);
    for (int j = 0; j < kEloc; ++j)
      for (int row = 0; row < d[r].recv_count[j]; ++row)
        for (int h = 0; h < kH; ++h) {
          const float v = static_cast<float>(100 * r + 10 * j + row + 1);
          y[r][(static_cast<size_t>(j) * kSlots + row) * kH + h] = bf(h % 2 ? -v : v);
        }
  }
  return y;
}

std::vector<LlDispatchResult> hand_dispatch_all() {
  return {hand_dispatch(0, false, false, false), hand_dispatch(1, false, false, false)};
}

// [N, H] rows of value v[t] at even h and -v[t] at odd h.
std::vector<float> alternating(const std::vector<float>& per_token) {
  std::vector<float> out;
  for (float v : per_token)
    for (int h = 0; h < kH; ++h) out.push_back(h % 2 ? -v : v);
  return out;
}

std::vector<float> to_float(const std::vector<uint16_t>& bits) {
  std::vector<float> out;
  for (uint16_t b : bits) out.push_back(bf16_to_float(b));
  return out;
}

TEST(RefLlCombine, HandWorked) {
  const std::vector<LlDispatchResult> d = hand_dispatch_all();
  const auto y = hand_y(d);
  // Rank 0: t0 = 0.5 * y(r0 e1 row0 = 11) + 2 * y(r1 e2 row0 = 101) = 207.5 -> bf16 tie -> 208;
  //         t1 = 0.25 * y(r1 e3 row0 = 111) = 27.75 (the -1 slot's weight 7 is skipped);
  //         t2 = 1 * y(r0 e0 row0 = 1) - 1 * y(r0 e1 row1 = 12) = -11.
  const std::vector<uint16_t> out0 = epx::ref::ll_combine(
      d, y, 0, {1, 2, 3, -1, 0, 1}, {0.5f, 2.0f, 0.25f, 7.0f, 1.0f, -1.0f}, kT, kK, kH, kT, kE);
  EXPECT_EQ(to_float(out0), alternating({208.0f, 27.75f, -11.0f}));
  // Rank 1: t0 = y(r1 e2 row1 = 102) + y(r0 e0 row1 = 2) = 104; t1 = 0.5 * y(r0 e1 row2 = 13)
  //         = 6.5; t2 has no expert: 0.
  const std::vector<uint16_t> out1 = epx::ref::ll_combine(
      d, y, 1, {2, 0, -1, 1, -1, -1}, {1.0f, 1.0f, 3.0f, 0.5f, 5.0f, 5.0f}, kT, kK, kH, kT, kE);
  EXPECT_EQ(to_float(out1), alternating({104.0f, 6.5f, 0.0f}));
}

TEST(RefLlCombine, FusedMultiplyAddInSlotOrder) {
  // R = 1, E = 2, T = 1, K = 2; both experts return y = 1 + 2^-7 for the token.
  // Slots [e0 w -1, e1 w 1 + 2^-23]: acc = -(1 + 2^-7), then fma gives the exact
  //   (1 + 2^-23)(1 + 2^-7) - (1 + 2^-7) = 2^-23 + 2^-30 -> bf16 0x3401.
  // Slots swapped: acc = round((1 + 2^-23)(1 + 2^-7)) = 1 + 2^-7 + 2^-23 (2^-30 lost), then
  //   fma(-1, 1 + 2^-7, acc) = 2^-23 -> bf16 0x3400. (A separate multiply and add in the first order
  //   would also lose 2^-30 and give 0x3400.)
  std::vector<LlRankInput> in(1);
  in[0].num_tokens = 1;
  in[0].x.assign(128, bf(1.0f));
  in[0].topk_idx = {0, 1};
  const std::vector<LlDispatchResult> d = {epx::ref::ll_dispatch(in, 0, 1, 128, 2, 2, false, false, false)};
  const std::vector<std::vector<uint16_t>> y = {std::vector<uint16_t>(2 * 128, bf(1.0f + std::ldexp(1.0f, -7)))};
  const float w = 1.0f + std::ldexp(1.0f, -23);
  const auto in_order = epx::ref::ll_combine(d, y, 0, {0, 1}, {-1.0f, w}, 1, 2, 128, 1, 2);
  EXPECT_EQ(in_order, std::vector<uint16_t>(128, 0x3401));
  const auto swapped = epx::ref::ll_combine(d, y, 0, {1, 0}, {w, -1.0f}, 1, 2, 128, 1, 2);
  EXPECT_EQ(swapped, std::vector<uint16_t>(128, 0x3400));
}

TEST(RefLlErrors, CombineRejectsBadArguments) {
  const std::vector<LlDispatchResult> d = hand_dispatch_all();
  const auto y = hand_y(d);
  const std::vector<int64_t> idx = {1, 2, 3, -1, 0, 1};
  const std::vector<float> w(6, 1.0f);
  auto combine = [&](const std::vector<LlDispatchResult>& dd, const std::vector<std::vector<uint16_t>>& yy,
                     const std::vector<int64_t>& ii, const std::vector<float>& ww, int n, int t) {
    epx::ref::ll_combine(dd, yy, 0, ii, ww, n, kK, kH, t, kE);
  };
  EXPECT_NO_THROW(combine(d, y, idx, w, kT, kT));
  expect_invalid_argument([&] { combine(d, y, idx, {1.0f}, kT, kT); }, {"topk_weights"});
  expect_invalid_argument([&] { combine(d, {y[0]}, idx, w, kT, kT); }, {"y_all_ranks"});
  auto short_y = y;
  short_y[1].pop_back();
  expect_invalid_argument([&] { combine(d, short_y, idx, w, kT, kT); }, {"y_all_ranks[1]"});
  expect_invalid_argument([&] { combine(d, y, {idx.begin(), idx.begin() + 4}, w, 2, kT); },
                          {"topk_weights"});
  const std::vector<int64_t> four_tokens(8, -1);
  expect_invalid_argument([&] { combine(d, y, four_tokens, std::vector<float>(8), 4, kT); },
                          {"num_tokens", "num_max_dispatch_tokens_per_rank"});
  auto bad_idx = idx;
  bad_idx[2] = 5;
  expect_invalid_argument([&] { combine(d, y, bad_idx, w, kT, kT); }, {"topk_idx"});
  // Token 1 now claims expert 2 (rank 1), which never received it.
  bad_idx = idx;
  bad_idx[2] = 2;
  expect_invalid_argument([&] { combine(d, y, bad_idx, w, kT, kT); }, {"dispatched_all_ranks[1]"});
  auto bad_d = d;
  bad_d[0].num_max_dispatch_tokens_per_rank = 4;
  expect_invalid_argument([&] { combine(bad_d, y, idx, w, kT, kT); }, {"dispatched_all_ranks[0]"});
  bad_d = d;
  bad_d[1].src_info[0] = 7;  // rank 1 expert 2 row 0 claims token 7 of rank 0
  expect_invalid_argument([&] { combine(bad_d, y, idx, w, kT, kT); }, {"dispatched_all_ranks[1].src_info"});
  bad_d = d;
  bad_d[0].layout_range[0] = (1ll << 32) | 2;  // rows [1, 3) of an expert holding 2
  expect_invalid_argument([&] { combine(bad_d, y, idx, w, kT, kT); },
                          {"dispatched_all_ranks[0].layout_range"});
  expect_invalid_argument([&] { epx::ref::ll_combine(d, y, 2, idx, w, kT, kK, kH, kT, kE); }, {"rank"});
}

// ---------------------------------------------------------------------------------------------
// Randomized round trip. Dispatch to every rank; check the packed metadata against a brute-force
// scan of every rank's top-k; then combine with weights 1 and y = the received rows (bf16) or their
// dequantization (fp8). The expectation is computed without dispatch or combine: per token, the
// fp32 sum over its valid slots, k ascending, of x (bf16) or bf16(dequantized x) (fp8).

unsigned test_seed() {
  // EPX_TEST_SEED reproduces a failing run.
  const char* env = std::getenv("EPX_TEST_SEED");
  return env ? static_cast<unsigned>(std::strtoul(env, nullptr, 10)) : std::random_device{}();
}

int uniform(std::mt19937& rng, int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); }

struct RandomLl {
  int num_ranks = 0, num_experts = 0, max_tokens = 0, hidden = 0, num_topk = 0;
  bool use_fp8 = false, round_scale = false, ue8m0 = false;
  std::vector<LlRankInput> inputs;
  int num_local() const { return num_experts / num_ranks; }
  size_t slots() const { return size_t(num_ranks) * max_tokens; }
};

RandomLl make_random_case(std::mt19937& rng) {
  RandomLl c;
  c.num_ranks = uniform(rng, 1, 4);
  c.num_experts = c.num_ranks * uniform(rng, 1, 3);
  c.max_tokens = uniform(rng, 1, 5);
  c.hidden = 128 * uniform(rng, 1, 5);
  c.num_topk = uniform(rng, 0, std::min(c.num_experts, 4));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int s = 0; s < c.num_ranks; ++s) {
    LlRankInput in;
    in.num_tokens = uniform(rng, 0, c.max_tokens);
    for (int t = 0; t < in.num_tokens; ++t) {
      std::vector<int64_t> experts(c.num_experts);
      std::iota(experts.begin(), experts.end(), 0);
      std::shuffle(experts.begin(), experts.end(), rng);
      for (int k = 0; k < c.num_topk; ++k) in.topk_idx.push_back(uniform(rng, 0, 3) ? experts[k] : -1);
      // Per-token magnitudes spread over a wide range so scales differ between blocks and tokens.
      const float magnitude = std::ldexp(1.0f, uniform(rng, -12, 12));
      for (int h = 0; h < c.hidden; ++h) in.x.push_back(float_to_bf16(normal(rng) * magnitude));
    }
    c.inputs.push_back(std::move(in));
  }
  return c;
}

// The (source, token, slot) triples expert e must receive, by brute force, in (source, token) order.
struct Triple { int s, t, k; };
std::vector<Triple> senders_of(const RandomLl& c, int e) {
  std::vector<Triple> out;
  for (int s = 0; s < c.num_ranks; ++s)
    for (int t = 0; t < c.inputs[s].num_tokens; ++t)
      for (int k = 0; k < c.num_topk; ++k)
        if (c.inputs[s].topk_idx[size_t(t) * c.num_topk + k] == e) out.push_back({s, t, k});
  return out;
}

void expect_metadata(const RandomLl& c, const LlDispatchResult& d, int rank) {
  for (int j = 0; j < c.num_local(); ++j) {
    const std::vector<Triple> rows = senders_of(c, rank * c.num_local() + j);
    ASSERT_EQ(d.recv_count[j], static_cast<int>(rows.size())) << "rank " << rank << " expert " << j;
    std::vector<int> per_source(c.num_ranks, 0);
    for (size_t i = 0; i < c.slots(); ++i) {
      const size_t slot = j * c.slots() + i;
      EXPECT_EQ(d.src_info[slot], i < rows.size() ? rows[i].t : -1) << "row " << i;
      EXPECT_EQ(d.src_topk_slot[slot], i < rows.size() ? rows[i].k : -1) << "row " << i;
      if (i < rows.size()) ++per_source[rows[i].s];
    }
    int64_t first = 0;
    for (int s = 0; s < c.num_ranks; ++s) {
      EXPECT_EQ(d.layout_range[size_t(j) * c.num_ranks + s], (first << 32) | per_source[s]);
      first += per_source[s];
    }
  }
}

float scale_inv_of(const RandomLl& c, const LlDispatchResult& d, int j, int row, int block) {
  const size_t column = c.ue8m0 ? block / 4 : block;
  const size_t index = (size_t(j) * d.num_scale_columns + column) * c.slots() + row;
  if (!c.ue8m0) return d.recv_scales[index];
  const int biased = (d.recv_scales_ue8m0[index] >> (8 * (block % 4))) & 0xFF;
  return std::ldexp(1.0f, biased - 127);
}

// The bf16 rows combine will read: bf16 rows as received, or fp8 rows dequantized (q * scale_inv).
// fp8 rows must be within e4m3 rounding of the source row they came from.
void expert_outputs(const RandomLl& c, const LlDispatchResult& d, int rank, std::vector<uint16_t>& y) {
  y.assign(c.num_local() * c.slots() * c.hidden, 0);
  for (int j = 0; j < c.num_local(); ++j) {
    const std::vector<Triple> rows = senders_of(c, rank * c.num_local() + j);
    for (int row = 0; row < d.recv_count[j]; ++row) {
      const uint16_t* x = c.inputs[rows[row].s].x.data() + size_t(rows[row].t) * c.hidden;
      const size_t base = (j * c.slots() + row) * c.hidden;
      for (int h = 0; h < c.hidden; ++h) {
        if (!c.use_fp8) {
          y[base + h] = static_cast<uint16_t>(d.recv_x[2 * (base + h)] | (d.recv_x[2 * (base + h) + 1] << 8));
          continue;
        }
        const float scale_inv = scale_inv_of(c, d, j, row, h / 128);
        if (c.round_scale) {
          ASSERT_EQ(scale_inv, std::ldexp(1.0f, std::ilogb(scale_inv)));
        }
        const float deq = epx::ref::fp8_e4m3_to_float(d.recv_x[base + h]) * scale_inv;
        const float xf = bf16_to_float(x[h]);
        // e4m3: half an ulp is 2^-4 relative (normals) or 2^-10 absolute (subnormals), in scaled units.
        const float bound = std::fabs(xf) * (0.0625f + 1e-6f) + scale_inv * std::ldexp(1.0f, -10);
        ASSERT_LE(std::fabs(deq - xf), bound) << "rank " << rank << " expert " << j << " row " << row << " h " << h;
        y[base + h] = float_to_bf16(deq);
      }
    }
  }
}

// The source-side view of one token as combine should rebuild it (no dispatch involved).
std::vector<uint16_t> expected_combine(const RandomLl& c, int rank) {
  const LlRankInput& in = c.inputs[rank];
  std::vector<uint16_t> out;
  for (int t = 0; t < in.num_tokens; ++t) {
    const uint16_t* x = in.x.data() + size_t(t) * c.hidden;
    std::vector<uint16_t> row(x, x + c.hidden);
    if (c.use_fp8) {
      const epx::ref::Fp8Row q = epx::ref::quantize_row_fp8(x, c.hidden, c.round_scale);
      for (int h = 0; h < c.hidden; ++h)
        row[h] = float_to_bf16(epx::ref::fp8_e4m3_to_float(q.q[h]) * q.scale_inv[h / 128]);
    }
    std::vector<float> acc(c.hidden, 0.0f);
    for (int k = 0; k < c.num_topk; ++k)
      if (in.topk_idx[size_t(t) * c.num_topk + k] >= 0)
        for (int h = 0; h < c.hidden; ++h) acc[h] += bf16_to_float(row[h]);
    for (float a : acc) out.push_back(float_to_bf16(a));
  }
  return out;
}

void run_round_trip(RandomLl& c) {
  std::vector<LlDispatchResult> d;
  std::vector<std::vector<uint16_t>> y;
  for (int r = 0; r < c.num_ranks; ++r) {
    d.push_back(epx::ref::ll_dispatch(c.inputs, r, c.max_tokens, c.hidden, c.num_topk, c.num_experts,
                                      c.use_fp8, c.round_scale, c.ue8m0));
    expect_metadata(c, d.back(), r);
    y.emplace_back();
    expert_outputs(c, d.back(), r, y.back());
  }
  for (int r = 0; r < c.num_ranks; ++r) {
    const LlRankInput& in = c.inputs[r];
    const std::vector<float> ones(size_t(in.num_tokens) * c.num_topk, 1.0f);
    const std::vector<uint16_t> out = epx::ref::ll_combine(d, y, r, in.topk_idx, ones, in.num_tokens,
                                                           c.num_topk, c.hidden, c.max_tokens, c.num_experts);
    EXPECT_EQ(out, expected_combine(c, r)) << "rank " << r;
  }
}

TEST(RefLlRandom, DispatchCombineRoundTrip) {
  const unsigned seed = test_seed();
  std::cout << "[ seed     ] EPX_TEST_SEED=" << seed << std::endl;
  SCOPED_TRACE("EPX_TEST_SEED=" + std::to_string(seed));
  std::mt19937 rng(seed);
  for (int iter = 0; iter < 60; ++iter) {
    RandomLl c = make_random_case(rng);
    const int mode = iter % 4;  // bf16, fp8 float scales, fp8 power-of-two, fp8 UE8M0
    c.use_fp8 = mode != 0;
    c.round_scale = mode >= 2;
    c.ue8m0 = mode == 3;
    SCOPED_TRACE("iteration " + std::to_string(iter) + " mode " + std::to_string(mode));
    run_round_trip(c);
    if (HasFailure()) return;
  }
}

}  // namespace
