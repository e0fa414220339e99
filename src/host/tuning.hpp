// Tuning: the kernel-protocol choices not yet settled by measurement. Internal: not installed and
// not reachable from the public headers (epx::Config holds what a user tunes). The bench and the
// tests use it to time and check the variants; the defaults are the measured winners
// (docs/performance.md), which every Buffer runs until set_tuning says otherwise.
//
// Every rank must set the same Tuning on a Buffer before its next collective op. The geometry it
// resolves to (ring channels, slots, sender blocks and warps, chunk, dispatch copy warps) travels in
// the op's plan words (plan::OpPlan), so ranks that disagree get the plan-check error naming the
// field, never a wrong slot.
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
  // Sender and receiver blocks (ring_split_blocks = false): channels are groups of ring_senders
  // sender blocks and one receiver block (num_sms / (ring_senders + 1) channels); sender block j of
  // a channel streams to every ring_senders-th peer, a peer's rows spread over its warps. 0 = one
  // sender block per peer. Must not exceed the peers (R - 1) when used. 1 is the fastest (half the
  // blocks reduce; docs/performance.md).
  int ring_senders = 1;
  // Rows a sender warp writes before it publishes them (one release each time); 0 = about 20
  // rows per round of the warps serving a peer, at most 4 each; with split blocks 8 rows per
  // round (8 for one warp per peer, 4 for two). Config::ring_slots must hold ring_chunk rows of
  // every warp of a block.
  int ring_chunk = 0;
  // Split blocks (the default): every block is a channel of its own whose first ring_send_warps
  // warps stream to every peer (ring_senders is ignored) while the others reduce, so every SM both
  // sends and reduces. false = the sender and receiver blocks above, slower at EP3 and EP4
  // (docs/performance.md).
  bool ring_split_blocks = true;
  // Sending warps of a split block; 0 = a warp per peer, two when there are only two peers (the
  // best counts at EP4 and EP3: docs/performance.md). The ring combine is off (row region) when
  // there are fewer than the peers (R - 1) or no warp is left to reduce.
  int ring_send_warps = 0;

  // Dispatch on split blocks (needs num_sms <= 80): dispatch_copy_warps warps of every block copy
  // received rows out of the row region as they land while the other warps send. false = every
  // warp sends, then copies out after each source's completion; split blocks are faster at EP4
  // (docs/performance.md). Off by default: on NVLink GPUs the GPU tests have passed with 4 and 5
  // copy warps; the auto counts (7-12) were benchmarked there, not tested. A dispatch whose rows do
  // not fit the row region runs on split blocks whatever this says (the bounded dispatch, through
  // per-(source, block) rings: plan::dispatch_ring).
  bool dispatch_split_blocks = false;
  // Copy-out warps of a split block; 0 = auto: the rest after S = round(1.3 MB / (row bytes x
  // num_sms)) sending warps, i.e. about 1.3 MB of rows in flight over the grid (a fit of the best
  // counts at EP4, hidden 7168: docs/performance.md).
  int dispatch_copy_warps = 0;

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
