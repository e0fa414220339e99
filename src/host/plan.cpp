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

size_t nvl_bytes_for_rows(int64_t max_rows, int hidden, DType x_dtype, int num_topk) {
  RowLayout d = dispatch_rows(0, hidden, x_dtype, num_topk);
  d.place(max_rows);
  RowLayout c = combine_rows(0, hidden, num_topk);
  c.place(max_rows);
  const size_t region = (d.num_bytes > c.num_bytes ? d.num_bytes : c.num_bytes) + 5 * 16;
  return align_up(SymmetricLayout::kRowsOffset + region, 1 << 21);
}

int dispatch_copy_warps(const Config& config, int64_t row_bytes) {
  if (!config.dispatch_split_blocks || config.num_sms > kMaxRingChannels) return 0;
  const int warps = config.num_threads / 32;
  if (warps < 2) return 0;
  if (config.dispatch_copy_warps > 0) return std::min(config.dispatch_copy_warps, warps - 1);
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
    {"ring slots (Config.ring_slots)", 0, 23, 13, &OpPlan::ring_slots},
    {"ring sending warps (Config.ring_send_warps)", 0, 36, 5, &OpPlan::ring_send_warps},
    {"ring sender blocks (Config.ring_senders)", 0, 41, 4, &OpPlan::ring_senders},
    {"rows per ring release (Config.ring_chunk)", 0, 45, 5, &OpPlan::ring_chunk},
    {"dispatch copy warps (Config.dispatch_copy_warps)", 0, 50, 5, &OpPlan::copy_warps},
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

RingPlan ring_plan(const Config& config, int num_ranks, int64_t capacity) {
  RingPlan plan;
  const int peers = num_ranks - 1;
  EPX_ARG_CHECK(config.ring_senders <= peers, "Config.ring_senders: at most one sender block per peer (",
                peers, " at ", num_ranks, " ranks), got ", config.ring_senders);
  // At 2 ranks the row-region combine is faster (docs/performance.md, EP2).
  if (!config.ring_combine || num_ranks < 3) return plan;
  const int warps = config.num_threads / 32;
  // Split blocks: each block is a channel, its first send_warps warps one sender for every peer
  // (auto: a warp per peer, two each for two peers).
  const int send_warps = !config.ring_split_blocks     ? 0
                         : config.ring_send_warps > 0 ? config.ring_send_warps
                                                      : peers * std::max(1, 4 / peers);
  const int senders = send_warps > 0 ? 1 : config.ring_senders > 0 ? config.ring_senders : peers;
  const int channels = std::min(send_warps > 0 ? config.num_sms : config.num_sms / (senders + 1), kMaxRingChannels);
  const int sender_warps = send_warps > 0 ? send_warps : warps;
  const int peers_per_block = (peers + senders - 1) / senders;
  if (channels < 1 || sender_warps < peers_per_block || (send_warps > 0 && send_warps >= warps)) return plan;
  const int64_t slots = std::min<int64_t>(config.ring_slots, capacity / (static_cast<int64_t>(num_ranks) * channels));
  if (slots < kMinRingSlots || slots < int64_t{config.ring_chunk} * warps) return plan;
  plan.channels = channels;
  plan.senders = senders;
  plan.slots = static_cast<int>(slots);
  plan.send_warps = send_warps;
  return plan;
}

}  // namespace epx::plan

namespace epx {

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
