// CPU tests of the host-side pieces that need no GPU: views, validation, config, planning, errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include "epx/buffer.hpp"
#include "epx/config.hpp"
#include "epx/error.hpp"
#include "host/env.hpp"
#include "host/handle_storage.hpp"
#include "host/plan.hpp"
#include "host/tuning.hpp"
#include "host/validate.hpp"
#include "common/ll_layout.hpp"

namespace epx {
namespace {

// Runs f, expects an epx::Error of `kind` whose message contains `needle`.
template <typename F>
void expect_error(F&& f, ErrorKind kind, const std::string& needle) {
  try {
    f();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), kind) << e.what();
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << "message lacks '" << needle << "': " << e.what();
    return;
  }
  ADD_FAILURE() << "no epx::Error thrown (wanted one naming '" << needle << "')";
}

alignas(16) char g_mem[1 << 16];

TEST(View, ContiguousStridesAndNumel) {
  View v = View::of(g_mem, DType::kBF16, {4, 8});
  EXPECT_EQ(v.stride[0], 8);
  EXPECT_EQ(v.stride[1], 1);
  EXPECT_EQ(v.numel(), 32);
  EXPECT_TRUE(v.is_contiguous());
  View t = View::strided(g_mem, DType::kF32, {4, 8}, {1, 4});
  EXPECT_FALSE(t.is_contiguous());
  EXPECT_FALSE(View{}.defined());
  EXPECT_TRUE(View::of(nullptr, DType::kI32, {0, 4}).defined());
}

TEST(Validate, NamesTheArgumentExpectedAndActual) {
  const View x = View::of(g_mem, DType::kF32, {4, 8});
  expect_error([&] { validate::tensor(x, "x", DType::kBF16, {4, 8}); }, ErrorKind::kInvalidArgument, "x: expected dtype bfloat16");
  expect_error([&] { validate::tensor(x, "recv_x", DType::kF32, {5, 8}); }, ErrorKind::kInvalidArgument, "recv_x: expected shape [5, 8]");
  expect_error([&] { validate::tensor(View{}, "topk_idx", DType::kI64, {4, 8}); }, ErrorKind::kInvalidArgument, "topk_idx: required");
  EXPECT_NO_THROW(validate::tensor(x, "x", DType::kF32, {validate::kAny, 8}));
  EXPECT_NO_THROW(validate::optional(View{}, "bias_0", DType::kBF16, {4, 8}));
  expect_error([&] { validate::in_range(33, "num_topk", 1, 32); }, ErrorKind::kInvalidArgument, "num_topk: expected a value in [1, 32], got 33");
}

TEST(Validate, RowAlignment) {
  // 100 bf16 = 200 bytes: not a multiple of 16.
  expect_error([] { validate::rows_16b_aligned(View::of(g_mem, DType::kBF16, {2, 100}), "x"); },
               ErrorKind::kInvalidArgument, "row bytes (200)");
  expect_error([] { validate::rows_16b_aligned(View::of(g_mem + 4, DType::kBF16, {2, 64}), "x"); },
               ErrorKind::kInvalidArgument, "16-byte aligned");
  expect_error([] { validate::rows_16b_aligned(View::strided(g_mem, DType::kBF16, {2, 64}, {68, 1}), "x"); },
               ErrorKind::kInvalidArgument, "row stride (136 bytes)");
  expect_error([] { validate::rows_16b_aligned(View::strided(g_mem, DType::kBF16, {2, 64}, {1, 2}), "x"); },
               ErrorKind::kInvalidArgument, "last dimension must be contiguous");
  EXPECT_NO_THROW(validate::rows_16b_aligned(View::strided(g_mem, DType::kBF16, {2, 64}, {72, 1}), "x"));
}

TEST(Config, ValidatesEveryField) {
  Config c;
  EXPECT_NO_THROW(c.validate(132));
  c.num_sms = 0;
  expect_error([&] { c.validate(132); }, ErrorKind::kInvalidArgument, "Config.num_sms");
  c.num_sms = 133;
  expect_error([&] { c.validate(132); }, ErrorKind::kInvalidArgument, "Config.num_sms");
  // At most kMaxHtBlocks blocks (a device with more SMs, or none given), named with the limit.
  c.num_sms = kMaxHtBlocks;
  EXPECT_NO_THROW(c.validate(132));
  EXPECT_NO_THROW(c.validate());
  c.num_sms = kMaxHtBlocks + 1;
  expect_error([&] { c.validate(132); }, ErrorKind::kInvalidArgument, "Config.num_sms: at most 80");
  expect_error([&] { c.validate(); }, ErrorKind::kInvalidArgument, "Config.num_sms: at most 80");
  expect_error([&] { c.validate(); }, ErrorKind::kInvalidArgument, "got 81");
  c = Config{};
  c.num_threads = 100;
  expect_error([&] { c.validate(132); }, ErrorKind::kInvalidArgument, "Config.num_threads");
  c = Config{};
  c.timeout_s = -1;
  expect_error([&] { c.validate(132); }, ErrorKind::kInvalidArgument, "Config.timeout_s");
  c = Config{};
  c.ring_slots = 63;
  expect_error([&] { c.validate(132); }, ErrorKind::kInvalidArgument, "Config.ring_slots");
  c.ring_slots = 4097;
  expect_error([&] { c.validate(132); }, ErrorKind::kInvalidArgument, "Config.ring_slots");
  c.ring_slots = 64;
  EXPECT_NO_THROW(c.validate(132));
  c.ring_slots = 4096;
  EXPECT_NO_THROW(c.validate(132));
  EXPECT_GE(Config::defaults(4).num_sms, 1);
}

// The public Config is what a user tunes, with today's defaults: exactly four fields (the
// structured binding stops compiling when one is added or removed).
TEST(Config, HoldsOnlyWhatAUserTunes) {
  const auto [num_sms, num_threads, timeout_s, ring_slots] = Config{};
  EXPECT_EQ(num_sms, 20);
  EXPECT_EQ(num_threads, 512);
  EXPECT_EQ(timeout_s, 0.0);
  EXPECT_EQ(ring_slots, 128);
  for (int R = 1; R <= kMaxPeers; ++R) {
    const Config d = Config::defaults(R);
    EXPECT_EQ(d.num_sms, R <= 2 ? 16 : 20) << R;
    EXPECT_EQ(d.num_threads, 512) << R;
    EXPECT_EQ(d.timeout_s, 0.0) << R;
    EXPECT_EQ(d.ring_slots, 128) << R;
    EXPECT_NO_THROW(d.validate()) << R;  // kMaxHtBlocks included
    EXPECT_NO_THROW(Tuning{}.validate(d)) << R;  // a Buffer's own tuning holds for every default
  }
  EXPECT_EQ(Config::defaults(8, 6).num_sms, 6);  // a SimWorld rank's share
}

// The internal Tuning starts at the measured winners (every count automatic), and its validation
// names each knob.
TEST(Tuning, DefaultsAreTheMeasuredWinnersAndValidateNamesEveryKnob) {
  const auto [ring_combine, ring_chunk, ring_send_warps, dispatch_copy_warps, net_adversarial] = Tuning{};
  EXPECT_FALSE(net_adversarial);  // the direct NVLink emulation
  EXPECT_TRUE(ring_combine);
  EXPECT_EQ(ring_chunk, 0);
  EXPECT_EQ(ring_send_warps, 0);
  EXPECT_EQ(dispatch_copy_warps, 0);

  const Config c;  // 16 warps
  Tuning t;
  EXPECT_NO_THROW(t.validate(c));
  t = Tuning{};
  t.ring_chunk = -1;
  expect_error([&] { t.validate(c); }, ErrorKind::kInvalidArgument, "Tuning.ring_chunk");
  t.ring_chunk = 17;
  expect_error([&] { t.validate(c); }, ErrorKind::kInvalidArgument, "Tuning.ring_chunk");
  t.ring_chunk = 8;  // 8 rows x 16 warps = 128 = the default ring_slots
  EXPECT_NO_THROW(t.validate(c));
  {
    Config small = c;
    small.ring_slots = 100;  // 8 rows x 16 warps > 100 slots
    expect_error([&] { t.validate(small); }, ErrorKind::kInvalidArgument, "Tuning.ring_chunk");
    expect_error([&] { t.validate(small); }, ErrorKind::kInvalidArgument, "Config.ring_slots = 100");
    small.num_threads = 384;  // 8 x 12 = 96 fits
    EXPECT_NO_THROW(t.validate(small));
  }
  t = Tuning{};
  t.ring_send_warps = 16;  // no warp left to reduce
  expect_error([&] { t.validate(c); }, ErrorKind::kInvalidArgument, "Tuning.ring_send_warps");
  t.ring_send_warps = -1;
  expect_error([&] { t.validate(c); }, ErrorKind::kInvalidArgument, "Tuning.ring_send_warps");
  t.ring_send_warps = 15;
  EXPECT_NO_THROW(t.validate(c));
  t = Tuning{};
  t.dispatch_copy_warps = 16;  // no warp left to send
  expect_error([&] { t.validate(c); }, ErrorKind::kInvalidArgument, "Tuning.dispatch_copy_warps");
  t.dispatch_copy_warps = -1;
  expect_error([&] { t.validate(c); }, ErrorKind::kInvalidArgument, "Tuning.dispatch_copy_warps");
  t.dispatch_copy_warps = 15;
  EXPECT_NO_THROW(t.validate(c));
  {
    Config narrow = c;
    narrow.num_threads = 128;  // 4 warps: at most 3 of them copy out
    expect_error([&] { t.validate(narrow); }, ErrorKind::kInvalidArgument, "Tuning.dispatch_copy_warps");
  }
}

TEST(Plan, LayoutsFitAndHintsSuffice) {
  for (int hidden : {2048, 7168, 8192}) {
    for (DType dt : {DType::kBF16, DType::kFP8E4M3}) {
      const int64_t rows = 16384;
      const size_t bytes = plan::nvl_bytes_for_rows(rows, hidden, dt, 8);
      const RowLayout d = plan::dispatch_rows(bytes, hidden, dt, 8);
      const RowLayout c = plan::combine_rows(bytes, hidden, 8);
      EXPECT_GE(d.capacity, rows);
      EXPECT_GE(c.capacity, rows);
      EXPECT_LE(d.num_bytes, plan::row_region_bytes(bytes));
      EXPECT_LE(c.num_bytes, plan::row_region_bytes(bytes));
      // Sub-arrays are 16-byte aligned and do not overlap.
      EXPECT_EQ(d.off_scales % 16, 0u);
      EXPECT_LE(static_cast<size_t>(d.capacity) * d.row_bytes, d.off_scales);
      EXPECT_LE(d.off_scales + d.capacity * d.num_scales * 4, d.off_topk_idx);
      EXPECT_LE(d.off_topk_idx + d.capacity * d.num_topk_idx * 4, d.off_topk_weights);
      EXPECT_LE(d.off_topk_weights + d.capacity * d.num_topk_weights * 4, d.off_src_idx);
    }
  }
  EXPECT_EQ(plan::num_scales(7168), 56);
  EXPECT_EQ(plan::num_scales(100), 1);
  EXPECT_EQ(plan::dispatch_rows(1024, 7168, DType::kBF16, 8).capacity, 0);
}

TEST(Plan, FlagAreasHoldEveryFlag) {
  // What Buffer::flag_bytes reports (kRowsOffset, LlLayout::kSyncBytes) covers every flag and control
  // word of its part: the rest only stages rows (get_local_buffer_tensor exposes that rest).
  const size_t nvl = SymmetricLayout::kRowsOffset;
  EXPECT_GE(nvl, SymmetricLayout::kRingCtlOffset + sizeof(RingCtl));
  EXPECT_GE(SymmetricLayout::kRingCtlOffset, SymmetricLayout::kNotifyOffset + sizeof(NotifyArea));
  EXPECT_GE(SymmetricLayout::kNotifyOffset, sizeof(SyncArea));
  EXPECT_EQ(nvl % 4096, 0u);
  const size_t ll = LlLayout::kSyncBytes;
  EXPECT_GE(ll, sizeof(LlSync));
  LlLayout layout;
  layout.place(8, 128, 7168, 8, 32, /*with_zero_copy=*/true);
  EXPECT_EQ(layout.num_bytes(), ll + 2 * layout.buffer_bytes);  // [ LlSync | buffer 0 | buffer 1 ]
}

TEST(Plan, SizeHintValidatesArguments) {
  expect_error([] { Buffer::get_nvl_buffer_size_hint(100, 7168, DType::kBF16, 33, 4); }, ErrorKind::kInvalidArgument, "num_topk");
  expect_error([] { Buffer::get_nvl_buffer_size_hint(100, 7168, DType::kBF16, 8, 9); }, ErrorKind::kInvalidArgument, "num_ranks");
  EXPECT_GT(Buffer::get_nvl_buffer_size_hint(16384, 7168, DType::kBF16, 8, 4), size_t{16384} * 7168 * 2);
}

TEST(Env, TimeoutIsReadAndValidated) {
  setenv("EPX_TIMEOUT_S", "2.5", 1);
  EXPECT_DOUBLE_EQ(env::timeout_s(), 2.5);
  setenv("EPX_TIMEOUT_S", "abc", 1);
  expect_error([] { env::timeout_s(); }, ErrorKind::kInvalidArgument, "EPX_TIMEOUT_S");
  unsetenv("EPX_TIMEOUT_S");
  EXPECT_DOUBLE_EQ(env::timeout_s(), 100.0);
  Config c;
  c.timeout_s = 3;
  EXPECT_DOUBLE_EQ(effective_timeout_s(c), 3.0);
}

TEST(Error, CarriesKindMessageAndLocation) {
  try {
    EPX_CHECK(false, ErrorKind::kTimeout, "rank ", 1, " peer ", 2);
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kTimeout);
    EXPECT_EQ(e.message(), "rank 1 peer 2");
    EXPECT_NE(std::string(e.what()).find("Timeout"), std::string::npos);
    EXPECT_NE(std::string(e.file()).find("test_host.cpp"), std::string::npos);
    EXPECT_GT(e.line(), 0);
    return;
  }
  ADD_FAILURE() << "EPX_CHECK did not throw";
}

}  // namespace
}  // namespace epx

namespace epx {
namespace {

TEST(Plan, DispatchCopyWarps) {
  Config c;
  Tuning t;
  c.num_threads = 512;
  // Auto: sending warps = round(1.3 MB / (row bytes x blocks)), the rest copy out.
  c.num_sms = 24;
  EXPECT_EQ(plan::dispatch_copy_warps(c, t, 7168 * 2), 16 - 4);        // bf16, hidden 7168
  EXPECT_EQ(plan::dispatch_copy_warps(c, t, 7168), 16 - 8);           // fp8 (scales are apart)
  c.num_sms = 20;
  EXPECT_EQ(plan::dispatch_copy_warps(c, t, 7168 * 2), 16 - 5);
  EXPECT_EQ(plan::dispatch_copy_warps(c, t, 7168), 16 - 9);
  EXPECT_EQ(plan::dispatch_copy_warps(c, t, 64), 1);  // tiny rows: all but one warp send
  c.num_sms = 1;
  EXPECT_EQ(plan::dispatch_copy_warps(c, t, 1 << 20), 15);  // huge rows: one warp sends
  c.num_threads = 64;  // the smallest block: one warp sends, one copies out
  EXPECT_EQ(plan::dispatch_copy_warps(c, t, 7168 * 2), 1);
  EXPECT_EQ(plan::dispatch_copy_warps(c, t, 64), 1);
  // Explicit, capped at all warps but one.
  c.num_threads = 512;
  c.num_sms = 24;
  t.dispatch_copy_warps = 6;
  EXPECT_EQ(plan::dispatch_copy_warps(c, t, 7168 * 2), 6);
  c.num_threads = 128;
  EXPECT_EQ(plan::dispatch_copy_warps(c, t, 7168 * 2), 3);
}

TEST(Plan, RingCombineGeometry) {
  Config c;
  Tuning t;
  c.num_sms = 24;
  c.num_threads = 512;
  // Auto: a warp per peer, two each when there are two peers.
  EXPECT_EQ(plan::ring_plan(c, t, 4, 1 << 20).send_warps, 3);
  EXPECT_EQ(plan::ring_plan(c, t, 3, 1 << 20).send_warps, 4);
  EXPECT_EQ(plan::ring_plan(c, t, 8, 1 << 24).send_warps, 7);
  EXPECT_EQ(plan::ring_plan(c, t, 2, 1 << 20).channels, 0);  // 2 ranks: the row region is faster
  t.ring_send_warps = 8;
  const plan::RingPlan p = plan::ring_plan(c, t, 4, 1 << 20);
  EXPECT_EQ(p.channels, 24);  // every block is a channel
  EXPECT_EQ(p.send_warps, 8);
  EXPECT_EQ(p.slots, c.ring_slots);
  EXPECT_LE(int64_t{4} * p.channels * p.slots, 1 << 20);
  // Rings shrink with the region (4 ranks x 24 channels x 100 rows), then the row region takes over.
  EXPECT_EQ(plan::ring_plan(c, t, 4, 4 * 24 * 100).slots, 100);
  EXPECT_EQ(plan::ring_plan(c, t, 4, 4 * 24 * (kMinRingSlots - 1)).channels, 0);
  // Rings must hold ring_chunk rows of every warp: 4 * 16 = 64 fits, 5 * 16 = 80 > 70 does not.
  t.ring_chunk = 4;
  EXPECT_EQ(plan::ring_plan(c, t, 4, 4 * 24 * 70).slots, 70);
  t.ring_chunk = 5;
  EXPECT_EQ(plan::ring_plan(c, t, 4, 4 * 24 * 70).channels, 0);
  t.ring_chunk = 0;
  // Fewer sending warps than peers, or no receiving warp left: the row region.
  t.ring_send_warps = 6;
  EXPECT_EQ(plan::ring_plan(c, t, 8, 1 << 24).channels, 0);  // 7 peers
  EXPECT_GT(plan::ring_plan(c, t, 7, 1 << 24).channels, 0);  // 6 peers
  c.num_threads = 192;  // 6 warps, all sending
  EXPECT_EQ(plan::ring_plan(c, t, 4, 1 << 24).channels, 0);
  t.ring_send_warps = 0;
  c.num_threads = 128;  // auto at 4 ranks: 3 send, 1 reduces; at 5 ranks 4 would send, none reduce
  EXPECT_EQ(plan::ring_plan(c, t, 4, 1 << 24).send_warps, 3);
  EXPECT_EQ(plan::ring_plan(c, t, 5, 1 << 24).channels, 0);
  // Switched off: the row region, unless bounded.
  c.num_threads = 512;
  t.ring_combine = false;
  EXPECT_EQ(plan::ring_plan(c, t, 3, 1 << 24).channels, 0);
  EXPECT_EQ(plan::ring_plan(c, t, 3, 1 << 24, /*bounded=*/true).channels, 24);
  EXPECT_FALSE(plan::rings_preferred(t, 3));
  EXPECT_TRUE(plan::rings_preferred(Tuning{}, 3));
  EXPECT_FALSE(plan::rings_preferred(Tuning{}, 2));
  t = Tuning{};
  // Tuning validation names the field.
  c.num_threads = 512;
  t.ring_send_warps = 16;
  expect_error([&] { t.validate(c); }, ErrorKind::kInvalidArgument, "Tuning.ring_send_warps");
  t.ring_send_warps = -1;
  expect_error([&] { t.validate(c); }, ErrorKind::kInvalidArgument, "Tuning.ring_send_warps");
  t.ring_send_warps = 15;
  t.validate(c);
}

TEST(Plan, BoundedDispatchRings) {
  const Config c;  // 20 blocks of 16 warps
  const Tuning t;
  const int H = 7168, K = 8;
  for (int R : {2, 3, 4, 8}) {
    for (DType dt : {DType::kBF16, DType::kFP8E4M3}) {
      const size_t bytes = size_t{256} << 20;
      const RowLayout rows = plan::dispatch_rows(bytes, H, dt, K);
      const plan::DispatchRing ring = plan::dispatch_ring(c, t, R, bytes, H, dt, K);
      // slots = capacity / (R x blocks); the copy warps of dispatch_copy_warps.
      EXPECT_EQ(ring.slots, rows.capacity / (R * c.num_sms)) << R;
      EXPECT_EQ(ring.copy_warps, plan::dispatch_copy_warps(c, t, rows.row_bytes));
      EXPECT_EQ(ring.send_warps + ring.copy_warps, c.num_threads / 32);
      EXPECT_EQ(plan::dispatch_ring_min_slots(c, t, rows.row_bytes), 2 * kDispatchPublishRounds * ring.send_warps);
    }
  }
  // bf16 hidden 7168 at 20 blocks: 5 sending warps, so rings of 2 x 2 x 5 = 20 rows at least.
  EXPECT_EQ(plan::dispatch_ring_min_slots(c, t, 7168 * 2), 20);
  // Capped at kMaxDispatchRingSlots.
  {
    Config one = c;
    one.num_sms = 1;
    EXPECT_EQ(plan::dispatch_ring(one, t, 2, size_t{1} << 31, 1024, DType::kBF16, 4).slots, kMaxDispatchRingSlots);
  }
  // The minimum legal size holds the rings; 2 MiB less (the rounding of num_nvl_bytes) does not,
  // and the error names the minimum.
  for (int R : {2, 4, 8}) {
    const size_t min = plan::dispatch_ring_min_bytes(c, t, R, H, DType::kBF16, K);
    EXPECT_EQ(min % (1 << 21), 0u);
    EXPECT_GE(plan::dispatch_ring(c, t, R, min, H, DType::kBF16, K).slots, 20);
    expect_error([&] { plan::dispatch_ring(c, t, R, min - (1 << 21), H, DType::kBF16, K); }, ErrorKind::kBufferTooSmall,
                 "need num_nvl_bytes >= " + std::to_string(min) + ", have " + std::to_string(min - (1 << 21)));
  }
  expect_error([&] { plan::dispatch_ring(c, t, 4, 4 << 20, H, DType::kBF16, K); }, ErrorKind::kBufferTooSmall,
               "fewer than two rounds of 5 sending warps (20)");
  // The most blocks Config allows.
  Config wide = c;
  wide.num_sms = kMaxHtBlocks;
  EXPECT_GT(plan::dispatch_ring(wide, t, 4, size_t{1} << 30, H, DType::kBF16, K).slots, 0);
}

// docs/protocol.md, "dispatch, bounded": the resolved values the deadlock-freedom argument needs. A
// publication round's rows fit in half a ring, so a sender waits only for slots of rows it
// published in earlier rounds (the receiver's copy warps always drain those); the rings of all
// sources and blocks lie apart inside the row region; both parts of a block have warps.
TEST(Plan, BoundedDispatchIsDeadlockFree) {
  for (int num_sms : {1, 7, 20, 24, 80}) {
    for (int threads : {64, 256, 512}) {
      for (int R : {2, 3, 4, 8}) {
        for (int hidden : {128, 2048, 7168}) {
          for (DType dt : {DType::kBF16, DType::kFP8E4M3}) {
            Config c;
            c.num_sms = num_sms;
            c.num_threads = threads;
            const Tuning t;
            const size_t bytes = plan::dispatch_ring_min_bytes(c, t, R, hidden, dt, 8);
            const plan::DispatchRing ring = plan::dispatch_ring(c, t, R, bytes, hidden, dt, 8);
            const RowLayout rows = plan::dispatch_rows(bytes, hidden, dt, 8);
            EXPECT_GE(ring.send_warps, 1);
            EXPECT_GE(ring.copy_warps, 1);
            const int round_rows = ring.send_warps * kDispatchPublishRounds;  // one row per token and destination
            EXPECT_GE(ring.slots, 2 * round_rows) << num_sms << " " << threads << " " << R << " " << hidden;
            EXPECT_LE(ring.slots, kMaxDispatchRingSlots);
            EXPECT_LE(int64_t{R} * num_sms * ring.slots, rows.capacity);
            // The combine's rings (where the block geometry makes any): a receiver batch of chunks fits each.
            if (plan::ring_plan(c, t, R, int64_t{1} << 40, /*bounded=*/true).channels == 0) continue;
            const size_t cbytes = std::max(bytes, plan::combine_ring_min_bytes(c, t, R, hidden, 8));
            const plan::RingPlan cr = plan::bounded_ring_plan(c, t, R, cbytes, hidden, 8);
            EXPECT_GT(cr.channels, 0);
            EXPECT_GE(cr.slots, plan::combine_ring_min_slots(c, t));
            EXPECT_LE(int64_t{R} * cr.channels * cr.slots, plan::combine_rows(cbytes, hidden, 8).capacity);
          }
        }
      }
    }
  }
}

TEST(Plan, BoundedCombineTakesRingsAtEveryRankCount) {
  const Config c;
  const Tuning t;
  const int64_t big = int64_t{1} << 24;
  for (int R : {2, 3, 4, 8}) {
    // Unbounded: 2 ranks (or the rings switched off) take the row region.
    EXPECT_EQ(plan::ring_plan(c, t, R, big).channels > 0, R >= 3) << R;
    // Bounded: the rings at every rank count, whatever Tuning.ring_combine says.
    for (bool on : {true, false}) {
      Tuning tt = t;
      tt.ring_combine = on;
      const plan::RingPlan p = plan::ring_plan(c, tt, R, big, /*bounded=*/true);
      EXPECT_EQ(p.channels, c.num_sms) << R;  // a channel per block
      EXPECT_EQ(p.slots, c.ring_slots);
      EXPECT_GT(p.send_warps, 0);
      const size_t min = plan::combine_ring_min_bytes(c, tt, R, 7168, 8);
      const plan::RingPlan q = plan::bounded_ring_plan(c, tt, R, min, 7168, 8);
      EXPECT_EQ(q.channels, c.num_sms);
      EXPECT_GE(q.slots, kMinRingSlots);
      expect_error([&] { plan::bounded_ring_plan(c, tt, R, min - (1 << 21), 7168, 8); }, ErrorKind::kBufferTooSmall,
                   "need num_nvl_bytes >= " + std::to_string(min));
    }
  }
  // No rings possible from the block geometry: Unsupported, not a size.
  Config narrow = c;
  narrow.num_threads = 64;  // 2 warps: 7 peers need 7 sending warps
  narrow.num_sms = 1;
  expect_error([&] { plan::bounded_ring_plan(narrow, t, 8, size_t{1} << 30, 7168, 8); }, ErrorKind::kUnsupported,
               "cannot make combine rings");
}

TEST(Plan, RingSizeHintServesAnyBatch) {
  for (int R : {1, 2, 4, 8}) {
    for (int hidden : {1024, 4096, 7168}) {
      Config c;
      const size_t hint = c.get_nvl_buffer_size_hint(size_t(hidden) * 2, R);
      EXPECT_EQ(hint % (1 << 21), 0u);
      if (R == 1) continue;  // nothing travels
      for (DType dt : {DType::kBF16, DType::kFP8E4M3}) {
        EXPECT_GE(plan::dispatch_ring(c, Tuning{}, R, hint, hidden, dt, kMaxTopk).slots, c.ring_slots);
        EXPECT_EQ(plan::bounded_ring_plan(c, Tuning{}, R, hint, hidden, kMaxTopk).slots, c.ring_slots);
      }
    }
  }
  expect_error([] { Config().get_nvl_buffer_size_hint(0, 4); }, ErrorKind::kInvalidArgument, "hidden_bytes");
  expect_error([] { Config().get_nvl_buffer_size_hint(1024, 9); }, ErrorKind::kInvalidArgument, "num_ranks");
}

// The handle's arrays tile its storage in order, with the sizes DispatchHandle documents, and the
// handle points at exactly those offsets (make_handle and the Python binding both place them so).
TEST(HandleStorage, ArraysTileTheStorageAndTheHandlePointsAtThem) {
  for (int R : {1, 2, 3, 8, kMaxRanks}) {
    for (int64_t N : {0, 1, 10, 4096}) {
      SCOPED_TRACE(::testing::Message() << "R=" << R << " N=" << N);
      const host::HandleStorageLayout l = host::handle_storage_layout(R, N);
      EXPECT_EQ(l.rank_prefix_matrix, 0);
      EXPECT_EQ(l.count_matrix - l.rank_prefix_matrix, int64_t{R} * R);
      EXPECT_EQ(l.send_pos - l.count_matrix, int64_t{R} * R);
      EXPECT_EQ(l.num_recv - l.send_pos, N * R);
      EXPECT_EQ(l.total - l.num_recv, 1);
      std::vector<int> storage(static_cast<size_t>(l.total));
      DispatchHandle h;
      h.num_ranks = R;
      h.num_tokens = static_cast<int>(N);
      host::place_handle_arrays(h, storage.data());
      EXPECT_EQ(h.rank_prefix_matrix, storage.data() + l.rank_prefix_matrix);
      EXPECT_EQ(h.count_matrix, storage.data() + l.count_matrix);
      EXPECT_EQ(h.send_pos, storage.data() + l.send_pos);
      EXPECT_EQ(h.num_recv_device, storage.data() + l.num_recv);
      EXPECT_EQ(h.num_recv_device + 1, storage.data() + storage.size());
    }
  }
}

TEST(Layout, SymmetricRegionsDoNotOverlap) {
  EXPECT_GE(SymmetricLayout::kNotifyOffset, sizeof(SyncArea));
  EXPECT_GE(SymmetricLayout::kRingCtlOffset, SymmetricLayout::kNotifyOffset + sizeof(NotifyArea));
  EXPECT_GE(SymmetricLayout::kRowsOffset, SymmetricLayout::kRingCtlOffset + sizeof(RingCtl));
  EXPECT_EQ(SymmetricLayout::kRowsOffset % 4096, 0u);
}

TEST(LlLayout, BuffersHoldEveryRegionAligned) {
  for (bool zero_copy : {false, true}) {
    for (int R : {2, 3, 8}) {
      for (int H : {128, 1152, 7168}) {
        SCOPED_TRACE(testing::Message() << "R " << R << " H " << H << " zero_copy " << zero_copy);
        LlLayout l;
        l.place(R, 128, H, 8, 32, zero_copy);
        EXPECT_GE(LlLayout::kSyncBytes, sizeof(LlSync));
        EXPECT_GE(l.row_bytes, static_cast<size_t>(H) + H / 128 * 4) << "fp8 row + scales must fit";
        EXPECT_EQ(l.row_bytes % 16, 0u);
        EXPECT_GE(l.off_dispatch_meta, l.off_dispatch + static_cast<size_t>(R) * 128 * l.row_bytes);
        EXPECT_GE(l.off_combine, l.off_dispatch_meta + static_cast<size_t>(R) * 128 * l.meta_bytes);
        const size_t staging_end = l.off_combine + static_cast<size_t>(128) * 8 * H * 2;
        EXPECT_EQ(l.has_zero_copy, zero_copy);
        EXPECT_EQ(l.zero_copy_bytes(), static_cast<size_t>(32) * R * 128 * H * 2);
        if (zero_copy) {
          EXPECT_GE(l.off_zero_copy, staging_end);
          EXPECT_EQ(l.off_zero_copy % 128, 0u);
          EXPECT_GE(l.buffer_bytes, l.off_zero_copy + l.zero_copy_bytes());
        } else {
          EXPECT_GE(l.buffer_bytes, staging_end);
          EXPECT_LT(l.buffer_bytes, staging_end + 4096) << "no room kept for a zero-copy buffer";
          char* region = reinterpret_cast<char*>(uintptr_t{1} << 20);
          EXPECT_EQ(l.zero_copy(region, 0), nullptr);
        }
        EXPECT_EQ(l.buffer_bytes % 4096, 0u);
        EXPECT_EQ(l.num_bytes(), LlLayout::kSyncBytes + 2 * l.buffer_bytes);
        const size_t hint = Buffer::low_latency_size_hint(128, H, R, 32 * R, 8, zero_copy);
        EXPECT_LE(l.num_bytes(), hint);
        EXPECT_EQ(hint % (size_t{1} << 21), 0u);
        EXPECT_LT(hint - l.num_bytes(), size_t{1} << 21) << "the hint is the layout rounded up to 2 MiB";
      }
    }
  }
  EXPECT_EQ(Buffer::low_latency_size_hint(128, 1024, 2, 64, 8),
            Buffer::low_latency_size_hint(128, 1024, 2, 64, 8, /*zero_copy=*/false)) << "default: no zero-copy";
  EXPECT_THROW(Buffer::low_latency_size_hint(128, 100, 2, 64, 8), Error);   // hidden % 128
  EXPECT_THROW(Buffer::low_latency_size_hint(128, 1024, 2, 63, 8), Error);  // E % R
  EXPECT_THROW(Buffer::low_latency_size_hint(0, 1024, 2, 64, 8), Error);    // T
}

// EP8 DeepSeek-V3 decode: T = 128 tokens per rank, H = 7168, E = 256 experts (E_loc = 32), K = 8.
// Per buffer: dispatch staging R*T rows of 2H bytes (14 MiB) + top-k ids (32 KiB), combine staging
// T*K rows of 2H bytes (14 MiB); the zero-copy buffer adds E_loc*R*T rows of 2H bytes (448 MiB).
// Two buffers and the 4 KiB sync block, rounded up to 2 MiB: 58 MiB, or 954 MiB with zero-copy.
TEST(LlLayout, SizeHintAtEp8DeepSeekV3Decode) {
  constexpr int T = 128, H = 7168, R = 8, E = 256, K = 8, E_loc = E / R;
  constexpr size_t kMiB = size_t{1} << 20;
  const size_t staging = align_up(align_up(size_t{R} * T * H * 2, 128) + size_t{R} * T * align_up(K * 4, 16), 128) +
                         size_t{T} * K * H * 2;
  const size_t zero_copy = size_t{E_loc} * R * T * H * 2;
  EXPECT_EQ(zero_copy, 448 * kMiB);
  const size_t without = Buffer::low_latency_size_hint(T, H, R, E, K, /*zero_copy=*/false);
  const size_t with = Buffer::low_latency_size_hint(T, H, R, E, K, /*zero_copy=*/true);
  EXPECT_EQ(without, align_up(LlLayout::kSyncBytes + 2 * align_up(staging, 4096), 2 * kMiB));
  EXPECT_EQ(with, align_up(LlLayout::kSyncBytes + 2 * align_up(align_up(staging, 128) + zero_copy, 4096), 2 * kMiB));
  EXPECT_EQ(without, 58 * kMiB);
  EXPECT_EQ(with, 954 * kMiB);
  EXPECT_EQ(with - without, 2 * zero_copy);
}

// The layout an op uses: kOff never places the zero-copy buffers, kOn always does, kIfRoom does
// exactly when num_ll_bytes holds them (so the zero-copy size hint turns them on, anything less off).
TEST(LlLayout, ZeroCopyModeResolvesFromTheRegionSize) {
  // Shapes whose zero-copy buffers exceed the hint's 2 MiB rounding (at tiny T both hints are 2 MiB,
  // and kIfRoom places them in either).
  for (int R : {2, 8}) {
    for (int T : {64, 128}) {
      SCOPED_TRACE(testing::Message() << "R " << R << " T " << T);
      const int H = 4096, K = 4, E_loc = 3, E = E_loc * R;
      const size_t with = Buffer::low_latency_size_hint(T, H, R, E, K, true);
      const size_t without = Buffer::low_latency_size_hint(T, H, R, E, K, false);
      ASSERT_GT(with, without);
      auto has = [&](LlZeroCopy mode, size_t bytes) {
        return plan::ll_layout(mode, bytes, R, T, H, K, E_loc).has_zero_copy;
      };
      EXPECT_FALSE(has(LlZeroCopy::kOff, with));
      EXPECT_FALSE(has(LlZeroCopy::kOff, 4 * with));
      EXPECT_TRUE(has(LlZeroCopy::kOn, without));
      EXPECT_TRUE(has(LlZeroCopy::kOn, with));
      EXPECT_TRUE(has(LlZeroCopy::kIfRoom, with));
      EXPECT_TRUE(has(LlZeroCopy::kIfRoom, 4 * with));
      EXPECT_FALSE(has(LlZeroCopy::kIfRoom, with - (size_t{1} << 21)));
      EXPECT_FALSE(has(LlZeroCopy::kIfRoom, without));
      // Off, the layout is the one low_latency_size_hint(..., false) sizes.
      EXPECT_EQ(plan::ll_bytes_for(plan::ll_layout(LlZeroCopy::kIfRoom, without, R, T, H, K, E_loc)), without);
      EXPECT_EQ(plan::ll_bytes_for(plan::ll_layout(LlZeroCopy::kOn, without, R, T, H, K, E_loc)), with);
    }
  }
}

}  // namespace
}  // namespace epx

// The plan words of the entry handshake: equal plans give equal words, and a difference in any
// field is named with both values.
TEST(OpPlan, EncodesEveryFieldAndNamesTheOneThatDiffers) {
  epx::plan::OpPlan a;
  a.num_blocks = 20;
  a.num_warps = 16;
  a.ring_channels = 20;
  a.ring_slots = 128;
  a.ring_send_warps = 3;
  a.ring_chunk = 4;
  a.copy_warps = 9;
  a.row_bytes = 14336;
  a.num_scales = 56;
  a.num_topk_idx = 8;
  a.num_topk_weights = 8;
  a.experts_per_rank = 64;
  uint64_t wa[2], wb[2];
  epx::plan::encode_plan(a, wa);
  epx::plan::encode_plan(a, wb);
  EXPECT_EQ(wa[0], wb[0]);
  EXPECT_EQ(wa[1], wb[1]);
  struct Change {
    int epx::plan::OpPlan::*field;
    int value;
    int word;
    const char* name;
  };
  const Change changes[] = {
      {&epx::plan::OpPlan::num_blocks, 19, 0, "Config.num_sms"},
      {&epx::plan::OpPlan::num_warps, 8, 0, "Config.num_threads"},
      {&epx::plan::OpPlan::ring_slots, 4096, 0, "Config.ring_slots"},
      {&epx::plan::OpPlan::copy_warps, 0, 0, "Tuning.dispatch_copy_warps"},
      {&epx::plan::OpPlan::ring_send_warps, 5, 0, "Tuning.ring_send_warps"},
      {&epx::plan::OpPlan::ring_chunk, 0, 0, "Tuning.ring_chunk"},
      {&epx::plan::OpPlan::ring_channels, 8, 0, "ring channels"},
      {&epx::plan::OpPlan::num_topk_weights, 0, 1, "topk_weights"},
      {&epx::plan::OpPlan::num_scales, 14, 1, "x_scales"},
      {&epx::plan::OpPlan::experts_per_rank, 1024, 1, "experts per rank"},
  };
  for (const Change& c : changes) {
    epx::plan::OpPlan b = a;
    b.*c.field = c.value;
    epx::plan::encode_plan(b, wb);
    EXPECT_EQ(wa[1 - c.word], wb[1 - c.word]) << c.name << " changed the other word";
    ASSERT_NE(wa[c.word], wb[c.word]) << c.name;
    std::string theirs, mine;
    const std::string field = epx::plan::plan_difference(c.word, wb[c.word], wa[c.word], &theirs, &mine);
    EXPECT_NE(field.find(c.name), std::string::npos) << field;
    EXPECT_EQ(theirs, std::to_string(c.value)) << c.name;
    EXPECT_EQ(mine, std::to_string(a.*c.field)) << c.name;
  }
}
