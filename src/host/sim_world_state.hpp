// SimWorld's internals: the rank threads' host collectives and the symmetric slabs (design.md §3).
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "epx/sim_world.hpp"
#include "host/thread_group.hpp"

namespace epx {

struct SimWorld::State {
  State(int world, int device, int num_sms_per_rank, double timeout_s)
      : group(world), device(device), num_sms_per_rank(num_sms_per_rank), timeout_s(timeout_s) {}

  ThreadGroup group;
  const int device;
  const int num_sms_per_rank;
  const double timeout_s;
  std::vector<std::unique_ptr<Communicator>> comms;
  // The bound of a host collective: the caller's, at most the world's.
  double bound(double caller_timeout_s) const {
    return caller_timeout_s > 0 && caller_timeout_s < timeout_s ? caller_timeout_s : timeout_s;
  }

  // Collective over the ranks (every rank, the same `num_bytes_per_rank`): one device allocation
  // of R slices; returns this rank's slice and writes every rank's slice base into peers[0, R).
  // NOTE: the slab is allocated and freed stream-ordered on the world's own stream, so neither
  // waits for the kernels of other ranks (cudaMalloc/cudaFree may synchronize the device).
  char* alloc_symmetric(int rank, size_t num_bytes_per_rank, double timeout_s, char** peers);
  // Each rank releases its slice once (after its own work on it is done); the last frees the slab.
  void release_symmetric(char* slice);
  // Guard bands around every window (filled with kGuardByte): what a rank's kernels wrote outside
  // its window shows there instead of in a peer's flags. Empty when both guards of `window` are
  // intact, else what was found.
  static constexpr size_t kGuardBytes = size_t{2} << 20;
  static constexpr unsigned char kGuardByte = 0xEB;
  std::string check_guards(const char* window, size_t num_bytes, cudaStream_t check_stream);
  // Host-mapped memory a Buffer no longer uses, freed when the world ends (cudaFreeHost may
  // synchronize the device while peers run).
  void defer_free_host(void* ptr);

  std::mutex mutex;  // guards everything below
  cudaStream_t stream = nullptr;
  struct Slab {
    char* base = nullptr;
    size_t stride = 0;  // guard + window rounded up to kGuardBytes
    int num_live = 0;
  };
  std::vector<Slab> slabs;
  std::vector<void*> deferred_host;
};

}  // namespace epx
