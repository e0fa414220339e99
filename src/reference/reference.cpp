// CPU reference model (reference.hpp). Deliberately plain loops that follow the design semantics
// literally and share nothing with the GPU code, so the two can check each other.
#include "reference/reference.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <string>

#include "epx/error.hpp"

namespace epx::ref {

uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  // Rounding a NaN could clear every kept mantissa bit and turn it into inf: emit a quiet NaN.
  if (std::isnan(f)) return static_cast<uint16_t>(sign | 0x7FC0u);
  // Adding 0x7FFF plus the lowest kept bit rounds to nearest with ties to even; a carry into the
  // exponent is the correctly rounded result, including overflow to inf.
  const uint32_t lowest_kept_bit = (bits >> 16) & 1u;
  return static_cast<uint16_t>((bits + 0x7FFFu + lowest_kept_bit) >> 16);
}

float bf16_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

namespace {

// Offset of a row in a row-major tensor, in size_t so products of int dimensions cannot overflow.
size_t offset(int row, int cols) { return static_cast<size_t>(row) * static_cast<size_t>(cols); }

template <typename T>
void check_numel(const std::vector<T>& v, int rows, int cols, const std::string& name) {
  EPX_ARG_CHECK(v.size() == offset(rows, cols), name, ": has ", v.size(), " elements, expected [",
                rows, ", ", cols, "] = ", offset(rows, cols));
}

// Optional tensors are either absent (empty) or full-sized.
template <typename T>
void check_numel_or_empty(const std::vector<T>& v, int rows, int cols, const std::string& name) {
  if (!v.empty()) check_numel(v, rows, cols, name);
}

void check_non_negative(int value, const std::string& name) {
  EPX_ARG_CHECK(value >= 0, name, ": ", value, " must be >= 0");
}

void check_rank(int rank, int num_ranks) {
  EPX_ARG_CHECK(rank >= 0 && rank < num_ranks, "rank: ", rank, " outside [0, ", num_ranks, ")");
}

void check_topology(int num_experts, int num_ranks) {
  EPX_ARG_CHECK(num_ranks > 0, "num_ranks: ", num_ranks, " must be > 0");
  EPX_ARG_CHECK(num_experts > 0, "num_experts: ", num_experts, " must be > 0");
  EPX_ARG_CHECK(num_experts % num_ranks == 0, "num_experts: ", num_experts,
                " is not divisible by num_ranks ", num_ranks);
}

void check_topk_idx(const std::vector<int64_t>& topk_idx, int num_tokens, int num_topk,
                    int num_experts, const std::string& name) {
  check_numel(topk_idx, num_tokens, num_topk, name);
  for (int t = 0; t < num_tokens; ++t) {
    for (int k = 0; k < num_topk; ++k) {
      const int64_t e = topk_idx[offset(t, num_topk) + k];
      EPX_ARG_CHECK(e >= -1 && e < num_experts, name, ": expert id ", e, " at token ", t, " slot ",
                    k, " outside [-1, ", num_experts, ")");
    }
  }
}

// get_dispatch_layout without validation: callers have checked the topology and topk_idx.
Layout compute_layout(const std::vector<int64_t>& topk_idx, int num_tokens, int num_topk,
                      int num_experts, int num_ranks) {
  const int experts_per_rank = num_experts / num_ranks;
  Layout layout;
  layout.num_tokens_per_rank.assign(num_ranks, 0);
  layout.num_tokens_per_expert.assign(num_experts, 0);
  layout.is_token_in_rank.assign(offset(num_tokens, num_ranks), 0);
  for (int t = 0; t < num_tokens; ++t) {
    uint8_t* in_rank = layout.is_token_in_rank.data() + offset(t, num_ranks);
    for (int k = 0; k < num_topk; ++k) {
      const int64_t e = topk_idx[offset(t, num_topk) + k];
      if (e < 0) continue;
      ++layout.num_tokens_per_expert[e];
      in_rank[e / experts_per_rank] = 1;  // a set flag, so a rank counts once per token
    }
    for (int r = 0; r < num_ranks; ++r) layout.num_tokens_per_rank[r] += in_rank[r];
  }
  return layout;
}

// Weights travel with the operation: if any rank gives them, every rank must. (An empty vector is
// also what a rank with no rows gives, so when no rank holds rows, no weights come out.)
template <typename Input>
bool any_has_weights(const std::vector<Input>& inputs) {
  return std::any_of(inputs.begin(), inputs.end(),
                     [](const Input& in) { return !in.topk_weights.empty(); });
}

void check_dispatch_shape(const DispatchShape& shape) {
  check_topology(shape.num_experts, shape.num_ranks);
  check_non_negative(shape.num_topk, "shape.num_topk");
  check_non_negative(shape.row_bytes, "shape.row_bytes");
  check_non_negative(shape.num_scales, "shape.num_scales");
  EPX_ARG_CHECK(shape.expert_alignment >= 1, "shape.expert_alignment: ", shape.expert_alignment,
                " must be >= 1");
}

void check_rank_input(const RankInput& in, int src_rank, const DispatchShape& shape,
                      bool has_weights) {
  const std::string name = "inputs[" + std::to_string(src_rank) + "].";
  check_non_negative(in.num_tokens, name + "num_tokens");
  check_numel(in.x, in.num_tokens, shape.row_bytes, name + "x");
  check_numel(in.x_scales, in.num_tokens, shape.num_scales, name + "x_scales");
  check_topk_idx(in.topk_idx, in.num_tokens, shape.num_topk, shape.num_experts, name + "topk_idx");
  if (has_weights)
    check_numel(in.topk_weights, in.num_tokens, shape.num_topk, name + "topk_weights");
}

template <typename T>
void append_row(std::vector<T>& dst, const std::vector<T>& src, int row, int cols) {
  const auto begin = src.begin() + offset(row, cols);
  dst.insert(dst.end(), begin, begin + cols);
}

// Appends token t of src_rank to what `rank` receives, its experts rewritten to `rank`'s local ids.
void receive_token(DispatchResult& out, const RankInput& in, int t, int src_rank, int rank,
                   const DispatchShape& shape, bool has_weights) {
  const int experts_per_rank = shape.num_experts / shape.num_ranks;
  append_row(out.recv_x, in.x, t, shape.row_bytes);
  append_row(out.recv_x_scales, in.x_scales, t, shape.num_scales);
  for (int k = 0; k < shape.num_topk; ++k) {
    const size_t slot = offset(t, shape.num_topk) + k;
    const int64_t e = in.topk_idx[slot];
    const int64_t local =
        (e >= 0 && e / experts_per_rank == rank) ? e - rank * experts_per_rank : -1;
    out.recv_topk_idx.push_back(local);
    if (has_weights) out.recv_topk_weights.push_back(local >= 0 ? in.topk_weights[slot] : 0.0f);
    if (local >= 0) ++out.num_recv_tokens_per_expert[local];
  }
  out.recv_src_idx.push_back(t);
  out.recv_src_rank.push_back(src_rank);
  ++out.num_recv;
}

int round_up(int value, int alignment) { return (value + alignment - 1) / alignment * alignment; }

void check_combine_input(const CombineRankInput& in, int r, int hidden, int num_topk,
                         bool has_weights) {
  const std::string name = "inputs[" + std::to_string(r) + "].";
  EPX_ARG_CHECK(in.dispatched != nullptr, name, "dispatched: is null");
  const DispatchResult& d = *in.dispatched;
  check_non_negative(d.num_recv, name + "dispatched->num_recv");
  check_numel(d.recv_src_rank, d.num_recv, 1, name + "dispatched->recv_src_rank");
  check_numel(d.recv_src_idx, d.num_recv, 1, name + "dispatched->recv_src_idx");
  check_numel(in.x, d.num_recv, hidden, name + "x");
  if (has_weights) check_numel(in.topk_weights, d.num_recv, num_topk, name + "topk_weights");
}

// row_of[t] = the row holding `rank`'s token t in d, or -1 where t was not sent to d's rank.
std::vector<int> rows_of_tokens(const DispatchResult& d, int rank, int num_tokens,
                                const std::string& name) {
  std::vector<int> row_of(num_tokens, -1);
  for (int i = 0; i < d.num_recv; ++i) {
    if (d.recv_src_rank[i] != rank) continue;
    const int t = d.recv_src_idx[i];
    EPX_ARG_CHECK(t >= 0 && t < num_tokens, name, ".recv_src_idx: token ", t, " at row ", i,
                  " outside [0, ", num_tokens, ")");
    EPX_ARG_CHECK(row_of[t] < 0, name, ".recv_src_idx: token ", t, " received twice (rows ",
                  row_of[t], " and ", i, ")");
    row_of[t] = i;
  }
  return row_of;
}

void add_bf16_row(float* acc, const uint16_t* row, int cols) {
  for (int c = 0; c < cols; ++c) acc[c] += bf16_to_float(row[c]);
}

void add_f32_row(float* acc, const float* row, int cols) {
  for (int c = 0; c < cols; ++c) acc[c] += row[c];
}

}  // namespace

Layout get_dispatch_layout(const std::vector<int64_t>& topk_idx, int num_tokens, int num_topk,
                           int num_experts, int num_ranks) {
  check_topology(num_experts, num_ranks);
  check_non_negative(num_tokens, "num_tokens");
  check_non_negative(num_topk, "num_topk");
  check_topk_idx(topk_idx, num_tokens, num_topk, num_experts, "topk_idx");
  return compute_layout(topk_idx, num_tokens, num_topk, num_experts, num_ranks);
}

DispatchResult dispatch(const std::vector<RankInput>& inputs, int rank,
                        const DispatchShape& shape) {
  check_dispatch_shape(shape);
  const int num_ranks = shape.num_ranks;
  EPX_ARG_CHECK(inputs.size() == static_cast<size_t>(num_ranks), "inputs: ", inputs.size(),
                " ranks given, shape.num_ranks is ", num_ranks);
  check_rank(rank, num_ranks);
  const bool has_weights = any_has_weights(inputs);
  for (int s = 0; s < num_ranks; ++s) check_rank_input(inputs[s], s, shape, has_weights);

  DispatchResult out;
  out.num_recv_tokens_per_expert.assign(shape.num_experts / num_ranks, 0);
  out.rank_prefix_matrix.assign(offset(num_ranks, num_ranks), 0);
  for (int s = 0; s < num_ranks; ++s) {
    const RankInput& in = inputs[s];
    const Layout layout =
        compute_layout(in.topk_idx, in.num_tokens, shape.num_topk, shape.num_experts, num_ranks);
    for (int r = 0; r < num_ranks; ++r) {
      const int before = s > 0 ? out.rank_prefix_matrix[offset(s - 1, num_ranks) + r] : 0;
      out.rank_prefix_matrix[offset(s, num_ranks) + r] = before + layout.num_tokens_per_rank[r];
    }
    // Walking sources, then tokens, in ascending order gives the (source rank, token) row order.
    for (int t = 0; t < in.num_tokens; ++t) {
      if (layout.is_token_in_rank[offset(t, num_ranks) + rank])
        receive_token(out, in, t, s, rank, shape, has_weights);
    }
  }
  for (int& count : out.num_recv_tokens_per_expert) count = round_up(count, shape.expert_alignment);
  return out;
}

CombineResult combine(const std::vector<CombineRankInput>& inputs, int rank, int num_tokens,
                      int hidden, int num_topk, const std::vector<uint16_t>& bias_0,
                      const std::vector<uint16_t>& bias_1) {
  const int num_ranks = static_cast<int>(inputs.size());
  EPX_ARG_CHECK(num_ranks > 0, "inputs: is empty");
  check_rank(rank, num_ranks);
  check_non_negative(num_tokens, "num_tokens");
  check_non_negative(hidden, "hidden");
  check_non_negative(num_topk, "num_topk");
  check_numel_or_empty(bias_0, num_tokens, hidden, "bias_0");
  check_numel_or_empty(bias_1, num_tokens, hidden, "bias_1");
  const bool has_weights = any_has_weights(inputs);
  // Per-rank token -> row maps, so each token is found in O(1) rather than by searching.
  std::vector<std::vector<int>> row_of(num_ranks);
  for (int r = 0; r < num_ranks; ++r) {
    check_combine_input(inputs[r], r, hidden, num_topk, has_weights);
    row_of[r] = rows_of_tokens(*inputs[r].dispatched, rank, num_tokens,
                               "inputs[" + std::to_string(r) + "].dispatched");
  }

  CombineResult out;
  out.combined_x.resize(offset(num_tokens, hidden));
  if (has_weights) out.combined_topk_weights.assign(offset(num_tokens, num_topk), 0.0f);
  std::vector<float> acc(hidden);
  for (int t = 0; t < num_tokens; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    // The fp32 summation order (ranks ascending, then bias_0, then bias_1) is part of the contract:
    // it makes the result bitwise reproducible.
    for (int r = 0; r < num_ranks; ++r) {
      const int row = row_of[r][t];
      if (row < 0) continue;
      add_bf16_row(acc.data(), inputs[r].x.data() + offset(row, hidden), hidden);
      if (has_weights)
        add_f32_row(out.combined_topk_weights.data() + offset(t, num_topk),
                    inputs[r].topk_weights.data() + offset(row, num_topk), num_topk);
    }
    if (!bias_0.empty()) add_bf16_row(acc.data(), bias_0.data() + offset(t, hidden), hidden);
    if (!bias_1.empty()) add_bf16_row(acc.data(), bias_1.data() + offset(t, hidden), hidden);
    for (int h = 0; h < hidden; ++h) out.combined_x[offset(t, hidden) + h] = float_to_bf16(acc[h]);
  }
  return out;
}

}  // namespace epx::ref
