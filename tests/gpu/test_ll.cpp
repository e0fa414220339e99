// Low-latency dispatch/combine on 2-8 ranks (real GPUs or a SimWorld) against the CPU reference:
// fp8 (float and UE8M0 scales) and bf16, -1 slots, N = 0 and N = T, hook and non-hook, zero-copy,
// double buffering, CUDA graph replay, 1000 alternating iterations.
#include <cuda_runtime_api.h>

#include "gpu/harness.hpp"
#include "reference/reference_ll.hpp"

namespace epx::test {
namespace {

struct LlSpec {
  std::string name;
  int T = 64, H = 2048, K = 8, experts_per_rank = 16;
  bool fp8 = true, ue8m0 = false, round_scale = false, hook = false, zero_copy = false;
  bool zero_copy_without_x = false;  // zero-copy combine given no x (it reads the buffer)
  double drop = 0.1;
  int empty_rank = -1;  // N = 0 there; every other rank has N = T - rank (rank 0: N = T)
};

ref::LlRankInput ll_input(uint64_t seed, int rank, const LlSpec& s, int world) {
  InputSpec is;
  is.num_tokens = rank == s.empty_rank ? 0 : s.T - rank;
  is.hidden = s.H;
  is.num_topk = s.K;
  is.num_experts = s.experts_per_rank * world;
  is.drop_prob = s.drop;
  is.with_weights = false;
  ref::RankInput in = make_input(seed, rank, is);
  ref::LlRankInput out;
  out.num_tokens = in.num_tokens;
  out.x.resize(in.x.size() / 2);
  std::memcpy(out.x.data(), in.x.data(), in.x.size());
  out.topk_idx = in.topk_idx;
  return out;
}

std::vector<float> ll_weights(uint64_t seed, int rank, int n, int k) {
  std::mt19937_64 rng(seed * 131 + rank);
  std::uniform_real_distribution<float> u(0.f, 1.f);
  std::vector<float> w(static_cast<size_t>(n) * k);
  for (auto& v : w) v = u(rng);
  return w;
}

// Rank r's expert outputs: random bf16 on the rows its dispatch filled, 0 elsewhere.
std::vector<uint16_t> ll_expert_outputs(uint64_t seed, int rank, const ref::LlDispatchResult& d) {
  const int RT = d.num_ranks * d.num_max_dispatch_tokens_per_rank, H = d.hidden;
  std::vector<uint16_t> y(static_cast<size_t>(d.num_local_experts) * RT * H, 0);
  std::mt19937_64 rng(seed * 977 + rank);
  std::uniform_real_distribution<float> u(-2.f, 2.f);
  for (int j = 0; j < d.num_local_experts; ++j)
    for (int row = 0; row < d.recv_count[j]; ++row)
      for (int h = 0; h < H; ++h) y[(static_cast<size_t>(j) * RT + row) * H + h] = ref::float_to_bf16(u(rng));
  return y;
}

// Device tensors of one low-latency dispatch.
struct LlOut {
  int E_loc, RT, H, C;
  bool fp8, ue8m0;
  DeviceMem x, scales, count, src_info, range, slot;
  LlOut(int e_loc, int rt, int h, bool f, bool u)
      : E_loc(e_loc), RT(rt), H(h), C(u ? (h / 128 + 3) / 4 : h / 128), fp8(f), ue8m0(u),
        x(static_cast<size_t>(e_loc) * rt * h * (f ? 1 : 2)), scales(static_cast<size_t>(e_loc) * rt * C * 4),
        count(4 * e_loc), src_info(4 * static_cast<size_t>(e_loc) * rt), range(8 * static_cast<size_t>(e_loc) * 8),
        slot(4 * static_cast<size_t>(e_loc) * rt) {
    for (DeviceMem* m : {&x, &scales, &count, &src_info, &range, &slot}) m->fill(0x7F);
  }
  LowLatencyDispatchOutputs view(int R) const {
    LowLatencyDispatchOutputs o;
    o.recv_x = View::of(x.get(), fp8 ? DType::kFP8E4M3 : DType::kBF16, {E_loc, RT, H});
    if (fp8)
      o.recv_scales = View::strided(scales.get(), ue8m0 ? DType::kI32 : DType::kF32, {E_loc, RT, C},
                                    {static_cast<int64_t>(RT) * C, 1, RT});
    o.recv_count = View::of(count.get(), DType::kI32, {E_loc});
    o.src_info = View::of(src_info.get(), DType::kI32, {E_loc, RT});
    o.layout_range = View::of(range.get(), DType::kI64, {E_loc, R});
    o.src_topk_slot = View::of(slot.get(), DType::kI32, {E_loc, RT});
    return o;
  }
};

// Compares the valid rows of every local expert with the reference.
void check_ll_recv(const LlOut& o, const ref::LlDispatchResult& want, int R, const std::string& tag) {
  const int E_loc = o.E_loc, RT = o.RT;
  expect_equal(o.count.download<int>(E_loc), want.recv_count, E_loc, tag + " recv_count");
  expect_equal(o.range.download<int64_t>(static_cast<size_t>(E_loc) * R), want.layout_range,
               static_cast<size_t>(E_loc) * R, tag + " layout_range");
  const size_t rb = want.row_bytes;
  auto x = o.x.download<uint8_t>(static_cast<size_t>(E_loc) * RT * rb);
  auto info = o.src_info.download<int>(static_cast<size_t>(E_loc) * RT);
  auto slot = o.slot.download<int>(static_cast<size_t>(E_loc) * RT);
  auto sc = o.scales.download<uint32_t>(static_cast<size_t>(E_loc) * RT * o.C);
  for (int j = 0; j < E_loc; ++j) {
    const int n = want.recv_count[j];
    const size_t first = static_cast<size_t>(j) * RT;
    REQUIRE(std::memcmp(&x[first * rb], &want.recv_x[first * rb], n * rb) == 0, tag, " recv_x of local expert ", j);
    REQUIRE(std::memcmp(&info[first], &want.src_info[first], n * 4) == 0, tag, " src_info of local expert ", j);
    REQUIRE(std::memcmp(&slot[first], &want.src_topk_slot[first], n * 4) == 0, tag, " src_topk_slot of expert ", j);
    if (!o.fp8) continue;
    for (int c = 0; c < o.C; ++c) {
      const size_t at = first * o.C + static_cast<size_t>(c) * RT;
      const void* w = o.ue8m0 ? static_cast<const void*>(&want.recv_scales_ue8m0[at]) : &want.recv_scales[at];
      REQUIRE(std::memcmp(&sc[at], w, n * 4) == 0, tag, " recv_scales of local expert ", j, " column ", c);
    }
  }
}

struct LlRun {
  std::vector<ref::LlRankInput> inputs;      // what the ranks pass to the GPU
  std::vector<ref::LlRankInput> ref_inputs;  // what the reference sees (inputs, or without rank `dead`)
  std::vector<ref::LlDispatchResult> want;
  std::vector<std::vector<uint16_t>> y;
  std::vector<float> weights;
};

// dead >= 0 (shrink mode): the reference as if rank `dead` had no tokens and every top-k slot
// naming one of its experts were -1 (its experts receive nothing and contribute nothing); the GPU
// inputs keep those slots, the kernels drop them.
LlRun make_run(RankCtx& ctx, const LlSpec& s, uint64_t seed, int dead = -1) {
  const int R = ctx.world;
  LlRun run;
  for (int r = 0; r < R; ++r) run.inputs.push_back(ll_input(seed, r, s, R));
  run.ref_inputs = run.inputs;
  if (dead >= 0) {
    run.ref_inputs[dead] = ref::LlRankInput{};
    for (ref::LlRankInput& in : run.ref_inputs)
      for (int64_t& e : in.topk_idx)
        if (e >= 0 && e / s.experts_per_rank == dead) e = -1;
  }
  for (int r = 0; r < R; ++r)
    run.want.push_back(
        ref::ll_dispatch(run.ref_inputs, r, s.T, s.H, s.K, s.experts_per_rank * R, s.fp8, s.round_scale, s.ue8m0));
  for (int r = 0; r < R; ++r) run.y.push_back(ll_expert_outputs(seed, r, run.want[r]));
  run.weights = ll_weights(seed, ctx.rank, run.inputs[ctx.rank].num_tokens, s.K);
  return run;
}

// A dispatch of one round, checked, and what its combine needs.
struct LlDispatched {
  LlRun run;
  std::string tag;
  int N = 0;
  DeviceMem x, topk, w;
  LowLatencyDispatchArgs args;
  LowLatencyHandle handle;
};

// The dispatch of `s` (fresh inputs from `seed`), checked against the reference. With `dead` >= 0
// (shrink mode) that rank takes no part, and the reference is make_run's without it.
LlDispatched ll_round_dispatch(RankCtx& ctx, const LlSpec& s, uint64_t seed, LlOut& out, int dead = -1) {
  const int R = ctx.world, me = ctx.rank, E = s.experts_per_rank * R;
  LlDispatched d;
  d.run = make_run(ctx, s, seed, dead);
  d.tag = dead >= 0 ? s.name + " without rank " + std::to_string(dead) : s.name;
  d.N = d.run.inputs[me].num_tokens;
  d.x = DeviceMem::from(d.run.inputs[me].x);
  d.topk = DeviceMem::from(d.run.inputs[me].topk_idx);
  d.w = DeviceMem::from(d.run.weights);
  LowLatencyDispatchArgs& a = d.args;
  a.x = View::of(d.x.get(), DType::kBF16, {d.N, s.H});
  a.topk_idx = View::of(d.topk.get(), DType::kI64, {d.N, s.K});
  a.num_max_dispatch_tokens_per_rank = s.T;
  a.num_experts = E;
  a.use_fp8 = s.fp8;
  a.round_scale = s.round_scale;
  a.scale_format = s.ue8m0 ? LowLatencyScale::kUE8M0 : LowLatencyScale::kFloat;
  a.return_recv_hook = s.hook;
  const int b = ctx.buffer->next_low_latency_buffer();
  d.handle = ctx.buffer->low_latency_dispatch(a, out.view(R), ctx.stream);
  if (s.hook) ctx.buffer->low_latency_receive(b, ctx.stream);
  ctx.buffer->synchronize(ctx.stream);
  check_ll_recv(out, d.run.want[me], R, d.tag);
  return d;
}

// The combine of that round: expert outputs into a user tensor, or straight into the zero-copy
// buffer (s.zero_copy; x then left out when s.zero_copy_without_x: the combine must read the
// buffer); checked bitwise against the reference.
void ll_round_combine(RankCtx& ctx, const LlSpec& s, LlDispatched& d, const LlOut& out) {
  const int R = ctx.world, me = ctx.rank, E = s.experts_per_rank * R, RT = R * s.T, N = d.N;
  DeviceMem y_user;
  View y;
  if (s.zero_copy) {
    y = ctx.buffer->next_combine_buffer(d.handle);
    upload_bytes(y.data, d.run.y[me].data(), d.run.y[me].size() * 2);
  } else {
    y_user = DeviceMem::from(d.run.y[me]);
    y = View::of(y_user.get(), DType::kBF16, {out.E_loc, RT, s.H});
  }
  DeviceMem combined(static_cast<size_t>(N) * s.H * 2);
  combined.fill(0x7F);
  LowLatencyCombineArgs ca;
  ca.x = s.zero_copy && s.zero_copy_without_x ? View{} : y;
  ca.zero_copy = s.zero_copy;
  ca.topk_idx = d.args.topk_idx;
  ca.topk_weights = View::of(d.w.get(), DType::kF32, {N, s.K});
  ca.return_recv_hook = s.hook;
  const int cb = ctx.buffer->next_low_latency_buffer();
  const int used = ctx.buffer->low_latency_combine(ca, d.handle, View::of(combined.get(), DType::kBF16, {N, s.H}),
                                                   ctx.stream);
  REQUIRE(used == cb, "low_latency_combine returned buffer ", used, ", next_low_latency_buffer() said ", cb);
  if (s.hook) ctx.buffer->low_latency_receive(cb, ctx.stream);
  ctx.buffer->synchronize(ctx.stream);
  const auto want =
      ref::ll_combine(d.run.want, d.run.y, me, d.run.ref_inputs[me].topk_idx, d.run.weights, N, s.K, s.H, s.T, E);
  expect_equal(combined.download<uint16_t>(static_cast<size_t>(N) * s.H), want, static_cast<size_t>(N) * s.H,
               d.tag + " combined", token_rows(me, s.H));
}

// One dispatch + combine of `s` (fresh inputs from `seed`), checked against the reference.
void ll_round(RankCtx& ctx, const LlSpec& s, uint64_t seed, LlOut& out, int dead = -1) {
  if (ctx.rank == dead) return;
  LlDispatched d = ll_round_dispatch(ctx, s, seed, out, dead);
  ll_round_combine(ctx, s, d, out);
}

std::vector<LlSpec> ll_cases() {
  std::vector<LlSpec> v;
  { LlSpec s; s.name = "fp8 float scales h7168 k8"; s.H = 7168; s.T = 128; v.push_back(s); }
  { LlSpec s; s.name = "fp8 ue8m0 h2048 hook"; s.ue8m0 = true; s.hook = true; v.push_back(s); }
  { LlSpec s; s.name = "fp8 round_scale h4096 zero-copy"; s.H = 4096; s.round_scale = true; s.zero_copy = true; v.push_back(s); }
  { LlSpec s; s.name = "bf16 h2048 hook zero-copy no x"; s.fp8 = false; s.hook = true; s.zero_copy = true;
    s.zero_copy_without_x = true; v.push_back(s); }
  { LlSpec s; s.name = "bf16 h8192 empty rank 1"; s.fp8 = false; s.H = 8192; s.T = 32; s.empty_rank = 1; v.push_back(s); }
  { LlSpec s; s.name = "fp8 h1152 k4 many -1"; s.H = 1152; s.K = 4; s.drop = 0.7; v.push_back(s); }
  { LlSpec s; s.name = "fp8 h2048 k16 e4"; s.K = 16; s.experts_per_rank = 8; s.drop = 0; v.push_back(s); }
  { LlSpec s; s.name = "fp8 T1024 h1024 k8"; s.T = 1024; s.H = 1024; s.experts_per_rank = 8; v.push_back(s); }
  return v;
}

// Region bytes for every spec, with the zero-copy buffers for those that use them.
size_t ll_bytes_for(const std::vector<LlSpec>& specs, int R) {
  size_t m = 0;
  for (const auto& s : specs)
    m = std::max(m, Buffer::low_latency_size_hint(s.T, s.H, R, s.experts_per_rank * R, s.K, s.zero_copy));
  return m;
}

// kIfRoom: the zero-copy buffers are placed for every op shape the region holds them for (the
// zero-copy specs, which ll_bytes_for sized with them).
int run_ll_world(WorldMode mode, int world, const std::function<void(RankCtx&)>& body, size_t ll_bytes,
                 LlZeroCopy zero_copy = LlZeroCopy::kIfRoom) {
  BufferOptions options;
  options.num_ll_bytes = ll_bytes;
  options.ll_zero_copy = zero_copy;
  return run_world(mode, world, 64 << 20, options, body);
}

std::vector<int> mask_status(RankCtx& ctx) {
  DeviceMem status(4 * ctx.world);
  status.fill(0x7F);
  ctx.buffer->low_latency_query_mask_buffer(View::of(status.get(), DType::kI32, {ctx.world}), ctx.stream);
  return status.download<int>(ctx.world);
}

void run_shrink(RankCtx& ctx) {
  const int R = ctx.world, me = ctx.rank, dead = R - 1;
  LlSpec s;
  s.name = "shrink fp8 h2048";
  LlSpec hook = s;
  hook.name = "shrink fp8 h2048 hook";
  hook.hook = true;
  LlOut out(s.experts_per_rank, R * s.T, s.H, true, false);
  const uint64_t seed = ctx.seed * 7 + 3;
  ll_round(ctx, s, seed, out);  // everyone: exact
  REQUIRE(mask_status(ctx) == std::vector<int>(R, 0), "no rank is masked at first");

  // Masked by hand on the survivors: `dead` takes no part.
  if (me != dead) ctx.buffer->low_latency_update_mask_buffer(dead, true);
  ll_round(ctx, s, seed + 1, out, dead);
  ll_round(ctx, hook, seed + 2, out, dead);
  if (me != dead) {
    std::vector<int> want(R, 0);
    want[dead] = 1;
    REQUIRE(mask_status(ctx) == want, "rank ", dead, " masked by hand");
    ctx.buffer->low_latency_clean_mask_buffer();
    REQUIRE(mask_status(ctx) == std::vector<int>(R, 0), "clean_mask_buffer unmasks every rank");
  }

  // Masked by a timeout: the survivors' first wait for `dead` (2 s) masks it and the op goes on.
  Config saved = ctx.buffer->config();
  if (me != dead) {
    Config quick = saved;
    quick.timeout_s = 2;
    ctx.buffer->set_config(quick);
  }
  ll_round(ctx, s, seed + 3, out, dead);
  if (me != dead) {
    std::vector<int> want(R, 0);
    want[dead] = 1;
    REQUIRE(mask_status(ctx) == want, "rank ", dead, " masked by its timeout");
    REQUIRE(!ctx.buffer->failed(), "a timeout in shrink mode masks instead of failing");
    ctx.buffer->set_config(saved);
  }

  // `dead` comes back: every rank cleans the low-latency state (collective), unmasks, and 100
  // rounds (hook and not, alternating) are exact again: nothing of the masked rounds is left.
  ctx.buffer->clean_low_latency_buffer();
  ctx.buffer->low_latency_clean_mask_buffer();
  REQUIRE(mask_status(ctx) == std::vector<int>(R, 0), "no rank is masked after the rejoin");
  for (int round = 0; round < 100; ++round) ll_round(ctx, round % 2 ? hook : s, seed + 10 + round, out);
  if (me == 0)
    std::printf("[world %d] shrink: rank %d masked by hand and by timeout, then back, 100 exact rounds\n", R, dead);
}

class LlWorld : public ::testing::TestWithParam<WorldParam> {};

TEST_P(LlWorld, MatchesReferenceInEveryMode) {
  const WorldMode mode = GetParam().mode;
  const int world = GetParam().world;
  SKIP_UNLESS_RUNNABLE(mode, world);
  const auto specs = ll_cases();
  EXPECT_EQ(run_ll_world(mode, world, [&](RankCtx& ctx) {
    for (const LlSpec& s : specs) {
      LlOut out(s.experts_per_rank, world * s.T, s.H, s.fp8, s.ue8m0);
      ll_round(ctx, s, ctx.seed ^ std::hash<std::string>{}(s.name), out);
      if (ctx.rank == 0) std::printf("[world %d] ll case %-32s ok\n", world, s.name.c_str());
    }
  }, ll_bytes_for(specs, world)), 0);
}

// Two micro-batches in flight: both sends, then both receives, then both combines (hooks).
TEST_P(LlWorld, DoubleBufferedMicroBatchesAndStats) {
  const WorldMode mode = GetParam().mode;
  const int world = GetParam().world;
  SKIP_UNLESS_RUNNABLE(mode, world);
  LlSpec s;
  s.name = "double buffering";
  s.hook = true;
  EXPECT_EQ(run_ll_world(mode, world, [&](RankCtx& ctx) {
    const int R = ctx.world, me = ctx.rank, E = s.experts_per_rank * R, E_loc = s.experts_per_rank;
    LlRun run[2] = {make_run(ctx, s, ctx.seed + 11), make_run(ctx, s, ctx.seed + 12)};
    std::vector<std::unique_ptr<LlOut>> out;
    DeviceMem x[2], topk[2], w[2], y[2], comb[2];
    LowLatencyHandle h[2];
    int bufs[2];
    DeviceMem stats(4 * E_loc), waits(8 * R);
    stats.fill(0);
    waits.fill(0);
    auto dispatch_args = [&](int m) {
      const int N = run[m].inputs[me].num_tokens;
      LowLatencyDispatchArgs a;
      a.x = View::of(x[m].get(), DType::kBF16, {N, s.H});
      a.topk_idx = View::of(topk[m].get(), DType::kI64, {N, s.K});
      a.num_max_dispatch_tokens_per_rank = s.T;
      a.num_experts = E;
      a.return_recv_hook = true;
      a.cumulative_local_expert_recv_stats = View::of(stats.get(), DType::kI32, {E_loc});
      a.dispatch_wait_recv_cost_stats = View::of(waits.get(), DType::kI64, {R});
      return a;
    };
    for (int m = 0; m < 2; ++m) {
      out.emplace_back(new LlOut(E_loc, R * s.T, s.H, true, false));
      x[m] = DeviceMem::from(run[m].inputs[me].x);
      topk[m] = DeviceMem::from(run[m].inputs[me].topk_idx);
      w[m] = DeviceMem::from(run[m].weights);
      bufs[m] = ctx.buffer->next_low_latency_buffer();
      h[m] = ctx.buffer->low_latency_dispatch(dispatch_args(m), out[m]->view(R), ctx.stream);
    }
    // Other GPU work between send and receive: nothing is held, results stay right.
    DeviceMem scratch(64 << 20);
    for (int i = 0; i < 10; ++i) CUDA_OK(cudaMemsetAsync(scratch.get(), i, 64 << 20, ctx.stream));
    for (int m = 0; m < 2; ++m) ctx.buffer->low_latency_receive(bufs[m], ctx.stream);
    ctx.buffer->synchronize(ctx.stream);
    std::vector<int> expect_stats(E_loc, 0);
    for (int m = 0; m < 2; ++m) {
      check_ll_recv(*out[m], run[m].want[me], R, "micro-batch " + std::to_string(m));
      for (int j = 0; j < E_loc; ++j) expect_stats[j] += run[m].want[me].recv_count[j];
    }
    expect_equal(stats.download<int>(E_loc), expect_stats, E_loc, "cumulative_local_expert_recv_stats");
    for (int m = 0; m < 2; ++m) {
      const int N = run[m].inputs[me].num_tokens;
      y[m] = DeviceMem::from(run[m].y[me]);
      comb[m] = DeviceMem(static_cast<size_t>(N) * s.H * 2);
      LowLatencyCombineArgs ca;
      ca.x = View::of(y[m].get(), DType::kBF16, {E_loc, R * s.T, s.H});
      ca.topk_idx = View::of(topk[m].get(), DType::kI64, {N, s.K});
      ca.topk_weights = View::of(w[m].get(), DType::kF32, {N, s.K});
      ca.return_recv_hook = true;
      bufs[m] = ctx.buffer->next_low_latency_buffer();
      ctx.buffer->low_latency_combine(ca, h[m], View::of(comb[m].get(), DType::kBF16, {N, s.H}), ctx.stream);
    }
    for (int m = 0; m < 2; ++m) ctx.buffer->low_latency_receive(bufs[m], ctx.stream);
    ctx.buffer->synchronize(ctx.stream);
    for (int m = 0; m < 2; ++m) {
      const int N = run[m].inputs[me].num_tokens;
      const auto want = ref::ll_combine(run[m].want, run[m].y, me, run[m].inputs[me].topk_idx, run[m].weights, N, s.K,
                                        s.H, s.T, E);
      expect_equal(comb[m].download<uint16_t>(static_cast<size_t>(N) * s.H), want, static_cast<size_t>(N) * s.H,
                   "micro-batch combine " + std::to_string(m), token_rows(me, s.H));
    }
    // A third op while both buffers hold unreceived sends is refused on every rank; like every
    // failed collective op it fails the Buffer, and a collective reset() makes it usable again.
    for (int m = 0; m < 2; ++m) {
      bufs[m] = ctx.buffer->next_low_latency_buffer();
      h[m] = ctx.buffer->low_latency_dispatch(dispatch_args(m), out[m]->view(R), ctx.stream);
    }
    try {
      ctx.buffer->low_latency_combine({}, h[0], View{}, ctx.stream);
      throw Failure("third in-flight low-latency op was accepted");
    } catch (const Error& e) {
      REQUIRE(e.kind() == ErrorKind::kState && std::string(e.what()).find("in flight") != std::string::npos, e.what());
    }
    ctx.buffer->reset();
    REQUIRE(ctx.buffer->next_low_latency_buffer() == 0, "reset: the next low-latency buffer is 0");
    if (me == 0) std::printf("[world %d] two micro-batches in flight, hooks, stats ok\n", R);
  }, ll_bytes_for({s}, world)), 0);
}

// The spec of the graph tests: small and bf16, so that rounds are cheap.
LlSpec graph_spec() {
  LlSpec s;
  s.name = "graph";
  s.fp8 = false;
  s.T = 16;
  s.H = 512;
  s.K = 4;
  s.experts_per_rank = 4;
  return s;
}

// One rank's dispatch -> (user copy of the expert outputs) -> combine with fixed tensors and
// shapes (N = T - rank tokens), so it can be captured once into a CUDA graph and replayed: fresh
// inputs go into the same tensors (outputs sentinel-filled) before each run.
struct LlFixedRound {
  RankCtx& ctx;
  LlSpec s;
  int N;
  LlOut out;
  DeviceMem x, topk, w, y_host_side, y, comb;
  LowLatencyDispatchArgs a;
  LowLatencyCombineArgs ca;
  View comb_v;

  LlFixedRound(RankCtx& c, const LlSpec& spec)
      : ctx(c), s(spec), N(spec.T - c.rank), out(spec.experts_per_rank, c.world * spec.T, spec.H, false, false),
        x(static_cast<size_t>(N) * s.H * 2), topk(static_cast<size_t>(N) * s.K * 8), w(static_cast<size_t>(N) * s.K * 4),
        y_host_side(out.x.bytes()), y(out.x.bytes()), comb(static_cast<size_t>(N) * s.H * 2) {
    REQUIRE(!s.fp8 && s.empty_rank < 0, "LlFixedRound: bf16 and N = T - rank on every rank");
    a.x = View::of(x.get(), DType::kBF16, {N, s.H});
    a.topk_idx = View::of(topk.get(), DType::kI64, {N, s.K});
    a.num_max_dispatch_tokens_per_rank = s.T;
    a.num_experts = s.experts_per_rank * ctx.world;
    a.use_fp8 = false;
    ca.x = View::of(y.get(), DType::kBF16, {out.E_loc, out.RT, s.H});
    ca.topk_idx = a.topk_idx;
    ca.topk_weights = View::of(w.get(), DType::kF32, {N, s.K});
    comb_v = View::of(comb.get(), DType::kBF16, {N, s.H});
  }
  // The round's inputs and expert outputs into the fixed tensors; every output to sentinels.
  void upload(const LlRun& run) {
    const int me = ctx.rank;
    x.upload(run.inputs[me].x.data(), run.inputs[me].x.size() * 2);
    topk.upload(run.inputs[me].topk_idx.data(), run.inputs[me].topk_idx.size() * 8);
    w.upload(run.weights.data(), run.weights.size() * 4);
    y_host_side.upload(run.y[me].data(), run.y[me].size() * 2);
    for (DeviceMem* m : {&out.x, &out.count, &out.src_info, &out.range, &out.slot, &comb}) m->fill(0x7F);
  }
  // The ops, on ctx.stream (captured or not).
  void enqueue() {
    const LowLatencyHandle h = ctx.buffer->low_latency_dispatch(a, out.view(ctx.world), ctx.stream);
    CUDA_OK(cudaMemcpyAsync(y.get(), y_host_side.get(), y.bytes(), cudaMemcpyDeviceToDevice, ctx.stream));
    ctx.buffer->low_latency_combine(ca, h, comb_v, ctx.stream);
  }
  // After the stream is done: the received rows and the combine against the reference of `run`
  // (without its dead rank, if make_run had one).
  void check(const LlRun& run, const std::string& tag) {
    const int me = ctx.rank;
    check_ll_recv(out, run.want[me], ctx.world, tag);
    const auto want = ref::ll_combine(run.want, run.y, me, run.ref_inputs[me].topk_idx, run.weights, N, s.K, s.H,
                                      s.T, a.num_experts);
    expect_equal(comb.download<uint16_t>(static_cast<size_t>(N) * s.H), want, static_cast<size_t>(N) * s.H,
                 tag + " combined", token_rows(me, s.H));
  }
};

// The round of `f` captured once into a CUDA graph (thread-local capture, as SimWorld needs).
struct LlGraph {
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  explicit LlGraph(LlFixedRound& f) {
    CUDA_OK(cudaStreamBeginCapture(f.ctx.stream, cudaStreamCaptureModeThreadLocal));
    f.enqueue();
    CUDA_OK(cudaStreamEndCapture(f.ctx.stream, &graph));
    CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
  }
  ~LlGraph() {
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
  }
  LlGraph(const LlGraph&) = delete;
  LlGraph& operator=(const LlGraph&) = delete;
  void replay(LlFixedRound& f) {
    CUDA_OK(cudaGraphLaunch(exec, f.ctx.stream));
    f.ctx.buffer->synchronize(f.ctx.stream);
  }
};

// CUDA graph: dispatch -> (user copy of expert outputs) -> combine captured once, replayed with
// fresh inputs; then 1000 alternating dispatch/combine rounds with fresh data, all checked.
TEST_P(LlWorld, GraphReplayAndThousandRounds) {
  const WorldMode mode = GetParam().mode;
  const int world = GetParam().world;
  SKIP_UNLESS_RUNNABLE(mode, world);
  const LlSpec s = graph_spec();
  EXPECT_EQ(run_ll_world(mode, world, [&](RankCtx& ctx) {
    const int R = ctx.world, me = ctx.rank;
    LlFixedRound f(ctx, s);
    {
      LlGraph graph(f);
      for (int i = 0; i < 5; ++i) {
        const LlRun run = make_run(ctx, s, ctx.seed + 500 + i);
        f.upload(run);
        ctx.comm->barrier();
        graph.replay(f);
        f.check(run, "graph replay " + std::to_string(i));
      }
    }
    if (me == 0) std::printf("[world %d] ll graph capture + 5 replays ok\n", R);
    for (int i = 0; i < 1000; ++i) {
      const LlRun run = make_run(ctx, s, ctx.seed + 10000 + i);
      f.upload(run);
      f.enqueue();
      ctx.buffer->synchronize(ctx.stream);
      f.check(run, "round " + std::to_string(i));
    }
    if (me == 0) std::printf("[world %d] 1000 alternating ll dispatch/combine rounds ok\n", R);
  }, ll_bytes_for({s}, world)), 0);
}

// Shrink mode under CUDA-graph replay. Every rank captures dispatch -> combine once, with a 2 s
// timeout (a captured op keeps the timeout of its capture), and replays it: exact. Then rank
// `dead` stops replaying (as if its process hung). The survivors' first replay waits 2 s for it,
// masks it and completes; that replay and the next ones equal the reference without `dead` (its
// experts receive nothing and contribute nothing), and none waits again. Then `dead` comes back:
// every rank cleans the low-latency state (collective) and the masks, and 100 replays by every
// rank are exact again.
void run_shrink_graph(RankCtx& ctx) {
  const int R = ctx.world, me = ctx.rank, dead = R - 1;
  constexpr int kMaskedReplays = 20, kRejoinedReplays = 100;
  const LlSpec s = graph_spec();
  const Config saved = ctx.buffer->config();
  Config quick = saved;
  quick.timeout_s = 2;
  ctx.buffer->set_config(quick);
  LlFixedRound f(ctx, s);
  LlGraph graph(f);
  const uint64_t seed = ctx.seed * 13 + 5;
  for (int i = 0; i < 3; ++i) {
    const LlRun run = make_run(ctx, s, seed + i);
    f.upload(run);
    ctx.comm->barrier();
    graph.replay(f);
    f.check(run, "shrink graph: replay " + std::to_string(i) + " by every rank");
  }
  REQUIRE(mask_status(ctx) == std::vector<int>(R, 0), "no rank is masked while every rank replays");

  if (me != dead) {
    for (int i = 0; i < kMaskedReplays; ++i) {
      const LlRun run = make_run(ctx, s, seed + 100 + i, dead);
      f.upload(run);
      graph.replay(f);
      f.check(run, "shrink graph: replay " + std::to_string(i) + " without rank " + std::to_string(dead));
      std::vector<int> want(R, 0);
      want[dead] = 1;
      REQUIRE(mask_status(ctx) == want, "rank ", dead, " masked by the timeout of a replay (after replay ", i, ")");
      REQUIRE(!ctx.buffer->failed(), "a timeout in shrink mode masks instead of failing");
    }
  }

  // `dead` comes back. The host collectives wait with the saved timeout (the survivors' replays
  // take a while); the graph keeps its 2 s.
  ctx.buffer->set_config(saved);
  ctx.buffer->clean_low_latency_buffer();
  ctx.buffer->low_latency_clean_mask_buffer();
  REQUIRE(mask_status(ctx) == std::vector<int>(R, 0), "no rank is masked after the rejoin");
  for (int i = 0; i < kRejoinedReplays; ++i) {
    const LlRun run = make_run(ctx, s, seed + 1000 + i);
    f.upload(run);
    ctx.comm->barrier();
    graph.replay(f);
    f.check(run, "shrink graph: replay " + std::to_string(i) + " after rank " + std::to_string(dead) + " rejoined");
  }
  REQUIRE(mask_status(ctx) == std::vector<int>(R, 0), "no rank was masked in the rejoined replays");
  if (me == 0)
    std::printf("[world %d] shrink under graph replay: rank %d masked by a replay's timeout, %d exact replays "
                "without it, %d exact after it rejoined\n", R, dead, kMaskedReplays, kRejoinedReplays);
}

INSTANTIATE_TEST_SUITE_P(Gpu, LlWorld, ::testing::ValuesIn(world_params()), world_param_name);

// Bad input raises epx::Error naming the argument.
class LlErrors : public ::testing::TestWithParam<WorldMode> {};

TEST_P(LlErrors, BadInputIsRejected) {
  SKIP_UNLESS_RUNNABLE(GetParam(), 2);
  LlSpec s;
  EXPECT_EQ(run_ll_world(GetParam(), 2, [&](RankCtx& ctx) {
    const int R = ctx.world, E = s.experts_per_rank * R;
    LlOut out(s.experts_per_rank, R * s.T, s.H, true, false);
    DeviceMem x(static_cast<size_t>(s.T + 1) * s.H * 2), topk(static_cast<size_t>(s.T + 1) * s.K * 8);
    topk.fill(0);
    LowLatencyDispatchArgs a;
    a.x = View::of(x.get(), DType::kBF16, {s.T + 1, s.H});
    a.topk_idx = View::of(topk.get(), DType::kI64, {s.T + 1, s.K});
    a.num_max_dispatch_tokens_per_rank = s.T;
    a.num_experts = E;
    // A collective op that raised fails the buffer on every rank; each rank meets the same error
    // here, so all reset together.
    auto expect = [&](ErrorKind kind, const std::string& needle) {
      try {
        ctx.buffer->low_latency_dispatch(a, out.view(R), ctx.stream);
      } catch (const Error& e) {
        REQUIRE(e.kind() == kind && std::string(e.what()).find(needle) != std::string::npos, "got: ", e.what());
        REQUIRE(ctx.buffer->failed(), "a collective op that raised must fail the buffer: ", needle);
        ctx.buffer->reset();
        return;
      }
      throw Failure("accepted bad input, wanted '" + needle + "'");
    };
    expect(ErrorKind::kInvalidArgument, "exceed num_max_dispatch_tokens_per_rank");
    a.x = View::of(x.get(), DType::kBF16, {s.T, s.H - 64});
    a.topk_idx = View::of(topk.get(), DType::kI64, {s.T, s.K});
    expect(ErrorKind::kInvalidArgument, "multiple of 128");
    a.x = View::of(x.get(), DType::kBF16, {s.T, s.H});
    a.num_max_dispatch_tokens_per_rank = 4 * s.T;  // T changed: the region no longer fits
    expect(ErrorKind::kInvalidArgument, "recv_x: expected shape");
    // After the resets: 100 exact rounds (hook and not, alternating), nothing of the failures left.
    LlSpec hook = s;
    hook.name = "after bad input, hook";
    LlSpec plain = s;
    plain.name = "after bad input";
    for (int round = 0; round < 100; ++round) ll_round(ctx, round % 2 ? hook : plain, ctx.seed * 17 + round, out);
    if (ctx.rank == 0) std::printf("[world %d] low-latency bad input rejected; reset, 100 exact rounds\n", R);
  }, ll_bytes_for({s}, 2)), 0);
}

// The zero-copy combine buffer exists only when asked for (BufferOptions::ll_zero_copy):
//  - kOff, region sized for it: next_combine_buffer and a zero_copy combine raise kBufferTooSmall
//    naming the size-hint call with zero_copy and its bytes; a rank alone in asking aborts its
//    peer's combine (kAborted naming it, not a timeout); the plain combine stays exact.
//  - kIfRoom, region sized without it: the same error (the region does not hold it).
//  - kOn, region sized without it: every low-latency op raises kBufferTooSmall.
//  - kIfRoom / kOn with the zero-copy hint: the zero-copy combine matches the reference bitwise.
//  - ranks that disagree on the mode: the Buffer constructor raises on every rank.
TEST_P(LlErrors, ZeroCopyRegionOnlyWhenAskedFor) {
  const WorldMode mode = GetParam();
  constexpr int kWorld = 2;
  SKIP_UNLESS_RUNNABLE(mode, kWorld);
  LlSpec plain;
  plain.name = "zero-copy off: plain combine";
  plain.T = 32;
  plain.H = 1024;
  plain.experts_per_rank = 4;
  LlSpec zero_copy = plain;
  zero_copy.name = "zero-copy combine";
  zero_copy.zero_copy = true;
  LlSpec zero_copy_hook = zero_copy;
  zero_copy_hook.name = "zero-copy combine, hook, no x";
  zero_copy_hook.fp8 = false;
  zero_copy_hook.hook = true;
  zero_copy_hook.zero_copy_without_x = true;
  const int E = plain.experts_per_rank * kWorld;
  const size_t with = Buffer::low_latency_size_hint(plain.T, plain.H, kWorld, E, plain.K, /*zero_copy=*/true);
  const size_t without = Buffer::low_latency_size_hint(plain.T, plain.H, kWorld, E, plain.K, /*zero_copy=*/false);
  ASSERT_GT(with, without) << "the zero-copy hint must be larger";
  const std::vector<std::string> names_the_hint = {
      std::to_string(with) + " bytes = Buffer::low_latency_size_hint(32, 1024, 2, 8, 8, /*zero_copy=*/true)",
      "get_low_latency_rdma_size_hint(32, 1024, 2, 8, num_topk=8, zero_copy=True)"};
  auto needles = [&](const std::string& why) {
    std::vector<std::string> v = names_the_hint;
    v.push_back(why);
    return v;
  };

  auto no_zero_copy = [&](RankCtx& ctx, const std::string& why) {
    LlOut out(plain.experts_per_rank, kWorld * plain.T, plain.H, plain.fp8, plain.ue8m0);
    const uint64_t seed = ctx.seed * 31 + 7;
    ll_round(ctx, plain, seed, out);  // the region without the zero-copy buffer serves plain combines
    LlDispatched d = ll_round_dispatch(ctx, plain, seed + 1, out);
    require_error([&] { ctx.buffer->next_combine_buffer(d.handle); }, ErrorKind::kBufferTooSmall, needles(why));
    REQUIRE(!ctx.buffer->failed(), "next_combine_buffer is local: it must not fail the buffer");
    // Every rank asks for a zero-copy combine: every rank raises, inside the collective op.
    DeviceMem combined(static_cast<size_t>(d.N) * plain.H * 2);
    LowLatencyCombineArgs ca;
    ca.zero_copy = true;
    ca.topk_idx = d.args.topk_idx;
    ca.topk_weights = View::of(d.w.get(), DType::kF32, {d.N, plain.K});
    const View out_view = View::of(combined.get(), DType::kBF16, {d.N, plain.H});
    require_error([&] { ctx.buffer->low_latency_combine(ca, d.handle, out_view, ctx.stream); },
                  ErrorKind::kBufferTooSmall, needles(why));
    REQUIRE(ctx.buffer->failed(), "a collective op that raised must fail the buffer");
    ctx.buffer->reset();
    // Only rank 0 asks: it raises, and its abort word ends rank 1's combine naming it.
    LlDispatched d2 = ll_round_dispatch(ctx, plain, seed + 2, out);
    DeviceMem y = DeviceMem::from(d2.run.y[ctx.rank]);
    LowLatencyCombineArgs ca2;
    ca2.zero_copy = ctx.rank == 0;
    ca2.x = ctx.rank == 0 ? View{} : View::of(y.get(), DType::kBF16, {out.E_loc, out.RT, plain.H});
    ca2.topk_idx = d2.args.topk_idx;
    ca2.topk_weights = View::of(d2.w.get(), DType::kF32, {d2.N, plain.K});
    DeviceMem combined2(static_cast<size_t>(d2.N) * plain.H * 2);
    auto combine = [&] {
      ctx.buffer->low_latency_combine(ca2, d2.handle, View::of(combined2.get(), DType::kBF16, {d2.N, plain.H}),
                                      ctx.stream);
      ctx.buffer->synchronize(ctx.stream);
    };
    if (ctx.rank == 0)
      require_error(combine, ErrorKind::kBufferTooSmall, needles(why));
    else
      require_error(combine, ErrorKind::kAborted, "rank 0 failed (its low_latency_combine raised an error on the host");
    ctx.buffer->reset();
    ll_round(ctx, plain, seed + 3, out);
  };

  // kOff: none even though the region has room for it.
  EXPECT_EQ(run_ll_world(mode, kWorld, [&](RankCtx& ctx) {
    no_zero_copy(ctx, "BufferOptions::ll_zero_copy = kOff");
    if (ctx.rank == 0) std::printf("[world %d] ll_zero_copy kOff: no zero-copy buffer, errors name the hint\n", kWorld);
  }, with, LlZeroCopy::kOff), 0);
  // kIfRoom without room: none.
  EXPECT_EQ(run_ll_world(mode, kWorld, [&](RankCtx& ctx) {
    no_zero_copy(ctx, "num_ll_bytes = " + std::to_string(without) + " does not hold it; ll_zero_copy = kIfRoom");
    if (ctx.rank == 0) std::printf("[world %d] ll_zero_copy kIfRoom, small region: no zero-copy buffer\n", kWorld);
  }, without, LlZeroCopy::kIfRoom), 0);
  // kOn without room: the layout does not fit, every op says so.
  EXPECT_EQ(run_ll_world(mode, kWorld, [&](RankCtx& ctx) {
    LlOut out(plain.experts_per_rank, kWorld * plain.T, plain.H, plain.fp8, plain.ue8m0);
    require_error([&] { ll_round(ctx, plain, ctx.seed, out); }, ErrorKind::kBufferTooSmall,
                  {"for the zero-copy combine buffers (BufferOptions::ll_zero_copy = kOn)", names_the_hint[0]});
    ctx.buffer->reset();
  }, without, LlZeroCopy::kOn), 0);
  // kIfRoom and kOn with the zero-copy hint: exact zero-copy combines, plain ones too.
  for (LlZeroCopy zc : {LlZeroCopy::kIfRoom, LlZeroCopy::kOn}) {
    EXPECT_EQ(run_ll_world(mode, kWorld, [&](RankCtx& ctx) {
      int round = 0;
      for (const LlSpec& s : {zero_copy, zero_copy_hook, plain, zero_copy}) {
        LlOut out(s.experts_per_rank, kWorld * s.T, s.H, s.fp8, s.ue8m0);
        ll_round(ctx, s, ctx.seed * 37 + round++, out);
      }
      if (ctx.rank == 0)
        std::printf("[world %d] ll_zero_copy %s with the zero-copy hint: zero-copy combines exact\n", kWorld,
                    zc == LlZeroCopy::kOn ? "kOn" : "kIfRoom");
    }, with, zc), 0);
  }
  // Ranks that disagree on the mode: the constructor raises on every rank, naming the field.
  EXPECT_EQ(run_ll_world(mode, kWorld, [&](RankCtx& ctx) {
    BufferOptions options;
    options.config = ctx.buffer->config();  // fits this rank's SM share
    options.num_ll_bytes = with;
    options.ll_zero_copy = ctx.rank == 0 ? LlZeroCopy::kOn : LlZeroCopy::kIfRoom;
    require_error([&] { Buffer other(*ctx.comm, 64 << 20, options); }, ErrorKind::kInvalidArgument,
                  {"ll_zero_copy: must be equal on all ranks", "kOn", "kIfRoom"});
  }, with), 0);
}

TEST_P(LlWorld, ShrinkMasksADeadRankAndKeepsServing) {
  const WorldMode mode = GetParam().mode;
  const int world = GetParam().world;
  SKIP_UNLESS_RUNNABLE(mode, world);
  if (world < 3) GTEST_SKIP() << "SKIPPED: needs 3 ranks (two survivors)";
  LlSpec s;
  BufferOptions options;
  options.num_ll_bytes = ll_bytes_for({s}, world);
  options.enable_shrink = true;
  EXPECT_EQ(run_world(mode, world, 64 << 20, options, run_shrink), 0);
}

TEST_P(LlWorld, ShrinkMasksADeadRankUnderGraphReplay) {
  const WorldMode mode = GetParam().mode;
  const int world = GetParam().world;
  SKIP_UNLESS_RUNNABLE(mode, world);
  if (world < 3) GTEST_SKIP() << "SKIPPED: needs 3 ranks (two survivors)";
  BufferOptions options;
  options.num_ll_bytes = ll_bytes_for({graph_spec()}, world);
  options.enable_shrink = true;
  EXPECT_EQ(run_world(mode, world, 64 << 20, options, run_shrink_graph), 0);
}

INSTANTIATE_TEST_SUITE_P(Gpu, LlErrors, ::testing::Values(WorldMode::kReal, WorldMode::kSim), mode_param_name);

}  // namespace
}  // namespace epx::test
