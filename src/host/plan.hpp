// Planning: sizes and row layouts derived from (buffer size, row shape). Pure host code, shared by
// the Buffer, the size hints and the CPU tests.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "common/layout.hpp"
#include "common/ll_layout.hpp"
#include "epx/buffer.hpp"
#include "epx/config.hpp"
#include "epx/types.hpp"

namespace epx::plan {

// Scale columns of an fp8 row of `hidden` channels (one f32 per 128 channels).
inline int num_scales(int hidden) { return (hidden + 127) / 128; }

size_t row_region_bytes(size_t num_nvl_bytes);
// Dispatch rows always reserve room for scales (fp8) and top-k ids + weights, so one capacity
// serves every dispatch of that shape.
// num_scale_columns: 32-bit scale words per fp8 row; -1 = one per 128 channels.
RowLayout dispatch_rows(size_t num_nvl_bytes, int hidden, DType x_dtype, int num_topk, int num_scale_columns = -1);
RowLayout combine_rows(size_t num_nvl_bytes, int hidden, int num_topk);

// Ring combine geometry: channels (ring_senders sender blocks + one receiver block each), sender
// blocks per channel and rows per ring, or channels = 0 when the ring combine does not apply (off
// in the config, fewer than 3 ranks, too few blocks, fewer warps per sender block than its peers, or rings smaller
// than kMinRingSlots or Config's ring_chunk * warps in `capacity` rows of the row region).
// Throws when Config.ring_senders exceeds the peers.
struct RingPlan {
  int channels = 0, senders = 0, slots = 0, send_warps = 0;
};
RingPlan ring_plan(const Config& config, int num_ranks, int64_t capacity);
// Copy-out warps of a split-block dispatch (Config.dispatch_split_blocks), 0 when it does not apply
// (switched off, or more blocks than the per-block progress words: kMaxRingChannels).
int dispatch_copy_warps(const Config& config, int64_t row_bytes);
// Smallest num_nvl_bytes whose dispatch and combine layouts both hold `max_rows` rows.
size_t nvl_bytes_for_rows(int64_t max_rows, int hidden, DType x_dtype, int num_topk);

// What a high-throughput op addresses its peers' memory by, as two words every rank sends the
// others in the op's entry handshake (SyncArea::plan): a rank that planned differently (another
// Config, row shape, or optional tensor) is an error naming the field, never a wrong slot.
struct OpPlan {
  int num_blocks = 0, num_warps = 0;                        // grid (Config.num_sms), Config.num_threads / 32
  int ring_channels = 0, ring_slots = 0, ring_send_warps = 0, ring_senders = 0, ring_chunk = 0;
  int copy_warps = 0;                                       // split-block dispatch
  int row_bytes = 0, num_scales = 0, num_topk_idx = 0, num_topk_weights = 0;  // row layout
  int experts_per_rank = 0;
};
// The grid part every HT kernel launch shares: Config.num_sms blocks of Config.num_threads.
OpPlan launch_plan(const Config& config);
void encode_plan(const OpPlan& plan, uint64_t words[2]);
// The first field that differs between two encodings, as "name = a" vs "b"; empty when equal.
std::string plan_difference(int word, uint64_t theirs, uint64_t mine, std::string* their_value,
                            std::string* my_value);

// The low-latency region layout for (R, T, H, K, E_loc), with or without the zero-copy buffers.
inline LlLayout ll_layout(int R, int T, int H, int K, int E_loc, bool with_zero_copy) {
  LlLayout l;
  l.place(R, T, H, K, E_loc, with_zero_copy);
  return l;
}
// Smallest num_ll_bytes that holds `layout` (what Buffer::low_latency_size_hint returns).
inline size_t ll_bytes_for(const LlLayout& layout) { return align_up(layout.num_bytes(), size_t{1} << 21); }
// The layout a Buffer with `mode` and `num_ll_bytes` uses for this op shape: a function of inputs
// every rank has (the options and sizes agreed at construction, the op's shape), so ranks agree.
inline LlLayout ll_layout(LlZeroCopy mode, size_t num_ll_bytes, int R, int T, int H, int K, int E_loc) {
  const LlLayout with = ll_layout(R, T, H, K, E_loc, true);
  const bool on = mode == LlZeroCopy::kOn || (mode == LlZeroCopy::kIfRoom && with.num_bytes() <= num_ll_bytes);
  return on ? with : ll_layout(R, T, H, K, E_loc, false);
}

}  // namespace epx::plan

namespace epx {
// The config's timeout, or EPX_TIMEOUT_S.
double effective_timeout_s(const Config& c);
}  // namespace epx
