#include "gpu/harness.hpp"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "host/checks.hpp"
#include "host/staged_copy.hpp"

namespace epx::test {
namespace {

// Bound of one test's world, start to end (the ctest limit is above it).
constexpr double kWorldTimeoutS = 240;

thread_local cudaStream_t t_rank_stream = nullptr;

// Runs fn in a forked child and returns its value (-1 if the child died or threw): for questions
// that need CUDA, which must stay uninitialized in this process (the real-mode ranks are forked).
int value_from_child(const std::function<int()>& fn) {
  int fds[2];
  if (pipe(fds) != 0) return -1;
  std::fflush(stdout);
  std::fflush(stderr);
  const pid_t pid = fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    int value = -1;
    try {
      value = fn();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "value_from_child: %s\n", e.what());
    }
    (void)!write(fds[1], &value, sizeof(value));
    _exit(0);
  }
  close(fds[1]);
  int value = -1;
  if (read(fds[0], &value, sizeof(value)) != sizeof(value)) value = -1;
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  return value;
}

// One rank of a world, in either mode: a Buffer with the fitted options, the rank's stream, the
// body, then the checks that the body left no error behind.
int run_rank(WorldMode mode, int rank, int world, uint64_t seed, Communicator& comm, size_t nvl_bytes,
             const BufferOptions& options, const std::function<void(RankCtx&)>& body) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  // NOTE: on failure the buffer is deliberately not destroyed: its teardown is collective and
  // would wait for ranks that went on. A real rank's process exits; a SimWorld frees what the
  // ranks' Buffers left behind when it ends.
  try {
    BufferOptions fitted = options;
    // A simulated rank owns SMs / R of the device; the library refuses more (no silent clamp).
    if (mode == WorldMode::kSim) fitted.config.num_sms = std::min(fitted.config.num_sms, comm.num_device_sms());
    auto* buffer = new Buffer(comm, nvl_bytes, fitted);
    cudaStream_t stream;
    CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    {
      RankStream on_stream(stream);
      RankCtx ctx{rank, world, seed, &comm, buffer, stream, mode, fitted};
      body(ctx);
      host_wait_stream(stream, kWorldTimeoutS, "the test body's stream", rank);
      buffer->check();
    }
    delete buffer;
    CUDA_OK(cudaStreamDestroy(stream));
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[%s rank %d/%d seed %llu] FAILED: %s\n", mode_name(mode), rank, world,
                 (unsigned long long)seed, e.what());
    return 1;
  }
}

}  // namespace

const char* mode_name(WorldMode mode) { return mode == WorldMode::kSim ? "sim" : "real"; }

std::vector<WorldParam> world_params() {
  std::vector<WorldParam> v;
  for (WorldMode mode : {WorldMode::kReal, WorldMode::kSim})
    for (int world : {2, 3, 4, 8}) v.push_back({mode, world});
  return v;
}

std::string world_param_name(const ::testing::TestParamInfo<WorldParam>& info) {
  return std::string(mode_name(info.param.mode)) + "_world" + std::to_string(info.param.world);
}

std::string mode_param_name(const ::testing::TestParamInfo<WorldMode>& info) { return mode_name(info.param); }

uint64_t run_seed() {
  static const uint64_t seed = [] {
    const char* s = std::getenv("EPX_TEST_SEED");
    const uint64_t v = s ? std::strtoull(s, nullptr, 10) : (static_cast<uint64_t>(std::random_device{}()) << 32) ^ std::random_device{}();
    std::printf("epx test seed: %llu (replay with EPX_TEST_SEED=%llu)\n", (unsigned long long)v, (unsigned long long)v);
    std::fflush(stdout);
    return v;
  }();
  return seed;
}

int num_gpus() {
  static const int n = count_local_gpus();
  return n;
}

int sim_max_world() {
  static const int n = num_gpus() < 1 ? 0 : std::max(0, value_from_child([] { return SimWorld::max_world(0); }));
  return n;
}

std::string why_not_runnable(WorldMode mode, int world) {
  const int have = num_gpus();
  if (mode == WorldMode::kReal) {
    if (have < world) return detail::concat("needs ", world, " GPUs, found ", have);
    return {};
  }
  if (have < 1) return detail::concat("needs 1 GPU, found ", have);
  const int max_world = sim_max_world();
  if (world > max_world)
    return detail::concat("needs a SimWorld of ", world, " ranks, SimWorld::max_world() is ", max_world, " on GPU 0");
  return {};
}

int run_in_child(const std::function<int()>& fn, double timeout_s) {
  // EPX_TEST_IN_PROCESS=1: no fork, for tools that follow only the process they started
  // (compute-sanitizer); simulated worlds only (real ranks need this process free of CUDA).
  const char* in_process = std::getenv("EPX_TEST_IN_PROCESS");
  if (in_process != nullptr && std::string(in_process) == "1") return fn();
  std::fflush(stdout);
  std::fflush(stderr);
  const pid_t pid = fork();
  REQUIRE(pid >= 0, "fork() failed");
  if (pid == 0) {
    std::setvbuf(stdout, nullptr, _IOLBF, 0);
    int rc = 1;
    try {
      rc = fn();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "[child] FAILED: %s\n", e.what());
    }
    std::fflush(stdout);
    std::fflush(stderr);
    _exit(std::min(std::max(rc, 0), 255));
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  int status = 0;
  while (waitpid(pid, &status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() > deadline) {
      std::fprintf(stderr, "run_in_child: killing the child after %.0f s\n", timeout_s);
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      return 1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  std::fprintf(stderr, "run_in_child: the child died of signal %d\n", WIFSIGNALED(status) ? WTERMSIG(status) : 0);
  return 1;
}

int run_world(WorldMode mode, int world, size_t nvl_bytes, const BufferOptions& options,
              const std::function<void(RankCtx&)>& body) {
  const uint64_t seed = run_seed();
  if (mode == WorldMode::kReal) {
    return launch_local(world, [&](int rank, int w, const ncclUniqueId& id) {
      Communicator* comm = nullptr;
      try {
        comm = new Communicator(id, rank, w, rank);  // NOTE: not destroyed on failure (collective)
      } catch (const std::exception& e) {
        std::fprintf(stderr, "[real rank %d/%d] FAILED: %s\n", rank, w, e.what());
        return 1;
      }
      const int rc = run_rank(mode, rank, w, seed, *comm, nvl_bytes, options, body);
      if (rc == 0) delete comm;
      return rc;
    }, kWorldTimeoutS);
  }
  return run_in_child([&] {
    return launch_sim(world, [&](int rank, int w, Communicator& comm) {
      return run_rank(mode, rank, w, seed, comm, nvl_bytes, options, body);
    }, /*device=*/0, /*timeout_s=*/0);
  }, kWorldTimeoutS);
}

cudaStream_t rank_stream() {
  REQUIRE(t_rank_stream != nullptr, "no rank stream on this thread (run_world or RankStream sets it)");
  return t_rank_stream;
}

RankStream::RankStream(cudaStream_t stream) : previous_(t_rank_stream) { t_rank_stream = stream; }
RankStream::~RankStream() { t_rank_stream = previous_; }

void upload_bytes(void* dst, const void* src, size_t bytes) {
  if (!bytes) return;
  detail::copy_to_device(dst, src, bytes, rank_stream(), kWorldTimeoutS, "upload_bytes");
}

void download_bytes(void* dst, const void* src, size_t bytes) {
  const cudaStream_t stream = rank_stream();
  if (bytes) detail::copy_to_host(dst, src, bytes, stream, kWorldTimeoutS, "download_bytes");
  else host_wait_stream(stream, kWorldTimeoutS, "download_bytes", -1);
}

void copy_device_bytes(void* dst, const void* src, size_t bytes) {
  if (bytes) CUDA_OK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, rank_stream()));
}

DeviceMem::DeviceMem(size_t bytes) : bytes_(bytes) {
  const cudaStream_t stream = rank_stream();
  void* p = nullptr;
  CUDA_OK(cudaMallocAsync(&p, bytes > 0 ? bytes : 16, stream));
  ptr_ = std::shared_ptr<void>(p, [stream](void* q) { cudaFreeAsync(q, stream); });
}

void DeviceMem::upload(const void* src, size_t bytes) {
  REQUIRE(bytes <= bytes_, "upload of ", bytes, " bytes into ", bytes_);
  upload_bytes(get(), src, bytes);
}

void DeviceMem::download_raw(void* dst, size_t bytes) const {
  REQUIRE(bytes <= bytes_, "download of ", bytes, " bytes from ", bytes_);
  download_bytes(dst, get(), bytes);
}

void DeviceMem::fill(uint8_t byte) {
  CUDA_OK(cudaMemsetAsync(get(), byte, bytes_ > 0 ? bytes_ : 16, rank_stream()));
}

RowNames received_rows(const ref::DispatchResult& want, size_t row_elems) {
  const ref::DispatchResult* w = &want;  // the reference outlives the comparison
  return {row_elems, [w](size_t row) {
            if (row >= w->recv_src_rank.size() || row >= w->recv_src_idx.size())
              return detail::concat("row ", row, " (beyond the reference's ", w->recv_src_idx.size(), " rows)");
            return detail::concat("row ", row, ": from rank ", w->recv_src_rank[row], ", token ", w->recv_src_idx[row]);
          }};
}

RowNames token_rows(int rank, size_t row_elems) {
  return {row_elems, [rank](size_t row) { return detail::concat("rank ", rank, "'s token ", row); }};
}

ref::RankInput make_input(uint64_t seed, int rank, const InputSpec& spec) {
  std::mt19937_64 rng(seed * 1000003ull + static_cast<uint64_t>(rank) * 7919ull + spec.hidden);
  ref::RankInput in;
  const int N = spec.num_tokens, H = spec.hidden, K = spec.num_topk, E = spec.num_experts;
  in.num_tokens = N;
  const int row_bytes = spec.fp8 ? H : 2 * H;
  in.x.resize(static_cast<size_t>(N) * row_bytes);
  if (spec.fp8) {
    for (auto& b : in.x) b = static_cast<uint8_t>(rng());
    in.x_scales.resize(static_cast<size_t>(N) * num_scale_columns(spec));
    std::uniform_real_distribution<float> u(0.01f, 10.f);
    for (auto& s : in.x_scales) {
      if (spec.scales != InputSpec::Scales::kUe8m0) {
        s = u(rng);
        continue;
      }
      // Four exponent bytes in [100, 150] (2^-27 .. 2^23): the int32 words travel as they are.
      uint32_t word = 0;
      for (int b = 0; b < 4; ++b) word |= static_cast<uint32_t>(100 + rng() % 51) << (8 * b);
      std::memcpy(&s, &word, 4);
    }
  } else {
    // Finite bf16 values in [-4, 4): random mantissas, so a misplaced row shows.
    std::uniform_real_distribution<float> u(-4.f, 4.f);
    auto* p = reinterpret_cast<uint16_t*>(in.x.data());
    for (size_t i = 0; i < static_cast<size_t>(N) * H; ++i) p[i] = ref::float_to_bf16(u(rng));
  }
  in.topk_idx.assign(static_cast<size_t>(N) * K, -1);
  std::uniform_real_distribution<double> coin(0, 1);
  std::vector<int> pool(E);
  for (int t = 0; t < N; ++t) {
    // Candidate experts by routing mode; choose K distinct ones.
    // kOneRank: only the first K experts, which all live on rank 0 when E / R >= K.
    const int n = spec.routing == Routing::kOneRank ? K : E;
    for (int e = 0; e < n; ++e) pool[e] = e;
    for (int k = 0; k < K && k < n; ++k) {
      int j = k + static_cast<int>(rng() % static_cast<uint64_t>(n - k));
      if (spec.routing == Routing::kSkewed && coin(rng) < 0.5) j = k;  // favour low (hot) experts
      std::swap(pool[k], pool[j]);
      in.topk_idx[static_cast<size_t>(t) * K + k] = coin(rng) < spec.drop_prob ? -1 : pool[k];
    }
  }
  if (spec.with_weights) {
    in.topk_weights.resize(static_cast<size_t>(N) * K);
    std::uniform_real_distribution<float> u(0.f, 1.f);
    for (auto& w : in.topk_weights) w = u(rng);
  }
  return in;
}

int num_scale_columns(const InputSpec& spec) {
  if (!spec.fp8) return 0;
  switch (spec.scales) {
    case InputSpec::Scales::kUe8m0: return (spec.hidden + 511) / 512;
    case InputSpec::Scales::kOnePerToken: return 1;
    default: return (spec.hidden + 127) / 128;
  }
}

ref::DispatchShape shape_of(const InputSpec& spec, int world, int alignment) {
  ref::DispatchShape s;
  s.num_ranks = world;
  s.num_experts = spec.num_experts;
  s.num_topk = spec.num_topk;
  s.row_bytes = spec.fp8 ? spec.hidden : 2 * spec.hidden;
  s.num_scales = num_scale_columns(spec);
  s.expert_alignment = alignment;
  return s;
}

}  // namespace epx::test
