// CPU reference model of the low-latency mode (reference_ll.hpp). Plain loops that follow the
// specification literally and share nothing with the GPU kernels except the fp8 rounding function,
// which is CUDA's own host implementation (so rounding is the hardware's by construction).
#include "reference/reference_ll.hpp"

#include <cuda_fp8.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <limits>
#include <string>

#include "epx/error.hpp"
#include "reference/reference.hpp"

namespace epx::ref {

namespace {

// Offset of a row in a row-major tensor, in size_t so products of int dimensions cannot overflow.
size_t offset(size_t row, size_t cols) { return row * cols; }

template <typename T>
void check_numel(const std::vector<T>& v, size_t rows, size_t cols, const std::string& name) {
  EPX_ARG_CHECK(v.size() == offset(rows, cols), name, ": has ", v.size(), " elements, expected [",
                rows, ", ", cols, "] = ", offset(rows, cols));
}

void check_non_negative(int value, const std::string& name) {
  EPX_ARG_CHECK(value >= 0, name, ": ", value, " must be >= 0");
}

void check_hidden(int hidden) {
  EPX_ARG_CHECK(hidden > 0 && hidden % kLlScaleBlock == 0, "hidden: ", hidden,
                " must be a positive multiple of ", kLlScaleBlock);
}

int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Every shape argument shared by dispatch and combine.
struct LlShape {
  int num_ranks = 0, num_experts = 0, num_local_experts = 0;
  int max_tokens = 0;  // T
  int hidden = 0, num_topk = 0;
  size_t slots() const { return offset(num_ranks, max_tokens); }  // rows per local expert: R*T
};

LlShape make_shape(int num_ranks, int rank, int max_tokens, int hidden, int num_topk,
                   int num_experts, const std::string& ranks_name) {
  EPX_ARG_CHECK(num_ranks > 0, ranks_name, ": is empty (no ranks)");
  EPX_ARG_CHECK(rank >= 0 && rank < num_ranks, "rank: ", rank, " outside [0, ", num_ranks, ")");
  EPX_ARG_CHECK(num_experts > 0, "num_experts: ", num_experts, " must be > 0");
  EPX_ARG_CHECK(num_experts % num_ranks == 0, "num_experts: ", num_experts,
                " is not divisible by the number of ranks ", num_ranks);
  check_non_negative(max_tokens, "num_max_dispatch_tokens_per_rank");
  check_hidden(hidden);
  check_non_negative(num_topk, "num_topk");
  return {num_ranks, num_experts, num_experts / num_ranks, max_tokens, hidden, num_topk};
}

// Ids in [-1, E) and, per token, distinct: a repeated expert would give a token two rows in one
// expert and make the combine's (source, token) -> row lookup ambiguous.
void check_topk_idx(const std::vector<int64_t>& topk_idx, int num_tokens, const LlShape& shape,
                    const std::string& name) {
  check_numel(topk_idx, num_tokens, shape.num_topk, name);
  for (int t = 0; t < num_tokens; ++t) {
    const int64_t* experts = topk_idx.data() + offset(t, shape.num_topk);
    for (int k = 0; k < shape.num_topk; ++k) {
      const int64_t e = experts[k];
      EPX_ARG_CHECK(e >= -1 && e < shape.num_experts, name, ": expert id ", e, " at token ", t,
                    " slot ", k, " outside [-1, ", shape.num_experts, ")");
      const bool repeated = e >= 0 && std::find(experts, experts + k, e) != experts + k;
      EPX_ARG_CHECK(!repeated, name, ": expert ", e, " appears twice in token ", t);
    }
  }
}

void check_num_tokens(int num_tokens, const LlShape& shape, const std::string& name) {
  EPX_ARG_CHECK(num_tokens >= 0 && num_tokens <= shape.max_tokens, name, ": ", num_tokens,
                " tokens, outside [0, num_max_dispatch_tokens_per_rank = ", shape.max_tokens, "]");
}

void check_rank_input(const LlRankInput& in, int src, const LlShape& shape) {
  const std::string name = "inputs[" + std::to_string(src) + "].";
  check_num_tokens(in.num_tokens, shape, name + "x");
  check_numel(in.x, in.num_tokens, shape.hidden, name + "x");
  check_topk_idx(in.topk_idx, in.num_tokens, shape, name + "topk_idx");
}

// ---- fp8 ----------------------------------------------------------------------------------------

// Block amax with fmax, which ignores NaN (as the GPU's fmaxf reduction does), floored so that an
// all-zero block still gets a finite, nonzero scale.
float block_amax(const uint16_t* block) {
  float amax = 0.0f;
  for (int i = 0; i < kLlScaleBlock; ++i) amax = std::fmax(amax, std::fabs(bf16_to_float(block[i])));
  return std::fmax(amax, kLlAmaxFloor);
}

void quantize_block(const uint16_t* block, uint8_t* q, bool round_scale, float* scale_inv,
                    int* exponent) {
  const float amax = block_amax(block);
  float scale;
  if (round_scale) {
    // A power-of-two scale makes dequantization exact in the exponent (and UE8M0-encodable).
    *exponent = ceil_log2_exact(amax / kFp8E4m3Max);
    *scale_inv = std::ldexp(1.0f, *exponent);
    scale = std::ldexp(1.0f, -*exponent);
  } else {
    *scale_inv = amax / kFp8E4m3Max;
    scale = kFp8E4m3Max / amax;
  }
  for (int i = 0; i < kLlScaleBlock; ++i) q[i] = float_to_fp8_e4m3(bf16_to_float(block[i]) * scale);
}

// The ceil(n/4) UE8M0 words of n block exponents.
std::vector<uint32_t> pack_ue8m0_row(const std::vector<int>& exponents) {
  const int n = static_cast<int>(exponents.size());
  std::vector<uint32_t> words;
  for (int i = 0; i < n; i += kLlUe8m0PerWord)
    words.push_back(pack_ue8m0(exponents.data() + i, std::min(kLlUe8m0PerWord, n - i)));
  return words;
}

// ---- Dispatch -----------------------------------------------------------------------------------

struct LlFormat {
  bool use_fp8 = false, round_scale = false, ue8m0 = false;
  int row_bytes = 0, num_scale_columns = 0;
};

LlFormat make_format(bool use_fp8, bool round_scale, bool ue8m0, int hidden) {
  LlFormat f;
  f.use_fp8 = use_fp8;
  f.ue8m0 = use_fp8 && ue8m0;
  f.round_scale = use_fp8 && (round_scale || ue8m0);  // UE8M0 can only hold powers of two
  f.row_bytes = use_fp8 ? hidden : 2 * hidden;
  if (use_fp8)
    f.num_scale_columns = f.ue8m0 ? ceil_div(hidden, kLlScaleBlock * kLlUe8m0PerWord)
                                  : hidden / kLlScaleBlock;
  return f;
}

// The dense, padded outputs before any row arrives.
LlDispatchResult make_empty_result(const LlShape& shape, const LlFormat& fmt) {
  LlDispatchResult out;
  out.num_ranks = shape.num_ranks;
  out.num_local_experts = shape.num_local_experts;
  out.num_max_dispatch_tokens_per_rank = shape.max_tokens;
  out.hidden = shape.hidden;
  out.row_bytes = fmt.row_bytes;
  out.num_scale_columns = fmt.num_scale_columns;
  const size_t rows = offset(shape.num_local_experts, shape.slots());
  out.recv_x.assign(offset(rows, fmt.row_bytes), 0);
  if (fmt.use_fp8 && !fmt.ue8m0) out.recv_scales.assign(offset(rows, fmt.num_scale_columns), 0.0f);
  if (fmt.ue8m0) out.recv_scales_ue8m0.assign(offset(rows, fmt.num_scale_columns), 0u);
  out.recv_count.assign(shape.num_local_experts, 0);
  out.src_info.assign(rows, -1);
  out.src_topk_slot.assign(rows, -1);
  out.layout_range.assign(offset(shape.num_local_experts, shape.num_ranks), 0);
  return out;
}

// What one token sends: identical for every expert it goes to, so it is encoded once.
struct EncodedRow {
  std::vector<uint8_t> payload;  // row_bytes
  std::vector<float> scales;     // fp8 with float scales
  std::vector<uint32_t> ue8m0;   // fp8 with UE8M0 scales
};

EncodedRow encode_row(const uint16_t* x, int hidden, const LlFormat& fmt) {
  EncodedRow enc;
  if (!fmt.use_fp8) {
    // bf16 as little-endian bytes, the GPU's memory layout, whatever the host's byte order.
    enc.payload.resize(offset(hidden, 2));
    for (int h = 0; h < hidden; ++h) {
      enc.payload[2 * h] = static_cast<uint8_t>(x[h] & 0xFFu);
      enc.payload[2 * h + 1] = static_cast<uint8_t>(x[h] >> 8);
    }
    return enc;
  }
  Fp8Row q = quantize_row_fp8(x, hidden, fmt.round_scale);
  enc.payload = std::move(q.q);
  if (fmt.ue8m0)
    enc.ue8m0 = pack_ue8m0_row(q.exponent);
  else
    enc.scales = std::move(q.scale_inv);
  return enc;
}

// Index of scale (j, row, c) in the column-major [E_loc, R*T, C] GPU tensor.
size_t scale_index(const LlDispatchResult& d, size_t slots, int j, int row, int c) {
  return offset(offset(j, d.num_scale_columns) + c, slots) + row;
}

void place_row(LlDispatchResult& out, size_t slots, int j, int row, const EncodedRow& enc, int t,
               int k) {
  const size_t slot = offset(j, slots) + row;
  std::copy(enc.payload.begin(), enc.payload.end(), out.recv_x.begin() + offset(slot, out.row_bytes));
  for (size_t c = 0; c < enc.scales.size(); ++c)
    out.recv_scales[scale_index(out, slots, j, row, static_cast<int>(c))] = enc.scales[c];
  for (size_t c = 0; c < enc.ue8m0.size(); ++c)
    out.recv_scales_ue8m0[scale_index(out, slots, j, row, static_cast<int>(c))] = enc.ue8m0[c];
  out.src_info[slot] = t;
  out.src_topk_slot[slot] = k;
}

bool is_local(int64_t e, int rank, const LlShape& shape) {
  return e >= 0 && e / shape.num_local_experts == rank;
}

bool has_local_expert(const int64_t* experts, int rank, const LlShape& shape) {
  return std::any_of(experts, experts + shape.num_topk,
                     [&](int64_t e) { return is_local(e, rank, shape); });
}

// Appends source src's rows to each local expert. Walking tokens in ascending order (and sources in
// ascending order across calls) gives the (source rank, token) row order.
void receive_from_source(LlDispatchResult& out, const LlRankInput& in, int src, int rank,
                         const LlShape& shape, const LlFormat& fmt) {
  const std::vector<int32_t> first = out.recv_count;  // rows from sources < src
  for (int t = 0; t < in.num_tokens; ++t) {
    const int64_t* experts = in.topk_idx.data() + offset(t, shape.num_topk);
    if (!has_local_expert(experts, rank, shape)) continue;
    const EncodedRow enc = encode_row(in.x.data() + offset(t, shape.hidden), shape.hidden, fmt);
    for (int k = 0; k < shape.num_topk; ++k) {
      if (!is_local(experts[k], rank, shape)) continue;
      const int j = static_cast<int>(experts[k]) - rank * shape.num_local_experts;
      place_row(out, shape.slots(), j, out.recv_count[j]++, enc, t, k);
    }
  }
  for (int j = 0; j < shape.num_local_experts; ++j) {
    const int64_t count = out.recv_count[j] - first[j];
    out.layout_range[offset(j, shape.num_ranks) + src] = (static_cast<int64_t>(first[j]) << 32) | count;
  }
}

// ---- Combine ------------------------------------------------------------------------------------

void check_dispatch_result(const LlDispatchResult& d, int r, const LlShape& shape) {
  const std::string name = "dispatched_all_ranks[" + std::to_string(r) + "].";
  EPX_ARG_CHECK(d.num_ranks == shape.num_ranks && d.num_local_experts == shape.num_local_experts &&
                    d.num_max_dispatch_tokens_per_rank == shape.max_tokens,
                name, "shape: (R, E_loc, T) = (", d.num_ranks, ", ", d.num_local_experts, ", ",
                d.num_max_dispatch_tokens_per_rank, "), expected (", shape.num_ranks, ", ",
                shape.num_local_experts, ", ", shape.max_tokens, ")");
  check_numel(d.recv_count, shape.num_local_experts, 1, name + "recv_count");
  check_numel(d.src_info, shape.num_local_experts, shape.slots(), name + "src_info");
  check_numel(d.layout_range, shape.num_local_experts, shape.num_ranks, name + "layout_range");
  for (int j = 0; j < shape.num_local_experts; ++j) {
    const int32_t count = d.recv_count[j];
    EPX_ARG_CHECK(count >= 0 && static_cast<size_t>(count) <= shape.slots(), name, "recv_count: ",
                  count, " rows in local expert ", j, ", outside [0, R*T = ", shape.slots(), "]");
  }
}

// Records, for local expert j of rank r, the rows that hold tokens of `rank` (one layout_range entry).
void map_rows_of_expert(const LlDispatchResult& d, int r, int j, int rank, int num_tokens,
                        const LlShape& shape, std::vector<int>& row_of) {
  const std::string name = "dispatched_all_ranks[" + std::to_string(r) + "]";
  const int64_t range = d.layout_range[offset(j, shape.num_ranks) + rank];
  const int64_t first = range >> 32, count = range & 0xFFFFFFFFll;
  EPX_ARG_CHECK(first >= 0 && first + count <= d.recv_count[j], name, ".layout_range: rows [",
                first, ", ", first + count, ") of local expert ", j, " exceed recv_count ",
                d.recv_count[j]);
  const int e = r * shape.num_local_experts + j;
  for (int64_t row = first; row < first + count; ++row) {
    const int32_t t = d.src_info[offset(j, shape.slots()) + row];
    EPX_ARG_CHECK(t >= 0 && t < num_tokens, name, ".src_info: token ", t, " at row ", row,
                  " of local expert ", j, " outside [0, ", num_tokens, ")");
    int& slot = row_of[offset(e, num_tokens) + t];
    EPX_ARG_CHECK(slot < 0, name, ".src_info: token ", t, " twice in local expert ", j, " (rows ",
                  slot, " and ", row, ")");
    slot = static_cast<int>(row);
  }
}

// row_of[e * N + t] = the row of (source `rank`, token t) in expert e on its rank, or -1: built
// once so the combine finds each (token, expert) in O(1).
std::vector<int> rows_of_tokens(const std::vector<LlDispatchResult>& dispatched, int rank,
                                int num_tokens, const LlShape& shape) {
  std::vector<int> row_of(offset(shape.num_experts, num_tokens), -1);
  for (int r = 0; r < shape.num_ranks; ++r)
    for (int j = 0; j < shape.num_local_experts; ++j)
      map_rows_of_expert(dispatched[r], r, j, rank, num_tokens, shape, row_of);
  return row_of;
}

}  // namespace

// ---- fp8 (public) -------------------------------------------------------------------------------

uint8_t float_to_fp8_e4m3(float f) {
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(f, __NV_SATFINITE, __NV_E4M3));
}

float fp8_e4m3_to_float(uint8_t q) {
  const int exponent_field = (q >> 3) & 0xF;
  const int mantissa = q & 0x7;
  // e4m3 has no infinities; S.1111.111 is its only NaN.
  if (exponent_field == 0xF && mantissa == 0x7) return std::numeric_limits<float>::quiet_NaN();
  const float magnitude = exponent_field == 0
                              ? std::ldexp(static_cast<float>(mantissa), -9)  // subnormal: m/8 * 2^-6
                              : std::ldexp(static_cast<float>(8 + mantissa), exponent_field - 10);
  return (q & 0x80) ? -magnitude : magnitude;
}

int ceil_log2_exact(float f) {
  EPX_ARG_CHECK(f > 0.0f, "f: ", f, " must be > 0");
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  const int exponent_field = static_cast<int>(bits >> 23);  // sign is 0
  const uint32_t mantissa = bits & 0x7FFFFFu;
  // Normal: f = 1.m * 2^(ex-127), a power of two exactly when m == 0. (+inf: ex = 255, m = 0.)
  if (exponent_field != 0) return exponent_field - 127 + (mantissa != 0 ? 1 : 0);
  // Subnormal: f = m * 2^-149 exactly, so ceil(log2 f) = ceil(log2 m) - 149.
  int floor_log2 = 0;
  while ((mantissa >> (floor_log2 + 1)) != 0) ++floor_log2;
  const bool power_of_two = (mantissa & (mantissa - 1)) == 0;
  return floor_log2 + (power_of_two ? 0 : 1) - 149;
}

Fp8Row quantize_row_fp8(const uint16_t* row, int hidden, bool round_scale) {
  check_hidden(hidden);
  EPX_ARG_CHECK(row != nullptr, "row: is null");
  const int blocks = hidden / kLlScaleBlock;
  Fp8Row out;
  out.q.resize(hidden);
  out.scale_inv.resize(blocks);
  std::vector<int> exponent(blocks, 0);
  for (int c = 0; c < blocks; ++c)
    quantize_block(row + offset(c, kLlScaleBlock), out.q.data() + offset(c, kLlScaleBlock),
                   round_scale, &out.scale_inv[c], &exponent[c]);
  if (round_scale) out.exponent = std::move(exponent);
  return out;
}

uint32_t pack_ue8m0(const int* exponents, int n) {
  EPX_ARG_CHECK(n >= 0 && n <= kLlUe8m0PerWord, "n: ", n, " outside [0, ", kLlUe8m0PerWord, "]");
  EPX_ARG_CHECK(n == 0 || exponents != nullptr, "exponents: is null");
  uint32_t word = 0;
  for (int k = 0; k < n; ++k) {
    const int biased = exponents[k] + 127;
    EPX_ARG_CHECK(biased >= 0 && biased <= 255, "exponents: ", exponents[k], " at ", k,
                  " outside the UE8M0 range [-127, 128]");
    word |= static_cast<uint32_t>(biased) << (8 * k);  // block 4i+k is byte k, little-endian
  }
  return word;
}

// ---- Dispatch / combine (public) ----------------------------------------------------------------

LlDispatchResult ll_dispatch(const std::vector<LlRankInput>& inputs, int rank,
                             int num_max_dispatch_tokens_per_rank, int hidden, int num_topk,
                             int num_experts, bool use_fp8, bool round_scale, bool ue8m0) {
  const LlShape shape = make_shape(static_cast<int>(inputs.size()), rank,
                                   num_max_dispatch_tokens_per_rank, hidden, num_topk, num_experts,
                                   "inputs");
  for (int s = 0; s < shape.num_ranks; ++s) check_rank_input(inputs[s], s, shape);
  const LlFormat fmt = make_format(use_fp8, round_scale, ue8m0, hidden);
  LlDispatchResult out = make_empty_result(shape, fmt);
  for (int s = 0; s < shape.num_ranks; ++s) receive_from_source(out, inputs[s], s, rank, shape, fmt);
  return out;
}

std::vector<uint16_t> ll_combine(const std::vector<LlDispatchResult>& dispatched_all_ranks,
                                 const std::vector<std::vector<uint16_t>>& y_all_ranks, int rank,
                                 const std::vector<int64_t>& topk_idx,
                                 const std::vector<float>& topk_weights, int num_tokens,
                                 int num_topk, int hidden, int num_max_dispatch_tokens_per_rank,
                                 int num_experts) {
  const LlShape shape = make_shape(static_cast<int>(dispatched_all_ranks.size()), rank,
                                   num_max_dispatch_tokens_per_rank, hidden, num_topk, num_experts,
                                   "dispatched_all_ranks");
  check_num_tokens(num_tokens, shape, "num_tokens");
  check_topk_idx(topk_idx, num_tokens, shape, "topk_idx");
  check_numel(topk_weights, num_tokens, num_topk, "topk_weights");
  EPX_ARG_CHECK(y_all_ranks.size() == dispatched_all_ranks.size(), "y_all_ranks: ",
                y_all_ranks.size(), " ranks given, dispatched_all_ranks has ", shape.num_ranks);
  for (int r = 0; r < shape.num_ranks; ++r) {
    check_dispatch_result(dispatched_all_ranks[r], r, shape);
    check_numel(y_all_ranks[r], offset(shape.num_local_experts, shape.slots()), hidden,
                "y_all_ranks[" + std::to_string(r) + "]");
  }
  const std::vector<int> row_of = rows_of_tokens(dispatched_all_ranks, rank, num_tokens, shape);

  std::vector<uint16_t> out(offset(num_tokens, hidden));
  std::vector<float> acc(hidden);
  for (int t = 0; t < num_tokens; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    // k ascending with a fused multiply-add each (the GPU's __fmaf_rn): the rounding sequence is
    // part of the contract, so the result is bitwise reproducible.
    for (int k = 0; k < num_topk; ++k) {
      const int64_t e = topk_idx[offset(t, num_topk) + k];
      if (e < 0) continue;
      const int row = row_of[offset(e, num_tokens) + t];
      const int r = static_cast<int>(e / shape.num_local_experts);
      const int j = static_cast<int>(e % shape.num_local_experts);
      EPX_ARG_CHECK(row >= 0, "dispatched_all_ranks[", r, "]: no row of token ", t, " of rank ",
                    rank, " in local expert ", j, " (topk_idx slot ", k, ")");
      const uint16_t* y = y_all_ranks[r].data() + offset(offset(j, shape.slots()) + row, hidden);
      const float w = topk_weights[offset(t, num_topk) + k];
      for (int h = 0; h < hidden; ++h) acc[h] = std::fma(w, bf16_to_float(y[h]), acc[h]);
    }
    for (int h = 0; h < hidden; ++h) out[offset(t, hidden) + h] = float_to_bf16(acc[h]);
  }
  return out;
}

}  // namespace epx::ref
