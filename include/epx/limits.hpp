// epx's limits, defined once: the public API validates against them, and the library's shared
// structs and kernels are sized by them.
#pragma once

namespace epx {

// kMaxRanks bounds one (virtual) node: the ranks a rank reaches over NVLink, and every per-peer
// table of the intranode protocols (sync words, count slots, shared-memory arrays). The world spans
// up to kMaxNodes such nodes (docs/design.md §6, scale-out): a warp lane per node in the
// high-throughput path across nodes, so kMaxNodes <= 32.
constexpr int kMaxRanks = 8;            // ranks of one node (NVLink domain or virtual node)
constexpr int kMaxNodes = 32;           // nodes of one world
constexpr int kMaxWorldRanks = kMaxNodes * kMaxRanks;  // ranks of one world (256)
constexpr int kMaxLocalExperts = 1024;  // experts per rank
constexpr int kMaxTopk = 32;            // top-k of a high-throughput dispatch
constexpr int kMaxLlTopk = 16;          // top-k of a low-latency dispatch
constexpr int kMaxLlHidden = 16384;     // hidden of a low-latency op (a multiple of 128)
constexpr int kMaxLlTokens = 1 << 16;   // num_max_dispatch_tokens_per_rank of a low-latency op
constexpr int kMaxHtThreads = 512;      // Config.num_threads: threads per high-throughput block
// Contexts of the scale-out interface (device/net.cuh): GIN's in NCCL 2.28.9 (one queue pair per
// peer each; NCCL takes the index modulo the contexts it gave).
constexpr int kMaxNetContexts = 4;
// Config.num_sms: blocks of a high-throughput kernel. Every dispatch and ring-combine block is a
// channel with progress words of its own in every peer's window (src/common/layout.hpp, RingCtl).
constexpr int kMaxHtBlocks = 80;
static_assert(kMaxNodes <= 32, "the high-throughput path across nodes gives each node a warp lane");
// A forward record of a dispatch across nodes (DispatchHandle::forward_records): source token,
// channel, and the token's row position on each rank of the forwarder's node.
constexpr int kForwardRecordInts = 2 + kMaxRanks;

// Bounded dispatch (a call whose rows do not all fit the receiver's row region): rows per
// (source rank, block) ring at most, and rounds of the sending warps' tokens a block writes between
// two publications of its progress. A ring holds at least two such rounds (docs/protocol.md,
// "dispatch, bounded").
constexpr int kMaxDispatchRingSlots = 4096;
constexpr int kDispatchPublishRounds = 2;
static_assert(kMaxLlTopk <= kMaxTopk, "the low-latency top-k is a high-throughput top-k too");
static_assert(kMaxLlHidden % 128 == 0, "low-latency rows are cast to fp8 in blocks of 128 channels");

}  // namespace epx
