#include "host/plan.hpp"

#include <algorithm>

#include "epx/buffer.hpp"
#include "epx/error.hpp"
#include "host/validate.hpp"

namespace epx::plan {

size_t row_region_bytes(size_t num_nvl_bytes) {
  return num_nvl_bytes > SymmetricLayout::kRowsOffset ? num_nvl_bytes - SymmetricLayout::kRowsOffset : 0;
}

RowLayout dispatch_rows(size_t num_nvl_bytes, int hidden, DType x_dtype, int num_topk, int num_scale_columns) {
  const bool fp8 = x_dtype == DType::kFP8E4M3;
  const int scales = !fp8 ? 0 : num_scale_columns >= 0 ? num_scale_columns : num_scales(hidden);
  return dispatch_row_layout(row_region_bytes(num_nvl_bytes), hidden * static_cast<int>(dtype_size(x_dtype)), scales,
                             num_topk, /*with_weights=*/true);
}

RowLayout combine_rows(size_t num_nvl_bytes, int hidden, int num_topk) {
  return combine_row_layout(row_region_bytes(num_nvl_bytes), hidden, num_topk);
}

namespace {

// num_nvl_bytes whose row region holds `layout` (placed for its rows): fit() leaves 5 x 16 bytes of
// alignment slack.
size_t bytes_for_layout(const RowLayout& layout) {
  return align_up(SymmetricLayout::kRowsOffset + layout.num_bytes + 5 * 16, 1 << 21);
}

}  // namespace

size_t nvl_bytes_for_rows(int64_t max_rows, int hidden, DType x_dtype, int num_topk) {
  RowLayout d = dispatch_rows(0, hidden, x_dtype, num_topk);
  d.place(max_rows);
  RowLayout c = combine_rows(0, hidden, num_topk);
  c.place(max_rows);
  const size_t region = (d.num_bytes > c.num_bytes ? d.num_bytes : c.num_bytes) + 5 * 16;
  return align_up(SymmetricLayout::kRowsOffset + region, 1 << 21);
}

int dispatch_copy_warps(const Config& config, const Tuning& tuning, int64_t row_bytes) {
  const int warps = config.num_threads / 32;  // >= 2 (Config.num_threads >= 64)
  if (tuning.dispatch_copy_warps > 0) return std::min(tuning.dispatch_copy_warps, warps - 1);
  // Sending warps in the whole grid ~ 1.3 MB of rows in flight, one row per warp (the best counts
  // at EP4: docs/performance.md).
  const double send = 1.3e6 / (static_cast<double>(std::max<int64_t>(row_bytes, 1)) * config.num_sms);
  const int s = std::clamp(static_cast<int>(send + 0.5), 1, warps - 1);
  return warps - s;
}

namespace {

struct PlanField {
  const char* name;
  int word, shift, bits;
  int OpPlan::*value;
};
constexpr PlanField kPlanFields[] = {
    {"grid blocks (Config.num_sms)", 0, 0, 10, &OpPlan::num_blocks},
    {"warps per block (Config.num_threads / 32)", 0, 10, 6, &OpPlan::num_warps},
    {"ring channels", 0, 16, 7, &OpPlan::ring_channels},
    {"ring slots (Config.ring_slots; a bounded dispatch: rows per ring)", 0, 23, 13, &OpPlan::ring_slots},
    {"ring sending warps (Tuning.ring_send_warps)", 0, 36, 5, &OpPlan::ring_send_warps},
    {"rows per ring release (Tuning.ring_chunk)", 0, 45, 5, &OpPlan::ring_chunk},
    {"dispatch copy warps (Tuning.dispatch_copy_warps)", 0, 50, 5, &OpPlan::copy_warps},
    {"row bytes (hidden x element size)", 1, 0, 18, &OpPlan::row_bytes},
    {"scale words per row (x_scales)", 1, 18, 17, &OpPlan::num_scales},
    {"top-k ids per row (topk_idx)", 1, 35, 6, &OpPlan::num_topk_idx},
    {"top-k weights per row (topk_weights given or not)", 1, 41, 6, &OpPlan::num_topk_weights},
    {"experts per rank", 1, 47, 11, &OpPlan::experts_per_rank},
};

uint64_t field_of(uint64_t word, const PlanField& f) { return (word >> f.shift) & ((uint64_t{1} << f.bits) - 1); }

}  // namespace

OpPlan launch_plan(const Config& config) {
  OpPlan plan;
  plan.num_blocks = config.num_sms;
  plan.num_warps = config.num_threads / 32;
  return plan;
}

void encode_plan(const OpPlan& plan, uint64_t words[2]) {
  words[0] = words[1] = 0;
  for (const PlanField& f : kPlanFields)
    words[f.word] |= (static_cast<uint64_t>(plan.*f.value) & ((uint64_t{1} << f.bits) - 1)) << f.shift;
}

std::string plan_difference(int word, uint64_t theirs, uint64_t mine, std::string* their_value, std::string* my_value) {
  for (const PlanField& f : kPlanFields) {
    if (f.word != word || field_of(theirs, f) == field_of(mine, f)) continue;
    *their_value = std::to_string(field_of(theirs, f));
    *my_value = std::to_string(field_of(mine, f));
    return f.name;
  }
  return {};
}

bool rings_preferred(const Tuning& tuning, int num_ranks) {
  // At 2 ranks the row-region combine is faster (docs/performance.md, EP2), when the rows fit.
  return tuning.ring_combine && num_ranks >= 3;
}

RingPlan ring_plan(const Config& config, const Tuning& tuning, int num_ranks, int64_t capacity, bool bounded) {
  RingPlan plan;
  const int peers = num_ranks - 1;
  if (!bounded && !rings_preferred(tuning, num_ranks)) return plan;
  if (peers < 1) return plan;
  // Each block is a channel: its first send_warps warps send to every peer (auto: a warp per peer,
  // two each for two peers), every peer needs one, and the rest reduce.
  const int send_warps = tuning.ring_send_warps > 0 ? tuning.ring_send_warps : peers * std::max(1, 4 / peers);
  if (send_warps < peers || send_warps >= config.num_threads / 32) return plan;
  const int64_t slots =
      std::min<int64_t>(config.ring_slots, capacity / (static_cast<int64_t>(num_ranks) * config.num_sms));
  if (slots < combine_ring_min_slots(config, tuning)) return plan;
  plan.channels = config.num_sms;
  plan.slots = static_cast<int>(slots);
  plan.send_warps = send_warps;
  return plan;
}

int combine_ring_min_slots(const Config& config, const Tuning& tuning) {
  return std::max(kMinRingSlots, tuning.ring_chunk * (config.num_threads / 32));
}

size_t combine_ring_min_bytes(const Config& config, const Tuning& tuning, int num_ranks, int hidden, int num_topk) {
  const RingPlan geometry = ring_plan(config, tuning, num_ranks, int64_t{1} << 40, /*bounded=*/true);
  RowLayout c = combine_rows(0, hidden, num_topk);
  c.place(static_cast<int64_t>(num_ranks) * std::max(geometry.channels, 1) * combine_ring_min_slots(config, tuning));
  return bytes_for_layout(c);
}

RingPlan bounded_ring_plan(const Config& config, const Tuning& tuning, int num_ranks, size_t num_nvl_bytes, int hidden,
                           int num_topk) {
  const RowLayout rows = combine_rows(num_nvl_bytes, hidden, num_topk);
  const RingPlan plan = ring_plan(config, tuning, num_ranks, rows.capacity, /*bounded=*/true);
  if (plan.channels > 0) return plan;
  EPX_CHECK(ring_plan(config, tuning, num_ranks, int64_t{1} << 40, /*bounded=*/true).channels > 0,
            ErrorKind::kUnsupported, "combine: the returned rows do not fit the row region and Config (num_sms ",
            config.num_sms, ", num_threads ", config.num_threads, ") with Tuning.ring_send_warps ", tuning.ring_send_warps,
            " cannot make combine rings at ", num_ranks, " ranks (a sending warp per peer and one left to reduce)");
  EPX_CHECK(false, ErrorKind::kBufferTooSmall, "combine: the returned rows do not fit the row region (",
            rows.capacity, " rows of this shape) and its rings would hold fewer than ",
            combine_ring_min_slots(config, tuning), " rows each; need num_nvl_bytes >= ",
            combine_ring_min_bytes(config, tuning, num_ranks, hidden, num_topk),
            ", have ", num_nvl_bytes);
  return plan;
}

int dispatch_ring_min_slots(const Config& config, const Tuning& tuning, int64_t row_bytes) {
  const int send_warps = config.num_threads / 32 - dispatch_copy_warps(config, tuning, row_bytes);
  return 2 * kDispatchPublishRounds * send_warps;
}

size_t dispatch_ring_min_bytes(const Config& config, const Tuning& tuning, int num_ranks, int hidden, DType x_dtype,
                               int num_topk, int num_scale_columns) {
  RowLayout d = dispatch_rows(0, hidden, x_dtype, num_topk, num_scale_columns);
  d.place(static_cast<int64_t>(num_ranks) * config.num_sms * dispatch_ring_min_slots(config, tuning, d.row_bytes));
  return bytes_for_layout(d);
}

DispatchRing dispatch_ring(const Config& config, const Tuning& tuning, int num_ranks, size_t num_nvl_bytes,
                           int hidden, DType x_dtype, int num_topk, int num_scale_columns) {
  const RowLayout rows = dispatch_rows(num_nvl_bytes, hidden, x_dtype, num_topk, num_scale_columns);
  DispatchRing ring;
  ring.copy_warps = dispatch_copy_warps(config, tuning, rows.row_bytes);
  ring.send_warps = config.num_threads / 32 - ring.copy_warps;
  const int64_t rings = static_cast<int64_t>(num_ranks) * config.num_sms;
  const int64_t per_ring = rows.capacity / rings;
  const int min_slots = dispatch_ring_min_slots(config, tuning, rows.row_bytes);
  EPX_CHECK(per_ring >= min_slots, ErrorKind::kBufferTooSmall, "dispatch: the rows do not fit the row region (",
            rows.capacity, " rows of this shape) and its ", num_ranks, " x ", config.num_sms, " rings would hold ",
            per_ring, " rows each, fewer than two rounds of ", ring.send_warps, " sending warps (", min_slots,
            "); need num_nvl_bytes >= ",
            dispatch_ring_min_bytes(config, tuning, num_ranks, hidden, x_dtype, num_topk, num_scale_columns),
            ", have ", num_nvl_bytes);
  ring.slots = static_cast<int>(std::min<int64_t>(per_ring, kMaxDispatchRingSlots));
  return ring;
}

size_t nvl_bytes_for_rings(const Config& config, const Tuning& tuning, int num_ranks, int64_t hidden_bytes,
                           int64_t rows_per_ring) {
  const int warps = config.num_threads / 32;
  // Any row shape: at most warps - 1 sending warps in a dispatch block.
  const int64_t per_ring = std::max<int64_t>({rows_per_ring, int64_t{2} * kDispatchPublishRounds * (warps - 1),
                                              combine_ring_min_slots(config, tuning)});
  const int64_t row_bytes = hidden_bytes + 4 * ((hidden_bytes + 127) / 128);
  return nvl_bytes_for_rows(static_cast<int64_t>(num_ranks) * config.num_sms * per_ring,
                            static_cast<int>((row_bytes + 1) / 2), DType::kBF16, kMaxTopk);
}

namespace {

RdmaLayout checked_rdma_layout(const RdmaShape& s) {
  EPX_ARG_CHECK(s.node_size >= 1 && s.node_size <= kMaxRanks && s.num_ranks >= 1 && s.num_ranks % s.node_size == 0,
                "node_size: expected a divisor of ", s.num_ranks, " ranks in [1, ", kMaxRanks, "], got ", s.node_size);
  const int num_nodes = s.num_ranks / s.node_size;
  EPX_ARG_CHECK(num_nodes <= kMaxNodes, "num_ranks: ", num_nodes, " nodes of ", s.node_size, " ranks, at most ",
                kMaxNodes, " nodes");
  EPX_ARG_CHECK(s.num_channels >= 1, "num_channels: must be >= 1, got ", s.num_channels);
  EPX_ARG_CHECK(s.chunk_tokens >= 1, "num_max_rdma_chunked_send_tokens: must be >= 1, got ", s.chunk_tokens);
  EPX_ARG_CHECK(s.ring_slots > s.chunk_tokens && s.ring_slots % s.chunk_tokens == 0,
                "num_max_rdma_chunked_recv_tokens: must be a multiple of num_max_rdma_chunked_send_tokens (",
                s.chunk_tokens, ") above it, got ", s.ring_slots);
  EPX_ARG_CHECK(s.hidden_bytes >= 1, "hidden_bytes: must be >= 1, got ", s.hidden_bytes);
  EPX_ARG_CHECK(s.num_topk >= 0 && s.num_topk <= kMaxTopk, "num_topk: expected [0, ", kMaxTopk, "], got ",
                s.num_topk);
  RdmaLayout l;
  l.num_nodes = num_nodes;
  l.num_channels = s.num_channels;
  l.ring_slots = s.ring_slots;
  l.chunk_tokens = s.chunk_tokens;
  l.hidden_bytes = static_cast<size_t>(s.hidden_bytes);
  l.num_topk = s.num_topk;
  return l;
}

}  // namespace

size_t rdma_bytes_for(const RdmaShape& shape) {
  const RdmaLayout l = checked_rdma_layout(shape);
  return l.num_nodes > 1 ? l.num_bytes() : 0;
}

RdmaLayout rdma_layout(size_t num_rdma_bytes, const RdmaShape& shape) {
  const RdmaLayout l = checked_rdma_layout(shape);
  EPX_ARG_CHECK(l.num_nodes > 1, "node_size: ", shape.node_size, " makes one node of ", shape.num_ranks,
                " ranks, which has no RDMA region");
  EPX_CHECK(l.num_bytes() <= num_rdma_bytes, ErrorKind::kBufferTooSmall, "num_rdma_bytes: ", num_rdma_bytes,
            " bytes, the RDMA rings need >= ", l.num_bytes(), " (", l.num_nodes, " nodes x ", l.num_channels,
            " channels x 2 rings of ", l.ring_slots, " slots of ", l.slot_bytes(), " bytes, and their signal words)");
  return l;
}

}  // namespace epx::plan

namespace epx {

size_t Config::get_nvl_buffer_size_hint(size_t hidden_bytes, int num_ranks) const {
  validate::in_range(static_cast<int64_t>(hidden_bytes), "hidden_bytes", 1, int64_t{1} << 22);
  validate::in_range(num_ranks, "num_ranks", 1, kMaxPeers);
  validate();
  // The Tuning every Buffer starts with: the rows a user's Buffer needs.
  return plan::nvl_bytes_for_rings(*this, Tuning{}, num_ranks, static_cast<int64_t>(hidden_bytes), ring_slots);
}

size_t Buffer::get_nvl_buffer_size_hint(int64_t max_rows, int hidden, DType x_dtype, int num_topk, int num_ranks) {
  validate::in_range(max_rows, "max_rows", 0, int64_t{1} << 31);
  validate::in_range(hidden, "hidden", 1, 1 << 20);
  validate::in_range(num_topk, "num_topk", 0, kMaxTopk);
  validate::in_range(num_ranks, "num_ranks", 1, kMaxPeers);
  return plan::nvl_bytes_for_rows(max_rows, hidden, x_dtype, num_topk);
}

size_t Buffer::low_latency_size_hint(int T, int hidden, int num_ranks, int num_experts, int num_topk,
                                     bool zero_copy) {
  validate::in_range(T, "num_max_dispatch_tokens_per_rank", 1, kMaxLlTokens);
  validate::in_range(hidden, "hidden", 128, kMaxLlHidden);
  EPX_ARG_CHECK(hidden % 128 == 0, "hidden: must be a multiple of 128, got ", hidden);
  validate::in_range(num_ranks, "num_ranks", 1, kMaxPeers);
  validate::in_range(num_topk, "num_topk", 1, kMaxLlTopk);
  EPX_ARG_CHECK(num_experts >= num_ranks && num_experts % num_ranks == 0, "num_experts: must be a multiple of ",
                num_ranks, ", got ", num_experts);
  return plan::ll_bytes_for(plan::ll_layout(num_ranks, T, hidden, num_topk, num_experts / num_ranks, zero_copy));
}

}  // namespace epx
