// The staged host<->device copies (EPX_SIM_STAGED_COPIES, src/host/staged_copy.hpp) in a SimWorld:
// bitwise at odd sizes and offsets (pieces larger than the staging buffer included), and one
// high-throughput dispatch -> combine round whose every upload and download is staged, against
// the CPU reference. The sanitizer stage (tools/gpu-check.sh) runs the whole HT / LL tests so.
#include <cuda_runtime_api.h>

#include <algorithm>

#include "gpu/harness.hpp"
#include "host/staged_copy.hpp"

namespace epx::test {
namespace {

// Forces the staged path (process-wide) for this object's lifetime; run_world's child inherits it.
class ForceStaged {
 public:
  explicit ForceStaged(int mode) { detail::set_staged_copies(mode); }
  ~ForceStaged() { detail::set_staged_copies(-1); }
  ForceStaged(const ForceStaged&) = delete;
  ForceStaged& operator=(const ForceStaged&) = delete;
};

// Bytes that encode (rank, position, seed): a misplaced or dropped byte shows.
std::vector<uint8_t> pattern(uint64_t seed, int rank, size_t n) {
  std::mt19937_64 rng(seed * 977 + static_cast<uint64_t>(rank) * 131 + n);
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(rng() ^ (i * 7) ^ (static_cast<size_t>(rank) << 5));
  return v;
}

// Uploads `n` bytes at device offset `dst_off` (from host offset `src_off` of a larger array),
// downloads the whole sentinel-filled region to a sentinel-filled host array at offset 3, and
// checks every byte: the sentinels around the copy untouched, the copy equal to its source.
void round_trip(RankCtx& ctx, size_t n, size_t dst_off, size_t src_off) {
  const uint8_t kDevSentinel = 0xA5, kHostSentinel = 0x5A;
  const std::vector<uint8_t> src = pattern(ctx.seed, ctx.rank, n + src_off);
  const size_t region = dst_off + n + 29;
  DeviceMem dev(region);
  dev.fill(kDevSentinel);
  detail::copy_to_device(static_cast<char*>(dev.get()) + dst_off, src.data() + src_off, n, ctx.stream, 60,
                         "staged test upload", ctx.rank);
  std::vector<uint8_t> back(region + 3 + 5, kHostSentinel);
  detail::copy_to_host(back.data() + 3, dev.get(), region, ctx.stream, 60, "staged test download", ctx.rank);
  const std::string what = detail::concat("copy of ", n, " bytes at device offset ", dst_off, ", host offset ", src_off);
  for (size_t i = 0; i < 3; ++i) REQUIRE(back[i] == kHostSentinel, what, ": host byte ", i, " before the download written");
  for (size_t i = 0; i < 5; ++i)
    REQUIRE(back[3 + region + i] == kHostSentinel, what, ": host byte ", i, " after the download written");
  for (size_t i = 0; i < region; ++i) {
    const uint8_t got = back[3 + i];
    const bool inside = i >= dst_off && i < dst_off + n;
    const uint8_t want = inside ? src[src_off + i - dst_off] : kDevSentinel;
    REQUIRE(got == want, what, ": device byte ", i, (inside ? " (copied)" : " (sentinel)"), " is ", +got, ", want ",
            +want);
  }
}

// Both paths, staged then plain, on every rank of a SimWorld of 2: the same bytes; the staged
// counter grows only while the staged path is on (the copies really took it).
TEST(SimWorld, StagedCopiesAreBitwiseAtOddSizesAndOffsets) {
  SKIP_WITHOUT_SIM_WORLD(2);
  const int failed = run_world(WorldMode::kSim, 2, size_t{64} << 20, Config::defaults(2), [](RankCtx& ctx) {
    const size_t kSizes[] = {1, 15, 16, 17, 4099, (size_t{8} << 20) + 13, (size_t{16} << 20) + 32};
    for (int staged : {1, 0}) {
      ctx.comm->barrier(60);
      if (ctx.rank == 0) detail::set_staged_copies(staged);
      ctx.comm->barrier(60);
      REQUIRE(detail::staged_copies() == (staged != 0), "staged_copies() after set_staged_copies(", staged, ")");
      const uint64_t before = detail::num_staged_bytes();
      uint64_t mine = 0;
      for (size_t n : kSizes)
        for (size_t dst_off : {size_t{0}, size_t{1}, size_t{16}})
          for (size_t src_off : {size_t{0}, size_t{3}}) {
            round_trip(ctx, n, dst_off, src_off);
            mine += n + dst_off + n + 29;
          }
      const uint64_t grew = detail::num_staged_bytes() - before;
      ctx.comm->barrier(60);  // the peer's copies of this phase are done too
      if (staged) REQUIRE(grew >= mine, "staged bytes grew by ", grew, ", this rank alone staged ", mine);
      else REQUIRE(detail::num_staged_bytes() == before, "plain copies staged ", detail::num_staged_bytes() - before, " bytes");
    }
    ctx.comm->barrier(60);
    if (ctx.rank == 0) detail::set_staged_copies(-1);
    if (ctx.rank == 0) std::printf("staged and plain copies bitwise at 7 sizes x 6 offsets\n");
  });
  EXPECT_EQ(failed, 0) << "see the ranks' messages above";
}

class StagedHtWorld : public ::testing::TestWithParam<WorldParam> {};

// One HT round (layout, notify, dispatch, combine) with every host<->device copy of the harness
// and of the library staged: every output row bitwise equal to the reference.
void run_staged_round(RankCtx& ctx) {
  REQUIRE(detail::staged_copies(), "the staged copies are not on in this rank");
  const uint64_t staged_before = detail::num_staged_bytes();
  const int R = ctx.world, me = ctx.rank;
  InputSpec s;
  s.num_tokens = 96;
  s.hidden = 1024;
  s.num_topk = 4;
  s.num_experts = 8 * R;
  const int N = s.num_tokens, H = s.hidden, K = s.num_topk, E = s.num_experts;
  std::vector<ref::RankInput> all(R);
  for (int r = 0; r < R; ++r) all[r] = make_input(ctx.seed, r, s);
  const ref::DispatchShape shape = shape_of(s, R, 1);
  std::vector<ref::DispatchResult> want(R);
  for (int r = 0; r < R; ++r) want[r] = ref::dispatch(all, r, shape);
  const ref::Layout want_layout = ref::get_dispatch_layout(all[me].topk_idx, N, K, E, R);

  DeviceMem x = DeviceMem::from(all[me].x), idx = DeviceMem::from(all[me].topk_idx),
            w = DeviceMem::from(all[me].topk_weights);
  DeviceMem per_rank(4 * R), per_expert(4 * E), in_rank(static_cast<size_t>(N) * R), recv_per_expert(4 * (E / R));
  for (DeviceMem* m : {&per_rank, &per_expert, &in_rank, &recv_per_expert}) m->fill(0x7F);
  const View topk_view = View::of(idx.get(), DType::kI64, {N, K});
  ctx.buffer->get_dispatch_layout(topk_view, E, View::of(per_rank.get(), DType::kI32, {R}),
                                  View::of(per_expert.get(), DType::kI32, {E}),
                                  View::of(in_rank.get(), DType::kBool, {N, R}), ctx.stream);
  ctx.buffer->synchronize(ctx.stream);
  expect_equal(per_rank.download<int>(R), want_layout.num_tokens_per_rank, R, "num_tokens_per_rank");
  expect_equal(per_expert.download<int>(E), want_layout.num_tokens_per_expert, E, "num_tokens_per_expert");
  expect_equal(in_rank.download<uint8_t>(static_cast<size_t>(N) * R), want_layout.is_token_in_rank,
               static_cast<size_t>(N) * R, "is_token_in_rank");

  DispatchInputs in;
  in.x = View::of(x.get(), DType::kBF16, {N, H});
  in.topk_idx = topk_view;
  in.topk_weights = View::of(w.get(), DType::kF32, {N, K});
  in.num_tokens_per_rank = View::of(per_rank.get(), DType::kI32, {R});
  in.num_tokens_per_expert = View::of(per_expert.get(), DType::kI32, {E});
  in.is_token_in_rank = View::of(in_rank.get(), DType::kBool, {N, R});
  DispatchHandle handle = ctx.buffer->make_handle(N);
  const int nr =
      ctx.buffer->dispatch_notify(in, handle, View::of(recv_per_expert.get(), DType::kI32, {E / R}), ctx.stream);
  REQUIRE(nr == want[me].num_recv, "num_recv ", nr, " want ", want[me].num_recv);
  DeviceMem rx(static_cast<size_t>(nr) * H * 2), ridx(static_cast<size_t>(nr) * K * 8),
      rw(static_cast<size_t>(nr) * K * 4), rsrc(static_cast<size_t>(nr) * 4);
  for (DeviceMem* m : {&rx, &ridx, &rw, &rsrc}) m->fill(0x7F);
  DispatchOutputs out;
  out.recv_x = View::of(rx.get(), DType::kBF16, {nr, H});
  out.recv_topk_idx = View::of(ridx.get(), DType::kI64, {nr, K});
  out.recv_topk_weights = View::of(rw.get(), DType::kF32, {nr, K});
  out.recv_src_idx = View::of(rsrc.get(), DType::kI32, {nr});
  ctx.buffer->dispatch(in, handle, out, ctx.stream);
  ctx.buffer->synchronize(ctx.stream);
  const size_t n = static_cast<size_t>(nr);
  expect_equal(rx.download<uint8_t>(n * H * 2), want[me].recv_x, n * H * 2, "recv_x", received_rows(want[me], H * 2));
  expect_equal(ridx.download<int64_t>(n * K), want[me].recv_topk_idx, n * K, "recv_topk_idx", received_rows(want[me], K));
  expect_equal(rw.download<float>(n * K), want[me].recv_topk_weights, n * K, "recv_topk_weights",
               received_rows(want[me], K));
  expect_equal(rsrc.download<int>(n), want[me].recv_src_idx, n, "recv_src_idx", received_rows(want[me], 1));
  expect_equal(recv_per_expert.download<int>(E / R), want[me].num_recv_tokens_per_expert, E / R,
               "num_recv_tokens_per_expert");

  // Combine: every rank's expert outputs are regenerable, so the reference is exact.
  std::vector<ref::CombineRankInput> cin(R);
  for (int r = 0; r < R; ++r) {
    std::mt19937_64 rng(ctx.seed * 31 + r + 17);
    std::uniform_real_distribution<float> u(-2.f, 2.f);
    cin[r].dispatched = &want[r];
    cin[r].x.resize(static_cast<size_t>(want[r].num_recv) * H);
    for (auto& v : cin[r].x) v = ref::float_to_bf16(u(rng));
    cin[r].topk_weights = want[r].recv_topk_weights;
  }
  const ref::CombineResult want_c = ref::combine(cin, me, N, H, K, {}, {});
  DeviceMem y = DeviceMem::from(cin[me].x);
  DeviceMem cx(static_cast<size_t>(N) * H * 2), cw(static_cast<size_t>(N) * K * 4);
  cx.fill(0x7F);
  cw.fill(0x7F);
  CombineInputs ci;
  ci.x = View::of(y.get(), DType::kBF16, {nr, H});
  ci.topk_weights = out.recv_topk_weights;
  CombineOutputs co;
  co.combined_x = View::of(cx.get(), DType::kBF16, {N, H});
  co.combined_topk_weights = View::of(cw.get(), DType::kF32, {N, K});
  ctx.buffer->combine(ci, handle, co, ctx.stream);
  ctx.buffer->synchronize(ctx.stream);
  expect_equal(cx.download<uint16_t>(static_cast<size_t>(N) * H), want_c.combined_x, static_cast<size_t>(N) * H,
               "combined_x", token_rows(me, H));
  expect_equal(cw.download<float>(static_cast<size_t>(N) * K), want_c.combined_topk_weights,
               static_cast<size_t>(N) * K, "combined_topk_weights", token_rows(me, K));
  // At least this rank's own inputs and outputs went through the staging buffer.
  const uint64_t mine = all[me].x.size() + n * H * 2 + static_cast<uint64_t>(N) * H * 2;
  const uint64_t grew = detail::num_staged_bytes() - staged_before;
  REQUIRE(grew >= mine, "staged bytes grew by ", grew, ", want >= ", mine);
  if (me == 0) std::printf("[world %d] staged HT round ok (rank 0 received %d rows)\n", R, nr);
}

TEST_P(StagedHtWorld, DispatchCombineMatchesReference) {
  const WorldParam p = GetParam();
  SKIP_UNLESS_RUNNABLE(p.mode, p.world);
  ForceStaged staged(1);
  const int failed = run_world(p.mode, p.world, size_t{1} << 30, Config::defaults(p.world), run_staged_round);
  EXPECT_EQ(failed, 0) << "see the ranks' messages above";
}

// 2 ranks: the row-region combine; 4: the ring combine (from 3 ranks on).
INSTANTIATE_TEST_SUITE_P(Gpu, StagedHtWorld,
                         ::testing::Values(WorldParam{WorldMode::kSim, 2}, WorldParam{WorldMode::kSim, 4}),
                         world_param_name);

}  // namespace
}  // namespace epx::test
