// Error paths on GPUs: host validation, device-recorded errors, timeouts, undersized buffers,
// reset after failure, and create/destroy cycles without leaks.
#include <cuda_runtime_api.h>

#include <chrono>
#include <csignal>
#include <memory>

#include "gpu/harness.hpp"
#include "host/plan.hpp"
#include "host/tuning.hpp"

namespace epx::test {
namespace {

// One rank's inputs of a small bf16 dispatch (top-4 of 8 experts per rank) and its layout, computed
// on `buffer`: x, topk_idx and the layout tensors, ready for dispatch_notify.
struct SmallInputs {
  DeviceMem x, topk, per_rank, per_expert, in_rank;
  DispatchInputs di;
  int num_tokens = 0, hidden = 0;
  // rows: a recv_x of `rows` rows (its memory is kept here).
  DispatchOutputs outputs(int64_t rows) {
    recv = DeviceMem(static_cast<size_t>(rows) * hidden * 2);
    DispatchOutputs o;
    o.recv_x = View::of(recv.get(), DType::kBF16, {rows, hidden});
    return o;
  }
  DeviceMem recv;
};

SmallInputs small_inputs(RankCtx& ctx, Buffer& buffer, int num_tokens, int hidden, uint64_t seed_offset) {
  const int R = ctx.world, E = 8 * R, K = 4, N = num_tokens;
  InputSpec s;
  s.num_tokens = N;
  s.hidden = hidden;
  s.num_topk = K;
  s.num_experts = E;
  s.drop_prob = 0;
  const ref::RankInput in = make_input(ctx.seed + seed_offset, ctx.rank, s);
  SmallInputs d{DeviceMem::from(in.x), DeviceMem::from(in.topk_idx), DeviceMem(4 * R), DeviceMem(4 * E),
                DeviceMem(static_cast<size_t>(N) * R)};
  d.num_tokens = N;
  d.hidden = hidden;
  d.di.x = View::of(d.x.get(), DType::kBF16, {N, hidden});
  d.di.topk_idx = View::of(d.topk.get(), DType::kI64, {N, K});
  d.di.num_tokens_per_rank = View::of(d.per_rank.get(), DType::kI32, {R});
  d.di.num_tokens_per_expert = View::of(d.per_expert.get(), DType::kI32, {E});
  d.di.is_token_in_rank = View::of(d.in_rank.get(), DType::kBool, {N, R});
  buffer.get_dispatch_layout(d.di.topk_idx, E, d.di.num_tokens_per_rank, d.di.num_tokens_per_expert,
                             d.di.is_token_in_rank, ctx.stream);
  return d;
}

// One fresh round of dispatch -> combine on `buffer`, checked bit for bit against the reference:
// every rank's inputs come from (seed, rank) (bf16 x, top-4 of 8 experts per rank, some -1 slots,
// weights); recv_x, recv_topk_idx, recv_topk_weights and recv_src_idx land in sentinel-filled
// tensors and every row is compared; the combine sums the received rows themselves (every rank
// regenerates them), and combined_x / combined_topk_weights (sentinel-filled) are compared too.
class CheckedRound {
 public:
  CheckedRound(RankCtx& ctx, Buffer& buffer, int num_tokens, int hidden, uint64_t seed, std::string tag)
      : ctx_(ctx), buffer_(buffer), tag_(std::move(tag)) {
    const int R = ctx.world;
    s_.num_tokens = num_tokens;
    s_.hidden = hidden;
    s_.num_topk = 4;
    s_.num_experts = 8 * R;
    s_.drop_prob = 0.1;
    std::vector<ref::RankInput> all(R);
    for (int r = 0; r < R; ++r) all[r] = make_input(seed, r, s_);
    want_.resize(R);
    for (int r = 0; r < R; ++r) want_[r] = ref::dispatch(all, r, shape_of(s_, R, 1));
    mine_ = all[ctx.rank];
  }

  // Layout, notify (host-synced), dispatch; synchronizes and checks every received row.
  void dispatch() {
    const int R = ctx_.world, N = s_.num_tokens, H = s_.hidden, K = s_.num_topk, E = s_.num_experts;
    const ref::DispatchResult& want = want_[ctx_.rank];
    x_ = DeviceMem::from(mine_.x);
    topk_ = DeviceMem::from(mine_.topk_idx);
    weights_ = DeviceMem::from(mine_.topk_weights);
    per_rank_ = DeviceMem(4 * R);
    per_expert_ = DeviceMem(4 * E);
    in_rank_ = DeviceMem(static_cast<size_t>(N) * R);
    DispatchInputs in;
    in.x = View::of(x_.get(), DType::kBF16, {N, H});
    in.topk_idx = View::of(topk_.get(), DType::kI64, {N, K});
    in.topk_weights = View::of(weights_.get(), DType::kF32, {N, K});
    in.num_tokens_per_rank = View::of(per_rank_.get(), DType::kI32, {R});
    in.num_tokens_per_expert = View::of(per_expert_.get(), DType::kI32, {E});
    in.is_token_in_rank = View::of(in_rank_.get(), DType::kBool, {N, R});
    buffer_.get_dispatch_layout(in.topk_idx, E, in.num_tokens_per_rank, in.num_tokens_per_expert,
                                in.is_token_in_rank, ctx_.stream);
    handle_ = buffer_.make_handle(N);
    rows_ = buffer_.dispatch_notify(in, handle_, View{}, ctx_.stream);
    REQUIRE(rows_ == want.num_recv, tag_, ": num_recv ", rows_, ", want ", want.num_recv);
    const int64_t n = rows_;
    recv_x_ = DeviceMem(static_cast<size_t>(n) * H * 2);
    recv_idx_ = DeviceMem(static_cast<size_t>(n) * K * 8);
    recv_w_ = DeviceMem(static_cast<size_t>(n) * K * 4);
    recv_src_ = DeviceMem(static_cast<size_t>(n) * 4);
    for (DeviceMem* m : {&recv_x_, &recv_idx_, &recv_w_, &recv_src_}) m->fill(0x7F);
    DispatchOutputs out;
    out.recv_x = View::of(recv_x_.get(), DType::kBF16, {n, H});
    out.recv_topk_idx = View::of(recv_idx_.get(), DType::kI64, {n, K});
    out.recv_topk_weights = View::of(recv_w_.get(), DType::kF32, {n, K});
    out.recv_src_idx = View::of(recv_src_.get(), DType::kI32, {n});
    buffer_.dispatch(in, handle_, out, ctx_.stream);
    buffer_.synchronize(ctx_.stream);
    expect_equal(recv_x_.download<uint8_t>(n * H * 2), want.recv_x, n * H * 2, tag_ + " recv_x", received_rows(want, H * 2));
    expect_equal(recv_idx_.download<int64_t>(n * K), want.recv_topk_idx, n * K, tag_ + " recv_topk_idx",
                 received_rows(want, K));
    expect_equal(recv_w_.download<float>(n * K), want.recv_topk_weights, n * K, tag_ + " recv_topk_weights",
                 received_rows(want, K));
    expect_equal(recv_src_.download<int>(n), want.recv_src_idx, n, tag_ + " recv_src_idx", received_rows(want, 1));
  }

  // The combine of the received rows (after dispatch()); synchronizes and checks every token.
  void combine() {
    const int R = ctx_.world, N = s_.num_tokens, H = s_.hidden, K = s_.num_topk;
    std::vector<ref::CombineRankInput> cin(R);
    std::vector<std::vector<uint16_t>> ys(R);
    for (int r = 0; r < R; ++r) {
      ys[r].resize(want_[r].recv_x.size() / 2);
      std::memcpy(ys[r].data(), want_[r].recv_x.data(), want_[r].recv_x.size());
      cin[r] = {&want_[r], ys[r], want_[r].recv_topk_weights};
    }
    const ref::CombineResult want = ref::combine(cin, ctx_.rank, N, H, K, {}, {});
    DeviceMem cx(static_cast<size_t>(N) * H * 2), cw(static_cast<size_t>(N) * K * 4);
    cx.fill(0x7F);
    cw.fill(0x7F);
    CombineInputs in;
    in.x = View::of(recv_x_.get(), DType::kBF16, {rows_, H});
    in.topk_weights = View::of(recv_w_.get(), DType::kF32, {rows_, K});
    CombineOutputs out;
    out.combined_x = View::of(cx.get(), DType::kBF16, {N, H});
    out.combined_topk_weights = View::of(cw.get(), DType::kF32, {N, K});
    buffer_.combine(in, handle_, out, ctx_.stream);
    buffer_.synchronize(ctx_.stream);
    expect_equal(cx.download<uint16_t>(static_cast<size_t>(N) * H), want.combined_x, static_cast<size_t>(N) * H,
                 tag_ + " combined_x", token_rows(ctx_.rank, H));
    expect_equal(cw.download<float>(static_cast<size_t>(N) * K), want.combined_topk_weights,
                 static_cast<size_t>(N) * K, tag_ + " combined_topk_weights", token_rows(ctx_.rank, K));
  }

 private:
  RankCtx& ctx_;
  Buffer& buffer_;
  std::string tag_;
  InputSpec s_;
  ref::RankInput mine_;
  std::vector<ref::DispatchResult> want_;
  DeviceMem x_, topk_, weights_, per_rank_, per_expert_, in_rank_, recv_x_, recv_idx_, recv_w_, recv_src_;
  DispatchHandle handle_;
  int rows_ = 0;
};

// A fresh dispatch -> combine that must work and give the reference's results: the buffer is usable.
void small_dispatch(RankCtx& ctx, Buffer& buffer, int num_tokens, int hidden, uint64_t seed = 5,
                    const std::string& tag = "dispatch") {
  CheckedRound round(ctx, buffer, num_tokens, hidden, ctx.seed * 1000003 + seed, tag);
  round.dispatch();
  round.combine();
}

// 100 checked rounds with fresh inputs each, after a failure and reset(): nothing the failure
// left behind (flags, epochs, abort words, error records, half-written rows) shows in any result.
void hundred_rounds(RankCtx& ctx, Buffer& buffer, const std::string& after, int num_tokens = 128, int hidden = 1024) {
  REQUIRE(!buffer.failed(), "the buffer is still failed after reset() (", after, ")");
  const uint64_t base = std::hash<std::string>{}(after) * 1000;
  for (int round = 0; round < 100; ++round)
    small_dispatch(ctx, buffer, num_tokens, hidden, base + round, after + ", round " + std::to_string(round));
  if (ctx.rank == 0) std::printf("[world %d] after %s: reset, 100 checked rounds ok\n", ctx.world, after.c_str());
}

void run_errors(RankCtx& ctx) {
  Buffer& b = *ctx.buffer;
  const int R = ctx.world, N = 64, H = 1024, K = 4, E = 8 * R;
  DeviceMem x(N * H * 4), topk(N * K * 8), per_rank(4 * R), per_expert(4 * E), in_rank(N * R);
  topk.fill(0);
  DispatchInputs di;
  di.x = View::of(x.get(), DType::kF32, {N, H});
  di.topk_idx = View::of(topk.get(), DType::kI64, {N, K});
  di.num_tokens_per_rank = View::of(per_rank.get(), DType::kI32, {R});
  di.num_tokens_per_expert = View::of(per_expert.get(), DType::kI32, {E});
  di.is_token_in_rank = View::of(in_rank.get(), DType::kBool, {N, R});
  DispatchHandle h = b.make_handle(N);

  // Host validation: named arguments, nothing launched. A collective op that fails on one rank
  // fails on every rank (its peers may already wait in it): the Buffer refuses work until the
  // collective reset(). Every rank meets the same errors here, so all reset together.
  // `needle` is the same on every rank (it seeds the rounds after the reset, which the ranks must
  // share); `detail`, when given, is also required of the message and may differ between ranks.
  auto refused = [&](auto&& op, ErrorKind kind, const std::string& needle, const std::string& detail = {}) {
    require_error(op, kind, detail.empty() ? std::vector<std::string>{needle} : std::vector<std::string>{needle, detail});
    REQUIRE(b.failed(), "a collective op that raised must fail the buffer: ", needle);
    require_error([&] { b.dispatch_notify(di, h, View{}, ctx.stream); }, ErrorKind::kState, "reset()");
    b.reset();
    REQUIRE(!b.failed(), "reset() must clear the failure");
    hundred_rounds(ctx, b, "the validation error '" + needle + "'");
  };
  refused([&] { b.dispatch_notify(di, h, View{}, ctx.stream); }, ErrorKind::kInvalidArgument, "x: expected dtype");
  di.x = View::of(x.get(), DType::kBF16, {N, 100});
  refused([&] { b.dispatch_notify(di, h, View{}, ctx.stream); }, ErrorKind::kInvalidArgument, "x: row bytes (200)");
  di.x = View::of(x.get(), DType::kBF16, {N, H});
  di.topk_idx = View::of(topk.get(), DType::kI64, {N - 1, K});
  refused([&] { b.dispatch_notify(di, h, View{}, ctx.stream); }, ErrorKind::kInvalidArgument, "topk_idx: expected shape");
  di.topk_idx = View::of(topk.get(), DType::kI64, {N, K});
  DispatchHandle peers = b.make_handle(N);  // a peer's handle (its rank), as a thread of another rank could pass
  peers.rank = (ctx.rank + 1) % R;
  refused([&] { b.dispatch_notify(di, peers, View{}, ctx.stream); }, ErrorKind::kInvalidArgument,
          "handle: made on rank",
          "rank " + std::to_string(peers.rank) + " of " + std::to_string(R) + ", this buffer is rank " +
              std::to_string(ctx.rank) + " of " + std::to_string(R));
  // get_dispatch_layout is local (no peer waits for it): its validation errors leave the buffer as it was.
  require_error([&] { b.get_dispatch_layout(di.topk_idx, E + 1, di.num_tokens_per_rank, di.num_tokens_per_expert,
                                            di.is_token_in_rank, ctx.stream); },
                ErrorKind::kInvalidArgument, "num_experts");
  REQUIRE(!b.failed(), "a local op's validation error must not fail the buffer");
  di.x = View::of(x.get(), DType::kFP8E4M3, {N, H});
  refused([&] { b.dispatch_notify(di, h, View{}, ctx.stream); }, ErrorKind::kInvalidArgument, "x_scales: required");
  di.x = View::of(x.get(), DType::kBF16, {N, H});
  // NOTE: a num_worst_tokens larger than the buffer's rows is no error: dispatch and combine then
  // stream through rings (HtWorld.BatchLargerThanTheBuffer).

  // Device-recorded error: expert id E on rank 0 (layout is local, no peer involved).
  if (ctx.rank == 0) {
    std::vector<int64_t> bad(N * K, 1);
    bad[7 * K + 2] = E;
    topk.upload(bad.data(), bad.size() * 8);
    b.get_dispatch_layout(di.topk_idx, E, di.num_tokens_per_rank, di.num_tokens_per_expert, di.is_token_in_rank,
                          ctx.stream);
    require_error([&] { b.synchronize(ctx.stream); }, ErrorKind::kInvalidArgument, "topk_idx: expert id");
    REQUIRE(b.failed(), "a device error must fail the buffer");
    require_error([&] { b.dispatch_notify(di, h, View{}, ctx.stream); }, ErrorKind::kState, "reset()");
  }
  b.reset();  // collective
  hundred_rounds(ctx, b, "a device error on rank 0");

  if (ctx.rank == 0) std::printf("[world %d] validation, device error, reset ok\n", R);
}

// Runs `f`, which raises the error the test expects, and prints how long this rank waited for it
// from the enqueue: with the peers' abort words that is milliseconds, not the `timeout_s` bound.
template <typename F>
void print_time_to_error(const RankCtx& ctx, const char* op, double timeout_s, F&& f) {
  const auto start = std::chrono::steady_clock::now();
  f();
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  std::printf("[world %d] rank %d: its %s raised %.1f ms after it was enqueued (timeout %.0f s)\n", ctx.world,
              ctx.rank, op, ms, timeout_s);
}

void run_timeout(RankCtx& ctx) {
  Buffer& b = *ctx.buffer;
  Config c = b.config();
  c.timeout_s = 2;
  b.set_config(c);
  if (ctx.rank == 0)
    print_time_to_error(ctx, "dispatch", c.timeout_s, [&] {
      require_error([&] { small_dispatch(ctx, b, 16, 512); }, ErrorKind::kTimeout, "waiting for peer");
    });
  ctx.comm->barrier(120);
  b.reset();
  c.timeout_s = 0;
  b.set_config(c);
  hundred_rounds(ctx, b, "a timeout on rank 0");
  if (ctx.rank == 0) std::printf("[world %d] timeout -> Error(kTimeout), reset, dispatch ok\n", ctx.world);
}

// Bad input that only rank 0's notify kernel sees: rank 0 raises its abort word, and its peers'
// next waits end with Error(kAborted) naming rank 0 instead of running out their 60 s timeout
// (which would be kTimeout: the kind tells the two apart).
void run_abort(RankCtx& ctx) {
  Buffer& b = *ctx.buffer;
  Config c = b.config();
  c.timeout_s = 60;
  b.set_config(c);
  const int R = ctx.world, N = 64, H = 1024;
  SmallInputs d = small_inputs(ctx, b, N, H, 11);
  DeviceMem& per_rank = d.per_rank;
  DispatchInputs& di = d.di;
  if (ctx.rank == 0) {
    // num_tokens_per_rank no longer matches is_token_in_rank for rank 1.
    std::vector<int> counts = per_rank.download<int>(R);
    counts[1] += 1;
    per_rank.upload(counts.data(), 4 * R);
  }
  DispatchHandle h = b.make_handle(N);
  auto dispatch = [&] {
    const int nr = b.dispatch_notify(di, h, View{}, ctx.stream);
    b.dispatch(di, h, d.outputs(nr), ctx.stream);
    b.synchronize(ctx.stream);
  };
  print_time_to_error(ctx, "dispatch", c.timeout_s, [&] {
    if (ctx.rank == 0)
      require_error(dispatch, ErrorKind::kInvalidArgument, "disagree for rank 1");
    else
      require_error(dispatch, ErrorKind::kAborted, "rank 0 failed");
  });
  b.reset();  // collective: clears every abort word
  c.timeout_s = 0;
  b.set_config(c);
  hundred_rounds(ctx, b, "bad input on rank 0 (its peers aborted)");
  if (ctx.rank == 0) std::printf("[world %d] bad input on rank 0 -> peers aborted naming it, reset ok\n", R);
}

// Rank 0 refuses its dispatch on the host (a wrongly shaped output) while its peers launch theirs:
// rank 0's abort word ends their waits with Error(kAborted) naming it, long before their 60 s
// timeout (which would be kTimeout).
void run_host_abort(RankCtx& ctx) {
  Buffer& b = *ctx.buffer;
  Config c = b.config();
  c.timeout_s = 60;
  b.set_config(c);
  const int R = ctx.world, N = 64, H = 1024;
  SmallInputs d = small_inputs(ctx, b, N, H, 13);
  DispatchInputs& di = d.di;
  DispatchHandle h = b.make_handle(N);
  const int nr = b.dispatch_notify(di, h, View{}, ctx.stream);
  const int64_t rows = ctx.rank == 0 ? nr + 1 : nr;  // rank 0's recv_x has one row too many
  const DispatchOutputs o = d.outputs(rows);
  auto dispatch = [&] {
    b.dispatch(di, h, o, ctx.stream);
    b.synchronize(ctx.stream);
  };
  print_time_to_error(ctx, "dispatch", c.timeout_s, [&] {
    if (ctx.rank == 0)
      require_error(dispatch, ErrorKind::kInvalidArgument, "recv_x: expected shape");
    else
      require_error(dispatch, ErrorKind::kAborted, "rank 0 failed (its dispatch raised an error on the host");
  });
  b.reset();
  c.timeout_s = 0;
  b.set_config(c);
  hundred_rounds(ctx, b, "a host error on rank 0 (its peers aborted)");
  if (ctx.rank == 0) std::printf("[world %d] host error on rank 0 -> peers aborted naming it, reset ok\n", R);
}

// Rank 0 launches a dispatch with fewer blocks than its peers (another Config.num_sms): the plan
// words of the entry handshake differ, and every rank gets an error naming the field, instead of
// ranks addressing each other's memory by different geometries.
void run_plan_mismatch(RankCtx& ctx) {
  Buffer& b = *ctx.buffer;
  const int R = ctx.world, N = 64, H = 1024;
  SmallInputs d = small_inputs(ctx, b, N, H, 17);
  DispatchInputs& di = d.di;
  DispatchHandle h = b.make_handle(N);
  const int nr = b.dispatch_notify(di, h, View{}, ctx.stream);
  const DispatchOutputs o = d.outputs(nr);
  const Config saved = b.config();
  if (ctx.rank == 0) {
    Config fewer = saved;
    fewer.num_sms = saved.num_sms > 1 ? saved.num_sms - 1 : 2;
    b.set_config(fewer);
  }
  require_error([&] {
    b.dispatch(di, h, o, ctx.stream);
    b.synchronize(ctx.stream);
  }, ErrorKind::kInvalidArgument, "grid blocks (Config.num_sms)");
  b.set_config(saved);
  b.reset();
  hundred_rounds(ctx, b, "a plan mismatch");
  if (ctx.rank == 0) std::printf("[world %d] a dispatch planned differently -> every rank names the field\n", R);
}

// Rank 0 dispatches with another copy-warp count than its peers (Tuning.dispatch_copy_warps, set
// through set_tuning): the count in the plan words differs, and every rank gets an error naming
// the knob instead of running a dispatch whose halves disagree on the protocol.
void run_tuning_mismatch(RankCtx& ctx) {
  Buffer& b = *ctx.buffer;
  const int R = ctx.world, N = 64, H = 1024;
  SmallInputs d = small_inputs(ctx, b, N, H, 19);
  DispatchInputs& di = d.di;
  DispatchHandle h = b.make_handle(N);
  const int nr = b.dispatch_notify(di, h, View{}, ctx.stream);
  const DispatchOutputs o = d.outputs(nr);
  const Tuning saved = tuning(b);
  if (ctx.rank == 0) {
    Tuning other = saved;
    // Not the count the peers resolve (the auto count of these rows, or an explicit one).
    const int theirs = plan::dispatch_copy_warps(b.config(), saved, int64_t{H} * 2);
    other.dispatch_copy_warps = theirs == 2 ? 3 : 2;
    set_tuning(b, other);
  }
  require_error([&] {
    b.dispatch(di, h, o, ctx.stream);
    b.synchronize(ctx.stream);
  }, ErrorKind::kInvalidArgument, "dispatch copy warps (Tuning.dispatch_copy_warps)");
  set_tuning(b, saved);
  b.reset();
  hundred_rounds(ctx, b, "a tuning mismatch");
  if (ctx.rank == 0) std::printf("[world %d] ranks with different tunings -> every rank names the knob\n", R);
}

// A rank that stops launching mid-sequence (its process hangs, or stops calling epx): after
// kRounds checked rounds, rank R-1 dispatches one more round and never launches its combine. Its
// peers' combines wait for it in their entry barrier until the 2 s timeout; none hangs. The first
// peer to give up raises Error(kTimeout) naming itself, the op, the phase and rank R-1; its abort
// word may end another peer's wait first, which then raises Error(kAborted) naming that peer and
// the same op, phase and rank R-1. Then every rank, the stopped one included, calls reset(), and
// 100 checked rounds pass.
void run_stopped_rank(RankCtx& ctx) {
  Buffer& b = *ctx.buffer;
  const int R = ctx.world, me = ctx.rank, stopped = R - 1;
  constexpr int kRounds = 5;
  const Config saved = b.config();
  Config quick = saved;
  quick.timeout_s = 2;
  b.set_config(quick);
  for (int round = 0; round < kRounds; ++round)
    small_dispatch(ctx, b, 128, 1024, 700 + round, "round " + std::to_string(round) + " before the stop");
  CheckedRound last(ctx, b, 128, 1024, ctx.seed * 1000003 + 700 + kRounds, "the round rank " + std::to_string(stopped) + " stops in");
  last.dispatch();
  const std::string stalled = detail::concat("waiting for peer ", stopped);
  char seen = 0;  // 1: this rank timed out itself, 2: a peer's abort word ended its wait
  if (me != stopped) {
    const auto start = std::chrono::steady_clock::now();
    try {
      last.combine();
      throw Failure(detail::concat("rank ", me, "'s combine completed without rank ", stopped));
    } catch (const Error& e) {
      const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
      const std::string what = e.what();
      std::vector<std::string> needles;
      if (e.kind() == ErrorKind::kTimeout) {
        seen = 1;
        needles = {"combine timed out in phase 'entry barrier' on rank " + std::to_string(me), stalled, "timeout 2 s"};
      } else {
        REQUIRE(e.kind() == ErrorKind::kAborted, "wrong error kind ", error_kind_name(e.kind()), ": ", what);
        seen = 2;
        needles = {"combine aborted in phase 'entry barrier' on rank " + std::to_string(me),
                   "failed (its combine timed out in phase 'entry barrier' " + stalled};
      }
      for (const std::string& needle : needles)
        REQUIRE(what.find(needle) != std::string::npos, "message lacks '", needle, "': ", what);
      REQUIRE(b.failed(), "a timed-out combine must fail the buffer");
      std::printf("[world %d] rank %d: %s %.0f ms after its combine was enqueued (timeout 2 s): %s\n", R, me,
                  seen == 1 ? "Error(kTimeout)" : "Error(kAborted)", ms, what.c_str());
    }
  }
  std::vector<char> all(R);
  ctx.comm->all_gather(&seen, all.data(), 1, 120);
  bool timed_out = false;
  for (int r = 0; r < R; ++r) {
    REQUIRE(r == stopped || all[r] != 0, "rank ", r, " saw no error");
    timed_out = timed_out || all[r] == 1;
  }
  REQUIRE(timed_out, "no peer of rank ", stopped, " timed out waiting for it");
  b.set_config(saved);
  b.reset();  // every rank: the stopped one rejoins here
  hundred_rounds(ctx, b, detail::concat("rank ", stopped, " stopped launching"));
}

// 512 rows of 7168 channels do not fit 4 MiB, nor do the bounded dispatch's rings (at least two
// publication rounds of a block's sending warps per source and block).
void run_too_small(RankCtx& ctx) {
  Buffer small(*ctx.comm, 4 << 20, ctx.options);
  require_error([&] { small_dispatch(ctx, small, 512, 7168); }, ErrorKind::kBufferTooSmall,
                std::vector<std::string>{"rings", "need num_nvl_bytes >="});
  small.reset();
  hundred_rounds(ctx, small, "an undersized buffer", 16, 1024);
  if (ctx.rank == 0) std::printf("[world %d] undersized buffer -> Error(kBufferTooSmall) on every rank\n", ctx.world);
}

void run_lifecycle(RankCtx& ctx) {
  // NOTE: the ranks of a SimWorld share the device's memory: every rank measures between two
  // barriers, when no rank holds a Buffer of the loop.
  size_t free0 = 0, total = 0;
  for (int i = 0; i < 100; ++i) {
    if (i == 5) {  // after one-time allocations settle
      ctx.comm->barrier();
      CUDA_OK(cudaMemGetInfo(&free0, &total));
      ctx.comm->barrier();
    }
    Buffer b(*ctx.comm, 8 << 20, ctx.options);
  }
  size_t free1 = 0;
  ctx.comm->barrier();
  CUDA_OK(cudaMemGetInfo(&free1, &total));
  ctx.comm->barrier();
  REQUIRE(free1 + (16 << 20) >= free0, "device memory leaked over 95 create/destroy cycles: ", (free0 - free1) >> 20, " MiB");
  if (ctx.rank == 0) std::printf("[world %d] 100 Buffer create/destroy cycles, no leak\n", ctx.world);
}

// A Communicator adopted from the caller's ncclComm_t serves a Buffer like a fresh one.
TEST(GpuLifecycle, AdoptsAnExistingNcclComm) {
  SKIP_WITHOUT_GPUS(2);
  const uint64_t seed = run_seed();
  const int failed = launch_local(2, [&](int rank, int world, const ncclUniqueId& id) {
    try {
      CUDA_OK(cudaSetDevice(rank));
      ncclComm_t raw = nullptr;
      REQUIRE(ncclCommInitRank(&raw, world, id, rank) == ncclSuccess, "ncclCommInitRank");
      Communicator comm(raw, /*owns=*/true);
      REQUIRE(comm.rank() == rank && comm.world() == world && comm.local_size() == world,
              "adopted topology: rank ", comm.rank(), " world ", comm.world(), " local ", comm.local_size());
      Buffer buffer(comm, 64 << 20);
      cudaStream_t stream;
      CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
      {
        RankStream on_stream(stream);
        RankCtx ctx{rank, world, seed, &comm, &buffer, stream};
        small_dispatch(ctx, buffer, 128, 2048);
      }
      CUDA_OK(cudaStreamDestroy(stream));
      if (rank == 0) std::printf("[world %d] adopted ncclComm_t: dispatch ok\n", world);
      return 0;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "[rank %d] FAILED: %s\n", rank, e.what());
      return 1;
    }
  }, 120);
  EXPECT_EQ(failed, 0);
}

// A rank's process killed (SIGKILL) in the middle of an exchange, after its dispatch and before
// its combine: the survivors' combines end with an error naming it within the wait bound (no abort
// word comes from a dead process: their own timeouts find it), and their Buffers and communicator
// are destroyed without it (the teardown's host barrier times out and breaks the communicator, see
// Communicator::broken). Real ranks only: a SimWorld rank is a thread of the test's process.
void run_killed_rank(RankCtx& ctx) {
  constexpr int kKilled = 1;
  constexpr double kBound = 3;
  Config bounded = ctx.buffer->config();
  bounded.timeout_s = kBound;
  ctx.buffer->set_config(bounded);  // the harness's Buffer, torn down after this body
  BufferOptions options = ctx.options;
  options.config = bounded;
  auto buffer = std::make_unique<Buffer>(*ctx.comm, size_t{64} << 20, options);
  CheckedRound round(ctx, *buffer, 128, 1024, ctx.seed * 1000003 + 900, "the round rank 1 is killed in");
  round.dispatch();
  if (ctx.rank == kKilled) {
    std::fflush(stdout);
    std::raise(SIGKILL);
  }
  const auto start = std::chrono::steady_clock::now();
  const auto ms_since_start = [&] {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  };
  try {
    round.combine();
    throw Failure(detail::concat("rank ", ctx.rank, "'s combine completed without rank ", kKilled));
  } catch (const Error& e) {
    const std::string what = e.what();
    REQUIRE(e.kind() == ErrorKind::kTimeout || e.kind() == ErrorKind::kAborted, "wrong error kind ",
            error_kind_name(e.kind()), ": ", what);
    REQUIRE(what.find(detail::concat("peer ", kKilled)) != std::string::npos, "message lacks 'peer ", kKilled,
            "': ", what);
    std::printf("[world %d] rank %d: %s %.0f ms after its combine was enqueued (timeout %.0f s): %s\n", ctx.world,
                ctx.rank, error_kind_name(e.kind()), ms_since_start(), kBound, what.c_str());
  }
  const auto destroy_start = std::chrono::steady_clock::now();
  buffer.reset();
  REQUIRE(ctx.comm->broken(), "the teardown's barrier with the killed rank must break the communicator");
  std::printf("[world %d] rank %d: its Buffer destroyed in %.0f ms, the communicator broken\n", ctx.world, ctx.rank,
              std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - destroy_start).count());
}

class GpuErrors : public ::testing::TestWithParam<WorldMode> {};

TEST_P(GpuErrors, ValidationDeviceErrorAndReset) {
  SKIP_UNLESS_RUNNABLE(GetParam(), 2);
  EXPECT_EQ(run_world(GetParam(), 2, 64 << 20, Config::defaults(2), run_errors), 0);
}

TEST_P(GpuErrors, TimeoutBecomesErrorNotHang) {
  SKIP_UNLESS_RUNNABLE(GetParam(), 2);
  EXPECT_EQ(run_world(GetParam(), 2, 64 << 20, Config::defaults(2), run_timeout), 0);
}

TEST_P(GpuErrors, PeerFailureAbortsWaitsNamingIt) {
  SKIP_UNLESS_RUNNABLE(GetParam(), 3);
  EXPECT_EQ(run_world(GetParam(), 3, 64 << 20, Config::defaults(3), run_abort), 0);
}

TEST_P(GpuErrors, PeerHostErrorAbortsWaitsNamingIt) {
  SKIP_UNLESS_RUNNABLE(GetParam(), 3);
  EXPECT_EQ(run_world(GetParam(), 3, 64 << 20, Config::defaults(3), run_host_abort), 0);
}

TEST_P(GpuErrors, RankThatStopsLaunchingTimesOutItsPeers) {
  SKIP_UNLESS_RUNNABLE(GetParam(), 3);
  EXPECT_EQ(run_world(GetParam(), 3, 64 << 20, Config::defaults(3), run_stopped_rank), 0);
}

TEST_P(GpuErrors, RanksThatPlanAnOpDifferentlyGetAnErrorNamingTheField) {
  SKIP_UNLESS_RUNNABLE(GetParam(), 2);
  EXPECT_EQ(run_world(GetParam(), 2, 64 << 20, Config::defaults(2), run_plan_mismatch), 0);
}

TEST_P(GpuErrors, RanksWithDifferentTuningsGetAnErrorNamingTheKnob) {
  SKIP_UNLESS_RUNNABLE(GetParam(), 2);
  EXPECT_EQ(run_world(GetParam(), 2, 64 << 20, Config::defaults(2), run_tuning_mismatch), 0);
}

TEST_P(GpuErrors, UndersizedBufferNamesBytesNeeded) {
  SKIP_UNLESS_RUNNABLE(GetParam(), 2);
  EXPECT_EQ(run_world(GetParam(), 2, 64 << 20, Config::defaults(2), run_too_small), 0);
}

class GpuLifecycle : public ::testing::TestWithParam<WorldMode> {};

TEST_P(GpuLifecycle, HundredCreateDestroyCycles) {
  SKIP_UNLESS_RUNNABLE(GetParam(), 2);
  EXPECT_EQ(run_world(GetParam(), 2, 64 << 20, Config::defaults(2), run_lifecycle), 0);
}

// The killed rank counts as the one failed rank of the world; a survivor that hung in its teardown
// would be killed by the launcher and count too.
class GpuKill : public ::testing::TestWithParam<WorldMode> {};

TEST_P(GpuKill, KilledRankEndsItsPeersWaitsAndTheyTearDown) {
  SKIP_UNLESS_RUNNABLE(GetParam(), 2);
  EXPECT_EQ(run_world(GetParam(), 2, 64 << 20, Config::defaults(2), run_killed_rank), 1);
}

INSTANTIATE_TEST_SUITE_P(Gpu, GpuErrors, ::testing::Values(WorldMode::kReal, WorldMode::kSim), mode_param_name);
INSTANTIATE_TEST_SUITE_P(Gpu, GpuLifecycle, ::testing::Values(WorldMode::kReal, WorldMode::kSim), mode_param_name);
INSTANTIATE_TEST_SUITE_P(Gpu, GpuKill, ::testing::Values(WorldMode::kReal), mode_param_name);

}  // namespace
}  // namespace epx::test
