#include "host/symmetric.hpp"

#include <nccl.h>
#include <nccl_device.h>

#include <cstring>

#include "common/gin_support.hpp"
#include "epx/sim_world.hpp"
#include "epx/version.hpp"
#include "host/checks.hpp"
#include "host/sim_world_state.hpp"
#include "kernels/transport.hpp"

namespace epx {
namespace {

class NcclSymmetric final : public SymmetricMemory {
 public:
  NcclSymmetric(Communicator& comm, size_t num_bytes, const GinSetup* gin)
      : SymmetricMemory(comm.rank(), comm.world(), num_bytes), comm_(comm) {
    try {
      if (gin != nullptr) create_gin_dev_comm(*gin);
      setup(num_bytes, gin != nullptr);
    } catch (...) {
      release();
      throw;
    }
  }
  ~NcclSymmetric() override { release(); }
  const ncclDevComm* gin_comm() const override { return gin_ ? &dev_comm_ : nullptr; }
  ncclWindow_t window() const override { return window_; }

 private:
  // The devComm with GIN resources, before the window is registered: when NCCL refuses GIN (no
  // GIN-capable NIC), nothing of this Buffer is registered with the communicator NCCL has marked.
  void create_gin_dev_comm(const GinSetup& gin) {
    Communicator& comm = comm_;
    const int version = nccl_loaded_version();
    ncclDevCommRequirements reqs;
    fill_dev_comm_requirements(reqs, &gin.request);
    const ncclResult_t created = ncclDevCommCreate(comm.nccl(), &reqs, &dev_comm_);
    if (created != ncclSuccess) {
      const char* last = ncclGetLastError(comm.nccl());
      mark_gin_refused(comm);
      EPX_FAIL(ErrorKind::kUnsupported,
               gin_unavailable_message(gin.world, version,
                                       detail::concat("ncclDevCommCreate with GIN resources (", gin.request.num_contexts,
                                                      " contexts, ", gin.request.num_signals, " signals) failed on rank ",
                                                      comm.rank(), ": ", ncclGetErrorString(created),
                                                      last != nullptr && last[0] != 0 ? " (" : "",
                                                      last != nullptr ? last : "",
                                                      last != nullptr && last[0] != 0 ? ")" : "")));
    }
    dev_comm_created_ = true;
    gin_ = true;
#if EPX_HAVE_GIN
    const int contexts = dev_comm_.ginContextCount, signals = dev_comm_.ginSignalCount;
#else
    const int contexts = 0, signals = 0;
#endif
    EPX_CHECK(contexts >= 1 && signals >= gin.request.num_signals, ErrorKind::kUnsupported,
              gin_unavailable_message(gin.world, version,
                                      detail::concat("NCCL gave rank ", comm.rank(), "'s devComm ", contexts,
                                                     " GIN contexts and ", signals, " signals (asked for ",
                                                     gin.request.num_contexts, " and ", gin.request.num_signals,
                                                     "): no GIN-capable network (NCCL_GIN_ENABLE, the NIC)")));
    EPX_CHECK(dev_comm_.lsaSize == comm.local_size(), ErrorKind::kUnsupported, "LSA team has ", dev_comm_.lsaSize,
              " ranks, the communicator's NVLink domain ", comm.local_size());
  }

  void setup(size_t num_bytes, bool with_gin) {
    Communicator& comm = comm_;
    void* base = nullptr;
    EPX_NCCL_CHECK(ncclMemAlloc(&base, num_bytes));
    base_ = base;
    EPX_NCCL_CHECK(ncclCommWindowRegister(comm.nccl(), base_, num_bytes, &window_, NCCL_WIN_COLL_SYMMETRIC));
    if (!with_gin) {
      ncclDevCommRequirements reqs;
      fill_dev_comm_requirements(reqs, nullptr);
      EPX_NCCL_CHECK(ncclDevCommCreate(comm.nccl(), &reqs, &dev_comm_));
      dev_comm_created_ = true;
      EPX_CHECK(dev_comm_.lsaSize == comm.world(), ErrorKind::kUnsupported, "LSA team has ", dev_comm_.lsaSize,
                " ranks, world has ", comm.world());
    }
    // The peers' LSA pointers are read on the device, once: by LSA index, which is the world rank
    // within one NVLink domain; across NCCL nodes they are the windows of this rank's domain, world
    // ranks [rank - lsaRank, rank - lsaRank + lsaSize) (the others stay null: GIN reaches them).
    const int lsa_size = dev_comm_.lsaSize;
    const int first = with_gin ? comm.rank() - dev_comm_.lsaRank : 0;
    void** peers_device = nullptr;
    EPX_CUDA_CHECK(cudaMalloc(&peers_device, sizeof(void*) * lsa_size));
    kernels::launch_query_peers(dev_comm_, window_, peers_device, nullptr);
    const cudaError_t launched = cudaGetLastError();
    const cudaError_t copied =
        cudaMemcpy(peers_.data() + first, peers_device, sizeof(void*) * lsa_size, cudaMemcpyDeviceToHost);
    cudaFree(peers_device);
    EPX_CUDA_CHECK(launched);
    EPX_CUDA_CHECK(copied);
  }
  void release() noexcept {
    // No NCCL call on a broken communicator, nor on one whose GIN request NCCL refused: the memory
    // goes with the process.
    if (comm_.broken() || comm_.gin_refused()) {
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
  bool gin_ = false;
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

std::unique_ptr<SymmetricMemory> SymmetricMemory::create(Communicator& comm, size_t num_bytes, double timeout_s,
                                                         const GinSetup* gin) {
  EPX_CHECK(comm.world() <= kMaxWorldRanks, ErrorKind::kUnsupported, "world size ", comm.world(),
            " exceeds the limit of ", kMaxWorldRanks, " ranks");
  if (comm.simulated()) return std::unique_ptr<SymmetricMemory>(new SimSymmetric(comm, num_bytes, timeout_s));
  EPX_CHECK(!comm.broken(), ErrorKind::kState, "Buffer: rank ", comm.rank(),
            "'s communicator is broken (a host collective timed out waiting for a peer): make a new one");
  EPX_CHECK(comm.nccl() != nullptr, ErrorKind::kState, "Communicator has no NCCL communicator");
  EPX_CHECK(!comm.gin_refused(), ErrorKind::kUnsupported, "Buffer: rank ", comm.rank(),
            "'s communicator was refused GIN resources by NCCL ", nccl_version_string(nccl_loaded_version()),
            " for an earlier Buffer (no GIN), and NCCL leaves it unusable for windows: make a new one");
  return std::unique_ptr<SymmetricMemory>(new NcclSymmetric(comm, num_bytes, gin));
}

}  // namespace epx
