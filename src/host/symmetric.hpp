// Symmetric memory providers behind Buffer (design.md §2): one window per rank, the same size on
// every rank, and the table of every rank's window as mapped here. Kernels see only that table.
//  - NCCL: ncclMemAlloc + a symmetric window; peer pointers from the LSA team (real ranks).
//  - SimWorld: slices of one device allocation shared by the world's rank threads.
#pragma once
#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

#include "common/layout.hpp"
#include "epx/communicator.hpp"

namespace epx {

class SymmetricMemory {
 public:
  // Collective over the communicator's ranks; every rank passes the same `num_bytes`.
  static std::unique_ptr<SymmetricMemory> create(Communicator& comm, size_t num_bytes, double timeout_s);
  // Collective for the NCCL window (deregistration); the caller keeps the ranks in step first.
  virtual ~SymmetricMemory() = default;

  // Empty when nothing of this rank's was seen written outside its window (simulated windows have
  // guard bands; an NCCL window has none and always answers empty), else what was found. Call
  // only when no op runs.
  virtual std::string check_bounds(cudaStream_t stream) { (void)stream; return {}; }

  char* local() const { return peers_[rank_]; }
  // peers()[p] = rank p's window as mapped in this process, p < world.
  char* const* peers() const { return peers_.data(); }
  size_t num_bytes() const { return num_bytes_; }

 protected:
  SymmetricMemory(int rank, int world, size_t num_bytes) : peers_(world, nullptr), rank_(rank), num_bytes_(num_bytes) {}
  std::vector<char*> peers_;  // world entries
  int rank_ = 0;
  size_t num_bytes_ = 0;
};

}  // namespace epx
