// High-throughput layout / dispatch / combine on 2-8 ranks (real GPUs or a SimWorld) against the
// CPU reference.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <numeric>

#include "gpu/harness.hpp"
#include "host/plan.hpp"
#include "host/tuning.hpp"

namespace epx::test {
namespace {

using ref::RankInput;

struct Case {
  std::string name;
  InputSpec spec;
  int alignment = 1;
  bool worst_case = false;   // num_worst_tokens sizing (no host sync)
  int empty_rank = -1;       // this rank has N = 0
  bool biases = false;
  int x_row_pad = 0;         // extra elements per x row (non-contiguous x)
  bool no_topk = false;      // fresh dispatch without topk_idx / topk_weights (x and layout only)
  bool bounded = false;      // the rows do not fit the buffer: combine variants without rings are skipped
};

uint64_t case_seed(uint64_t seed, const std::string& name) {
  return seed ^ std::hash<std::string>{}(name);
}

// Rank r's expert outputs for combine: random bf16 rows, regenerable by every rank.
std::vector<uint16_t> expert_outputs(uint64_t seed, int rank, int64_t rows, int hidden) {
  std::mt19937_64 rng(seed * 31 + rank + 17);
  std::uniform_real_distribution<float> u(-2.f, 2.f);
  std::vector<uint16_t> y(static_cast<size_t>(rows) * hidden);
  for (auto& v : y) v = ref::float_to_bf16(u(rng));
  return y;
}

std::vector<uint16_t> random_bias(uint64_t seed, int rank, int n, int hidden, int which) {
  return expert_outputs(seed * 7 + which, rank + 100, n, hidden);
}

// The device copies of one rank's dispatch inputs.
struct DeviceInputs {
  DeviceMem x, scales, topk_idx, topk_weights;
  DispatchInputs view(const InputSpec& s, int N, int pad) const {
    DispatchInputs in;
    const DType dt = s.fp8 ? DType::kFP8E4M3 : DType::kBF16;
    in.x = View::strided(x.get(), dt, {N, s.hidden}, {s.hidden + pad, 1});
    if (s.fp8) {
      const int S = num_scale_columns(s);
      const DType dt = s.scales == InputSpec::Scales::kUe8m0 ? DType::kI32 : DType::kF32;
      if (s.scales == InputSpec::Scales::kOnePerToken) in.x_scales = View::of(scales.get(), dt, {N});
      else in.x_scales = View::strided(scales.get(), dt, {N, S}, {1, N});  // column-major
    }
    in.topk_idx = View::of(topk_idx.get(), DType::kI64, {N, s.num_topk});
    if (s.with_weights) in.topk_weights = View::of(topk_weights.get(), DType::kF32, {N, s.num_topk});
    return in;
  }
};

DeviceInputs upload_inputs(const RankInput& in, const InputSpec& s, int pad) {
  DeviceInputs d;
  const int N = in.num_tokens;
  const size_t es = s.fp8 ? 1 : 2;
  const size_t row = static_cast<size_t>(s.hidden) * es, padded = (s.hidden + pad) * es;
  std::vector<uint8_t> x(padded * N, 0xAB);
  for (int t = 0; t < N; ++t) std::memcpy(&x[t * padded], &in.x[t * row], row);
  d.x = DeviceMem::from(x);
  if (s.fp8) {
    const int S = num_scale_columns(s);
    std::vector<float> col(static_cast<size_t>(S) * N);
    for (int t = 0; t < N; ++t)
      for (int j = 0; j < S; ++j) col[static_cast<size_t>(j) * N + t] = in.x_scales[static_cast<size_t>(t) * S + j];
    d.scales = DeviceMem::from(col);
  }
  d.topk_idx = DeviceMem::from(in.topk_idx);
  if (s.with_weights) d.topk_weights = DeviceMem::from(in.topk_weights);
  return d;
}

struct LayoutOut {
  DeviceMem per_rank, per_expert, in_rank;
};

LayoutOut run_layout(RankCtx& ctx, const DeviceInputs& d, const InputSpec& s, int N, const ref::Layout& want) {
  const int R = ctx.world;
  LayoutOut o{DeviceMem(4 * R), DeviceMem(4 * s.num_experts), DeviceMem(static_cast<size_t>(N) * R)};
  o.per_rank.fill(0x7F);
  o.per_expert.fill(0x7F);
  o.in_rank.fill(0x7F);
  ctx.buffer->get_dispatch_layout(View::of(d.topk_idx.get(), DType::kI64, {N, s.num_topk}), s.num_experts,
                                  View::of(o.per_rank.get(), DType::kI32, {R}),
                                  View::of(o.per_expert.get(), DType::kI32, {s.num_experts}),
                                  View::of(o.in_rank.get(), DType::kBool, {N, R}), ctx.stream);
  ctx.buffer->synchronize(ctx.stream);
  expect_equal(o.per_rank.download<int>(R), want.num_tokens_per_rank, R, "num_tokens_per_rank");
  expect_equal(o.per_expert.download<int>(s.num_experts), want.num_tokens_per_expert, s.num_experts,
               "num_tokens_per_expert");
  expect_equal(o.in_rank.download<uint8_t>(static_cast<size_t>(N) * R), want.is_token_in_rank,
               static_cast<size_t>(N) * R, "is_token_in_rank");
  return o;
}

// The dispatch inputs of x's tokens with the layout tensors of `layout` (R ranks, E experts).
DispatchInputs with_layout(DispatchInputs in, const LayoutOut& layout, int R, int N, int E) {
  in.num_tokens_per_rank = View::of(layout.per_rank.get(), DType::kI32, {R});
  in.num_tokens_per_expert = View::of(layout.per_expert.get(), DType::kI32, {E});
  in.is_token_in_rank = View::of(layout.in_rank.get(), DType::kBool, {N, R});
  return in;
}

struct RecvOut {
  DeviceMem x, scales, topk_idx, topk_weights, src_idx;
  DispatchOutputs view(const InputSpec& s, int64_t rows, bool with_topk = true) const {
    DispatchOutputs o;
    o.recv_x = View::of(x.get(), s.fp8 ? DType::kFP8E4M3 : DType::kBF16, {rows, s.hidden});
    if (s.fp8) {
      const DType dt = s.scales == InputSpec::Scales::kUe8m0 ? DType::kI32 : DType::kF32;
      o.recv_x_scales = s.scales == InputSpec::Scales::kOnePerToken
                            ? View::of(scales.get(), dt, {rows})
                            : View::of(scales.get(), dt, {rows, num_scale_columns(s)});
    }
    if (with_topk) o.recv_topk_idx = View::of(topk_idx.get(), DType::kI64, {rows, s.num_topk});
    if (with_topk && s.with_weights)
      o.recv_topk_weights = View::of(topk_weights.get(), DType::kF32, {rows, s.num_topk});
    o.recv_src_idx = View::of(src_idx.get(), DType::kI32, {rows});
    return o;
  }
};

RecvOut alloc_recv(const InputSpec& s, int64_t rows) {
  const size_t es = s.fp8 ? 1 : 2, S = num_scale_columns(s);
  RecvOut o{DeviceMem(rows * s.hidden * es), DeviceMem(s.fp8 ? rows * S * 4 : 0), DeviceMem(rows * s.num_topk * 8),
            DeviceMem(rows * s.num_topk * 4), DeviceMem(rows * 4)};
  for (DeviceMem* m : {&o.x, &o.scales, &o.topk_idx, &o.topk_weights, &o.src_idx}) m->fill(0x7F);
  return o;
}

// meta: also recv_src_idx, and (with_topk) recv_topk_idx / recv_topk_weights.
void check_recv(const RecvOut& o, const InputSpec& s, const ref::DispatchResult& want, int64_t rows, bool meta,
                const std::string& tag, bool with_topk = true) {
  const int64_t n = want.num_recv;
  const size_t es = s.fp8 ? 1 : 2, S = num_scale_columns(s), K = s.num_topk;
  auto x = o.x.download<uint8_t>(rows * s.hidden * es);
  expect_equal(x, want.recv_x, n * s.hidden * es, tag + " recv_x", received_rows(want, s.hidden * es));
  if (S)
    expect_equal(o.scales.download<float>(rows * S), want.recv_x_scales, n * S, tag + " recv_x_scales",
                 received_rows(want, S));
  if (meta && with_topk) {
    expect_equal(o.topk_idx.download<int64_t>(rows * K), want.recv_topk_idx, n * K, tag + " recv_topk_idx",
                 received_rows(want, K));
    if (s.with_weights)
      expect_equal(o.topk_weights.download<float>(rows * K), want.recv_topk_weights, n * K, tag + " recv_topk_weights",
                   received_rows(want, K));
  }
  if (meta) expect_equal(o.src_idx.download<int>(rows), want.recv_src_idx, n, tag + " recv_src_idx", received_rows(want, 1));
  if (rows > n) {  // worst-case padding: fully written
    for (size_t i = n * s.hidden * es; i < x.size(); ++i) REQUIRE(x[i] == 0, tag, " padding recv_x byte ", i);
    if (meta && with_topk) {
      auto idx = o.topk_idx.download<int64_t>(rows * K);
      for (size_t i = n * K; i < idx.size(); ++i) REQUIRE(idx[i] == -1, tag, " padding recv_topk_idx ", i);
    }
    if (meta) {
      auto src = o.src_idx.download<int>(rows);
      for (int64_t i = n; i < rows; ++i) REQUIRE(src[i] == -1, tag, " padding recv_src_idx ", i);
    }
  }
}

void run_case(RankCtx& ctx, const Case& c) {
  const int R = ctx.world, me = ctx.rank;
  const uint64_t seed = case_seed(ctx.seed, c.name);
  std::vector<RankInput> all(R);
  std::vector<InputSpec> specs(R, c.spec);
  for (int r = 0; r < R; ++r) {
    if (r == c.empty_rank) specs[r].num_tokens = 0;
    all[r] = make_input(seed, r, specs[r]);
  }
  const InputSpec& s = specs[me];
  const int N = s.num_tokens, H = s.hidden, K = s.num_topk, E = s.num_experts;
  const ref::DispatchShape shape = shape_of(s, R, c.alignment);
  std::vector<ref::DispatchResult> want(R);
  for (int r = 0; r < R; ++r) want[r] = ref::dispatch(all, r, shape);
  const ref::Layout want_layout = ref::get_dispatch_layout(all[me].topk_idx, N, K, E, R);

  DeviceInputs d = upload_inputs(all[me], s, c.x_row_pad);
  LayoutOut layout = run_layout(ctx, d, s, N, want_layout);

  DispatchInputs in = with_layout(d.view(s, N, c.x_row_pad), layout, R, N, E);
  if (c.no_topk) in.topk_idx = in.topk_weights = View{};  // routing from the layout tensors alone
  const bool topk = !c.no_topk;
  in.expert_alignment = c.alignment;
  int max_tokens = 0;
  for (const auto& sp : specs) max_tokens = std::max(max_tokens, sp.num_tokens);
  in.num_worst_tokens = c.worst_case ? max_tokens * R : 0;

  DispatchHandle handle = ctx.buffer->make_handle(N);
  DeviceMem per_expert(4 * (E / R));
  per_expert.fill(0x7F);
  const int nr = ctx.buffer->dispatch_notify(in, handle, View::of(per_expert.get(), DType::kI32, {E / R}), ctx.stream);
  if (!c.worst_case) {
    REQUIRE(nr == want[me].num_recv, c.name, ": num_recv ", nr, " want ", want[me].num_recv);
    // The busiest receiver's and sender's rows (what decides the bounded dispatch and combine).
    long long max_recv = 0, max_sent = 0;
    for (int r = 0; r < R; ++r) {
      max_recv = std::max<long long>(max_recv, want[r].num_recv);
      const ref::Layout l = ref::get_dispatch_layout(all[r].topk_idx, specs[r].num_tokens, K, E, R);
      max_sent = std::max<long long>(max_sent, std::accumulate(l.num_tokens_per_rank.begin(), l.num_tokens_per_rank.end(), 0LL));
    }
    REQUIRE(handle.max_recv_tokens == max_recv, c.name, ": max_recv_tokens ", handle.max_recv_tokens, " want ", max_recv);
    REQUIRE(handle.max_sent_tokens == max_sent, c.name, ": max_sent_tokens ", handle.max_sent_tokens, " want ", max_sent);
  }
  const int64_t rows = c.worst_case ? in.num_worst_tokens : nr;
  RecvOut out = alloc_recv(s, rows);
  ctx.buffer->dispatch(in, handle, out.view(s, rows, topk), ctx.stream);
  ctx.buffer->synchronize(ctx.stream);
  check_recv(out, s, want[me], rows, true, c.name, topk);
  expect_equal(per_expert.download<int>(E / R), want[me].num_recv_tokens_per_expert, E / R,
               c.name + " num_recv_tokens_per_expert");
  // The handle's prefix matrix is DeepEP's rank_prefix_matrix.
  std::vector<int> prefix(R * R);
  download_bytes(prefix.data(), handle.rank_prefix_matrix, 4 * R * R);
  expect_equal(prefix, want[me].rank_prefix_matrix, R * R, c.name + " rank_prefix_matrix");

  // Cached re-dispatch through a handle: same routing, x only, into sentinel-filled outputs.
  auto dispatch_cached = [&](const DispatchHandle& h) {
    DispatchInputs cached;
    cached.x = in.x;
    cached.x_scales = in.x_scales;
    RecvOut again = alloc_recv(s, rows);
    DispatchOutputs o = again.view(s, rows);
    o.recv_topk_idx = o.recv_topk_weights = o.recv_src_idx = View{};
    ctx.buffer->dispatch(cached, h, o, ctx.stream);
    return again;
  };
  {  // must equal the fresh one
    RecvOut again = dispatch_cached(handle);
    ctx.buffer->synchronize(ctx.stream);
    check_recv(again, s, want[me], rows, false, c.name + " cached");
  }
  // 5 copy-out warps per block instead of the auto count: fresh (notify again, all metadata) and
  // cached, both equal to the reference.
  {
    const Tuning saved = tuning(*ctx.buffer);
    Tuning five = saved;
    five.dispatch_copy_warps = 5;
    set_tuning(*ctx.buffer, five);
    DispatchHandle h2 = ctx.buffer->make_handle(N);
    const int nr2 = ctx.buffer->dispatch_notify(in, h2, View::of(per_expert.get(), DType::kI32, {E / R}), ctx.stream);
    REQUIRE(nr2 == nr, c.name, ": copy-warps-5 num_recv ", nr2, " want ", nr);
    RecvOut fresh = alloc_recv(s, rows);
    ctx.buffer->dispatch(in, h2, fresh.view(s, rows, topk), ctx.stream);
    RecvOut again = dispatch_cached(h2);
    ctx.buffer->synchronize(ctx.stream);
    set_tuning(*ctx.buffer, saved);
    const std::string tag = c.name + " copy warps 5";
    check_recv(fresh, s, want[me], rows, true, tag, topk);
    check_recv(again, s, want[me], rows, false, tag + " cached");
  }
  // Combine: every rank's expert outputs are regenerable, so the reference is exact (bitwise).
  std::vector<ref::CombineRankInput> cin(R);
  std::vector<std::vector<uint16_t>> ys(R);
  for (int r = 0; r < R; ++r) {
    ys[r] = expert_outputs(seed, r, want[r].num_recv, H);
    cin[r].dispatched = &want[r];
    cin[r].x = ys[r];
    cin[r].topk_weights = want[r].recv_topk_weights;
  }
  std::vector<uint16_t> b0, b1;
  if (c.biases) {
    b0 = random_bias(seed, me, N, H, 0);
    b1 = random_bias(seed, me, N, H, 1);
  }
  const ref::CombineResult want_c = ref::combine(cin, me, N, H, K, b0, b1);

  std::vector<uint16_t> y_rows(static_cast<size_t>(rows) * H, ref::float_to_bf16(1000.f));  // padding rows ignored
  std::copy(ys[me].begin(), ys[me].end(), y_rows.begin());
  DeviceMem y = DeviceMem::from(y_rows);
  CombineInputs ci;
  ci.x = View::of(y.get(), DType::kBF16, {rows, H});
  if (s.with_weights) ci.topk_weights = View::of(out.topk_weights.get(), DType::kF32, {rows, K});
  DeviceMem db0, db1;
  if (c.biases) {
    db0 = DeviceMem::from(b0);
    db1 = DeviceMem::from(b1);
    ci.bias_0 = View::of(db0.get(), DType::kBF16, {N, H});
    ci.bias_1 = View::of(db1.get(), DType::kBF16, {N, H});
  }
  std::vector<uint16_t> first;
  for (int iter = 0; iter < 4; ++iter) {
    DeviceMem cx(static_cast<size_t>(N) * H * 2), cw(static_cast<size_t>(N) * K * 4);
    cx.fill(0x7F);
    cw.fill(0x7F);
    CombineOutputs co;
    co.combined_x = View::of(cx.get(), DType::kBF16, {N, H});
    if (s.with_weights) co.combined_topk_weights = View::of(cw.get(), DType::kF32, {N, K});
    // Run 1: the ring combine (the default: a warp per peer sending); run 2: the row-region
    // combine; run 3: rings of 64 rows (wrapping many times) and chunks of 3 rows (ragged ends);
    // run 4: 5 sending warps (uneven over the peers) and 11 reducing, on rings of 64 rows. At 2
    // ranks all four take the row region (the ring combine starts at 3).
    const Config saved = ctx.buffer->config();
    const Tuning saved_tuning = tuning(*ctx.buffer);
    Config cfg = saved;
    Tuning t = saved_tuning;
    t.ring_combine = iter != 1;
    if (iter == 2) {
      cfg.ring_slots = 64;
      t.ring_chunk = 3;
    }
    if (iter == 3) {
      t.ring_send_warps = 5;
      cfg.ring_slots = 64;
    }
    // A bounded combine takes the rings whatever ring_combine says; a geometry without rings
    // (too few sending warps for the peers) is Unsupported there.
    if (c.bounded && plan::ring_plan(cfg, t, R, int64_t{1} << 40, /*bounded=*/true).channels == 0) continue;
    ctx.buffer->set_config(cfg);  // the saved tuning (chunk 0) holds for any ring_slots
    set_tuning(*ctx.buffer, t);
    ctx.buffer->combine(ci, handle, co, ctx.stream);
    ctx.buffer->synchronize(ctx.stream);
    set_tuning(*ctx.buffer, saved_tuning);
    ctx.buffer->set_config(saved);
    auto got = cx.download<uint16_t>(static_cast<size_t>(N) * H);
    expect_equal(got, want_c.combined_x, static_cast<size_t>(N) * H, c.name + " combined_x", token_rows(me, H));
    if (s.with_weights)
      expect_equal(cw.download<float>(static_cast<size_t>(N) * K), want_c.combined_topk_weights,
                   static_cast<size_t>(N) * K, c.name + " combined_topk_weights", token_rows(me, K));
    // Two variants: the same bits.
    if (iter == 0) first = got;
    else expect_equal(got, first, first.size(), c.name + (iter == 1 ? " row-region" : iter == 2 ? " chunk-3" : " send-warps-5") + " combine == ring combine");
  }
  if (me == 0) std::printf("[world %d] case %-28s ok (rank 0 received %d rows)\n", R, c.name.c_str(), want[0].num_recv);
}

std::vector<Case> cases(int world) {
  std::vector<Case> v;
  InputSpec base;
  base.num_experts = 16 * world;
  v.push_back({"bf16 h2048", base});
  { Case c{"bf16 h7168 biases align4", base, 4}; c.spec.hidden = 7168; c.biases = true; v.push_back(c); }
  { Case c{"bf16 h8192 worst-case", base}; c.spec.hidden = 8192; c.worst_case = true; v.push_back(c); }
  { Case c{"fp8 h7168 strided", base}; c.spec.hidden = 7168; c.spec.fp8 = true; c.x_row_pad = 128; v.push_back(c); }
  { Case c{"fp8 h2048 worst-case align8", base, 8}; c.spec.fp8 = true; c.worst_case = true; v.push_back(c); }
  { Case c{"empty rank 1", base}; c.empty_rank = 1; v.push_back(c); }
  { Case c{"all to rank 0", base}; c.spec.routing = Routing::kOneRank; v.push_back(c); }
  { Case c{"skewed no weights k4", base}; c.spec.routing = Routing::kSkewed; c.spec.with_weights = false; c.spec.num_topk = 4; v.push_back(c); }
  { Case c{"many -1 slots", base}; c.spec.drop_prob = 0.6; c.spec.num_tokens = 1000; v.push_back(c); }
  { Case c{"fresh without topk_idx", base}; c.no_topk = true; c.spec.with_weights = false; v.push_back(c); }
  { Case c{"fp8 h7168 ue8m0 int32 scales", base}; c.spec.hidden = 7168; c.spec.fp8 = true; c.spec.scales = InputSpec::Scales::kUe8m0; v.push_back(c); }
  { Case c{"fp8 h2048 per-token scales worst-case", base}; c.spec.fp8 = true; c.spec.scales = InputSpec::Scales::kOnePerToken; c.worst_case = true; v.push_back(c); }
  { Case c{"bf16 n4096 h7168 k8 e64R", base}; c.spec.num_tokens = 4096; c.spec.hidden = 7168; c.spec.num_experts = 64 * world; c.spec.drop_prob = 0; v.push_back(c); }
  return v;
}

// The prologue of the rounds below: this rank's `mine` (of spec s) on the device, its layout
// tensors (run and checked against want_layout now, or, when null, allocated for a captured
// get_dispatch_layout), the dispatch inputs viewing both, and the combine outputs of its N tokens
// (the caller fills them with sentinels).
struct RoundInputs {
  int N, H, K, E;
  DeviceInputs d;
  LayoutOut layout;
  DispatchInputs in;
  DeviceMem cx, cw;  // combined_x, combined_topk_weights
  CombineOutputs co;
};
RoundInputs round_inputs(RankCtx& ctx, const RankInput& mine, const InputSpec& s, const ref::Layout* want_layout) {
  const int R = ctx.world;
  RoundInputs r{s.num_tokens, s.hidden, s.num_topk, s.num_experts};
  r.d = upload_inputs(mine, s, 0);
  r.layout = want_layout ? run_layout(ctx, r.d, s, r.N, *want_layout)
                         : LayoutOut{DeviceMem(4 * R), DeviceMem(4 * r.E), DeviceMem(static_cast<size_t>(r.N) * R)};
  r.in = with_layout(r.d.view(s, r.N, 0), r.layout, R, r.N, r.E);
  r.cx = DeviceMem(static_cast<size_t>(r.N) * r.H * 2);
  r.cw = DeviceMem(static_cast<size_t>(r.N) * r.K * 4);
  r.co.combined_x = View::of(r.cx.get(), DType::kBF16, {r.N, r.H});
  r.co.combined_topk_weights = View::of(r.cw.get(), DType::kF32, {r.N, r.K});
  return r;
}
// The rounds' spec: num_tokens tokens over 16 experts per rank, the other fields' defaults.
InputSpec round_spec(int R, int num_tokens) {
  InputSpec s;
  s.num_experts = 16 * R;
  s.num_tokens = num_tokens;
  return s;
}

// Rounds of cached dispatch -> combine queued back to back, no host sync between them (as
// frameworks run them): every rank's host runs ahead of its kernels, and ops of consecutive
// epochs meet. The last round's combine equals the reference bit for bit.
void run_back_to_back(RankCtx& ctx) {
  const int R = ctx.world, me = ctx.rank;
  const InputSpec s = round_spec(R, 512);
  const uint64_t seed = case_seed(ctx.seed, "back to back");
  std::vector<RankInput> all(R);
  for (int r = 0; r < R; ++r) all[r] = make_input(seed, r, s);
  const ref::DispatchShape shape = shape_of(s, R, 1);
  std::vector<ref::DispatchResult> want(R);
  for (int r = 0; r < R; ++r) want[r] = ref::dispatch(all, r, shape);
  const ref::Layout want_layout = ref::get_dispatch_layout(all[me].topk_idx, s.num_tokens, s.num_topk, s.num_experts, R);
  RoundInputs ri = round_inputs(ctx, all[me], s, &want_layout);
  const int N = ri.N, H = ri.H, K = ri.K;
  const DispatchInputs& in = ri.in;
  DispatchHandle handle = ctx.buffer->make_handle(N);
  const int nr = ctx.buffer->dispatch_notify(in, handle, View{}, ctx.stream);
  REQUIRE(nr == want[me].num_recv, "num_recv ", nr, " want ", want[me].num_recv);
  RecvOut out = alloc_recv(s, nr);
  ctx.buffer->dispatch(in, handle, out.view(s, nr), ctx.stream);
  ctx.buffer->synchronize(ctx.stream);
  check_recv(out, s, want[me], nr, true, "back to back: fresh");

  // Combine the received rows themselves: the reference sums each token's copies in rank order.
  std::vector<ref::CombineRankInput> cin(R);
  std::vector<std::vector<uint16_t>> ys(R);
  for (int r = 0; r < R; ++r) {
    ys[r].resize(want[r].recv_x.size() / 2);
    std::memcpy(ys[r].data(), want[r].recv_x.data(), want[r].recv_x.size());
    cin[r].dispatched = &want[r];
    cin[r].x = ys[r];
    cin[r].topk_weights = want[r].recv_topk_weights;
  }
  const ref::CombineResult want_c = ref::combine(cin, me, N, H, K, {}, {});
  DeviceMem &cx = ri.cx, &cw = ri.cw;
  cx.fill(0x7F);
  cw.fill(0x7F);
  DispatchInputs cached;
  cached.x = in.x;
  DispatchOutputs cached_out = out.view(s, nr);
  cached_out.recv_topk_idx = cached_out.recv_topk_weights = cached_out.recv_src_idx = View{};
  CombineInputs ci;
  ci.x = View::of(out.x.get(), DType::kBF16, {nr, H});
  ci.topk_weights = View::of(out.topk_weights.get(), DType::kF32, {nr, K});
  const CombineOutputs& co = ri.co;
  constexpr int kRounds = 64;
  for (int round = 0; round < kRounds; ++round) {
    ctx.buffer->dispatch(cached, handle, cached_out, ctx.stream);
    ctx.buffer->combine(ci, handle, co, ctx.stream);
  }
  ctx.buffer->synchronize(ctx.stream);
  expect_equal(cx.download<uint16_t>(static_cast<size_t>(N) * H), want_c.combined_x, static_cast<size_t>(N) * H,
               "back to back: combined_x after the last round", token_rows(me, H));
  expect_equal(cw.download<float>(static_cast<size_t>(N) * K), want_c.combined_topk_weights,
               static_cast<size_t>(N) * K, "back to back: combined_topk_weights after the last round", token_rows(me, K));
  if (me == 0) std::printf("[world %d] %d back-to-back rounds of cached dispatch + combine ok\n", R, kRounds);
}

// CUDA graph: layout -> notify (worst-case, no host sync) -> dispatch -> combine captured once,
// replayed with fresh inputs (same shapes) written into the captured input buffers.
void run_graph(RankCtx& ctx) {
  const int R = ctx.world, me = ctx.rank;
  const InputSpec s = round_spec(R, 300);
  RoundInputs ri = round_inputs(ctx, make_input(ctx.seed, me, s), s, nullptr);
  const int N = ri.N, H = ri.H, K = ri.K, E = ri.E;
  const int64_t rows = static_cast<int64_t>(N) * R;
  DeviceInputs& d = ri.d;
  DispatchInputs& in = ri.in;
  in.num_worst_tokens = static_cast<int>(rows);
  DeviceMem per_expert(4 * (E / R));
  DispatchHandle handle = ctx.buffer->make_handle(N);
  RecvOut out = alloc_recv(s, rows);
  DeviceMem y(rows * H * 2);
  DeviceMem &cx = ri.cx, &cw = ri.cw;
  CombineInputs ci;
  ci.x = View::of(y.get(), DType::kBF16, {rows, H});
  ci.topk_weights = View::of(out.topk_weights.get(), DType::kF32, {rows, K});
  const CombineOutputs& co = ri.co;

  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CUDA_OK(cudaStreamBeginCapture(ctx.stream, cudaStreamCaptureModeThreadLocal));
  ctx.buffer->get_dispatch_layout(in.topk_idx, E, in.num_tokens_per_rank, in.num_tokens_per_expert, in.is_token_in_rank,
                                  ctx.stream);
  ctx.buffer->dispatch_notify(in, handle, View::of(per_expert.get(), DType::kI32, {E / R}), ctx.stream);
  ctx.buffer->dispatch(in, handle, out.view(s, rows), ctx.stream);
  ctx.buffer->combine(ci, handle, co, ctx.stream);
  CUDA_OK(cudaStreamEndCapture(ctx.stream, &graph));
  CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));

  for (int replay = 0; replay < 3; ++replay) {
    const uint64_t seed = ctx.seed + 1000 * (replay + 1);
    std::vector<RankInput> all(R);
    for (int r = 0; r < R; ++r) all[r] = make_input(seed, r, s);
    std::vector<ref::DispatchResult> want(R);
    for (int r = 0; r < R; ++r) want[r] = ref::dispatch(all, r, shape_of(s, R, 1));
    DeviceInputs fresh = upload_inputs(all[me], s, 0);
    copy_device_bytes(d.x.get(), fresh.x.get(), d.x.bytes());
    copy_device_bytes(d.topk_idx.get(), fresh.topk_idx.get(), d.topk_idx.bytes());
    copy_device_bytes(d.topk_weights.get(), fresh.topk_weights.get(), d.topk_weights.bytes());
    // Expert outputs of every rank (regenerable), padded to the worst-case rows.
    std::vector<ref::CombineRankInput> cin(R);
    std::vector<std::vector<uint16_t>> ys(R);
    for (int r = 0; r < R; ++r) {
      ys[r] = expert_outputs(seed, r, want[r].num_recv, H);
      cin[r] = {&want[r], ys[r], want[r].recv_topk_weights};
    }
    std::vector<uint16_t> y_rows(rows * H, 0);
    std::copy(ys[me].begin(), ys[me].end(), y_rows.begin());
    y.upload(y_rows.data(), y_rows.size() * 2);
    for (DeviceMem* m : {&out.x, &out.topk_idx, &out.topk_weights, &out.src_idx, &cx, &cw}) m->fill(0x7F);
    ctx.comm->barrier();
    // NOTE: combine reads recv_topk_weights that the captured dispatch wrote in the same replay.
    CUDA_OK(cudaGraphLaunch(exec, ctx.stream));
    ctx.buffer->synchronize(ctx.stream);
    check_recv(out, s, want[me], rows, true, "graph replay " + std::to_string(replay));
    const ref::CombineResult want_c = ref::combine(cin, me, N, H, K, {}, {});
    expect_equal(cx.download<uint16_t>(static_cast<size_t>(N) * H), want_c.combined_x, static_cast<size_t>(N) * H,
                 "graph replay combined_x", token_rows(me, H));
    expect_equal(cw.download<float>(static_cast<size_t>(N) * K), want_c.combined_topk_weights, static_cast<size_t>(N) * K,
                 "graph replay combined_topk_weights", token_rows(me, K));
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  if (me == 0) std::printf("[world %d] graph capture + 3 replays ok\n", R);
}

// Rows every rank receives and sends for a case's inputs (every rank computes all of them alike).
struct CaseRows {
  int64_t max_recv = 0, max_sent = 0;
};
CaseRows case_rows(RankCtx& ctx, const Case& c) {
  const int R = ctx.world;
  const uint64_t seed = case_seed(ctx.seed, c.name);
  CaseRows out;
  std::vector<int64_t> recv(R, 0);
  for (int r = 0; r < R; ++r) {
    const RankInput in = make_input(seed, r, c.spec);
    const ref::Layout l = ref::get_dispatch_layout(in.topk_idx, c.spec.num_tokens, c.spec.num_topk, c.spec.num_experts, R);
    int64_t sent = 0;
    for (int d = 0; d < R; ++d) {
      recv[d] += l.num_tokens_per_rank[d];
      sent += l.num_tokens_per_rank[d];
    }
    out.max_sent = std::max(out.max_sent, sent);
  }
  out.max_recv = *std::max_element(recv.begin(), recv.end());
  return out;
}

// Dispatch and combine of a batch larger than the buffer: Buffers whose row region holds 1/4 and
// 1/16 of the busiest rank's rows, and one of the minimum legal size (the bounded dispatch's and
// combine's rings at their smallest); host-synced and worst-case, bf16 and fp8; every case runs
// fresh, cached and 5-copy-warp dispatches and the combine variants, every row bitwise against the
// reference into sentinel-filled outputs (run_case). A buffer 2 MiB below the minimum gives
// kBufferTooSmall naming the minimum bytes.
void run_batch_larger_than_the_buffer(RankCtx& ctx) {
  const int R = ctx.world;
  const Config cfg = ctx.buffer->config();
  const Tuning tun = tuning(*ctx.buffer);  // the Buffers below start with the same (default) one
  InputSpec base;
  base.num_experts = 16 * R;
  // Rows of 1 KB; the batch is a few times the buffer's smallest legal size at every rank count
  // (the reference's cost grows as R x R x rows, so fewer tokens per rank from 3 ranks).
  base.num_tokens = R <= 2 ? 8192 : 4096;
  base.hidden = 512;
  std::vector<Case> v;
  v.push_back({"bounded bf16", base});
  { Case c{"bounded bf16 worst-case", base}; c.worst_case = true; v.push_back(c); }
  { Case c{"bounded fp8", base}; c.spec.fp8 = true; v.push_back(c); }
  { Case c{"bounded fp8 worst-case skewed", base}; c.spec.fp8 = true; c.worst_case = true; c.spec.routing = Routing::kSkewed; v.push_back(c); }
  Buffer* const saved = ctx.buffer;
  for (Case c : v) {
    c.bounded = true;
    const InputSpec& s = c.spec;
    const DType dt = s.fp8 ? DType::kFP8E4M3 : DType::kBF16;
    const int S = num_scale_columns(s);
    const CaseRows rows = case_rows(ctx, c);
    const size_t dispatch_min = plan::dispatch_ring_min_bytes(cfg, tun, R, s.hidden, dt, s.num_topk, S);
    const size_t combine_min = plan::combine_ring_min_bytes(cfg, tun, R, s.hidden, s.num_topk);
    const size_t min_bytes = std::max(dispatch_min, combine_min);
    for (int fraction : {4, 16, 0}) {
      const size_t bytes = fraction == 0 ? min_bytes
                                         : std::max(min_bytes, Buffer::get_nvl_buffer_size_hint(rows.max_recv / fraction, s.hidden, dt,
                                                                                                s.num_topk, R));
      // The test means nothing unless neither the dispatch's nor the combine's rows fit.
      const int64_t dcap = plan::dispatch_rows(bytes, s.hidden, dt, s.num_topk, S).capacity;
      const int64_t ccap = plan::combine_rows(bytes, s.hidden, s.num_topk).capacity;
      REQUIRE(dcap < rows.max_recv && ccap < rows.max_sent, c.name, ": a buffer of ", bytes, " bytes holds ", dcap,
              " dispatch / ", ccap, " combine rows, the batch ", rows.max_recv, " / ", rows.max_sent, ": not bounded");
      if (fraction > 0)
        REQUIRE(bytes == min_bytes || dcap <= 2 * (rows.max_recv / fraction) + 4096, c.name, ": buffer not sized to 1/", fraction);
      Buffer small(*ctx.comm, bytes, ctx.options);
      ctx.buffer = &small;
      Case sized = c;
      sized.name = c.name + (fraction ? " 1/" + std::to_string(fraction) : " min") + " (" + std::to_string(dcap) + " rows)";
      try {
        run_case(ctx, sized);
      } catch (...) {
        ctx.buffer = saved;
        throw;
      }
      ctx.buffer = saved;
    }
  }
  // Too small: 2 MiB under the dispatch's minimum (sizes are whole 2 MiB), rows of 7168 channels so
  // that this is a legal Buffer at every rank count; host-synced and worst-case alike.
  for (bool worst : {false, true}) {
    Case c{worst ? "too small worst-case" : "too small", base};
    c.spec.hidden = 7168;
    c.spec.num_tokens = 1024;
    c.worst_case = worst;
    c.bounded = true;
    const size_t dispatch_min = plan::dispatch_ring_min_bytes(cfg, tun, R, c.spec.hidden, DType::kBF16, c.spec.num_topk);
    const size_t bytes = dispatch_min - (size_t{2} << 20);
    REQUIRE(bytes >= SymmetricLayout::kMinBytes && plan::dispatch_rows(bytes, c.spec.hidden, DType::kBF16, c.spec.num_topk).capacity <
                                                      case_rows(ctx, c).max_recv,
            c.name, ": ", bytes, " bytes is no test of the minimum");
    Buffer tiny(*ctx.comm, bytes, ctx.options);
    ctx.buffer = &tiny;
    try {
      require_error([&] { run_case(ctx, c); }, ErrorKind::kBufferTooSmall,
                    std::vector<std::string>{"dispatch", "need num_nvl_bytes >= " + std::to_string(dispatch_min)});
    } catch (...) {
      ctx.buffer = saved;
      throw;
    }
    ctx.buffer = saved;
  }
  if (ctx.rank == 0) std::printf("[world %d] batches larger than the buffer ok\n", R);
}

class HtWorld : public ::testing::TestWithParam<WorldParam> {};

TEST_P(HtWorld, CudaGraphReplay) {
  const WorldMode mode = GetParam().mode;
  const int world = GetParam().world;
  SKIP_UNLESS_RUNNABLE(mode, world);
  const Config c = Config::defaults(world);
  EXPECT_EQ(run_world(mode, world, size_t{256} << 20, c, run_graph), 0);
}

TEST_P(HtWorld, BackToBackRoundsWithoutHostSync) {
  const WorldMode mode = GetParam().mode;
  const int world = GetParam().world;
  SKIP_UNLESS_RUNNABLE(mode, world);
  EXPECT_EQ(run_world(mode, world, size_t{256} << 20, Config::defaults(world), run_back_to_back), 0);
}

TEST_P(HtWorld, MatchesReferenceInEveryMode) {
  const WorldMode mode = GetParam().mode;
  const int world = GetParam().world;
  SKIP_UNLESS_RUNNABLE(mode, world);
  const int failed = run_world(mode, world, size_t{1} << 30, Config::defaults(world), [](RankCtx& ctx) {
    for (const Case& c : cases(ctx.world)) run_case(ctx, c);
  });
  EXPECT_EQ(failed, 0) << "see the ranks' messages above";
}

TEST_P(HtWorld, BatchLargerThanTheBuffer) {
  const WorldMode mode = GetParam().mode;
  const int world = GetParam().world;
  SKIP_UNLESS_RUNNABLE(mode, world);
  // 4 blocks: small rings, so a batch 16 x the row region stays small for a SimWorld.
  Config c = Config::defaults(world);
  c.num_sms = 4;
  EXPECT_EQ(run_world(mode, world, size_t{64} << 20, c, run_batch_larger_than_the_buffer), 0);
}

INSTANTIATE_TEST_SUITE_P(Gpu, HtWorld, ::testing::ValuesIn(world_params()), world_param_name);

}  // namespace
}  // namespace epx::test
