// GPU test harness: runs a test body on R ranks, real (one forked process per GPU, through
// epx::launch_local) or simulated (R threads on one GPU, through epx::launch_sim); device memory
// helpers on the rank's own stream; inputs every rank can regenerate for every other rank from
// per-rank seeds.
//
// NOTE: every helper here keeps the SimWorld rules (epx/sim_world.hpp), in both modes: work goes
// on the rank's stream (run_world sets it for the body's thread), memory is allocated and freed
// stream-ordered, and nothing waits for the whole device. A rank thread that waited for the device
// would wait for its peers' kernels, which may be spinning on this rank's next step.
#pragma once
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <ostream>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "epx/buffer.hpp"
#include "epx/launcher.hpp"
#include "epx/sim_world.hpp"
#include "reference/reference.hpp"

namespace epx::test {

// A failed expectation inside a rank (gtest assertions cross neither fork() nor the rank threads).
struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};
#define REQUIRE(cond, ...)                                                                          \
  do {                                                                                              \
    if (!(cond)) throw ::epx::test::Failure(::epx::detail::concat(__FILE__, ":", __LINE__, ": ", #cond, ": ", __VA_ARGS__)); \
  } while (0)
#define CUDA_OK(call) REQUIRE((call) == cudaSuccess, #call, " failed")

// How a test's ranks run: kReal = one process per GPU (needs R GPUs), kSim = R threads of one
// process on GPU 0 (a SimWorld: needs one GPU and R <= SimWorld::max_world()).
enum class WorldMode { kReal, kSim };
const char* mode_name(WorldMode mode);  // "real", "sim": the suffix of the test names
inline void PrintTo(WorldMode mode, std::ostream* os) { *os << mode_name(mode); }

// One instantiation of a multi-rank test: names like real_world4, sim_world2.
struct WorldParam {
  WorldMode mode;
  int world;
};
inline void PrintTo(const WorldParam& p, std::ostream* os) { *os << mode_name(p.mode) << "_world" << p.world; }
// Both modes at every world size the tests cover (2, 3, 4, 8).
std::vector<WorldParam> world_params();
std::string world_param_name(const ::testing::TestParamInfo<WorldParam>& info);
std::string mode_param_name(const ::testing::TestParamInfo<WorldMode>& info);

// Seed of this test run: EPX_TEST_SEED if set, else fresh; printed so a failure can be replayed.
uint64_t run_seed();

// Number of visible GPUs (counted in a child process).
int num_gpus();
// SimWorld::max_world() on GPU 0, asked in a child process (0 without a GPU).
int sim_max_world();
// Why `world` ranks cannot run in `mode` on this machine; empty when they can.
std::string why_not_runnable(WorldMode mode, int world);

// Skips the test (GTEST_SKIP, with the reason) unless `world` ranks can run in `mode` here.
#define SKIP_UNLESS_RUNNABLE(mode, world)                                                           \
  do {                                                                                              \
    const std::string why_ = ::epx::test::why_not_runnable((mode), (world));                         \
    if (!why_.empty()) GTEST_SKIP() << why_;                                                        \
  } while (0)
// Real mode: needs n GPUs ("needs n GPUs, found m").
#define SKIP_WITHOUT_GPUS(n) SKIP_UNLESS_RUNNABLE(::epx::test::WorldMode::kReal, (n))
// Sim mode: needs one GPU and n <= SimWorld::max_world().
#define SKIP_WITHOUT_SIM_WORLD(n) SKIP_UNLESS_RUNNABLE(::epx::test::WorldMode::kSim, (n))

struct RankCtx {
  int rank = 0, world = 0;
  uint64_t seed = 0;
  Communicator* comm = nullptr;
  Buffer* buffer = nullptr;
  cudaStream_t stream = nullptr;  // the rank's stream (also rank_stream() in the body's thread)
  WorldMode mode = WorldMode::kReal;
  // The options `buffer` was made with: the test's, with Config.num_sms lowered to the rank's SM
  // share in a SimWorld. Further Buffers of the test take these.
  BufferOptions options;
};

// Runs `body` on `world` ranks, each with a Buffer of `nvl_bytes`; returns the number of ranks that
// failed (each prints what failed, with the seed). Sim mode runs the SimWorld in a
// child process, so this process never initializes CUDA (real-mode tests fork after it) and a
// world that hangs is killed at the time limit.
int run_world(WorldMode mode, int world, size_t nvl_bytes, const BufferOptions& options,
              const std::function<void(RankCtx&)>& body);
inline int run_world(WorldMode mode, int world, size_t nvl_bytes, const Config& config,
                     const std::function<void(RankCtx&)>& body) {
  BufferOptions options;
  options.config = config;
  return run_world(mode, world, nvl_bytes, options, body);
}

// Runs `fn` in a forked child process (a CUDA context of its own); returns its result (0..255), 1
// if it threw (printed), died, or was killed after `timeout_s`.
int run_in_child(const std::function<int()>& fn, double timeout_s = 240);

// The stream of the rank the calling thread runs; REQUIREs one (set by run_world, or RankStream).
cudaStream_t rank_stream();
// Makes `stream` the calling thread's rank stream for this object's lifetime.
class RankStream {
 public:
  explicit RankStream(cudaStream_t stream);
  ~RankStream();
  RankStream(const RankStream&) = delete;
  RankStream& operator=(const RankStream&) = delete;

 private:
  cudaStream_t previous_;
};

// Copies on the rank's stream; they return when the copy is done.
void upload_bytes(void* dst, const void* src, size_t bytes);    // host -> device
void download_bytes(void* dst, const void* src, size_t bytes);  // device -> host
// Device -> device, ordered on the rank's stream (returns at once).
void copy_device_bytes(void* dst, const void* src, size_t bytes);

// Owning device allocation, allocated and freed in order on the rank's stream of its creation
// (cudaMallocAsync / cudaFreeAsync): usable by work on that stream.
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
  // Waits for the rank's stream (the kernels that wrote this memory), then copies.
  void download_raw(void* dst, size_t bytes) const;
  void fill(uint8_t byte);  // sentinel fill, in order on the rank's stream

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
  // fp8 scales: kF32 [N, ceil(H/128)] floats, kUe8m0 [N, ceil(H/512)] int32 (4 packed exponent
  // bytes each, as DeepGEMM takes them), kOnePerToken [N] floats.
  enum class Scales { kF32, kUe8m0, kOnePerToken } scales = Scales::kF32;
};

// 32-bit scale words per fp8 row of `spec` (0 for bf16).
int num_scale_columns(const InputSpec& spec);

// Rank `rank`'s inputs, a pure function of (seed, rank, spec): distinct experts per token.
ref::RankInput make_input(uint64_t seed, int rank, const InputSpec& spec);
ref::DispatchShape shape_of(const InputSpec& spec, int world, int alignment);

// Names the rows of a compared output in failure messages: `row_elems` compared elements per row
// (bytes when a row is compared as bytes), and `name(row)` says which row it is, e.g.
// "row 5: from rank 2, token 17" (received rows) or "rank 1's token 17" (combined rows).
struct RowNames {
  size_t row_elems = 0;
  std::function<std::string(size_t)> name;
};
// The received rows of a dispatch: the reference's source rank and token of each row.
RowNames received_rows(const ref::DispatchResult& want, size_t row_elems);
// The token rows of rank `rank`'s own outputs (layout, combine).
RowNames token_rows(int rank, size_t row_elems);

// Compares n elements; on mismatch throws naming `what`, the first bad index (with `rows`, the row
// it belongs to, where that row came from and the element within it) and both values.
template <typename T>
void expect_equal(const std::vector<T>& got, const std::vector<T>& want, size_t n, const std::string& what,
                  const RowNames& rows = {}) {
  REQUIRE(got.size() >= n && want.size() >= n, what, ": size ", got.size(), " / ", want.size(), " < ", n);
  if (n == 0 || std::memcmp(got.data(), want.data(), n * sizeof(T)) == 0) return;
  for (size_t i = 0; i < n; ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0) {
      std::ostringstream os;
      os << what << ": first mismatch at element " << i;
      if (rows.row_elems > 0 && rows.name)
        os << " (" << rows.name(i / rows.row_elems) << ", element " << i % rows.row_elems << " of the row)";
      os << ": got " << +got[i] << ", want " << +want[i];
      throw Failure(os.str());
    }
  }
}

// Runs f, requires an epx::Error of `kind` whose message contains every one of `needles`.
template <typename F>
void require_error(F&& f, ErrorKind kind, const std::vector<std::string>& needles) {
  try {
    f();
  } catch (const Error& e) {
    REQUIRE(e.kind() == kind, "wrong error kind ", error_kind_name(e.kind()), ": ", e.what());
    for (const std::string& needle : needles)
      REQUIRE(std::string(e.what()).find(needle) != std::string::npos, "message lacks '", needle, "': ", e.what());
    return;
  }
  throw Failure("no epx::Error thrown, wanted " + std::string(error_kind_name(kind)) + " naming '" + needles.at(0) + "'");
}
template <typename F>
void require_error(F&& f, ErrorKind kind, const std::string& needle) {
  require_error(std::forward<F>(f), kind, std::vector<std::string>{needle});
}

}  // namespace epx::test
