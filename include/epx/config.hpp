// Config: tuning knobs of the high-throughput kernels, validated at construction.
#pragma once
#include <cstddef>
#include <cstdint>

namespace epx {

struct Config {
  // Thread blocks (one per SM) used by dispatch and combine. Must not exceed the device's SMs.
  int num_sms = 20;
  // Threads per block of the high-throughput kernels (multiple of 32, 64..512).
  int num_threads = 512;
  // Bound of every device wait; a wait that expires raises Error(kTimeout). 0 = take EPX_TIMEOUT_S
  // (default 100 s), read when the Buffer is made or given this config. An op captured into a CUDA
  // graph keeps the timeout it was captured with.
  double timeout_s = 0;
  // Combine through bounded per-channel rings (push and reduce overlap) from 3 ranks up, when the
  // buffer and the block size allow it; false (and 2 ranks, where the row region is faster:
  // docs/performance.md) = push every row into the row region, then reduce. Same results bit for bit.
  // A combine whose returned rows do not fit the row region takes the rings at every rank count
  // whatever this says (plan::ring_plan, bounded).
  bool ring_combine = true;
  // Ring combine tuning (DeepEP's chunked send/recv tokens play the same part). Channels are groups
  // of ring_senders sender blocks and one receiver block (num_sms / (ring_senders + 1) channels);
  // sender block j of a channel streams to every ring_senders-th peer, a peer's rows spread over
  // its warps. 0 = one sender block per peer. Must not exceed the peers (R - 1) when used.
  // 1 is the fastest (half the blocks reduce; docs/performance.md).
  int ring_senders = 1;
  // Rows per (peer, channel) ring at most (fewer when the row region is smaller).
  int ring_slots = 128;
  // Rows a sender warp writes before it publishes them (one release each time); 0 = about 20
  // rows per round of the warps serving a peer, at most 4 each; with split blocks 8 rows per
  // round (8 for one warp per peer, 4 for two).
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

  // Throws Error(kInvalidArgument) naming the field when out of range. `num_device_sms` <= 0 skips
  // the check against the device.
  void validate(int num_device_sms = 0) const;
  // Default config for a given number of ranks (src/host/config.cpp, docs/performance.md), with
  // num_sms at most `num_device_sms` when that is > 0 (a SimWorld rank's share:
  // Communicator::num_device_sms()).
  static Config defaults(int num_ranks, int num_device_sms = 0);
  // num_nvl_bytes (DeepEP's signature) that serves any batch of rows of up to `hidden_bytes` bytes
  // (pass the widest row moved: 2 x hidden for bf16 combines) at `num_ranks` ranks: a call whose rows
  // do not all fit streams through num_ranks x num_sms rings of ring_slots rows (at least every
  // ring minimum), room for fp8 scales and the largest top-k included (src/host/plan.cpp).
  size_t get_nvl_buffer_size_hint(size_t hidden_bytes, int num_ranks) const;
};

}  // namespace epx
