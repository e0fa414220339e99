// Planning: sizes and row layouts derived from (buffer size, row shape). Pure host code, shared by
// the Buffer, the size hints and the CPU tests.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "common/layout.hpp"
#include "common/ll_layout.hpp"
#include "common/rdma_layout.hpp"
#include "epx/buffer.hpp"
#include "epx/config.hpp"
#include "epx/types.hpp"
#include "host/tuning.hpp"

namespace epx::plan {

// Scale columns of an fp8 row of `hidden` channels (one f32 per 128 channels).
inline int num_scales(int hidden) { return (hidden + 127) / 128; }

size_t row_region_bytes(size_t num_nvl_bytes);
// Dispatch rows always reserve room for scales (fp8) and top-k ids + weights, so one capacity
// serves every dispatch of that shape.
// num_scale_columns: 32-bit scale words per fp8 row; -1 = one per 128 channels.
RowLayout dispatch_rows(size_t num_nvl_bytes, int hidden, DType x_dtype, int num_topk, int num_scale_columns = -1);
RowLayout combine_rows(size_t num_nvl_bytes, int hidden, int num_topk);

// Ring combine geometry: channels (one per block: Config.num_sms), sending warps per block and rows
// per ring (at most Config.ring_slots), or channels = 0 when the ring combine does not apply (off
// in the tuning, fewer than 3 ranks, fewer sending warps than peers or none left to reduce, or
// rings smaller than kMinRingSlots or Tuning.ring_chunk * warps in `capacity` rows of the row
// region).
struct RingPlan {
  int channels = 0, slots = 0, send_warps = 0;
};
// bounded: a combine whose returned rows do not all fit the row region takes the rings at every
// rank count (2 included) whatever Tuning.ring_combine says; channels = 0 still when the block
// geometry or the row region cannot hold them (bounded_ring_plan turns that into an error).
RingPlan ring_plan(const Config& config, const Tuning& tuning, int num_ranks, int64_t capacity, bool bounded = false);
// Whether a combine whose rows fit the row region takes the rings (ring_plan, not bounded): from 3
// ranks, when Tuning.ring_combine says so.
bool rings_preferred(const Tuning& tuning, int num_ranks);
// The bounded combine's rings for a buffer of num_nvl_bytes: throws Error(kBufferTooSmall) naming
// combine_ring_min_bytes when a ring holds fewer than its minimum rows, Error(kUnsupported) when the
// config's blocks cannot make rings at all.
RingPlan bounded_ring_plan(const Config& config, const Tuning& tuning, int num_ranks, size_t num_nvl_bytes, int hidden, int num_topk);
// Rows a bounded combine ring needs at least: kMinRingSlots, and a receiver batch of chunks.
int combine_ring_min_slots(const Config& config, const Tuning& tuning);
// Smallest num_nvl_bytes whose combine rows hold the bounded combine's rings.
size_t combine_ring_min_bytes(const Config& config, const Tuning& tuning, int num_ranks, int hidden, int num_topk);

// Bounded dispatch: a call whose rows do not all fit the receiver's row region cuts each
// receiver's row region into R x B rings (B = Config.num_sms blocks), ring (s, b) holding the rows
// of source s's block b: slots = capacity / (R * B), at most kMaxDispatchRingSlots. A ring holds at
// least two publication rounds of the block's sending warps (2 * kDispatchPublishRounds *
// send_warps rows: docs/protocol.md, "dispatch, bounded"), else Error(kBufferTooSmall) naming
// dispatch_ring_min_bytes.
struct DispatchRing {
  int slots = 0, copy_warps = 0, send_warps = 0;
};
DispatchRing dispatch_ring(const Config& config, const Tuning& tuning, int num_ranks, size_t num_nvl_bytes,
                           int hidden, DType x_dtype, int num_topk, int num_scale_columns = -1);
// Rows a bounded dispatch ring needs at least for rows of `row_bytes` (two rounds).
int dispatch_ring_min_slots(const Config& config, const Tuning& tuning, int64_t row_bytes);
// Smallest num_nvl_bytes whose dispatch rows hold the bounded dispatch's rings.
size_t dispatch_ring_min_bytes(const Config& config, const Tuning& tuning, int num_ranks, int hidden, DType x_dtype,
                               int num_topk, int num_scale_columns = -1);
// A num_nvl_bytes that serves any batch through the rings of `config`'s grid: R x Config.num_sms
// rings of max(rows_per_ring, every ring minimum of any row shape, `tuning`'s ring_chunk
// included) rows of hidden_bytes of payload plus the scales of an fp8 row of hidden_bytes channels
// and epx's largest top-k (dispatch and combine, bf16 or fp8).
size_t nvl_bytes_for_rings(const Config& config, const Tuning& tuning, int num_ranks, int64_t hidden_bytes,
                           int64_t rows_per_ring);
// Copy-out warps of a dispatch block (Tuning.dispatch_copy_warps, or its auto count): at least 1,
// at most warps - 1.
int dispatch_copy_warps(const Config& config, const Tuning& tuning, int64_t row_bytes);
// Smallest num_nvl_bytes whose dispatch and combine layouts both hold `max_rows` rows.
size_t nvl_bytes_for_rows(int64_t max_rows, int hidden, DType x_dtype, int num_topk);

// The RDMA region of the high-throughput path across nodes (common/rdma_layout.hpp) for R ranks in
// nodes of node_size (2 to kMaxNodes nodes), num_channels channels, rings of ring_slots messages
// (Config.num_max_rdma_chunked_recv_tokens) put in chunks of chunk_tokens
// (Config.num_max_rdma_chunked_send_tokens; chunk_tokens < ring_slots, ring_slots a multiple of
// it), messages of hidden_bytes payload and num_topk ids/weights. Throws Error(kInvalidArgument)
// naming the argument out of range, Error(kBufferTooSmall) naming num_rdma_bytes and the minimum
// bytes (rdma_bytes_for) when the region does not fit.
struct RdmaShape {
  int num_ranks = 0, node_size = 0, num_channels = 0, chunk_tokens = 0, ring_slots = 0;
  int64_t hidden_bytes = 0;
  int num_topk = 0;
};
RdmaLayout rdma_layout(size_t num_rdma_bytes, const RdmaShape& shape);
// Smallest num_rdma_bytes of that shape (a multiple of kRdmaAlign); 0 for one node (no RDMA region).
size_t rdma_bytes_for(const RdmaShape& shape);

// What a high-throughput op addresses its peers' memory by, as two words every rank sends the
// others in the op's entry handshake (SyncArea::plan): a rank that planned differently (another
// Config or Tuning, row shape, or optional tensor) is an error naming the field, never a wrong
// slot. Every Tuning field reaches the kernels only through the ring and copy-warp fields here.
struct OpPlan {
  int num_blocks = 0, num_warps = 0;                        // grid (Config.num_sms), Config.num_threads / 32
  int ring_channels = 0, ring_slots = 0, ring_send_warps = 0, ring_chunk = 0;
  int copy_warps = 0;                                       // dispatch
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
