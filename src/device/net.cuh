// The scale-out interface (docs/scaleout.md §3, docs/protocol.md "Scale-out transport"): one-sided
// puts with signals between the ranks of a world that spans nodes. Kernels are templates over a
// backend `Net`, which provides
//
//   typename Net::View   plain data, part of a kernel's params struct (built on the host)
//   typename Net::Warp   one warp's endpoint: constructed by every lane of a warp from the View,
//                        and every operation is called by all 32 lanes together (lane 0 posts)
//
// Backends: GinNet (device/net_gin.cuh: NCCL GIN, real NICs) and EmuNet (device/net_emu.cuh: the
// NVLink emulation, with an adversarial mode for tests). Operations of Net::Warp:
//
//   put(ctx, peer, dst_off, src_off, num_bytes)
//       asynchronous one-sided write of num_bytes from this rank's window at src_off into peer's
//       window at dst_off, on context ctx in [0, kMaxNetContexts). Offsets and sizes are
//       multiples of 16 bytes. Returns before the data lands.
//   put_signal(ctx, peer, dst_off, src_off, num_bytes, sig, add)
//       put, then signal(ctx, peer, sig, add).
//   signal(ctx, peer, sig, add)
//       signal[sig] += add at peer (sig in [0, num_signals), add > 0).
//   commit()
//       ends this warp's batch before it hands its work off to another warp or block (a barrier,
//       a flag): puts before a commit() count as preceding a signal that the hand-off precedes.
//   flush()
//       the sources of this warp's earlier puts may be rewritten. Says nothing about delivery.
//   read(sig) -> uint64_t   (any lane, alone)
//       acquire load of this rank's own signal[sig]. Wait through net_wait_geq (bounded).
//
// THE CONTRACT kernels may rely on (GIN gives at least this; the emulator gives no more in its
// adversarial mode):
//  1. When a receiver observes a signal sent on context ctx, every put to it on ctx that precedes
//     the signal (earlier in the same warp, or in another warp before a commit() that
//     happens-before the signal) has landed and is visible. Nothing else is: no order across
//     contexts, none between unsignalled puts, none between two puts to the same bytes.
//  2. A put's source is rewritten only after flush(), or after the receiver acknowledged (with a
//     signal back) a signal that covered the put.
//  3. A receiver never polls payload words, only signals.
//  4. Signals are 64-bit, add-only and monotone: waiters compare with a cumulative target kept in
//     their own workspace. Signals are reset only collectively, while no op runs (GinNet: NCCL's
//     resetSignal; EmuNet: the words are zeroed on the host). Adds only (never GIN's increment form).
//
// Contexts: GIN (NCCL 2.28.9) has at most 4 (one queue pair per peer each). Per-warp state (the
// adversarial queue; GIN's context registers) lives in Net::Warp, so warps never share a batch:
// a warp that hands work to another commits first.
#pragma once
#include <cstdint>

#include "common/op_context.hpp"
#include "device/sync.cuh"

namespace epx::device {

using ::epx::kMaxNetContexts;  // epx/limits.hpp: GIN's contexts in NCCL 2.28.9

// The bounded wait on a scale-out signal: until net.read(sig) >= target, through the one wait
// helper (a timeout records op, phase, rank and `peer`, the rank expected to signal). Warp-wide:
// lane 0 polls, the result is broadcast.
template <typename NetWarp>
__device__ __forceinline__ bool net_wait_geq(const OpContext& ctx, const NetWarp& net, int sig, uint64_t target,
                                             Phase phase, int peer) {
  bool ok = true;
  if (threadIdx.x % 32 == 0) ok = wait_load_geq(ctx, [&] { return net.read(sig); }, target, phase, peer).ok;
  ok = __shfl_sync(0xffffffffu, ok, 0);
  __syncwarp();  // orders lane 0's acquire before every lane's reads of the payload
  return ok;
}

}  // namespace epx::device
