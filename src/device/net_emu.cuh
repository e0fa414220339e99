// EmuNet: the scale-out interface (device/net.cuh) emulated over NVLink, for tests and virtual
// nodes inside one NVLink domain (SimWorld, or a real domain split by BufferOptions::node_size).
//
//  - put: a warp copy from this rank's window into the peer's window through its NVLink (LSA or
//    SimWorld) pointer, at once (kDirect) or deferred (kAdversarial, below).
//  - signal: the warp's stores are ordered (syncwarp) before lane 0's atomic add with release at
//    system scope on the emulated signal word in the receiver's window
//    (EmuNetView::signal_offset + 8 * sig); read is an acquire load of one's own word.
//  - commit: a system-scope fence by lane 0 after the warp's stores; flush: nothing is in flight
//    once put returns (the sources were read), so only the adversarial queue is drained.
//
// kDirect orders more than the contract (every earlier store of the warp, any context, lands
// before a signal). kAdversarial gives no more than the contract: each put is held in the warp's
// queue and runs, last posted first, at the warp's next signal on that context, or at its next
// commit or flush (all contexts); a full queue runs early (legal: a put may land any time). The
// queue is in shared memory (kQueueSize puts per warp, 32 warps: 16 KiB per block). So code
// that reads data signalled on another context, or rewrites a source before flush, sees wrong
// data in the tests instead of on a cluster.
#pragma once
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "common/net_view.hpp"
#include "device/copy.cuh"
#include "device/net.cuh"
#include "device/ptx.cuh"

namespace epx::device {

template <EmuMode kMode>
class EmuNetWarp {
 public:
  static constexpr bool kAdversarial = kMode == EmuMode::kAdversarial;
  static constexpr int kQueueSize = 16;  // puts held per warp (adversarial mode)

  __device__ explicit EmuNetWarp(const EmuNetView& view) : view_(view), lane_(threadIdx.x % kWarpSize) {}

  __device__ void put(int ctx, int peer, size_t dst_off, size_t src_off, size_t num_bytes) {
    if constexpr (kAdversarial) {
      if (queue_.size == kQueueSize) drain(-1);
      __syncwarp();
      if (lane_ == 0) queue()[queue_.size] = Pending{ctx, peer, dst_off, src_off, num_bytes};
      __syncwarp();
      ++queue_.size;
    } else {
      (void)ctx;
      copy(peer, dst_off, src_off, num_bytes);
    }
  }

  __device__ void put_signal(int ctx, int peer, size_t dst_off, size_t src_off, size_t num_bytes, int sig,
                             uint64_t add) {
    put(ctx, peer, dst_off, src_off, num_bytes);
    signal(ctx, peer, sig, add);
  }

  __device__ void signal(int ctx, int peer, int sig, uint64_t add) {
    if constexpr (kAdversarial) drain(ctx);
    __syncwarp();  // every lane's stores of this warp before lane 0's release
    if (lane_ == 0) red_add_release_sys(signal_word(peer, sig), add);
    __syncwarp();
  }

  __device__ void commit() {
    if constexpr (kAdversarial) drain(-1);
    __syncwarp();
    if (lane_ == 0) fence_acq_rel_sys();
    __syncwarp();
  }

  __device__ void flush() {
    if constexpr (kAdversarial) drain(-1);
    __syncwarp();
  }

  __device__ uint64_t read(int sig) const { return ld_acquire_sys(signal_word(view_.rank, sig)); }

 private:
  struct Pending {
    int ctx, peer;
    size_t dst_off, src_off, num_bytes;
  };
  // The held puts live in shared memory (a queue per warp of the block, at most 32 warps), not
  // in registers: kernels keep their register budget in both modes.
  struct Queue {
    int size = 0;
  };
  struct NoQueue {};
  __device__ static Pending* queue() {
    __shared__ Pending held[32][kQueueSize];
    return held[threadIdx.x / kWarpSize];
  }

  __device__ uint64_t* signal_word(int rank, int sig) const {
    return reinterpret_cast<uint64_t*>(view_.windows[rank] + view_.signal_offset) + sig;
  }

  __device__ void copy(int peer, size_t dst_off, size_t src_off, size_t num_bytes) {
    __syncwarp();  // the source may have been written by other lanes of this warp
    coop_copy<4>(view_.windows[peer] + dst_off, view_.windows[view_.rank] + src_off, num_bytes, lane_, kWarpSize);
  }

  // Runs the held puts of context `ctx` (-1: all), last posted first, and keeps the others in order.
  __device__ void drain(int ctx) {
    if constexpr (kAdversarial) {
      Pending* held = queue();
      for (int i = queue_.size - 1; i >= 0; --i) {
        const Pending p = held[i];
        if (ctx < 0 || p.ctx == ctx) copy(p.peer, p.dst_off, p.src_off, p.num_bytes);
      }
      __syncwarp();
      int kept = 0;
      for (int i = 0; i < queue_.size; ++i) {
        const Pending p = held[i];
        __syncwarp();
        if (ctx >= 0 && p.ctx != ctx) {
          if (lane_ == 0) held[kept] = p;
          ++kept;
        }
        __syncwarp();
      }
      queue_.size = kept;
    }
  }

  const EmuNetView& view_;
  const int lane_;
  std::conditional_t<kAdversarial, Queue, NoQueue> queue_;
};

// The backends of device/net.cuh.
template <EmuMode kMode>
struct EmuNet {
  using View = EmuNetView;
  using Warp = EmuNetWarp<kMode>;
};
using EmuNetDirect = EmuNet<EmuMode::kDirect>;
using EmuNetAdversarial = EmuNet<EmuMode::kAdversarial>;

}  // namespace epx::device
