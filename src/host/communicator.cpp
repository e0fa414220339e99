#include "epx/communicator.hpp"

#include <nccl_device.h>

#include <cstring>

#include "epx/error.hpp"
#include "epx/sim_world.hpp"
#include "epx/version.hpp"
#include "host/checks.hpp"
#include "host/sim_world_state.hpp"

namespace epx {
namespace {

// Grows the device scratch of the NCCL host collectives to at least `num_bytes`.
void reserve_scratch(void*& scratch, size_t& num_scratch_bytes, size_t num_bytes) {
  if (num_bytes <= num_scratch_bytes) return;
  if (scratch) EPX_CUDA_CHECK(cudaFree(scratch));
  scratch = nullptr;
  num_scratch_bytes = 0;
  EPX_CUDA_CHECK(cudaMalloc(&scratch, num_bytes));
  num_scratch_bytes = num_bytes;
}

}  // namespace

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

// A simulated rank: the whole world is one NVLink domain on one device; no CUDA call here.
Communicator::Communicator(SimWorld& world, int rank, int device, int num_sms_per_rank)
    : sim_(&world), rank_(rank), world_(world.world()), local_rank_(rank), local_size_(world.world()),
      device_(device), num_device_sms_(num_sms_per_rank) {}

void Communicator::init_topology() {
  EPX_NCCL_CHECK(ncclCommUserRank(comm_, &rank_));
  EPX_NCCL_CHECK(ncclCommCount(comm_, &world_));
  EPX_NCCL_CHECK(ncclCommCuDevice(comm_, &device_));
  EPX_CUDA_CHECK(cudaSetDevice(device_));
  const ncclTeam_t lsa = ncclTeamLsa(comm_);
  local_rank_ = lsa.rank;
  local_size_ = lsa.nRanks;
  EPX_CUDA_CHECK(cudaDeviceGetAttribute(&num_device_sms_, cudaDevAttrMultiProcessorCount, device_));
  EPX_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
}

Communicator::~Communicator() {
  if (stream_) cudaStreamDestroy(stream_);
  // A broken adopted communicator's kernel may still use the scratch (cudaFree would wait for it).
  if (scratch_ && !(broken_ && comm_)) cudaFree(scratch_);
  if (owns_ && comm_) ncclCommDestroy(comm_);
}

void Communicator::check_not_broken(const char* what) const {
  EPX_CHECK(!broken_, ErrorKind::kState, what, ": rank ", rank_,
            "'s communicator is broken (an earlier host collective failed or timed out waiting for a peer",
            owns_ ? "; it was aborted" : "; abort the adopted ncclComm_t", "): make a new one");
}

void Communicator::break_nccl() noexcept {
  broken_ = true;
  if (owns_ && comm_) {
    ncclCommAbort(comm_);  // ends the collective's kernel that waits for the missing peer
    comm_ = nullptr;
  }
}

void Communicator::wait_collective(double timeout_s, const char* what) {
  try {
    host_wait_stream(stream_, timeout_s, what, rank_);
  } catch (const Error& e) {
    if (e.kind() == ErrorKind::kTimeout) break_nccl();
    throw;
  }
}

void Communicator::barrier(double timeout_s) {
  if (sim_) {
    sim_->state().group.barrier(rank_, sim_->state().bound(timeout_s), "Communicator::barrier");
    return;
  }
  check_not_broken("Communicator::barrier");
  EPX_CUDA_CHECK(cudaSetDevice(device_));
  reserve_scratch(scratch_, num_scratch_bytes_, sizeof(int));
  int* word = static_cast<int*>(scratch_);
  // NCCL refuses to enqueue on a communicator with an asynchronous error (a peer's connection
  // closed: a killed process): that breaks it too.
  const ncclResult_t enqueued = ncclAllReduce(word, word, 1, ncclInt32, ncclSum, comm_, stream_);
  if (enqueued != ncclSuccess) break_nccl();
  EPX_CHECK(enqueued == ncclSuccess, ErrorKind::kNccl, "Communicator::barrier: ncclAllReduce failed on rank ", rank_,
            ": ", ncclGetErrorString(enqueued), "; the communicator is broken");
  wait_collective(timeout_s, "Communicator::barrier");
}

void Communicator::all_gather(const void* mine, void* all, size_t num_bytes, double timeout_s) {
  if (sim_) {
    sim_->state().group.all_gather(rank_, mine, all, num_bytes, sim_->state().bound(timeout_s),
                                   "Communicator::all_gather");
    return;
  }
  check_not_broken("Communicator::all_gather");
  EPX_CUDA_CHECK(cudaSetDevice(device_));
  if (num_bytes == 0) return;
  reserve_scratch(scratch_, num_scratch_bytes_, num_bytes * static_cast<size_t>(world_));
  char* recv = static_cast<char*>(scratch_);
  char* send = recv + static_cast<size_t>(rank_) * num_bytes;  // in place: NCCL's convention
  EPX_CUDA_CHECK(cudaMemcpyAsync(send, mine, num_bytes, cudaMemcpyHostToDevice, stream_));
  const ncclResult_t enqueued = ncclAllGather(send, recv, num_bytes, ncclUint8, comm_, stream_);
  if (enqueued != ncclSuccess) break_nccl();
  EPX_CHECK(enqueued == ncclSuccess, ErrorKind::kNccl, "Communicator::all_gather: ncclAllGather failed on rank ",
            rank_, ": ", ncclGetErrorString(enqueued), "; the communicator is broken");
  EPX_CUDA_CHECK(cudaMemcpyAsync(all, recv, num_bytes * world_, cudaMemcpyDeviceToHost, stream_));
  wait_collective(timeout_s, "Communicator::all_gather");
}

}  // namespace epx
