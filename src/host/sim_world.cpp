// SimWorld: R ranks as threads of one process on one GPU (design.md §3).
#include "epx/sim_world.hpp"

#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <exception>
#include <string>
#include <thread>

#include "common/layout.hpp"
#include "epx/buffer.hpp"
#include "host/checks.hpp"
#include "host/env.hpp"
#include "host/sim_world_state.hpp"
#include "host/staged_copy.hpp"

namespace epx {
namespace {

int device_sms(int device) {
  int num_devices = 0;
  EPX_CUDA_CHECK(cudaGetDeviceCount(&num_devices));
  EPX_ARG_CHECK(device >= 0 && device < num_devices, "SimWorld device: expected [0, ", num_devices, "), got ", device);
  int sms = 0;
  EPX_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

}  // namespace

int SimWorld::max_world(int device) {
  const int by_sms = device_sms(device) / kMinSmsPerRank;
  return by_sms < kMaxWorldRanks ? by_sms : kMaxWorldRanks;
}

int SimWorld::sms_per_rank(int world, int device) {
  EPX_ARG_CHECK(world >= 1, "SimWorld world: expected >= 1, got ", world);
  return device_sms(device) / world;
}

SimWorld::SimWorld(int world, int device, double timeout_s) {
  // Streams share the device's hardware queues (8 by default); work queued behind a rank's
  // dependent kernel in a shared queue cannot start, and a peer's kernel may be waiting for it.
  // More queues make sharing rare. Read when the CUDA context is created: this only helps when
  // the SimWorld comes first (tools/test.sh and the Python tests export it).
  setenv("CUDA_DEVICE_MAX_CONNECTIONS", "32", /*overwrite=*/0);
  // Under lazy loading a kernel's first launch may wait for every running kernel of the context
  // (seen on an H200: a first launch on one stream waited for a spinning kernel on another), so a
  // rank's first use of any kernel while a peer's kernel waits for that rank stalls both until
  // the peer times out. epx loads its own kernels at Buffer creation; eager loading covers the
  // program's kernels too. Also read at context creation only.
  setenv("CUDA_MODULE_LOADING", "EAGER", /*overwrite=*/0);
  const int sms = device_sms(device);
  const int by_sms = sms / kMinSmsPerRank;
  EPX_ARG_CHECK(world >= 2, "SimWorld world: expected >= 2 ranks (a simulated world exists to exercise peers), got ",
                world);
  EPX_CHECK(world <= kMaxWorldRanks, ErrorKind::kUnsupported, "SimWorld world: ", world,
            " ranks exceed the limit of ", kMaxWorldRanks, " ranks of one world");
  EPX_CHECK(world <= by_sms, ErrorKind::kUnsupported, "SimWorld world: ", world, " ranks need ", kMinSmsPerRank,
            " SMs each, device ", device, " has ", sms, " SMs (at most ", by_sms, " ranks)");
  EPX_ARG_CHECK(timeout_s >= 0 && timeout_s <= 86400, "SimWorld timeout_s: expected [0, 86400] seconds, got ",
                timeout_s);
  state_ = std::make_unique<State>(world, device, sms / world, timeout_s > 0 ? timeout_s : env::timeout_s());
  // The stream-ordered allocator may make one stream wait for another's free to reuse its memory;
  // here that stream may belong to a peer whose kernel waits for this rank: reuse only what is
  // already free. NOTE: a setting of the device's default pool, for the whole process.
  {
    cudaMemPool_t pool = nullptr;
    EPX_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, device));
    int allow = 0;
    EPX_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolReuseAllowInternalDependencies, &allow));
  }
  for (int r = 0; r < world; ++r)
    state_->comms.emplace_back(new Communicator(*this, r, device, state_->num_sms_per_rank));
}

SimWorld::~SimWorld() {
  if (!state_) return;
  State& s = *state_;
  // The ranks' threads have ended; kernels they left behind (a failed rank's) are bounded, and
  // nothing can wait for a rank any more: a device-wide sync is safe here and nowhere else.
  cudaSetDevice(s.device);
  cudaDeviceSynchronize();
  if (s.stream) {
    for (const State::Slab& slab : s.slabs)
      if (slab.base) cudaFreeAsync(slab.base, s.stream);
    cudaStreamSynchronize(s.stream);
    cudaStreamDestroy(s.stream);
  }
  for (void* p : s.deferred_host) cudaFreeHost(p);
}

int SimWorld::world() const { return state_->group.size(); }
int SimWorld::device() const { return state_->device; }
int SimWorld::num_sms_per_rank() const { return state_->num_sms_per_rank; }

Communicator& SimWorld::comm(int rank) {
  EPX_ARG_CHECK(rank >= 0 && rank < world(), "SimWorld::comm rank: expected [0, ", world(), "), got ", rank);
  return *state_->comms[rank];
}

void SimWorld::leave(int rank, const std::string& reason) { state_->group.leave(rank, reason); }

char* SimWorld::State::alloc_symmetric(int rank, size_t num_bytes_per_rank, double wait_s, char** peers) {
  const int world = group.size();
  const size_t stride = kGuardBytes + align_up(num_bytes_per_rank, kGuardBytes);
  // Rank 0 allocates; every rank learns the base (or the failure) from one all-gather, so all
  // ranks succeed or all throw.
  struct Offer {
    uint64_t base;
    uint64_t num_bytes;
  } mine{0, num_bytes_per_rank};
  std::string failure;
  if (rank == 0) {
    try {
      std::lock_guard<std::mutex> lock(mutex);
      if (stream == nullptr) EPX_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
      void* base = nullptr;
      // [guard | window 0 | guard | window 1 | ... | guard]: a write past a window lands in a
      // guard (found by check_guards), never in the next rank's flags.
      EPX_CUDA_CHECK(cudaMallocAsync(&base, stride * world + kGuardBytes, stream));
      for (int r = 0; r <= world; ++r)
        EPX_CUDA_CHECK(cudaMemsetAsync(static_cast<char*>(base) + r * stride, kGuardByte, kGuardBytes, stream));
      host_wait_stream(stream, bound(wait_s), "SimWorld symmetric allocation", rank);
      slabs.push_back(Slab{static_cast<char*>(base), stride, world});
      mine.base = reinterpret_cast<uint64_t>(base);
    } catch (const Error& e) {
      failure = e.message();
    }
  }
  std::vector<Offer> offers(world);
  group.all_gather(rank, &mine, offers.data(), sizeof(Offer), bound(wait_s), "SimWorld symmetric allocation");
  for (int r = 0; r < world; ++r)
    EPX_ARG_CHECK(offers[r].num_bytes == offers[0].num_bytes, "symmetric size: must be equal on all ranks; rank ", r,
                  " asks for ", offers[r].num_bytes, " bytes, rank 0 for ", offers[0].num_bytes);
  EPX_CHECK(offers[0].base != 0, ErrorKind::kCuda, "SimWorld: allocating ", world, " x ", num_bytes_per_rank,
            " bytes of symmetric memory failed on rank 0", failure.empty() ? "" : ": ", failure);
  char* base = reinterpret_cast<char*>(offers[0].base);
  for (int r = 0; r < world; ++r) peers[r] = base + kGuardBytes + static_cast<size_t>(r) * stride;
  return peers[rank];
}

std::string SimWorld::State::check_guards(const char* window, size_t num_bytes, cudaStream_t check_stream) {
  // The guards before and after this window (the one after starts at the window's rounded end).
  const size_t padded = align_up(num_bytes, kGuardBytes);
  const char* guards[2] = {window - kGuardBytes, window + padded};
  std::vector<unsigned char> host(kGuardBytes);
  for (int g = 0; g < 2; ++g) {
    detail::copy_to_host(host.data(), guards[g], kGuardBytes, check_stream, timeout_s + 10,
                         "checking the SimWorld window guards");
    for (size_t i = 0; i < kGuardBytes; ++i)
      if (host[i] != kGuardByte)
        return g == 0 ? detail::concat("a write landed ", kGuardBytes - i, " bytes before the window")
                      : detail::concat("a write landed ", i, " bytes past the window's ", num_bytes, " bytes");
  }
  return {};
}

void SimWorld::State::release_symmetric(char* slice) {
  std::lock_guard<std::mutex> lock(mutex);
  for (Slab& slab : slabs) {
    if (slab.base == nullptr || slice < slab.base || slice >= slab.base + slab.stride * group.size() + kGuardBytes)
      continue;
    if (--slab.num_live == 0) {
      cudaFreeAsync(slab.base, stream);
      slab.base = nullptr;
    }
    return;
  }
}

void SimWorld::State::defer_free_host(void* ptr) {
  if (ptr == nullptr) return;
  std::lock_guard<std::mutex> lock(mutex);
  deferred_host.push_back(ptr);
}

int launch_sim(int world, const std::function<int(int, int, Communicator&)>& fn, int device, double timeout_s) {
  SimWorld sim(world, device, timeout_s);
  std::vector<int> rc(world, 1);
  std::vector<std::thread> threads;
  std::fflush(stdout);
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      try {
        EPX_CUDA_CHECK(cudaSetDevice(device));
        rc[r] = fn(r, world, sim.comm(r));
        // A peer still waiting in a collective for this rank learns at once that it will not come.
        sim.leave(r, rc[r] == 0 ? std::string("finished") : detail::concat("returned ", rc[r]));
      } catch (const std::exception& e) {
        std::fprintf(stderr, "[sim rank %d/%d] %s\n", r, world, e.what());
        sim.leave(r, e.what());
        rc[r] = 1;
      }
    });
  }
  for (std::thread& t : threads) t.join();
  int failed = 0;
  for (int r = 0; r < world; ++r) failed += rc[r] != 0;
  return failed;
}

}  // namespace epx
