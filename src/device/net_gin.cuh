// GinNet: the scale-out interface (device/net.cuh) over NCCL GIN (ncclGin, nccl_device/gin.h), on
// the world team of the communicator's ncclDevComm and its symmetric window. Built only where the
// NCCL headers have GIN (EPX_HAVE_GIN); runs only with the NCCL it was compiled against
// (host/net.hpp: check_gin_usable) and on a devComm made with GIN resources (ginContextCount,
// ginSignalCount), which epx requests only when the communicator spans NCCL nodes.
//
// How the contract maps onto GIN (NCCL 2.28.9):
//  - put / put_signal / signal: ncclGin::put / signal on context ctx (taken modulo the devComm's
//    contexts by NCCL), with GinSignalAdd (2.28 SignalAdd, 2.30 StrongSignalAdd; never the Inc
//    forms: they may not be mixed with adds).
//    GIN: a signal is visible only after its put's payload and every earlier put's on the same
//    context to the same peer: contract 1 within a context.
//  - the GDAKI put does not fence at system scope: lane 0 fences (acq_rel, sys) after the warp's
//    stores, before posting, and tells NCCL the release is done (alreadyReleased = system).
//  - commit: nothing to do beyond ordering the warp: posts on one context are ordered by posting,
//    and a post has been made when put returns.
//  - flush: ncclGin::flush on every context (flush frees sources, it proves no delivery).
//  - read: ncclGin::readSignal (acquire). Never waitSignal: it has no timeout (net_wait_geq).
#pragma once
#include "common/gin_support.hpp"

#if EPX_HAVE_GIN
#include <nccl.h>
#include <nccl_device.h>

#include <cstddef>
#include <cstdint>

#include "common/net_view.hpp"
#include "device/net.cuh"
#include "device/ptx.cuh"

namespace epx::device {

// The signal of contract 1 (visible only after every earlier put on the context to the peer):
// NCCL 2.28's SignalAdd; NCCL 2.30 splits it into strong and weak and deprecates the old name.
#if NCCL_VERSION_CODE >= 23000
using GinSignalAdd = ncclGin_StrongSignalAdd;
#else
using GinSignalAdd = ncclGin_SignalAdd;
#endif

class GinNetWarp {
 public:
  __device__ explicit GinNetWarp(const GinNetView& view) : view_(view), lane_(threadIdx.x % 32) {}

  __device__ void put(int ctx, int peer, size_t dst_off, size_t src_off, size_t num_bytes) {
    release_warp();
    ncclGin gin(view_.comm, ctx);
    gin.put(ncclTeamWorld(view_.comm), peer, view_.window, dst_off, view_.window, src_off, num_bytes,
            ncclGin_None{}, ncclGin_None{}, ncclCoopWarp{}, ncclGin_None{}, cuda::thread_scope_system);
  }

  __device__ void put_signal(int ctx, int peer, size_t dst_off, size_t src_off, size_t num_bytes, int sig,
                             uint64_t add) {
    release_warp();
    ncclGin gin(view_.comm, ctx);
    gin.put(ncclTeamWorld(view_.comm), peer, view_.window, dst_off, view_.window, src_off, num_bytes,
            GinSignalAdd{gin_signal(sig), add}, ncclGin_None{}, ncclCoopWarp{},
            ncclGin_None{}, cuda::thread_scope_system);
  }

  __device__ void signal(int ctx, int peer, int sig, uint64_t add) {
    release_warp();
    ncclGin gin(view_.comm, ctx);
    gin.signal(ncclTeamWorld(view_.comm), peer, GinSignalAdd{gin_signal(sig), add},
               ncclCoopWarp{}, ncclGin_None{}, cuda::thread_scope_system);
  }

  __device__ void commit() { __syncwarp(); }

  __device__ void flush() {
    for (int ctx = 0; ctx < view_.num_contexts; ++ctx) ncclGin(view_.comm, ctx).flush(ncclCoopWarp{});
  }

  __device__ uint64_t read(int sig) const {
    return ncclGin(view_.comm, 0).readSignal(gin_signal(sig));
  }

 private:
  // Ops share the devComm's signals: each owns the ids from its view's signal_base.
  __device__ ncclGinSignal_t gin_signal(int sig) const { return static_cast<ncclGinSignal_t>(view_.signal_base + sig); }

  // The warp's stores (sources it wrote) before the post, at system scope: the NIC reads them.
  __device__ void release_warp() const {
    __syncwarp();
    if (lane_ == 0) fence_acq_rel_sys();
    __syncwarp();
  }

  const GinNetView& view_;
  const int lane_;
};

struct GinNet {
  using View = GinNetView;
  using Warp = GinNetWarp;
};

}  // namespace epx::device
#endif  // EPX_HAVE_GIN
