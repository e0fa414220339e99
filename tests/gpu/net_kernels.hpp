// Kernels of the scale-out contract tests (test_net.cpp), over the EmuNet backends (and compiled,
// not run, over GinNet where the NCCL headers have GIN).
//
// Every rank runs one kernel of two blocks: block 0 sends to every rank of the other nodes (warp w
// serves destination w), block 1 receives from them (warp w serves source w) and, each time it
// observes a signal, copies what that signal covers out of its window into `snapshot` at once:
// the snapshot shows what a receiver that trusted the signal would have read. The host compares
// snapshots and windows with payload(), which encodes (seed, source, destination, chunk, word).
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "common/hd.hpp"
#include "common/net_view.hpp"
#include "common/op_context.hpp"
#include "common/topology.hpp"

namespace epx::test {

enum class NetScenario {
  kDelivery,           // chunks over 4 contexts, one put_signal per group; plus a hand-off:
                       //   every warp puts, commit, barrier, one warp signals (contract 1)
  kFlushReuse,         // one staging slot per destination, rewritten after each put's flush (contract 2)
  kReuseWithoutFlush,  // NEGATIVE: the staging slot rewritten before flush
  kCrossContext,       // NEGATIVE: puts on context 0, signal on context 1; the sender waits for
                       //   the receiver's ack before it flushes
  kHandOffWithoutCommit,  // NEGATIVE: every warp puts, barrier without commit, one warp signals;
                          //   every warp waits for the receiver's ack before it flushes
};
const char* scenario_name(NetScenario s);

// Offsets in every rank's window (the same on all ranks).
struct NetTestLayout {
  int num_ranks = 0, num_warps = 0, max_chunks = 0, chunk_bytes = 0;
  static constexpr size_t kSignalOffset = 4096;  // after the SyncArea (the waits' abort words)
  static constexpr int kSignalsPerSource = 8;
  EPX_HD int sig_data(int src, int ctx) const { return src * kSignalsPerSource + ctx; }  // ctx < 4
  EPX_HD int sig_handoff(int src) const { return src * kSignalsPerSource + 4; }
  EPX_HD int sig_ack(int src) const { return src * kSignalsPerSource + 5; }
  EPX_HD int num_signals() const { return num_ranks * kSignalsPerSource; }
  EPX_HD size_t chunk(int i) const { return static_cast<size_t>(i) * chunk_bytes; }
  EPX_HD size_t recv_offset() const { return 65536; }
  // Received chunk c from `src`; hand-off chunks follow the max_chunks data chunks.
  EPX_HD int recv_slot(int src, int c) const { return src * (max_chunks + num_warps) + c; }
  EPX_HD int handoff_slot(int src, int warp) const { return recv_slot(src, max_chunks + warp); }
  EPX_HD int num_recv_slots() const { return num_ranks * (max_chunks + num_warps); }
  EPX_HD size_t recv(int slot) const { return recv_offset() + chunk(slot); }
  EPX_HD size_t src_offset() const { return recv_offset() + chunk(num_recv_slots()); }
  EPX_HD size_t src(int dst, int c) const { return src_offset() + chunk(dst * max_chunks + c); }
  EPX_HD size_t handoff_src(int warp, int dst) const {
    return src_offset() + chunk(num_ranks * max_chunks + warp * num_ranks + dst);
  }
  EPX_HD size_t staging(int dst) const { return src_offset() + chunk(num_ranks * max_chunks + num_warps * num_ranks + dst); }
  EPX_HD size_t num_bytes() const { return staging(num_ranks); }
};

constexpr uint32_t kNetSentinel = 0xABABABABu;  // the windows' receive region before a test

EPX_HD uint32_t net_mix(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}
// Word `word` of chunk c from src to dst (hand-off chunk of warp w: c = max_chunks + w).
EPX_HD uint32_t payload(uint32_t seed, int src, int dst, int c, int word) {
  const uint32_t v = net_mix(seed ^ net_mix((static_cast<uint32_t>(src) << 20) ^ (static_cast<uint32_t>(dst) << 8) ^
                                            static_cast<uint32_t>(c) ^ net_mix(static_cast<uint32_t>(word) + 0x9e3779b9u)));
  return v == kNetSentinel ? v ^ 1u : v;
}
// Data chunks from src to dst: in [2, max_chunks].
EPX_HD int num_chunks(uint32_t seed, int src, int dst, int max_chunks) {
  return 2 + static_cast<int>(net_mix(seed ^ 0x51ed270bu ^ (static_cast<uint32_t>(src) * 977u + dst)) %
                              static_cast<uint32_t>(max_chunks - 1));
}
// Data chunk c of a destination travels on context c % 4, as the k = c / 4-th chunk of that context,
// in signal group k / chunks_per_signal (each group ends with one put_signal).
struct NetTestArgs {
  NetScenario scenario = NetScenario::kDelivery;
  EmuMode mode = EmuMode::kDirect;
  uint32_t seed = 0;
  int chunks_per_signal = 2;
  NetTestLayout layout;
  TopologyView topology;
  char* const* windows = nullptr;  // device array [num_ranks]: every rank's window
  device::OpContext op;            // the waits: this node's windows (abort words), error record, timeout
  char* snapshot = nullptr;        // device [num_recv_slots() chunks]
};

// Loads the kernels (before any rank launches: a lazy first launch may wait for the peers').
void load_net_test_kernels();
void launch_net_test(const NetTestArgs& args, cudaStream_t stream);

}  // namespace epx::test
