// High-throughput dispatch across (virtual) nodes against the CPU reference of the internode
// dispatch (ref::internode_dispatch), on one GPU through SimWorld at (world, node size) splits,
// the RDMA leg over the NVLink emulation in its direct and adversarial modes:
//  - bf16 and fp8 (per-128 scales), top-k 1 / 6 / 8, weights on and off, a rank without tokens,
//    a node whose ranks receive nothing; RDMA rings of 12 messages in chunks of 3 (every stream
//    wraps many times) and DeepEP's 252 in chunks of 6;
//  - every output (rows, scales, local top-k ids, weights, source indices, per-expert counts, the
//    rank prefix matrix, the host's row counts) bitwise against the reference, into outputs
//    pre-filled with sentinels; a cached re-dispatch through the same handle; worst-case sizing (no
//    host sync) with its padding; back-to-back ops whose ring geometry differs (the rings carry
//    their counts across ops).
// Combine: the two-level order and rounding of ref::internode_combine, bitwise, with and without
// weights and biases, from the host-synced and the worst-case handle.
// CUDA graph: a worst-case round (layout, count exchange, dispatch, combine) captured once and
// replayed on fresh inputs, every replay against the reference.
// Errors: a world across nodes without num_rdma_bytes, or with too few, names num_rdma_bytes (and
// the minimum); an op whose rings do not fit names the bytes it needs.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "common/net_view.hpp"
#include "gpu/harness.hpp"
#include "host/plan.hpp"
#include "host/tuning.hpp"
#include "reference/reference_internode.hpp"

namespace epx::test {
namespace {

constexpr int kChannels = 4;  // Config.num_sms of every case: within a SimWorld rank's share at 16 ranks
constexpr int kHidden = 1024;
constexpr int kExperts = 64;  // 4 per rank at 16 ranks

struct SplitCase {
  int world, node_size;
  EmuMode mode;
};
void PrintTo(const SplitCase& c, std::ostream* os) {
  *os << "sim_world" << c.world << "_node" << c.node_size
      << (c.mode == EmuMode::kAdversarial ? "_adversarial" : "_direct");
}
std::string split_name(const ::testing::TestParamInfo<SplitCase>& info) {
  std::ostringstream os;
  PrintTo(info.param, &os);
  return os.str();
}
std::vector<SplitCase> splits() {
  std::vector<SplitCase> out;
  for (const auto& [world, node_size] : std::vector<std::pair<int, int>>{{2, 1}, {4, 1}, {4, 2}, {8, 2}, {8, 4}, {16, 8}})
    for (EmuMode mode : {EmuMode::kDirect, EmuMode::kAdversarial}) out.push_back({world, node_size, mode});
  return out;
}

Config case_config() {
  Config config;
  config.num_sms = kChannels;
  config.num_threads = 512;
  return config;
}

// num_rdma_bytes that holds the rings of every row shape below (bf16 rows of kHidden, top-k 8).
size_t rdma_bytes(int world, int node_size, int chunk, int slots) {
  return plan::rdma_bytes_for(plan::RdmaShape{world, node_size, kChannels, chunk, slots, 2 * kHidden, 8});
}

struct Sub {
  std::string name;
  InputSpec spec;
  int empty_rank = -1;  // this rank has no tokens
  int quiet_node = -1;  // no token has an expert on this node
  bool biases = false;  // the combine adds two bias rows
};

// Rank r's expert outputs for the combine: random bf16 rows, regenerable by every rank.
std::vector<uint16_t> expert_rows(uint64_t seed, int rank, int64_t rows, int hidden) {
  std::mt19937_64 rng(seed * 31 + rank + 17);
  std::uniform_real_distribution<float> u(-2.f, 2.f);
  std::vector<uint16_t> y(static_cast<size_t>(rows) * hidden);
  for (auto& v : y) v = ref::float_to_bf16(u(rng));
  return y;
}

std::vector<Sub> subcases(int world, int node_size) {
  std::vector<Sub> out;
  InputSpec base;
  base.num_tokens = 96;
  base.hidden = kHidden;
  base.num_experts = kExperts;
  {
    Sub s{"bf16_k8_weights_biases", base};
    s.spec.num_topk = 8;
    s.biases = true;
    out.push_back(s);
  }
  {
    Sub s{"fp8_k6_noweights_empty_rank", base};
    s.spec.fp8 = true;
    s.spec.num_topk = 6;
    s.spec.with_weights = false;
    s.empty_rank = world - 1;
    out.push_back(s);
  }
  {
    Sub s{"bf16_k1_quiet_node", base};
    s.spec.num_topk = 1;
    s.spec.num_tokens = 130;
    s.quiet_node = world / node_size - 1;
    s.empty_rank = 0;
    out.push_back(s);
  }
  {
    Sub s{"fp8_k8_skewed", base};
    s.spec.fp8 = true;
    s.spec.routing = Routing::kSkewed;
    s.spec.num_tokens = 200;
    out.push_back(s);
  }
  return out;
}

// The device copies of one rank's inputs (scales column-major, as DeepEP's are).
struct Inputs {
  DeviceMem x, scales, topk_idx, topk_weights;
};
Inputs upload(const ref::RankInput& in, const InputSpec& s) {
  Inputs d;
  const int N = in.num_tokens;
  d.x = DeviceMem::from(in.x.empty() ? std::vector<uint8_t>(16, 0) : in.x);
  if (s.fp8) {
    const int S = num_scale_columns(s);
    std::vector<float> col(std::max<size_t>(1, static_cast<size_t>(S) * N));
    for (int t = 0; t < N; ++t)
      for (int j = 0; j < S; ++j) col[static_cast<size_t>(j) * N + t] = in.x_scales[static_cast<size_t>(t) * S + j];
    d.scales = DeviceMem::from(col);
  }
  d.topk_idx = DeviceMem::from(in.topk_idx.empty() ? std::vector<int64_t>(1, -1) : in.topk_idx);
  if (s.with_weights) d.topk_weights = DeviceMem::from(in.topk_weights.empty() ? std::vector<float>(1, 0.f) : in.topk_weights);
  return d;
}

struct Outputs {
  DeviceMem x, scales, topk_idx, topk_weights, src_idx;
};
Outputs alloc_outputs(const InputSpec& s, int64_t rows) {
  const size_t es = s.fp8 ? 1 : 2, S = num_scale_columns(s), K = s.num_topk, n = std::max<int64_t>(rows, 1);
  Outputs o{DeviceMem(n * s.hidden * es), DeviceMem(s.fp8 ? n * S * 4 : 16), DeviceMem(n * K * 8), DeviceMem(n * K * 4),
            DeviceMem(n * 4)};
  for (DeviceMem* m : {&o.x, &o.scales, &o.topk_idx, &o.topk_weights, &o.src_idx}) m->fill(0x7F);
  return o;
}

// Views of `o` as a dispatch's outputs for `rows` rows: recv_x (and scales with fp8), then with
// `meta` the top-k ids, weights (when the spec has them) and source indices.
DispatchOutputs output_views(const Outputs& o, const InputSpec& s, int64_t rows, bool meta) {
  const int K = s.num_topk;
  DispatchOutputs v;
  v.recv_x = View::of(o.x.get(), s.fp8 ? DType::kFP8E4M3 : DType::kBF16, {rows, s.hidden});
  if (s.fp8) v.recv_x_scales = View::of(o.scales.get(), DType::kF32, {rows, num_scale_columns(s)});
  if (!meta) return v;
  v.recv_topk_idx = View::of(o.topk_idx.get(), DType::kI64, {rows, K});
  if (s.with_weights) v.recv_topk_weights = View::of(o.topk_weights.get(), DType::kF32, {rows, K});
  v.recv_src_idx = View::of(o.src_idx.get(), DType::kI32, {rows});
  return v;
}

// A combine's outputs (cx [N, H] bf16, cw [N, K] f32 when the spec has weights) against the reference.
void check_combined(const DeviceMem& cx, const DeviceMem& cw, const InputSpec& s, const ref::CombineResult& want,
                    int rank, const std::string& tag) {
  const size_t N = s.num_tokens, H = s.hidden, K = s.num_topk;
  expect_equal(cx.download<uint16_t>(N * H), want.combined_x, N * H, tag + " combined_x", token_rows(rank, H));
  if (s.with_weights)
    expect_equal(cw.download<float>(N * K), want.combined_topk_weights, N * K, tag + " combined_topk_weights",
                 token_rows(rank, K));
}

void check_outputs(const Outputs& o, const InputSpec& s, const ref::DispatchResult& want, bool meta,
                   const std::string& tag) {
  const size_t n = want.num_recv, es = s.fp8 ? 1 : 2, S = num_scale_columns(s), K = s.num_topk;
  expect_equal(o.x.download<uint8_t>(n * s.hidden * es), want.recv_x, n * s.hidden * es, tag + " recv_x",
               received_rows(want, s.hidden * es));
  if (S)
    expect_equal(o.scales.download<float>(n * S), want.recv_x_scales, n * S, tag + " recv_x_scales",
                 received_rows(want, S));
  if (!meta) return;
  expect_equal(o.topk_idx.download<int64_t>(n * K), want.recv_topk_idx, n * K, tag + " recv_topk_idx",
               received_rows(want, K));
  if (s.with_weights)
    expect_equal(o.topk_weights.download<float>(n * K), want.recv_topk_weights, n * K, tag + " recv_topk_weights",
                 received_rows(want, K));
  expect_equal(o.src_idx.download<int>(n), want.recv_src_idx, n, tag + " recv_src_idx", received_rows(want, 1));
}

// The combine of `handle` (rows: its output rows; the rows past the received ones hold garbage,
// which the combine must ignore) against the two-level reference; weights from the dispatch.
void check_combine(RankCtx& ctx, Buffer& buffer, const DispatchHandle& handle, int64_t rows, const Outputs& recv,
                   const InputSpec& s, const std::vector<uint16_t>& mine, const ref::CombineResult& want,
                   const std::vector<uint16_t>& b0, const std::vector<uint16_t>& b1, const std::string& tag) {
  const int N = s.num_tokens, H = s.hidden, K = s.num_topk;
  std::vector<uint16_t> y_rows(static_cast<size_t>(std::max<int64_t>(rows, 1)) * H, ref::float_to_bf16(1000.f));
  std::copy(mine.begin(), mine.end(), y_rows.begin());
  DeviceMem y = DeviceMem::from(y_rows);
  CombineInputs ci;
  ci.x = View::of(y.get(), DType::kBF16, {rows, H});
  if (s.with_weights) ci.topk_weights = View::of(recv.topk_weights.get(), DType::kF32, {rows, K});
  DeviceMem db0, db1;
  if (!b0.empty()) {
    db0 = DeviceMem::from(b0);
    db1 = DeviceMem::from(b1);
    ci.bias_0 = View::of(db0.get(), DType::kBF16, {N, H});
    ci.bias_1 = View::of(db1.get(), DType::kBF16, {N, H});
  }
  DeviceMem cx(std::max<size_t>(16, static_cast<size_t>(N) * H * 2)), cw(std::max<size_t>(16, static_cast<size_t>(N) * K * 4));
  cx.fill(0x7F);
  cw.fill(0x7F);
  CombineOutputs co;
  co.combined_x = View::of(cx.get(), DType::kBF16, {N, H});
  if (s.with_weights) co.combined_topk_weights = View::of(cw.get(), DType::kF32, {N, K});
  buffer.combine(ci, handle, co, ctx.stream);
  buffer.synchronize(ctx.stream);
  check_combined(cx, cw, s, want, ctx.rank, tag);
}

// One sub-case on every rank: layout, host-synced dispatch (all outputs), cached re-dispatch,
// worst-case sizing. stop_rank >= 0: that rank stops after the count exchange (launches no
// dispatch); every other rank's dispatch must fail with a timeout or a peer's abort, and the
// return value is 1 when this rank timed out itself, 2 when an abort word ended its wait.
int run_sub(RankCtx& ctx, Buffer& buffer, const Sub& sub, uint64_t seed, int node_size, int stop_rank = -1) {
  const int R = ctx.world, me = ctx.rank;
  std::vector<ref::RankInput> all(R);
  std::vector<InputSpec> specs(R, sub.spec);
  for (int r = 0; r < R; ++r) {
    if (r == sub.empty_rank) specs[r].num_tokens = 0;
    all[r] = make_input(seed, r, specs[r]);
    if (sub.quiet_node >= 0) {
      const int E_loc = sub.spec.num_experts / R;
      for (int64_t& e : all[r].topk_idx)
        if (e >= 0 && e / E_loc / node_size == sub.quiet_node) e = -1;
    }
  }
  const InputSpec& s = specs[me];
  const int N = s.num_tokens, K = s.num_topk, E = s.num_experts;
  ref::InternodeShape shape;
  shape.base = shape_of(s, R, 1);
  shape.node_size = node_size;
  shape.num_channels = kChannels;
  const std::vector<ref::InternodeDispatchResult> want = ref::internode_dispatch(all, shape);
  const ref::DispatchResult& mine = want[me].recv;
  if (sub.quiet_node >= 0 && me / node_size == sub.quiet_node)
    REQUIRE(mine.num_recv == 0, sub.name, ": the quiet node's rank ", me, " receives ", mine.num_recv, " rows");

  Inputs d = upload(all[me], s);
  DeviceMem per_rank(4 * R), per_expert(4 * E), in_rank(std::max(1, N * R)), recv_per_expert(4 * (E / R));
  recv_per_expert.fill(0x7F);
  buffer.get_dispatch_layout(View::of(d.topk_idx.get(), DType::kI64, {N, K}), E, View::of(per_rank.get(), DType::kI32, {R}),
                             View::of(per_expert.get(), DType::kI32, {E}),
                             View::of(in_rank.get(), DType::kBool, {N, R}), ctx.stream);
  // A rank without tokens passes null data, as torch's empty tensors do: nothing of what it
  // forwards for other ranks may depend on its own inputs' pointers.
  auto data = [N](const DeviceMem& m) { return N == 0 ? nullptr : m.get(); };
  DispatchInputs in;
  in.x = View::of(data(d.x), s.fp8 ? DType::kFP8E4M3 : DType::kBF16, {N, s.hidden});
  if (s.fp8) in.x_scales = View::strided(data(d.scales), DType::kF32, {N, num_scale_columns(s)}, {1, std::max(N, 1)});
  in.topk_idx = View::of(data(d.topk_idx), DType::kI64, {N, K});
  if (s.with_weights) in.topk_weights = View::of(data(d.topk_weights), DType::kF32, {N, K});
  in.num_tokens_per_rank = View::of(per_rank.get(), DType::kI32, {R});
  in.num_tokens_per_expert = View::of(per_expert.get(), DType::kI32, {E});
  in.is_token_in_rank = View::of(in_rank.get(), DType::kBool, {N, R});

  DispatchHandle handle = buffer.make_handle(N);
  const int nr = buffer.dispatch_notify(in, handle, View::of(recv_per_expert.get(), DType::kI32, {E / R}), ctx.stream);
  REQUIRE(nr == mine.num_recv, sub.name, ": rank ", me, " num_recv ", nr, " want ", mine.num_recv);
  long long max_recv = 0, max_sent = 0;
  for (int r = 0; r < R; ++r) {
    max_recv = std::max<long long>(max_recv, want[r].recv.num_recv);
    const ref::Layout l = ref::get_dispatch_layout(all[r].topk_idx, specs[r].num_tokens, K, E, R);
    long long sent = 0;
    for (int v : l.num_tokens_per_rank) sent += v;
    max_sent = std::max(max_sent, sent);
  }
  REQUIRE(handle.max_recv_tokens == max_recv, sub.name, ": max_recv_tokens ", handle.max_recv_tokens, " want ", max_recv);
  REQUIRE(handle.max_sent_tokens == max_sent, sub.name, ": max_sent_tokens ", handle.max_sent_tokens, " want ", max_sent);
  expect_equal(recv_per_expert.download<int>(E / R), mine.num_recv_tokens_per_expert, E / R,
               sub.name + " num_recv_tokens_per_expert");
  std::vector<int> prefix(R * R);
  download_bytes(prefix.data(), handle.rank_prefix_matrix, 4 * R * R);
  expect_equal(prefix, mine.rank_prefix_matrix, R * R, sub.name + " rank_prefix_matrix");

  Outputs out = alloc_outputs(s, nr);
  if (stop_rank >= 0) {
    if (me == stop_rank) return 0;
    const DispatchOutputs o = output_views(out, s, nr, false);
    try {
      buffer.dispatch(in, handle, o, ctx.stream);
      buffer.synchronize(ctx.stream);
    } catch (const Error& e) {
      const std::string what = e.what();
      REQUIRE(e.kind() == ErrorKind::kTimeout || e.kind() == ErrorKind::kAborted, "rank ", me, ": wrong error kind ",
              error_kind_name(e.kind()), ": ", what);
      const std::string needle = e.kind() == ErrorKind::kTimeout ? "dispatch timed out in phase" : "dispatch aborted in phase";
      REQUIRE(what.find(needle) != std::string::npos && what.find("on rank " + std::to_string(me)) != std::string::npos,
              "rank ", me, ": message lacks '", needle, "' / its rank: ", what);
      REQUIRE(buffer.failed(), "rank ", me, ": a failed dispatch must fail the buffer");
      std::printf("rank %d (rank %d stopped): %s\n", me, stop_rank, what.c_str());
      return e.kind() == ErrorKind::kTimeout ? 1 : 2;
    }
    throw Failure(detail::concat("rank ", me, "'s dispatch completed without rank ", stop_rank));
  }
  buffer.dispatch(in, handle, output_views(out, s, nr, true), ctx.stream);
  buffer.synchronize(ctx.stream);
  check_outputs(out, s, mine, true, sub.name);

  // Combine (the two-level order and rounding of the reference): every rank's expert outputs are
  // regenerable, so the reference is exact.
  std::vector<std::vector<uint16_t>> ys(R);
  std::vector<std::vector<float>> ws(R);
  for (int r = 0; r < R; ++r) {
    ys[r] = expert_rows(seed, r, want[r].recv.num_recv, s.hidden);
    if (s.with_weights) ws[r] = want[r].recv.recv_topk_weights;
  }
  std::vector<uint16_t> b0, b1;
  if (sub.biases) {
    b0 = expert_rows(seed * 7, me + 100, N, s.hidden);
    b1 = expert_rows(seed * 7 + 1, me + 100, N, s.hidden);
  }
  const ref::CombineResult want_c = ref::internode_combine(want, ys, ws, me, shape, s.hidden, b0, b1);
  check_combine(ctx, buffer, handle, nr, out, s, ys[me], want_c, b0, b1, sub.name);

  // Cached re-dispatch: the handle's routing, x (and scales) only, into fresh sentinels.
  DispatchInputs cached;
  cached.x = in.x;
  cached.x_scales = in.x_scales;
  Outputs again = alloc_outputs(s, nr);
  buffer.dispatch(cached, handle, output_views(again, s, nr, false), ctx.stream);
  buffer.synchronize(ctx.stream);
  check_outputs(again, s, mine, false, sub.name + " cached");

  // Worst-case sizing (no host sync): the same rows, then padding (x 0, top-k -1, weights 0, src -1).
  int max_tokens = 0;
  for (const InputSpec& sp : specs) max_tokens = std::max(max_tokens, sp.num_tokens);
  DispatchInputs worst = in;
  worst.num_worst_tokens = std::max(1, max_tokens * R);
  const int64_t rows = worst.num_worst_tokens;
  DispatchHandle hw = buffer.make_handle(N);
  REQUIRE(buffer.dispatch_notify(worst, hw, View{}, ctx.stream) == -1, sub.name, ": worst-case notify returned a count");
  Outputs padded = alloc_outputs(s, rows);
  buffer.dispatch(worst, hw, output_views(padded, s, rows, true), ctx.stream);
  buffer.synchronize(ctx.stream);
  const std::string tag = sub.name + " worst-case";
  check_outputs(padded, s, mine, true, tag);
  const size_t n = mine.num_recv, es = s.fp8 ? 1 : 2;
  const auto x = padded.x.download<uint8_t>(rows * s.hidden * es);
  for (size_t i = n * s.hidden * es; i < x.size(); ++i) REQUIRE(x[i] == 0, tag, " padding recv_x byte ", i);
  const auto idx = padded.topk_idx.download<int64_t>(rows * K);
  for (size_t i = n * K; i < idx.size(); ++i) REQUIRE(idx[i] == -1, tag, " padding recv_topk_idx ", i);
  if (s.with_weights) {
    const auto w = padded.topk_weights.download<float>(rows * K);
    for (size_t i = n * K; i < w.size(); ++i) REQUIRE(w[i] == 0.f, tag, " padding recv_topk_weights ", i);
  }
  const auto src = padded.src_idx.download<int>(rows);
  for (int64_t i = n; i < rows; ++i) REQUIRE(src[i] == -1, tag, " padding recv_src_idx ", i);
  // The worst-case handle's combine: the same bits (the padding rows' x is garbage, ignored).
  check_combine(ctx, buffer, hw, rows, padded, s, ys[me], want_c, b0, b1, tag);
  return 0;
}

// A split's Buffer options: virtual nodes of c.node_size, RDMA rings of 12 messages in chunks of 3
// (every stream wraps).
BufferOptions wrapping_rings(const SplitCase& c) {
  BufferOptions options;
  options.config = case_config();
  options.node_size = c.node_size;
  options.rdma_chunk_tokens = 3;
  options.rdma_ring_slots = 12;
  options.num_rdma_bytes = rdma_bytes(c.world, c.node_size, 3, 12);
  return options;
}

// The emulated network's mode on `buffer` (direct or adversarial); returns the tuning set.
Tuning use_net_mode(Buffer& buffer, EmuMode mode) {
  Tuning t = tuning(buffer);
  t.net_adversarial = mode == EmuMode::kAdversarial;
  set_tuning(buffer, t);
  return t;
}

class InternodeDispatchCombine : public ::testing::TestWithParam<SplitCase> {};

// Every sub-case on rings that wrap (12 messages, chunks of 3), then on DeepEP's (252, 6), one
// Buffer each; the sub-cases run back to back on a Buffer (ring counts carried across ops).
TEST_P(InternodeDispatchCombine, EveryOutputMatchesTheReference) {
  const SplitCase c = GetParam();
  SKIP_WITHOUT_SIM_WORLD(c.world);
  const uint64_t seed = run_seed();
  EXPECT_EQ(run_world(WorldMode::kSim, c.world, 32 << 20, wrapping_rings(c), [&](RankCtx& ctx) {
    REQUIRE(ctx.buffer->num_nodes() == c.world / c.node_size, "num_nodes ", ctx.buffer->num_nodes());
    const Tuning t = use_net_mode(*ctx.buffer, c.mode);
    const std::vector<Sub> subs = subcases(c.world, c.node_size);
    for (const Sub& sub : subs) run_sub(ctx, *ctx.buffer, sub, seed ^ std::hash<std::string>{}(sub.name), c.node_size);
    BufferOptions deep = ctx.options;
    deep.rdma_chunk_tokens = 6;
    deep.rdma_ring_slots = 252;
    deep.num_rdma_bytes = rdma_bytes(c.world, c.node_size, 6, 252);
    Buffer wide(*ctx.comm, 32 << 20, deep);
    set_tuning(wide, t);
    for (const Sub& sub : subs) run_sub(ctx, wide, sub, seed ^ 7 ^ std::hash<std::string>{}(sub.name), c.node_size);
    wide.synchronize(ctx.stream);
  }), 0);
  std::printf("world %d, node size %d, %s: %zu sub-cases on two ring geometries match the reference\n", c.world,
              c.node_size, c.mode == EmuMode::kAdversarial ? "adversarial" : "direct", subcases(c.world, c.node_size).size());
}

INSTANTIATE_TEST_SUITE_P(Splits, InternodeDispatchCombine, ::testing::ValuesIn(splits()), split_name);

// CUDA graph across nodes: layout, worst-case count exchange (no host sync), dispatch and combine
// captured once on a handle a first uncaptured round sized (its forward records are kept), then
// replayed on fresh inputs of the same shapes written into the captured input buffers; every
// replay's outputs against the reference over sentinels.
void run_graph(RankCtx& ctx, Buffer& buffer, uint64_t seed, int node_size) {
  const int R = ctx.world, me = ctx.rank;
  InputSpec s;
  s.num_tokens = 96;
  s.hidden = kHidden;
  s.num_experts = kExperts;
  s.num_topk = 8;
  const int N = s.num_tokens, H = s.hidden, K = s.num_topk, E = s.num_experts;
  const int64_t rows = static_cast<int64_t>(N) * R;
  ref::InternodeShape shape;
  shape.base = shape_of(s, R, 1);
  shape.node_size = node_size;
  shape.num_channels = kChannels;

  Inputs d = upload(make_input(seed, me, s), s);
  DeviceMem per_rank(4 * R), per_expert(4 * E), in_rank(N * R);
  DispatchInputs in;
  in.x = View::of(d.x.get(), DType::kBF16, {N, H});
  in.topk_idx = View::of(d.topk_idx.get(), DType::kI64, {N, K});
  in.topk_weights = View::of(d.topk_weights.get(), DType::kF32, {N, K});
  in.num_tokens_per_rank = View::of(per_rank.get(), DType::kI32, {R});
  in.num_tokens_per_expert = View::of(per_expert.get(), DType::kI32, {E});
  in.is_token_in_rank = View::of(in_rank.get(), DType::kBool, {N, R});
  in.num_worst_tokens = static_cast<int>(rows);
  DispatchHandle handle = buffer.make_handle(N);
  Outputs out = alloc_outputs(s, rows);
  const DispatchOutputs o = output_views(out, s, rows, true);
  DeviceMem y(rows * H * 2), cx(static_cast<size_t>(N) * H * 2), cw(static_cast<size_t>(N) * K * 4);
  CombineInputs ci;
  ci.x = View::of(y.get(), DType::kBF16, {rows, H});
  ci.topk_weights = o.recv_topk_weights;
  CombineOutputs co;
  co.combined_x = View::of(cx.get(), DType::kBF16, {N, H});
  co.combined_topk_weights = View::of(cw.get(), DType::kF32, {N, K});
  auto round = [&](cudaStream_t stream) {
    buffer.get_dispatch_layout(in.topk_idx, E, in.num_tokens_per_rank, in.num_tokens_per_expert, in.is_token_in_rank,
                               stream);
    REQUIRE(buffer.dispatch_notify(in, handle, View{}, stream) == -1, "rank ", me, ": a worst-case notify returned a count");
    buffer.dispatch(in, handle, o, stream);
    buffer.combine(ci, handle, co, stream);
  };
  // Round r's inputs into the buffers the ops read, outputs to sentinels; then its checks.
  auto prepare = [&](uint64_t round_seed, std::vector<ref::InternodeDispatchResult>& want,
                     std::vector<std::vector<uint16_t>>& ys, std::vector<std::vector<float>>& ws) {
    std::vector<ref::RankInput> all(R);
    for (int r = 0; r < R; ++r) all[r] = make_input(round_seed, r, s);
    want = ref::internode_dispatch(all, shape);
    Inputs fresh = upload(all[me], s);
    copy_device_bytes(d.x.get(), fresh.x.get(), d.x.bytes());
    copy_device_bytes(d.topk_idx.get(), fresh.topk_idx.get(), d.topk_idx.bytes());
    copy_device_bytes(d.topk_weights.get(), fresh.topk_weights.get(), d.topk_weights.bytes());
    ys.assign(R, {});
    ws.assign(R, {});
    for (int r = 0; r < R; ++r) {
      ys[r] = expert_rows(round_seed, r, want[r].recv.num_recv, H);
      ws[r] = want[r].recv.recv_topk_weights;
    }
    std::vector<uint16_t> y_rows(rows * H, ref::float_to_bf16(1000.f));  // rows past the received: ignored
    std::copy(ys[me].begin(), ys[me].end(), y_rows.begin());
    y.upload(y_rows.data(), y_rows.size() * 2);
    for (DeviceMem* m : {&out.x, &out.topk_idx, &out.topk_weights, &out.src_idx, &cx, &cw}) m->fill(0x7F);
    ctx.comm->barrier();
  };
  auto check = [&](const std::vector<ref::InternodeDispatchResult>& want, const std::vector<std::vector<uint16_t>>& ys,
                   const std::vector<std::vector<float>>& ws, const std::string& tag) {
    check_outputs(out, s, want[me].recv, true, tag);
    const auto idx = out.topk_idx.download<int64_t>(rows * K);
    for (size_t i = want[me].recv.num_recv * K; i < idx.size(); ++i)
      REQUIRE(idx[i] == -1, tag, " padding recv_topk_idx ", i);
    check_combined(cx, cw, s, ref::internode_combine(want, ys, ws, me, shape, H, {}, {}), me, tag);
  };

  std::vector<ref::InternodeDispatchResult> want;
  std::vector<std::vector<uint16_t>> ys;
  std::vector<std::vector<float>> ws;
  prepare(seed, want, ys, ws);
  round(ctx.stream);
  buffer.synchronize(ctx.stream);
  check(want, ys, ws, "uncaptured round");

  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CUDA_OK(cudaStreamBeginCapture(ctx.stream, cudaStreamCaptureModeThreadLocal));
  round(ctx.stream);
  CUDA_OK(cudaStreamEndCapture(ctx.stream, &graph));
  CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
  for (int replay = 0; replay < 3; ++replay) {
    prepare(seed + 1000 * (replay + 1), want, ys, ws);
    CUDA_OK(cudaGraphLaunch(exec, ctx.stream));
    buffer.synchronize(ctx.stream);
    check(want, ys, ws, "graph replay " + std::to_string(replay));
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
}

class InternodeGraph : public ::testing::TestWithParam<SplitCase> {};

TEST_P(InternodeGraph, CapturedWorstCaseRoundReplaysExactly) {
  const SplitCase c = GetParam();
  SKIP_WITHOUT_SIM_WORLD(c.world);
  const uint64_t seed = run_seed();
  EXPECT_EQ(run_world(WorldMode::kSim, c.world, 32 << 20, wrapping_rings(c), [&](RankCtx& ctx) {
    use_net_mode(*ctx.buffer, c.mode);
    run_graph(ctx, *ctx.buffer, seed, c.node_size);
  }), 0);
  std::printf("world %d, node size %d, %s: a captured round and 3 replays match the reference\n", c.world,
              c.node_size, c.mode == EmuMode::kAdversarial ? "adversarial" : "direct");
}

INSTANTIATE_TEST_SUITE_P(Splits, InternodeGraph,
                         ::testing::Values(SplitCase{4, 2, EmuMode::kDirect}, SplitCase{8, 4, EmuMode::kDirect},
                                           SplitCase{8, 2, EmuMode::kAdversarial}),
                         split_name);

// The Buffer's checks across nodes (4 ranks in 2 virtual nodes of 2).
class InternodeErrors : public ::testing::TestWithParam<int> {};

TEST_P(InternodeErrors, RdmaBytesAreNamed) {
  SKIP_WITHOUT_SIM_WORLD(GetParam());
  const uint64_t seed = run_seed();
  EXPECT_EQ(run_world(WorldMode::kSim, GetParam(), 32 << 20, case_config(), [&](RankCtx& ctx) {
    const int R = ctx.world;
    BufferOptions split = ctx.options;
    split.node_size = 2;
    require_error([&] { Buffer b(*ctx.comm, 32 << 20, split); }, ErrorKind::kInvalidArgument,
                  {"num_rdma_bytes", "2 virtual nodes of 2", "got 0"});
    split.num_rdma_bytes = 4096;
    const size_t minimum =
        plan::rdma_bytes_for(plan::RdmaShape{R, 2, kChannels, split.rdma_chunk_tokens, split.rdma_ring_slots, 16, 0});
    require_error([&] { Buffer b(*ctx.comm, 32 << 20, split); }, ErrorKind::kBufferTooSmall,
                  {"num_rdma_bytes", std::to_string(minimum)});
    // Enough for 16-byte rows only: a dispatch of kHidden bf16 rows names the bytes its rings need.
    split.num_rdma_bytes = minimum;
    Buffer b(*ctx.comm, 32 << 20, split);
    InputSpec spec;
    spec.num_tokens = 32;
    spec.hidden = kHidden;
    spec.num_experts = 16;
    spec.num_topk = 4;
    const ref::RankInput input = make_input(seed, ctx.rank, spec);
    const size_t need = plan::rdma_bytes_for(plan::RdmaShape{R, 2, kChannels, split.rdma_chunk_tokens,
                                                             split.rdma_ring_slots, 2 * kHidden, 4});
    Inputs d = upload(input, spec);
    DeviceMem per_rank(4 * R), per_expert(4 * spec.num_experts), in_rank(spec.num_tokens * R);
    const int N = spec.num_tokens, K = spec.num_topk, E = spec.num_experts;
    b.get_dispatch_layout(View::of(d.topk_idx.get(), DType::kI64, {N, K}), E, View::of(per_rank.get(), DType::kI32, {R}),
                          View::of(per_expert.get(), DType::kI32, {E}), View::of(in_rank.get(), DType::kBool, {N, R}),
                          ctx.stream);
    DispatchInputs in;
    in.x = View::of(d.x.get(), DType::kBF16, {N, spec.hidden});
    in.topk_idx = View::of(d.topk_idx.get(), DType::kI64, {N, K});
    in.topk_weights = View::of(d.topk_weights.get(), DType::kF32, {N, K});
    in.num_tokens_per_rank = View::of(per_rank.get(), DType::kI32, {R});
    in.num_tokens_per_expert = View::of(per_expert.get(), DType::kI32, {E});
    in.is_token_in_rank = View::of(in_rank.get(), DType::kBool, {N, R});
    DispatchHandle h = b.make_handle(N);
    const int nr = b.dispatch_notify(in, h, View{}, ctx.stream);
    Outputs out = alloc_outputs(spec, nr);
    const DispatchOutputs o = output_views(out, spec, nr, false);
    require_error([&] { b.dispatch(in, h, o, ctx.stream); }, ErrorKind::kBufferTooSmall,
                  {"num_rdma_bytes", std::to_string(need)});
    b.reset();
  }), 0);
}

// A rank that stops launching (after the count exchange): its peers on both nodes fail within the
// wait bound (2 s), at least one with a timeout naming the op; after reset() on every rank the
// dispatch is exact again.
TEST_P(InternodeErrors, RankThatStopsLaunchingFailsItsPeersAndResetRecovers) {
  SKIP_WITHOUT_SIM_WORLD(GetParam());
  const uint64_t seed = run_seed();
  const int world = GetParam(), node_size = 2;
  BufferOptions options;
  options.config = case_config();
  options.config.timeout_s = 2;
  options.node_size = node_size;
  options.rdma_chunk_tokens = 3;
  options.rdma_ring_slots = 12;
  options.num_rdma_bytes = rdma_bytes(world, node_size, 3, 12);
  EXPECT_EQ(run_world(WorldMode::kSim, world, 32 << 20, options, [&](RankCtx& ctx) {
    const Sub sub = subcases(world, node_size).front();
    Buffer& b = *ctx.buffer;
    run_sub(ctx, b, sub, seed, node_size);
    const int stopped = ctx.world - 1;
    const char seen = static_cast<char>(run_sub(ctx, b, sub, seed + 1, node_size, stopped));
    std::vector<char> all(ctx.world);
    ctx.comm->all_gather(&seen, all.data(), 1, 120);
    bool timed_out = false;
    for (int r = 0; r < ctx.world; ++r) {
      REQUIRE(r == stopped || all[r] != 0, "rank ", r, " saw no error");
      timed_out = timed_out || all[r] == 1;
    }
    REQUIRE(timed_out, "no rank timed out waiting for rank ", stopped);
    b.reset();  // every rank, the stopped one included
    run_sub(ctx, b, sub, seed + 2, node_size);
  }), 0);
}

INSTANTIATE_TEST_SUITE_P(Sim, InternodeErrors, ::testing::Values(4),
                         [](const ::testing::TestParamInfo<int>& info) { return "sim_world" + std::to_string(info.param); });

}  // namespace
}  // namespace epx::test
