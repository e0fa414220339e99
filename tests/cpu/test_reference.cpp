// CPU tests of the reference model (src/reference): hand-worked cases whose expected values are
// written out literally, error handling, and a randomized dispatch -> combine round trip.
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iostream>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "epx/error.hpp"
#include "reference/reference.hpp"
#include "cpu/test_util.hpp"

namespace {

using epx::ref::bf16_to_float;
using epx::ref::CombineRankInput;
using epx::ref::DispatchResult;
using epx::ref::DispatchShape;
using epx::ref::float_to_bf16;
using epx::ref::RankInput;

using epx::test_util::bf;
using epx::test_util::from_bits;

std::vector<uint16_t> bf_vec(const std::vector<float>& values) {
  std::vector<uint16_t> out;
  for (float v : values) out.push_back(bf(v));
  return out;
}

std::vector<float> to_float(const std::vector<uint16_t>& bits) {
  std::vector<float> out;
  for (uint16_t b : bits) out.push_back(bf16_to_float(b));
  return out;
}

// Runs fn and expects an InvalidArgument epx::Error whose message names `argument`.
void expect_invalid_argument(const std::function<void()>& fn, const std::string& argument) {
  try {
    fn();
  } catch (const epx::Error& e) {
    EXPECT_EQ(e.kind(), epx::ErrorKind::kInvalidArgument) << e.what();
    EXPECT_NE(std::string(e.what()).find(argument), std::string::npos)
        << "message does not name " << argument << ": " << e.what();
    return;
  }
  ADD_FAILURE() << "no epx::Error thrown; expected one naming " << argument;
}

// ---------------------------------------------------------------------------------------------
// bf16 conversion

TEST(RefBf16, ExactValuesAndSignedZero) {
  EXPECT_EQ(float_to_bf16(1.0f), 0x3F80);
  EXPECT_EQ(float_to_bf16(-2.0f), 0xC000);
  EXPECT_EQ(float_to_bf16(0.0f), 0x0000);
  EXPECT_EQ(float_to_bf16(-0.0f), 0x8000);
  EXPECT_EQ(float_to_bf16(from_bits(0x7F7F0000)), 0x7F7F);  // largest finite bf16
}

TEST(RefBf16, RoundsToNearestTiesToEven) {
  EXPECT_EQ(float_to_bf16(from_bits(0x3F808000)), 0x3F80);  // tie, kept bit even: down
  EXPECT_EQ(float_to_bf16(from_bits(0x3F818000)), 0x3F82);  // tie, kept bit odd: up
  EXPECT_EQ(float_to_bf16(from_bits(0x3F808001)), 0x3F81);  // just above the tie: up
  EXPECT_EQ(float_to_bf16(from_bits(0x3F807FFF)), 0x3F80);  // just below the tie: down
  EXPECT_EQ(float_to_bf16(from_bits(0xBF818000)), 0xBF82);  // negative tie, odd: away from 0
  EXPECT_EQ(float_to_bf16(from_bits(0xBF808000)), 0xBF80);  // negative tie, even: toward 0
  EXPECT_EQ(float_to_bf16(from_bits(0x00018000)), 0x0002);  // subnormal tie, odd: up
}

TEST(RefBf16, InfinityAndOverflow) {
  EXPECT_EQ(float_to_bf16(INFINITY), 0x7F80);
  EXPECT_EQ(float_to_bf16(-INFINITY), 0xFF80);
  EXPECT_EQ(float_to_bf16(FLT_MAX), 0x7F80);                // rounds past the largest bf16
  EXPECT_EQ(float_to_bf16(from_bits(0x7F7F8000)), 0x7F80);  // tie above 0x7F7F (odd): to inf
}

TEST(RefBf16, NanBecomesQuietNanKeepingSign) {
  EXPECT_EQ(float_to_bf16(from_bits(0x7FC00000)), 0x7FC0);
  EXPECT_EQ(float_to_bf16(from_bits(0x7F800001)), 0x7FC0);  // payload below bf16: must not be inf
  EXPECT_EQ(float_to_bf16(from_bits(0x7FFFFFFF)), 0x7FC0);  // rounding would carry out
  EXPECT_EQ(float_to_bf16(from_bits(0xFF800001)), 0xFFC0);
}

TEST(RefBf16, ToFloat) {
  EXPECT_EQ(bf16_to_float(0x3F80), 1.0f);
  EXPECT_EQ(bf16_to_float(0xC040), -3.0f);
  EXPECT_EQ(bf16_to_float(0x7F80), INFINITY);
  EXPECT_EQ(bf16_to_float(0x0001), std::ldexp(1.0f, -133));  // smallest subnormal
  EXPECT_TRUE(std::isnan(bf16_to_float(0x7FC0)));
}

TEST(RefBf16, EveryNonNanPatternRoundTrips) {
  for (uint32_t b = 0; b <= 0xFFFF; ++b) {
    const float f = bf16_to_float(static_cast<uint16_t>(b));
    if (std::isnan(f)) continue;
    ASSERT_EQ(float_to_bf16(f), b) << "bf16 pattern 0x" << std::hex << b;
  }
}

// ---------------------------------------------------------------------------------------------
// Hand-worked case: R = 2 ranks, E = 4 experts (experts 0,1 on rank 0; 2,3 on rank 1), K = 2.
//   rank 0, N = 3: t0 -> {0, 2} (ranks 0, 1); t1 -> {1, -1} (rank 0); t2 -> {3, 2} (rank 1 only)
//   rank 1, N = 2: t0 -> {2, 1} (ranks 1, 0); t1 -> {-1, 0} (rank 0)
// x rows are 4 bytes: rank s token t holds {100s + 10t + j}; one scale per row.

constexpr int kRanks = 2, kExperts = 4, kTopk = 2;

std::vector<RankInput> hand_inputs(bool with_weights) {
  std::vector<RankInput> in(2);
  in[0].num_tokens = 3;
  in[0].x = {0, 1, 2, 3, 10, 11, 12, 13, 20, 21, 22, 23};
  in[0].x_scales = {1.0f, 2.0f, 3.0f};
  in[0].topk_idx = {0, 2, 1, -1, 3, 2};
  in[1].num_tokens = 2;
  in[1].x = {100, 101, 102, 103, 110, 111, 112, 113};
  in[1].x_scales = {11.0f, 12.0f};
  in[1].topk_idx = {2, 1, -1, 0};
  if (with_weights) {
    in[0].topk_weights = {0.5f, 0.25f, 0.75f, 0.125f, 0.375f, 0.625f};
    in[1].topk_weights = {1.5f, 2.5f, 3.5f, 4.5f};
  }
  return in;
}

DispatchShape hand_shape(int expert_alignment = 1) {
  DispatchShape shape;
  shape.num_ranks = kRanks;
  shape.num_experts = kExperts;
  shape.num_topk = kTopk;
  shape.row_bytes = 4;
  shape.num_scales = 1;
  shape.expert_alignment = expert_alignment;
  return shape;
}

TEST(RefLayout, HandWorkedRank0) {
  const auto in = hand_inputs(false);
  const auto layout = epx::ref::get_dispatch_layout(in[0].topk_idx, 3, kTopk, kExperts, kRanks);
  // t2 has two experts on rank 1 but counts once there.
  EXPECT_EQ(layout.num_tokens_per_rank, (std::vector<int>{2, 2}));
  EXPECT_EQ(layout.num_tokens_per_expert, (std::vector<int>{1, 1, 2, 1}));
  EXPECT_EQ(layout.is_token_in_rank, (std::vector<uint8_t>{1, 1, 1, 0, 0, 1}));
}

TEST(RefLayout, HandWorkedRank1) {
  const auto in = hand_inputs(false);
  const auto layout = epx::ref::get_dispatch_layout(in[1].topk_idx, 2, kTopk, kExperts, kRanks);
  EXPECT_EQ(layout.num_tokens_per_rank, (std::vector<int>{2, 1}));
  EXPECT_EQ(layout.num_tokens_per_expert, (std::vector<int>{1, 1, 1, 0}));
  EXPECT_EQ(layout.is_token_in_rank, (std::vector<uint8_t>{1, 1, 1, 0}));
}

TEST(RefDispatch, HandWorkedToRank0) {
  const auto d = epx::ref::dispatch(hand_inputs(true), 0, hand_shape());
  // Rows ordered by (source rank, token): (0,t0), (0,t1), (1,t0), (1,t1).
  EXPECT_EQ(d.num_recv, 4);
  EXPECT_EQ(d.recv_x, (std::vector<uint8_t>{0, 1, 2, 3, 10, 11, 12, 13, 100, 101, 102, 103, 110,
                                            111, 112, 113}));
  EXPECT_EQ(d.recv_x_scales, (std::vector<float>{1.0f, 2.0f, 11.0f, 12.0f}));
  EXPECT_EQ(d.recv_topk_idx, (std::vector<int64_t>{0, -1, 1, -1, -1, 1, -1, 0}));
  EXPECT_EQ(d.recv_topk_weights,
            (std::vector<float>{0.5f, 0.0f, 0.75f, 0.0f, 0.0f, 2.5f, 0.0f, 4.5f}));
  EXPECT_EQ(d.recv_src_idx, (std::vector<int>{0, 1, 0, 1}));
  EXPECT_EQ(d.recv_src_rank, (std::vector<int>{0, 0, 1, 1}));
  EXPECT_EQ(d.num_recv_tokens_per_expert, (std::vector<int>{2, 2}));
  // Rank 0 sends {2, 2}, rank 1 sends {2, 1}; rows are cumulative over source ranks.
  EXPECT_EQ(d.rank_prefix_matrix, (std::vector<int>{2, 2, 4, 3}));
}

TEST(RefDispatch, HandWorkedToRank1) {
  const auto d = epx::ref::dispatch(hand_inputs(true), 1, hand_shape());
  // Rows: (0,t0), (0,t2), (1,t0); experts 2, 3 become local 0, 1.
  EXPECT_EQ(d.num_recv, 3);
  EXPECT_EQ(d.recv_x, (std::vector<uint8_t>{0, 1, 2, 3, 20, 21, 22, 23, 100, 101, 102, 103}));
  EXPECT_EQ(d.recv_x_scales, (std::vector<float>{1.0f, 3.0f, 11.0f}));
  EXPECT_EQ(d.recv_topk_idx, (std::vector<int64_t>{-1, 0, 1, 0, 0, -1}));
  EXPECT_EQ(d.recv_topk_weights, (std::vector<float>{0.0f, 0.25f, 0.375f, 0.625f, 1.5f, 0.0f}));
  EXPECT_EQ(d.recv_src_idx, (std::vector<int>{0, 2, 0}));
  EXPECT_EQ(d.recv_src_rank, (std::vector<int>{0, 0, 1}));
  EXPECT_EQ(d.num_recv_tokens_per_expert, (std::vector<int>{3, 1}));
  EXPECT_EQ(d.rank_prefix_matrix, (std::vector<int>{2, 2, 4, 3}));
}

TEST(RefDispatch, ExpertCountsRoundUpToAlignment) {
  // Unaligned counts on rank 1 are {3, 1}.
  EXPECT_EQ(epx::ref::dispatch(hand_inputs(true), 1, hand_shape(2)).num_recv_tokens_per_expert,
            (std::vector<int>{4, 2}));
  EXPECT_EQ(epx::ref::dispatch(hand_inputs(true), 1, hand_shape(4)).num_recv_tokens_per_expert,
            (std::vector<int>{4, 4}));
  EXPECT_EQ(epx::ref::dispatch(hand_inputs(true), 1, hand_shape(3)).num_recv_tokens_per_expert,
            (std::vector<int>{3, 3}));
}

TEST(RefDispatch, NoWeightsGiveNoRecvWeights) {
  const auto d = epx::ref::dispatch(hand_inputs(false), 0, hand_shape());
  EXPECT_EQ(d.num_recv, 4);
  EXPECT_TRUE(d.recv_topk_weights.empty());
}

// ---------------------------------------------------------------------------------------------
// Combine on hand-made dispatch results (those of the hand-worked dispatch above).

DispatchResult received_rows(const std::vector<int>& src_rank, const std::vector<int>& src_idx) {
  DispatchResult d;
  d.num_recv = static_cast<int>(src_rank.size());
  d.recv_src_rank = src_rank;
  d.recv_src_idx = src_idx;
  return d;
}

struct HandCombine {
  DispatchResult on_rank0 = received_rows({0, 0, 1, 1}, {0, 1, 0, 1});
  DispatchResult on_rank1 = received_rows({0, 0, 1}, {0, 2, 0});
  std::vector<CombineRankInput> inputs() const {
    std::vector<CombineRankInput> in(2);
    in[0].dispatched = &on_rank0;
    in[0].x = bf_vec({1, 2, 3, 4, 100, 100, 200, 200});
    in[0].topk_weights = {0.5f, 0.0f, 0.75f, 0.0f, 9.0f, 9.0f, 9.0f, 9.0f};
    in[1].dispatched = &on_rank1;
    in[1].x = bf_vec({10, 20, 30, 40, 300, 300});
    in[1].topk_weights = {0.0f, 0.25f, 0.375f, 0.625f, 9.0f, 9.0f};
    return in;
  }
};

TEST(RefCombine, SumsRowsOfEachTokenOverRanks) {
  const HandCombine hand;
  const auto c = epx::ref::combine(hand.inputs(), 0, 3, 2, kTopk, {}, {});
  // t0 on both ranks, t1 only on rank 0 (row 1), t2 only on rank 1 (row 1).
  EXPECT_EQ(to_float(c.combined_x), (std::vector<float>{11, 22, 3, 4, 30, 40}));
  EXPECT_EQ(c.combined_topk_weights,
            (std::vector<float>{0.5f, 0.25f, 0.75f, 0.0f, 0.375f, 0.625f}));
}

TEST(RefCombine, PicksRowsOfTheCombiningRank) {
  const HandCombine hand;
  const auto c = epx::ref::combine(hand.inputs(), 1, 2, 2, kTopk, {}, {});
  EXPECT_EQ(to_float(c.combined_x), (std::vector<float>{400, 400, 200, 200}));
  EXPECT_EQ(c.combined_topk_weights, (std::vector<float>{18.0f, 18.0f, 9.0f, 9.0f}));
}

TEST(RefCombine, AddsBiases) {
  const HandCombine hand;
  const auto bias_0 = bf_vec({0.5f, 0.5f, 1, 1, -30, 0});
  const auto bias_1 = bf_vec({0.25f, 0, 0, 0, 0, -40});
  const auto c = epx::ref::combine(hand.inputs(), 0, 3, 2, kTopk, bias_0, bias_1);
  EXPECT_EQ(to_float(c.combined_x), (std::vector<float>{11.75f, 22.5f, 4, 5, 0, 0}));
}

TEST(RefCombine, NoWeightsGiveNoCombinedWeights) {
  const HandCombine hand;
  auto in = hand.inputs();
  for (auto& r : in) r.topk_weights.clear();
  EXPECT_TRUE(epx::ref::combine(in, 0, 3, 2, kTopk, {}, {}).combined_topk_weights.empty());
}

// The fp32 summation order is part of the contract. With eps = 2^-24 (half an fp32 ulp at 1) and
// 1 + 2^-8 (a bf16 tie that rounds down to 1.0 = 0x3F80), any other order ends at 1 + 2^-8 + 2^-23,
// which rounds to 0x3F81.
TEST(RefCombine, SumsInContractOrder) {
  const float eps = std::ldexp(1.0f, -24), tie = std::ldexp(1.0f, -8);
  const DispatchResult one_row = received_rows({0}, {0});
  std::vector<CombineRankInput> in(3);
  for (auto& r : in) r.dispatched = &one_row;
  // Column 0 checks ranks ascending: 1 + eps + eps stays 1 only if 1 comes first.
  // Column 1 checks bias_0 then bias_1 after the ranks: each eps alone is lost against 1 + 2^-8.
  in[0].x = bf_vec({1, 1});
  in[1].x = bf_vec({eps, tie});
  in[2].x = bf_vec({eps, 0});
  const auto c = epx::ref::combine(in, 0, 1, 2, 0, bf_vec({tie, eps}), bf_vec({0, eps}));
  EXPECT_EQ(c.combined_x, (std::vector<uint16_t>{0x3F80, 0x3F80}));
}

// ---------------------------------------------------------------------------------------------
// Argument errors

TEST(RefErrors, LayoutRejectsExpertIdE) {
  expect_invalid_argument(
      [] {
        epx::ref::get_dispatch_layout({0, 4}, 1, 2, kExperts, kRanks);
      },
      "topk_idx");
}

TEST(RefErrors, LayoutRejectsExpertIdMinusTwo) {
  expect_invalid_argument(
      [] {
        epx::ref::get_dispatch_layout({-2, 0}, 1, 2, kExperts, kRanks);
      },
      "topk_idx");
}

TEST(RefErrors, LayoutRejectsExpertsNotDivisibleByRanks) {
  expect_invalid_argument([] { epx::ref::get_dispatch_layout({0, 1}, 1, 2, 5, 2); }, "num_experts");
}

TEST(RefErrors, LayoutRejectsWrongTopkIdxSize) {
  expect_invalid_argument(
      [] {
        epx::ref::get_dispatch_layout({0, 1, 2}, 1, 2, kExperts, kRanks);
      },
      "topk_idx");
}

TEST(RefErrors, DispatchRejectsWrongRankCount) {
  auto in = hand_inputs(true);
  in.pop_back();
  expect_invalid_argument([&] { epx::ref::dispatch(in, 0, hand_shape()); }, "inputs");
}

TEST(RefErrors, DispatchRejectsRankOutOfRange) {
  expect_invalid_argument([] { epx::ref::dispatch(hand_inputs(true), 2, hand_shape()); }, "rank");
  expect_invalid_argument([] { epx::ref::dispatch(hand_inputs(true), -1, hand_shape()); }, "rank");
}

TEST(RefErrors, DispatchRejectsZeroAlignment) {
  expect_invalid_argument([] { epx::ref::dispatch(hand_inputs(true), 0, hand_shape(0)); },
                          "expert_alignment");
}

TEST(RefErrors, DispatchRejectsExpertsNotDivisibleByRanks) {
  auto shape = hand_shape();
  shape.num_experts = 3;
  expect_invalid_argument([&] { epx::ref::dispatch(hand_inputs(true), 0, shape); }, "num_experts");
}

TEST(RefErrors, DispatchRejectsBadExpertIdOnAnyRank) {
  auto in = hand_inputs(true);
  in[1].topk_idx[3] = kExperts;
  expect_invalid_argument([&] { epx::ref::dispatch(in, 0, hand_shape()); }, "inputs[1].topk_idx");
}

TEST(RefErrors, DispatchRejectsWrongXSize) {
  auto in = hand_inputs(true);
  in[0].x.pop_back();
  expect_invalid_argument([&] { epx::ref::dispatch(in, 0, hand_shape()); }, "inputs[0].x");
}

TEST(RefErrors, DispatchRejectsWrongScalesSize) {
  auto in = hand_inputs(true);
  in[1].x_scales.clear();
  expect_invalid_argument([&] { epx::ref::dispatch(in, 0, hand_shape()); }, "inputs[1].x_scales");
}

TEST(RefErrors, DispatchRejectsWeightsOnOnlySomeRanks) {
  auto in = hand_inputs(true);
  in[1].topk_weights.clear();
  expect_invalid_argument([&] { epx::ref::dispatch(in, 0, hand_shape()); },
                          "inputs[1].topk_weights");
}

TEST(RefErrors, CombineRejectsNullDispatched) {
  const HandCombine hand;
  auto in = hand.inputs();
  in[1].dispatched = nullptr;
  expect_invalid_argument([&] { epx::ref::combine(in, 0, 3, 2, kTopk, {}, {}); }, "dispatched");
}

TEST(RefErrors, CombineRejectsWrongXSize) {
  const HandCombine hand;
  auto in = hand.inputs();
  in[0].x.pop_back();
  expect_invalid_argument([&] { epx::ref::combine(in, 0, 3, 2, kTopk, {}, {}); }, "inputs[0].x");
}

TEST(RefErrors, CombineRejectsWrongBiasSize) {
  const HandCombine hand;
  expect_invalid_argument(
      [&] {
        epx::ref::combine(hand.inputs(), 0, 3, 2, kTopk, bf_vec({1, 1}), {});
      },
      "bias_0");
  expect_invalid_argument(
      [&] {
        epx::ref::combine(hand.inputs(), 0, 3, 2, kTopk, {}, bf_vec({1, 1}));
      },
      "bias_1");
}

TEST(RefErrors, CombineRejectsSourceIndexOutOfRange) {
  const HandCombine hand;
  // Rank 1 holds token 2 of rank 0, which does not exist if rank 0 has only 2 tokens.
  expect_invalid_argument([&] { epx::ref::combine(hand.inputs(), 0, 2, 2, kTopk, {}, {}); },
                          "recv_src_idx");
}

TEST(RefErrors, CombineRejectsRankOutOfRange) {
  const HandCombine hand;
  expect_invalid_argument([&] { epx::ref::combine(hand.inputs(), 2, 3, 2, kTopk, {}, {}); },
                          "rank");
}

// ---------------------------------------------------------------------------------------------
// Randomized round trip: dispatch to every rank, then combine the received bf16 rows unchanged.
// Each token then comes back as x * (number of ranks it was sent to), and its weights come back
// unchanged (each expert slot survives on exactly one rank, zeros elsewhere). Rows hold small
// integers so every fp32 sum is exact and the expectation needs no rounding model.

unsigned test_seed() {
  // EPX_TEST_SEED reproduces a failing run.
  const char* env = std::getenv("EPX_TEST_SEED");
  return env ? static_cast<unsigned>(std::strtoul(env, nullptr, 10)) : std::random_device{}();
}

struct RandomCase {
  DispatchShape shape;
  int hidden = 0;
  std::vector<RankInput> inputs;
  std::vector<std::vector<uint16_t>> x;  // per rank [N, hidden] bf16, the bytes of inputs[r].x
};

int uniform(std::mt19937& rng, int lo, int hi) {
  return std::uniform_int_distribution<int>(lo, hi)(rng);
}

// bf16 rows as the little-endian bytes that dispatch moves (the GPU is little-endian too).
std::vector<uint8_t> to_bytes(const std::vector<uint16_t>& bits) {
  std::vector<uint8_t> bytes;
  for (uint16_t b : bits) {
    bytes.push_back(static_cast<uint8_t>(b & 0xFF));
    bytes.push_back(static_cast<uint8_t>(b >> 8));
  }
  return bytes;
}

std::vector<uint16_t> from_bytes(const std::vector<uint8_t>& bytes) {
  std::vector<uint16_t> bits;
  for (size_t i = 0; i + 1 < bytes.size(); i += 2)
    bits.push_back(static_cast<uint16_t>(bytes[i] | (bytes[i + 1] << 8)));
  return bits;
}

// K distinct experts, each slot dropped to -1 with probability 1/5.
std::vector<int64_t> random_topk(std::mt19937& rng, int num_experts, int num_topk) {
  std::vector<int64_t> experts(num_experts);
  std::iota(experts.begin(), experts.end(), 0);
  std::shuffle(experts.begin(), experts.end(), rng);
  experts.resize(num_topk);
  for (auto& e : experts)
    if (uniform(rng, 0, 4) == 0) e = -1;
  return experts;
}

RankInput random_rank_input(std::mt19937& rng, const DispatchShape& shape, int hidden,
                            std::vector<uint16_t>& x) {
  RankInput in;
  in.num_tokens = uniform(rng, 0, 40);
  for (int i = 0; i < in.num_tokens * hidden; ++i)
    x.push_back(bf(static_cast<float>(uniform(rng, -8, 8))));
  in.x = to_bytes(x);
  for (int i = 0; i < in.num_tokens * shape.num_scales; ++i)
    in.x_scales.push_back(uniform(rng, 1, 99));
  for (int t = 0; t < in.num_tokens; ++t) {
    const auto topk = random_topk(rng, shape.num_experts, shape.num_topk);
    in.topk_idx.insert(in.topk_idx.end(), topk.begin(), topk.end());
    for (int k = 0; k < shape.num_topk; ++k)
      in.topk_weights.push_back(uniform(rng, 1, 1000) / 64.0f);
  }
  return in;
}

RandomCase random_case(std::mt19937& rng) {
  RandomCase c;
  c.shape.num_ranks = uniform(rng, 1, 8);
  c.shape.num_experts = c.shape.num_ranks * uniform(rng, 1, 4);
  c.shape.num_topk = uniform(rng, 1, std::min(c.shape.num_experts, 6));
  c.hidden = uniform(rng, 1, 16);
  c.shape.row_bytes = 2 * c.hidden;
  c.shape.num_scales = uniform(rng, 0, 2);
  c.shape.expert_alignment = uniform(rng, 1, 4);
  c.x.resize(c.shape.num_ranks);
  for (int r = 0; r < c.shape.num_ranks; ++r)
    c.inputs.push_back(random_rank_input(rng, c.shape, c.hidden, c.x[r]));
  return c;
}

CombineRankInput combine_input_from(const DispatchResult& d) {
  CombineRankInput in;
  in.dispatched = &d;
  in.x = from_bytes(d.recv_x);
  in.topk_weights = d.recv_topk_weights;
  return in;
}

// Row order (source rank, token) strictly ascending; row and expert counts match the layouts of
// all sources.
void check_dispatch_bookkeeping(const RandomCase& c, const std::vector<DispatchResult>& d) {
  const int R = c.shape.num_ranks, E = c.shape.num_experts, E_loc = E / R;
  std::vector<int> rows_to(R, 0), tokens_of_expert(E, 0);
  for (const RankInput& in : c.inputs) {
    const auto layout =
        epx::ref::get_dispatch_layout(in.topk_idx, in.num_tokens, c.shape.num_topk, E, R);
    for (int r = 0; r < R; ++r) rows_to[r] += layout.num_tokens_per_rank[r];
    for (int e = 0; e < E; ++e) tokens_of_expert[e] += layout.num_tokens_per_expert[e];
  }
  const int a = c.shape.expert_alignment;
  for (int r = 0; r < R; ++r) {
    EXPECT_EQ(d[r].num_recv, rows_to[r]) << "rank " << r;
    EXPECT_EQ(d[r].rank_prefix_matrix[(R - 1) * R + r], d[r].num_recv) << "rank " << r;
    for (int j = 0; j < E_loc; ++j)
      EXPECT_EQ(d[r].num_recv_tokens_per_expert[j],
                (tokens_of_expert[r * E_loc + j] + a - 1) / a * a)
          << "rank " << r << " local expert " << j;
    for (int i = 1; i < d[r].num_recv; ++i) {
      const auto prev = std::make_pair(d[r].recv_src_rank[i - 1], d[r].recv_src_idx[i - 1]);
      const auto cur = std::make_pair(d[r].recv_src_rank[i], d[r].recv_src_idx[i]);
      EXPECT_LT(prev, cur) << "rank " << r << " row " << i;
    }
  }
}

// Each token comes back as x * (number of destination ranks), with its weights unchanged. Weights
// come back only if some rank received rows: with none, combine's inputs cannot show they exist.
void check_round_trip(const RandomCase& c, int rank, bool any_rows,
                      const epx::ref::CombineResult& out) {
  const RankInput& in = c.inputs[rank];
  const int R = c.shape.num_ranks, K = c.shape.num_topk, H = c.hidden;
  ASSERT_EQ(out.combined_x.size(), static_cast<size_t>(in.num_tokens * H)) << "rank " << rank;
  ASSERT_EQ(out.combined_topk_weights.size(), any_rows ? static_cast<size_t>(in.num_tokens * K) : 0)
      << "rank " << rank;
  const auto layout =
      epx::ref::get_dispatch_layout(in.topk_idx, in.num_tokens, K, c.shape.num_experts, R);
  for (int t = 0; t < in.num_tokens; ++t) {
    const int destinations =
        std::accumulate(&layout.is_token_in_rank[t * R], &layout.is_token_in_rank[t * R] + R, 0);
    for (int h = 0; h < H; ++h) {
      const float x = bf16_to_float(c.x[rank][t * H + h]);
      ASSERT_EQ(bf16_to_float(out.combined_x[t * H + h]), x * destinations)
          << "rank " << rank << " token " << t << " column " << h;
    }
    for (int k = 0; k < K && any_rows; ++k) {
      const float expected = in.topk_idx[t * K + k] >= 0 ? in.topk_weights[t * K + k] : 0.0f;
      ASSERT_EQ(out.combined_topk_weights[t * K + k], expected)
          << "rank " << rank << " token " << t << " slot " << k;
    }
  }
}

TEST(RefProperty, DispatchThenCombineMultipliesByDestinationCount) {
  const unsigned seed = test_seed();
  std::cout << "[ seed     ] EPX_TEST_SEED=" << seed << std::endl;
  RecordProperty("seed", std::to_string(seed));
  SCOPED_TRACE("EPX_TEST_SEED=" + std::to_string(seed));
  std::mt19937 rng(seed);
  for (int iteration = 0; iteration < 50; ++iteration) {
    SCOPED_TRACE("iteration " + std::to_string(iteration));
    const RandomCase c = random_case(rng);
    const int R = c.shape.num_ranks;
    std::vector<DispatchResult> d;
    for (int r = 0; r < R; ++r) d.push_back(epx::ref::dispatch(c.inputs, r, c.shape));
    check_dispatch_bookkeeping(c, d);
    std::vector<CombineRankInput> combine_in;
    bool any_rows = false;
    for (const auto& dr : d) {
      combine_in.push_back(combine_input_from(dr));
      any_rows = any_rows || dr.num_recv > 0;
    }
    for (int r = 0; r < R; ++r) {
      const auto out = epx::ref::combine(combine_in, r, c.inputs[r].num_tokens, c.hidden,
                                         c.shape.num_topk, {}, {});
      check_round_trip(c, r, any_rows, out);
      if (HasFatalFailure()) return;
    }
  }
}

}  // namespace
