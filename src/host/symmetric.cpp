#include "host/symmetric.hpp"

#include <nccl.h>
#include <nccl_device.h>

#include <cstring>

#include "epx/sim_world.hpp"
#include "host/checks.hpp"
#include "host/sim_world_state.hpp"
#include "kernels/transport.hpp"

namespace epx {
namespace {

class NcclSymmetric final : public SymmetricMemory {
 public:
  NcclSymmetric(Communicator& comm, size_t num_bytes) : SymmetricMemory(comm.rank(), comm.world(), num_bytes), comm_(comm) {
    try {
      setup(num_bytes);
    } catch (...) {
      release();
      throw;
    }
  }
  ~NcclSymmetric() override { release(); }

 private:
  void setup(size_t num_bytes) {
    Communicator& comm = comm_;
    void* base = nullptr;
    EPX_NCCL_CHECK(ncclMemAlloc(&base, num_bytes));
    base_ = base;
    EPX_NCCL_CHECK(ncclCommWindowRegister(comm.nccl(), base_, num_bytes, &window_, NCCL_WIN_COLL_SYMMETRIC));
    ncclDevCommRequirements reqs;
    std::memset(&reqs, 0, sizeof(reqs));
    reqs.lsaMultimem = false;  // never multicast (NVLS) on shared hosts
    reqs.lsaBarrierCount = 1;
    EPX_NCCL_CHECK(ncclDevCommCreate(comm.nccl(), &reqs, &dev_comm_));
    dev_comm_created_ = true;
    EPX_CHECK(dev_comm_.lsaSize == comm.world(), ErrorKind::kUnsupported, "LSA team has ", dev_comm_.lsaSize,
              " ranks, world has ", comm.world());
    // The peers' LSA pointers are read on the device, once.
    void** peers_device = nullptr;
    EPX_CUDA_CHECK(cudaMalloc(&peers_device, sizeof(void*) * comm.world()));
    kernels::launch_query_peers(dev_comm_, window_, peers_device, nullptr);
    const cudaError_t launched = cudaGetLastError();
    const cudaError_t copied =
        cudaMemcpy(peers_.data(), peers_device, sizeof(void*) * comm.world(), cudaMemcpyDeviceToHost);
    cudaFree(peers_device);
    EPX_CUDA_CHECK(launched);
    EPX_CUDA_CHECK(copied);
  }
  void release() noexcept {
    if (comm_.broken()) {  // no NCCL call on a broken communicator: the memory goes with the process
      dev_comm_created_ = false;
      window_ = nullptr;
      base_ = nullptr;
      return;
    }
    if (dev_comm_created_) ncclDevCommDestroy(comm_.nccl(), &dev_comm_);
    if (window_) ncclCommWindowDeregister(comm_.nccl(), window_);
    if (base_) ncclMemFree(base_);
    dev_comm_created_ = false;
    window_ = nullptr;
    base_ = nullptr;
  }

  Communicator& comm_;
  void* base_ = nullptr;
  ncclWindow_t window_ = nullptr;
  ncclDevComm dev_comm_{};
  bool dev_comm_created_ = false;
};

class SimSymmetric final : public SymmetricMemory {
 public:
  SimSymmetric(Communicator& comm, size_t num_bytes, double timeout_s)
      : SymmetricMemory(comm.rank(), comm.world(), num_bytes), state_(comm.sim_world()->state()) {
    state_.alloc_symmetric(comm.rank(), num_bytes, timeout_s, peers_.data());
  }
  ~SimSymmetric() override { state_.release_symmetric(local()); }
  std::string check_bounds(cudaStream_t stream) override { return state_.check_guards(local(), num_bytes(), stream); }

 private:
  SimWorld::State& state_;
};

}  // namespace

std::unique_ptr<SymmetricMemory> SymmetricMemory::create(Communicator& comm, size_t num_bytes, double timeout_s) {
  EPX_CHECK(comm.world() <= kMaxWorldRanks, ErrorKind::kUnsupported, "world size ", comm.world(),
            " exceeds the limit of ", kMaxWorldRanks, " ranks");
  if (comm.simulated()) return std::unique_ptr<SymmetricMemory>(new SimSymmetric(comm, num_bytes, timeout_s));
  EPX_CHECK(!comm.broken(), ErrorKind::kState, "Buffer: rank ", comm.rank(),
            "'s communicator is broken (a host collective timed out waiting for a peer): make a new one");
  EPX_CHECK(comm.nccl() != nullptr, ErrorKind::kState, "Communicator has no NCCL communicator");
  return std::unique_ptr<SymmetricMemory>(new NcclSymmetric(comm, num_bytes));
}

}  // namespace epx
