// Communicator: the ranks of one expert-parallel group and the host collectives epx needs.
//
// Two kinds, one interface:
//  - real: an NCCL communicator, one process (or thread) per GPU (made from an ncclUniqueId or
//    adopted from the caller's ncclComm_t);
//  - simulated: handed out by a SimWorld (epx/sim_world.hpp): R ranks as threads of one process on
//    one GPU, for developing and testing EP code on a single GPU. Its host collectives are thread
//    barriers, its symmetric memory slices of one allocation, and each rank owns SMs / R of the
//    device (num_device_sms()), so every rank's grids are resident together.
// A Communicator is used from one thread at a time (its rank's).
#pragma once
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <cstddef>

namespace epx {

class SimWorld;
class SymmetricMemory;

class Communicator {
 public:
  // Rank 0 calls this and shares the id with the others (torch.distributed, MPI, a file, or
  // epx::launch_local).
  static ncclUniqueId make_unique_id();

  // Creates a new NCCL communicator (collective over all `world` ranks). Sets the current device.
  Communicator(const ncclUniqueId& id, int rank, int world, int device);
  // Adopts an existing communicator; `owns` = destroy it with this object.
  Communicator(ncclComm_t comm, bool owns);
  ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int rank() const { return rank_; }
  int world() const { return world_; }
  // Rank and size inside the NVLink (NCCL LSA) domain.
  int local_rank() const { return local_rank_; }
  int local_size() const { return local_size_; }
  int num_nodes() const { return world_ / local_size_; }
  int device() const { return device_; }
  // SMs this rank may use: the device's, or its share (device SMs / R) in a SimWorld.
  int num_device_sms() const { return num_device_sms_; }
  // The NCCL communicator; nullptr when simulated.
  ncclComm_t nccl() const { return comm_; }
  bool simulated() const { return sim_ != nullptr; }
  // The SimWorld this rank belongs to; nullptr when real.
  SimWorld* sim_world() const { return sim_; }

  // Host-blocking barrier over all ranks, bounded by `timeout_s` (Error(kTimeout) on expiry).
  void barrier(double timeout_s = 100.0);
  // Host all-gather of `num_bytes` per rank: all[r * num_bytes ...] = rank r's `mine`. Bounded.
  void all_gather(const void* mine, void* all, size_t num_bytes, double timeout_s = 100.0);

  // A real communicator whose host collective missed its bound (or that NCCL refused to enqueue
  // on, after an asynchronous error such as a peer's closed connection) is broken: NCCL's kernel
  // of that collective may still wait on the communicator's stream for a peer that is gone (a
  // killed process never arrives). An owned NCCL communicator is then aborted (ncclCommAbort ends that
  // kernel); an adopted one is left to its owner, who must abort it. After that, host collectives
  // and new Buffers raise Error(kState), and the teardown of Buffers made on it skips every NCCL
  // call (their symmetric memory is released with the process). Never true for a simulated one.
  bool broken() const { return broken_; }
  // NCCL refused this communicator GIN resources (a Buffer across NCCL nodes where GIN is
  // unavailable). NCCL 2.28.9 leaves such a communicator marked GIN-enabled, and window calls on
  // it may crash: later Buffers on it raise Error(kUnsupported), and NCCL is left to release what
  // it holds when the communicator is destroyed.
  bool gin_refused() const { return gin_refused_; }

 private:
  friend class SimWorld;
  friend class SymmetricMemory;
  Communicator(SimWorld& world, int rank, int device, int num_sms_per_rank);
  void init_topology();
  void check_not_broken(const char* what) const;
  // Waits for this rank's part of a host collective on stream_; on a timeout, breaks the communicator.
  void wait_collective(double timeout_s, const char* what);
  // Marks the communicator broken and aborts an owned NCCL communicator (see broken()).
  void break_nccl() noexcept;
  ncclComm_t comm_ = nullptr;
  bool owns_ = false;
  bool broken_ = false;
  bool gin_refused_ = false;
  SimWorld* sim_ = nullptr;
  int rank_ = 0, world_ = 1, local_rank_ = 0, local_size_ = 1, device_ = 0, num_device_sms_ = 0;
  void* scratch_ = nullptr;  // device scratch of the NCCL host collectives
  size_t num_scratch_bytes_ = 0;
  cudaStream_t stream_ = nullptr;
};

}  // namespace epx
