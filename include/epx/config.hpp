// Config: what a user tunes in the high-throughput kernels (grid, block size, wait bound, ring
// rows), validated at construction. The protocol choices are the measured winners, not settings.
#pragma once
#include <cstddef>
#include <cstdint>

namespace epx {

struct Config {
  // Thread blocks (one per SM) used by dispatch and combine. Must not exceed the device's SMs nor
  // kMaxHtBlocks (epx/limits.hpp).
  int num_sms = 20;
  // Threads per block of the high-throughput kernels (multiple of 32, 64..512).
  int num_threads = 512;
  // Bound of every device wait; a wait that expires raises Error(kTimeout). 0 = take EPX_TIMEOUT_S
  // (default 100 s), read when the Buffer is made or given this config. An op captured into a CUDA
  // graph keeps the timeout it was captured with.
  double timeout_s = 0;
  // Rows per (peer, channel) ring of the combine rings at most (fewer when the row region is
  // smaller), and the rows per ring get_nvl_buffer_size_hint sizes for; 64..4096. It plays the part
  // of DeepEP's num_max_nvl_chunked_recv_tokens.
  int ring_slots = 128;

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
