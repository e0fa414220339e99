// Symmetric memory providers behind Buffer (design.md §2): one window per rank, the same size on
// every rank, and the table of every rank's window as mapped here. Kernels see only that table.
//  - NCCL: ncclMemAlloc + a symmetric window; peer pointers from the LSA team (real ranks). Its
//    devComm has GIN resources only when asked for (a world that spans NCCL nodes, host/net_plan.hpp).
//  - SimWorld: slices of one device allocation shared by the world's rank threads.
#pragma once
#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>
#include <nccl.h>
#include <nccl_device.h>

#include "common/layout.hpp"
#include "epx/communicator.hpp"
#include "host/net_plan.hpp"

namespace epx {

class SymmetricMemory {
 public:
  // What a window across NCCL nodes asks of NCCL: the GIN resources, and the words that describe
  // the world in the error when NCCL has no GIN for it.
  struct GinSetup {
    GinRequest request;
    std::string world;
  };
  // Collective over the communicator's ranks; every rank passes the same `num_bytes` and `gin`.
  // With `gin` (a real communicator only) the devComm is made with GIN resources before the window
  // exists; when NCCL refuses them this throws Error(kUnsupported) naming GIN and the NCCL version,
  // and the communicator takes no further window (NCCL 2.28.9 leaves it marked GIN-enabled after
  // the failure, and later window calls on it may crash). Without `gin` no GIN is requested, and
  // the window's LSA team must be the whole world.
  static std::unique_ptr<SymmetricMemory> create(Communicator& comm, size_t num_bytes, double timeout_s,
                                                 const GinSetup* gin = nullptr);
  // Collective for the NCCL window (deregistration); the caller keeps the ranks in step first.
  virtual ~SymmetricMemory() = default;

  // Empty when nothing of this rank's was seen written outside its window (simulated windows have
  // guard bands; an NCCL window has none and always answers empty), else what was found. Call
  // only when no op runs.
  virtual std::string check_bounds(cudaStream_t stream) { (void)stream; return {}; }

  // The devComm with GIN resources and the window, for GinNet's view; null where none was asked for.
  virtual const ncclDevComm* gin_comm() const { return nullptr; }
  virtual ncclWindow_t window() const { return nullptr; }

  char* local() const { return peers_[rank_]; }
  // peers()[p] = rank p's window as mapped in this process, p < world; null outside this rank's
  // NVLink domain (a world across NCCL nodes).
  char* const* peers() const { return peers_.data(); }
  size_t num_bytes() const { return num_bytes_; }

 protected:
  static void mark_gin_refused(Communicator& comm) { comm.gin_refused_ = true; }
  SymmetricMemory(int rank, int world, size_t num_bytes) : peers_(world, nullptr), rank_(rank), num_bytes_(num_bytes) {}
  std::vector<char*> peers_;  // world entries
  int rank_ = 0;
  size_t num_bytes_ = 0;
};

}  // namespace epx
