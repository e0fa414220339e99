// A high-throughput dispatch and combine on every local GPU, checked on the host.
//
// Each GPU is one rank (a process forked by epx::launch_local). Every rank routes its tokens to
// top-k experts, dispatches them (each token goes once to every rank that holds one of its
// experts), leaves the received rows as they are (the identity "expert"), and combines them back.
// Combine sums the copies a token's receiving ranks send back, so the result must be
// x * (number of ranks the token went to), exactly.
//
//   dispatch_combine [world]      (default: one rank per visible GPU)
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <set>
#include <vector>

#include <epx/buffer.hpp>
#include <epx/launcher.hpp>
#include <epx/version.hpp>

namespace {

constexpr int kNumTokens = 512, kHidden = 2048, kNumTopk = 4, kNumExpertsPerRank = 4;

void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw epx::Error(epx::ErrorKind::kCuda, what, __FILE__, __LINE__);
}

// Device memory for `count` elements of T, freed with the object.
template <typename T>
struct DeviceArray {
  T* ptr = nullptr;
  explicit DeviceArray(size_t count) { cuda_check(cudaMalloc(&ptr, (count > 0 ? count : 1) * sizeof(T)), "cudaMalloc"); }
  ~DeviceArray() { cudaFree(ptr); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
};

// bf16 <-> float on the host (the values used here are small integers, exact in bf16).
uint16_t to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return static_cast<uint16_t>(bits >> 16);
}
float from_bf16(uint16_t value) {
  const uint32_t bits = static_cast<uint32_t>(value) << 16;
  float result;
  std::memcpy(&result, &bits, sizeof(result));
  return result;
}

int run_rank(int rank, int world, const ncclUniqueId& id) {
  const int num_experts = kNumExpertsPerRank * world;
  epx::Communicator comm(id, rank, world, /*device=*/rank);
  // Room for every token of every rank: the most rows one rank can receive.
  epx::Buffer buffer(comm, epx::Buffer::get_nvl_buffer_size_hint(int64_t{kNumTokens} * world, kHidden,
                                                                  epx::DType::kBF16, kNumTopk, world));
  cudaStream_t stream;
  cuda_check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  const std::unique_ptr<CUstream_st, decltype(&cudaStreamDestroy)> stream_owner(stream, cudaStreamDestroy);

  // Inputs: x [N, H] bf16 with small integer values; top-k distinct experts per token.
  std::mt19937 rng(1234 + rank);
  std::vector<uint16_t> x(size_t{kNumTokens} * kHidden);
  for (size_t i = 0; i < x.size(); ++i) x[i] = to_bf16(static_cast<float>((rank + i) % 32));
  std::vector<int64_t> topk_idx(size_t{kNumTokens} * kNumTopk);
  std::vector<int> num_dest_ranks(kNumTokens);
  for (int t = 0; t < kNumTokens; ++t) {
    std::set<int64_t> experts, ranks;
    while (static_cast<int>(experts.size()) < kNumTopk) experts.insert(rng() % num_experts);
    int k = 0;
    for (int64_t e : experts) {
      topk_idx[size_t{t} * kNumTopk + k++] = e;
      ranks.insert(e / kNumExpertsPerRank);
    }
    num_dest_ranks[t] = static_cast<int>(ranks.size());
  }
  std::vector<float> topk_weights(topk_idx.size(), 1.0f / kNumTopk);

  DeviceArray<uint16_t> d_x(x.size()), d_combined(x.size());
  DeviceArray<int64_t> d_topk_idx(topk_idx.size());
  DeviceArray<float> d_topk_weights(topk_weights.size());
  DeviceArray<int> d_per_rank(world), d_per_expert(num_experts);
  DeviceArray<bool> d_in_rank(size_t{kNumTokens} * world);
  cuda_check(cudaMemcpyAsync(d_x.ptr, x.data(), x.size() * 2, cudaMemcpyHostToDevice, stream), "copy x");
  cuda_check(cudaMemcpyAsync(d_topk_idx.ptr, topk_idx.data(), topk_idx.size() * 8, cudaMemcpyHostToDevice, stream),
             "copy topk_idx");
  cuda_check(cudaMemcpyAsync(d_topk_weights.ptr, topk_weights.data(), topk_weights.size() * 4,
                             cudaMemcpyHostToDevice, stream),
             "copy topk_weights");

  // 1. Layout: tokens per rank and expert, and which ranks each token goes to.
  epx::DispatchInputs in;
  in.x = epx::View::of(d_x.ptr, epx::DType::kBF16, {kNumTokens, kHidden});
  in.topk_idx = epx::View::of(d_topk_idx.ptr, epx::DType::kI64, {kNumTokens, kNumTopk});
  in.topk_weights = epx::View::of(d_topk_weights.ptr, epx::DType::kF32, {kNumTokens, kNumTopk});
  in.num_tokens_per_rank = epx::View::of(d_per_rank.ptr, epx::DType::kI32, {world});
  in.num_tokens_per_expert = epx::View::of(d_per_expert.ptr, epx::DType::kI32, {num_experts});
  in.is_token_in_rank = epx::View::of(d_in_rank.ptr, epx::DType::kBool, {kNumTokens, world});
  buffer.get_dispatch_layout(in.topk_idx, num_experts, in.num_tokens_per_rank, in.num_tokens_per_expert,
                             in.is_token_in_rank, stream);

  // 2. Dispatch, host-synced: the count exchange tells this rank how many rows it receives.
  epx::DispatchHandle handle = buffer.make_handle(kNumTokens);
  const int num_recv = buffer.dispatch_notify(in, handle, /*num_recv_tokens_per_expert=*/{}, stream);
  DeviceArray<uint16_t> d_recv_x(size_t{num_recv} * kHidden);
  DeviceArray<float> d_recv_weights(size_t{num_recv} * kNumTopk);
  epx::DispatchOutputs out;
  out.recv_x = epx::View::of(d_recv_x.ptr, epx::DType::kBF16, {num_recv, kHidden});
  out.recv_topk_weights = epx::View::of(d_recv_weights.ptr, epx::DType::kF32, {num_recv, kNumTopk});
  buffer.dispatch(in, handle, out, stream);

  // 3. The experts would run on recv_x here. 4. Combine the rows back to their source tokens.
  epx::CombineInputs combine_in;
  combine_in.x = out.recv_x;
  epx::CombineOutputs combine_out;
  combine_out.combined_x = epx::View::of(d_combined.ptr, epx::DType::kBF16, {kNumTokens, kHidden});
  buffer.combine(combine_in, handle, combine_out, stream);
  buffer.synchronize(stream);  // waits (bounded) and raises any device-side error

  std::vector<uint16_t> combined(x.size());
  cuda_check(cudaMemcpy(combined.data(), d_combined.ptr, combined.size() * 2, cudaMemcpyDeviceToHost), "copy out");
  for (int t = 0; t < kNumTokens; ++t) {
    for (int h = 0; h < kHidden; ++h) {
      const size_t i = size_t{t} * kHidden + h;
      const float want = from_bf16(x[i]) * num_dest_ranks[t];
      if (from_bf16(combined[i]) != want) {
        std::fprintf(stderr, "[rank %d] token %d, hidden %d: combined %g, want %g\n", rank, t, h,
                     from_bf16(combined[i]), want);
        return 1;
      }
    }
  }
  std::printf("[rank %d/%d] received %d rows; combine matches for all %d tokens\n", rank, world, num_recv,
              kNumTokens);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const int world = argc > 1 ? std::atoi(argv[1]) : 0;  // 0: one rank per visible GPU
  std::printf("epx %s (NCCL %d)\n", epx::version(), epx::nccl_compiled_version());
  try {
    const int num_failed = epx::launch_local(world, run_rank);
    if (num_failed != 0) std::fprintf(stderr, "%d rank(s) failed\n", num_failed);
    return num_failed == 0 ? 0 : 1;
  } catch (const epx::Error& e) {  // e.g. no GPU visible
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
