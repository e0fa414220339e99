// GPU test harness: one forked process per rank (epx::launch_local), device memory helpers, and
// inputs every rank can regenerate for every other rank from per-rank seeds.
#pragma once
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "epx/buffer.hpp"
#include "epx/launcher.hpp"
#include "reference/reference.hpp"

namespace epx::test {

// A failed expectation inside a rank process (gtest assertions do not cross fork()).
struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};
#define REQUIRE(cond, ...)                                                                          \
  do {                                                                                              \
    if (!(cond)) throw ::epx::test::Failure(::epx::detail::concat(__FILE__, ":", __LINE__, ": ", #cond, ": ", __VA_ARGS__)); \
  } while (0)
#define CUDA_OK(call) REQUIRE((call) == cudaSuccess, #call, " failed")

// Seed of this test run: EPX_TEST_SEED if set, else fresh; printed so a failure can be replayed.
uint64_t run_seed();

// Number of visible GPUs (counted in a child process).
int num_gpus();

struct RankCtx {
  int rank = 0, world = 0;
  uint64_t seed = 0;
  Communicator* comm = nullptr;
  Buffer* buffer = nullptr;
  cudaStream_t stream = nullptr;
};

// Runs `body` on `world` ranks with a Buffer of `nvl_bytes`; returns the number of failed ranks.
// Each rank prints what failed, with the seed.
int run_world(int world, size_t nvl_bytes, const BufferOptions& options, const std::function<void(RankCtx&)>& body);
inline int run_world(int world, size_t nvl_bytes, const Config& config, const std::function<void(RankCtx&)>& body) {
  BufferOptions options;
  options.config = config;
  return run_world(world, nvl_bytes, options, body);
}

#define SKIP_WITHOUT_GPUS(n)                                                                        \
  do {                                                                                              \
    const int have_ = ::epx::test::num_gpus();                                                      \
    if (have_ < (n)) GTEST_SKIP() << "needs " << (n) << " GPUs, found " << have_;                   \
  } while (0)

// Owning device allocation.
class DeviceMem {
 public:
  DeviceMem() = default;
  explicit DeviceMem(size_t bytes);
  void* get() const { return ptr_.get(); }
  size_t bytes() const { return bytes_; }
  template <typename T>
  static DeviceMem from(const std::vector<T>& v) {
    DeviceMem m(v.size() * sizeof(T));
    m.upload(v.data(), v.size() * sizeof(T));
    return m;
  }
  void upload(const void* src, size_t bytes);
  template <typename T>
  std::vector<T> download(size_t count) const {
    std::vector<T> v(count);
    download_raw(v.data(), count * sizeof(T));
    return v;
  }
  void download_raw(void* dst, size_t bytes) const;
  void fill(uint8_t byte);  // sentinel fill

 private:
  std::shared_ptr<void> ptr_;
  size_t bytes_ = 0;
};

enum class Routing { kUniform, kOneRank, kSkewed };

struct InputSpec {
  int num_tokens = 256;
  int hidden = 2048;
  int num_topk = 8;
  int num_experts = 64;
  bool fp8 = false;
  bool with_weights = true;
  double drop_prob = 0.1;  // chance of a -1 slot
  Routing routing = Routing::kUniform;
};

// Rank `rank`'s inputs, a pure function of (seed, rank, spec): distinct experts per token.
ref::RankInput make_input(uint64_t seed, int rank, const InputSpec& spec);
ref::DispatchShape shape_of(const InputSpec& spec, int world, int alignment);

// Compares n elements; on mismatch throws naming `what`, the first bad index and both values.
template <typename T>
void expect_equal(const std::vector<T>& got, const std::vector<T>& want, size_t n, const std::string& what) {
  REQUIRE(got.size() >= n && want.size() >= n, what, ": size ", got.size(), " / ", want.size(), " < ", n);
  if (n == 0 || std::memcmp(got.data(), want.data(), n * sizeof(T)) == 0) return;
  for (size_t i = 0; i < n; ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0) {
      std::ostringstream os;
      os << what << ": first mismatch at element " << i << ": got " << +got[i] << ", want " << +want[i];
      throw Failure(os.str());
    }
  }
}

}  // namespace epx::test
