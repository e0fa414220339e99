// Tuning: the kernel-protocol knobs of the measured winners' geometry. Internal: not installed and
// not reachable from the public headers (epx::Config holds what a user tunes). The bench and the
// tests use it to time and check other counts; the defaults are the measured best
// (docs/performance.md), which every Buffer runs until set_tuning says otherwise.
//
// Every rank must set the same Tuning on a Buffer before its next collective op. The geometry it
// resolves to (ring channels, slots, sending warps, chunk, dispatch copy warps) travels in the op's
// plan words (plan::OpPlan), so ranks that disagree get the plan-check error naming the field,
// never a wrong slot.
#pragma once

#include "epx/config.hpp"

namespace epx {

class Buffer;

struct Tuning {
  // Combine through bounded per-channel rings (push and reduce overlap) from 3 ranks up, when the
  // buffer and the block size allow it; false (and 2 ranks, where the row region is faster:
  // docs/performance.md) = push every row into the row region, then reduce. Same results bit for bit.
  // A combine whose returned rows do not fit the row region takes the rings at every rank count
  // whatever this says (plan::ring_plan, bounded).
  bool ring_combine = true;
  // Rows a sending warp of the ring combine writes before it publishes them (one release each
  // time); 0 = 8 rows per round of the warps serving a peer (8 for one warp per peer, 4 for two).
  // Config::ring_slots must hold ring_chunk rows of every warp of a block.
  int ring_chunk = 0;
  // Sending warps of a ring-combine block (every block is a channel: its first ring_send_warps
  // warps stream to every peer while the others reduce); 0 = a warp per peer, two when there are
  // only two peers (the best counts at EP4 and EP3: docs/performance.md). The ring combine is off
  // (row region) when there are fewer than the peers (R - 1) or no warp is left to reduce.
  int ring_send_warps = 0;

  // Copy-out warps of a dispatch block (the others send; the copy-out runs beside the sends);
  // 0 = auto: the rest after S = round(1.3 MB / (row bytes x num_sms)) sending warps, i.e. about
  // 1.3 MB of rows in flight over the grid (a fit of the best counts at EP4, hidden 7168:
  // docs/performance.md).
  int dispatch_copy_warps = 0;

  // A Buffer across virtual nodes moves the RDMA leg through the NVLink emulation (EmuNet); true
  // runs it in the emulation's adversarial mode (puts held back and run in reverse order at the
  // next signal, commit or flush: no more than the scale-out contract promises), which the tests
  // use so that a kernel that leans on an order GIN does not promise fails there. No effect
  // within one node. Ranks may differ (either mode keeps the contract).
  bool net_adversarial = false;

  // Throws Error(kInvalidArgument) naming the field ("Tuning.<field>") when out of range for a
  // Buffer running `config` (warp counts are bounded by config.num_threads, ring_chunk by
  // config.ring_slots).
  void validate(const Config& config) const;
};

// The only way to change a Buffer's Tuning (default-constructed when the Buffer is made): validated
// against the Buffer's Config; takes effect at the next op. Local, like Buffer::set_config: every
// rank must set the same one. Buffer::set_config checks the Tuning held against the new Config.
void set_tuning(Buffer& buffer, const Tuning& tuning);
const Tuning& tuning(const Buffer& buffer);

}  // namespace epx
