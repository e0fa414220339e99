// epx's limits, defined once: the public API validates against them, and the library's shared
// structs and kernels are sized by them.
#pragma once

namespace epx {

constexpr int kMaxRanks = 8;            // ranks of one NVLink domain
constexpr int kMaxLocalExperts = 1024;  // experts per rank
constexpr int kMaxTopk = 32;            // top-k of a high-throughput dispatch
constexpr int kMaxLlTopk = 16;          // top-k of a low-latency dispatch
constexpr int kMaxLlHidden = 16384;     // hidden of a low-latency op (a multiple of 128)
constexpr int kMaxLlTokens = 1 << 16;   // num_max_dispatch_tokens_per_rank of a low-latency op
// Bounded dispatch (a call whose rows do not all fit the receiver's row region): rows per
// (source rank, block) ring at most, and rounds of the sending warps' tokens a block writes between
// two publications of its progress. A ring holds at least two such rounds (docs/protocol.md,
// "dispatch, bounded").
constexpr int kMaxDispatchRingSlots = 4096;
constexpr int kDispatchPublishRounds = 2;
static_assert(kMaxLlTopk <= kMaxTopk, "the low-latency top-k is a high-throughput top-k too");
static_assert(kMaxLlHidden % 128 == 0, "low-latency rows are cast to fp8 in blocks of 128 channels");

}  // namespace epx
