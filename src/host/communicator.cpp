#include "epx/communicator.hpp"

#include <nccl_device.h>

#include <chrono>
#include <thread>

#include "epx/error.hpp"
#include "epx/version.hpp"
#include "host/checks.hpp"

namespace epx {

ncclUniqueId Communicator::make_unique_id() {
  ncclUniqueId id;
  EPX_NCCL_CHECK(ncclGetUniqueId(&id));
  return id;
}

Communicator::Communicator(const ncclUniqueId& id, int rank, int world, int device) : owns_(true) {
  check_nccl_version();
  EPX_ARG_CHECK(world >= 1, "world: expected >= 1, got ", world);
  EPX_ARG_CHECK(rank >= 0 && rank < world, "rank: expected [0, ", world, "), got ", rank);
  int num_devices = 0;
  EPX_CUDA_CHECK(cudaGetDeviceCount(&num_devices));
  EPX_ARG_CHECK(device >= 0 && device < num_devices, "device: expected [0, ", num_devices, "), got ", device);
  EPX_CUDA_CHECK(cudaSetDevice(device));
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  EPX_NCCL_CHECK(ncclCommInitRankConfig(&comm_, world, id, rank, &config));
  init_topology();
}

Communicator::Communicator(ncclComm_t comm, bool owns) : comm_(comm), owns_(owns) {
  EPX_ARG_CHECK(comm != nullptr, "comm: null ncclComm_t");
  check_nccl_version();
  init_topology();
}

void Communicator::init_topology() {
  EPX_NCCL_CHECK(ncclCommUserRank(comm_, &rank_));
  EPX_NCCL_CHECK(ncclCommCount(comm_, &world_));
  EPX_NCCL_CHECK(ncclCommCuDevice(comm_, &device_));
  EPX_CUDA_CHECK(cudaSetDevice(device_));
  const ncclTeam_t lsa = ncclTeamLsa(comm_);
  local_rank_ = lsa.rank;
  local_size_ = lsa.nRanks;
  EPX_CUDA_CHECK(cudaDeviceGetAttribute(&num_device_sms_, cudaDevAttrMultiProcessorCount, device_));
  EPX_CUDA_CHECK(cudaMalloc(&barrier_word_, sizeof(int)));
  EPX_CUDA_CHECK(cudaStreamCreateWithFlags(&barrier_stream_, cudaStreamNonBlocking));
}

Communicator::~Communicator() {
  if (barrier_stream_) cudaStreamDestroy(barrier_stream_);
  if (barrier_word_) cudaFree(barrier_word_);
  if (owns_ && comm_) ncclCommDestroy(comm_);
}

void Communicator::barrier(double timeout_s) {
  EPX_NCCL_CHECK(ncclAllReduce(barrier_word_, barrier_word_, 1, ncclInt32, ncclSum, comm_, barrier_stream_));
  host_wait_stream(barrier_stream_, timeout_s, "Communicator::barrier", rank_);
}

}  // namespace epx
