#include "gpu/harness.hpp"

#include <cstdio>
#include <cstdlib>

namespace epx::test {

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

int run_world(int world, size_t nvl_bytes, const BufferOptions& options, const std::function<void(RankCtx&)>& body) {
  const uint64_t seed = run_seed();
  return launch_local(world, [&](int rank, int w, const ncclUniqueId& id) {
    std::setvbuf(stdout, nullptr, _IOLBF, 0);
    // NOTE: on failure the communicator and buffer are deliberately not destroyed: their teardown
    // is collective (NCCL window deregistration) and would wait for ranks that went on; the
    // process exits instead.
    try {
      auto* comm = new Communicator(id, rank, w, rank);
      auto* buffer = new Buffer(*comm, nvl_bytes, options);
      cudaStream_t stream;
      CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
      RankCtx ctx{rank, w, seed, comm, buffer, stream};
      body(ctx);
      CUDA_OK(cudaStreamSynchronize(stream));
      buffer->check();
      cudaStreamDestroy(stream);
      delete buffer;
      delete comm;
      return 0;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "[rank %d/%d seed %llu] FAILED: %s\n", rank, w, (unsigned long long)seed, e.what());
      return 1;
    }
  }, /*timeout_s=*/240);
}

DeviceMem::DeviceMem(size_t bytes) : bytes_(bytes) {
  void* p = nullptr;
  CUDA_OK(cudaMalloc(&p, bytes > 0 ? bytes : 16));
  ptr_ = std::shared_ptr<void>(p, [](void* q) { cudaFree(q); });
}

void DeviceMem::upload(const void* src, size_t bytes) {
  REQUIRE(bytes <= bytes_, "upload of ", bytes, " bytes into ", bytes_);
  if (bytes) CUDA_OK(cudaMemcpy(get(), src, bytes, cudaMemcpyHostToDevice));
}

void DeviceMem::download_raw(void* dst, size_t bytes) const {
  REQUIRE(bytes <= bytes_, "download of ", bytes, " bytes from ", bytes_);
  CUDA_OK(cudaDeviceSynchronize());
  if (bytes) CUDA_OK(cudaMemcpy(dst, get(), bytes, cudaMemcpyDeviceToHost));
}

// cudaMemset runs on the legacy default stream, which does not order against the tests'
// non-blocking streams: wait for it, or the fill can land after (and over) a kernel's outputs.
void DeviceMem::fill(uint8_t byte) {
  CUDA_OK(cudaMemset(get(), byte, bytes_ > 0 ? bytes_ : 16));
  CUDA_OK(cudaDeviceSynchronize());
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
    in.x_scales.resize(static_cast<size_t>(N) * ((H + 127) / 128));
    std::uniform_real_distribution<float> u(0.01f, 10.f);
    for (auto& s : in.x_scales) s = u(rng);
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

ref::DispatchShape shape_of(const InputSpec& spec, int world, int alignment) {
  ref::DispatchShape s;
  s.num_ranks = world;
  s.num_experts = spec.num_experts;
  s.num_topk = spec.num_topk;
  s.row_bytes = spec.fp8 ? spec.hidden : 2 * spec.hidden;
  s.num_scales = spec.fp8 ? (spec.hidden + 127) / 128 : 0;
  s.expert_alignment = alignment;
  return s;
}

}  // namespace epx::test
