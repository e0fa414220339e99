// Error paths on GPUs: host validation, device-recorded errors, timeouts, undersized buffers,
// reset after failure, and create/destroy cycles without leaks.
#include <cuda_runtime_api.h>

#include "gpu/harness.hpp"

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

// A small fresh dispatch (host-synced) that must work: the buffer is usable.
void small_dispatch(RankCtx& ctx, Buffer& buffer, int num_tokens, int hidden) {
  SmallInputs d = small_inputs(ctx, buffer, num_tokens, hidden, 5);
  DispatchHandle h = buffer.make_handle(num_tokens);
  const int nr = buffer.dispatch_notify(d.di, h, View{}, ctx.stream);
  buffer.dispatch(d.di, h, d.outputs(nr), ctx.stream);
  buffer.synchronize(ctx.stream);
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
  auto refused = [&](auto&& op, ErrorKind kind, const std::string& needle) {
    require_error(op, kind, needle);
    REQUIRE(b.failed(), "a collective op that raised must fail the buffer: ", needle);
    require_error([&] { b.dispatch_notify(di, h, View{}, ctx.stream); }, ErrorKind::kState, "reset()");
    b.reset();
    REQUIRE(!b.failed(), "reset() must clear the failure");
  };
  refused([&] { b.dispatch_notify(di, h, View{}, ctx.stream); }, ErrorKind::kInvalidArgument, "x: expected dtype");
  di.x = View::of(x.get(), DType::kBF16, {N, 100});
  refused([&] { b.dispatch_notify(di, h, View{}, ctx.stream); }, ErrorKind::kInvalidArgument, "x: row bytes (200)");
  di.x = View::of(x.get(), DType::kBF16, {N, H});
  di.topk_idx = View::of(topk.get(), DType::kI64, {N - 1, K});
  refused([&] { b.dispatch_notify(di, h, View{}, ctx.stream); }, ErrorKind::kInvalidArgument, "topk_idx: expected shape");
  di.topk_idx = View::of(topk.get(), DType::kI64, {N, K});
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
  small_dispatch(ctx, b, 128, 2048);

  if (ctx.rank == 0) std::printf("[world %d] validation, device error, reset ok\n", R);
}

void run_timeout(RankCtx& ctx) {
  Buffer& b = *ctx.buffer;
  Config c = b.config();
  c.timeout_s = 2;
  b.set_config(c);
  if (ctx.rank == 0)
    require_error([&] { small_dispatch(ctx, b, 16, 512); }, ErrorKind::kTimeout, "waiting for peer");
  ctx.comm->barrier(120);
  b.reset();
  c.timeout_s = 0;
  b.set_config(c);
  small_dispatch(ctx, b, 128, 2048);
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
  if (ctx.rank == 0)
    require_error(dispatch, ErrorKind::kInvalidArgument, "disagree for rank 1");
  else
    require_error(dispatch, ErrorKind::kAborted, "rank 0 failed");
  b.reset();  // collective: clears every abort word
  c.timeout_s = 0;
  b.set_config(c);
  small_dispatch(ctx, b, 128, 2048);
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
  if (ctx.rank == 0)
    require_error(dispatch, ErrorKind::kInvalidArgument, "recv_x: expected shape");
  else
    require_error(dispatch, ErrorKind::kAborted, "rank 0 failed (its dispatch raised an error on the host");
  b.reset();
  c.timeout_s = 0;
  b.set_config(c);
  small_dispatch(ctx, b, 128, 2048);
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
  small_dispatch(ctx, b, 128, 2048);
  if (ctx.rank == 0) std::printf("[world %d] a dispatch planned differently -> every rank names the field\n", R);
}

// 512 rows of 7168 channels do not fit 4 MiB, nor do the bounded dispatch's rings (at least two
// publication rounds of a block's sending warps per source and block).
void run_too_small(RankCtx& ctx) {
  Buffer small(*ctx.comm, 4 << 20, ctx.options);
  require_error([&] { small_dispatch(ctx, small, 512, 7168); }, ErrorKind::kBufferTooSmall,
                std::vector<std::string>{"rings", "need num_nvl_bytes >="});
  small.reset();
  small_dispatch(ctx, small, 16, 1024);
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

TEST_P(GpuErrors, RanksThatPlanAnOpDifferentlyGetAnErrorNamingTheField) {
  SKIP_UNLESS_RUNNABLE(GetParam(), 2);
  EXPECT_EQ(run_world(GetParam(), 2, 64 << 20, Config::defaults(2), run_plan_mismatch), 0);
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

INSTANTIATE_TEST_SUITE_P(Gpu, GpuErrors, ::testing::Values(WorldMode::kReal, WorldMode::kSim), mode_param_name);
INSTANTIATE_TEST_SUITE_P(Gpu, GpuLifecycle, ::testing::Values(WorldMode::kReal, WorldMode::kSim), mode_param_name);

}  // namespace
}  // namespace epx::test
