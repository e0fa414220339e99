// Communicator: an NCCL communicator plus the topology epx needs. One per process (and GPU).
#pragma once
#include <nccl.h>
#include <cuda_runtime_api.h>

namespace epx {

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
  int num_device_sms() const { return num_device_sms_; }
  ncclComm_t nccl() const { return comm_; }

  // Host-blocking barrier over all ranks (an NCCL all-reduce of one int), bounded by `timeout_s`.
  void barrier(double timeout_s = 100.0);

 private:
  void init_topology();
  ncclComm_t comm_ = nullptr;
  bool owns_ = false;
  int rank_ = 0, world_ = 1, local_rank_ = 0, local_size_ = 1, device_ = 0, num_device_sms_ = 0;
  int* barrier_word_ = nullptr;
  cudaStream_t barrier_stream_ = nullptr;
};

}  // namespace epx
