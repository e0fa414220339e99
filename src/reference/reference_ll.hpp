// CPU reference model of the low-latency mode (design.md 4.4-4.5): the oracle of the GPU LL tests,
// so every result here is bit-exact with the specification, including padding of the dense outputs.
// Inputs of all ranks are given so any rank can compute its expected outputs.
//
// Notation: R ranks, E experts, E_loc = E / R local experts per rank (expert e lives on rank
// e / E_loc as local expert e % E_loc), T = num_max_dispatch_tokens_per_rank, H = hidden.
#pragma once
#include <cstdint>
#include <vector>

namespace epx::ref {

constexpr int kLlScaleBlock = 128;        // channels sharing one fp8 scale
constexpr int kLlUe8m0PerWord = 4;        // UE8M0 scale bytes packed in one int32
constexpr float kFp8E4m3Max = 448.0f;     // largest finite e4m3 value
constexpr float kLlAmaxFloor = 1e-4f;     // keeps the scale finite for an all-zero block

// ---- fp8 e4m3 quantization ----------------------------------------------------------------------

// fp8 e4m3 bits of f: round to nearest even, saturated to +-448, NaN -> NaN (0x7F). This is the CUDA
// host function __nv_cvt_float_to_fp8(f, __NV_SATFINITE, __NV_E4M3), as the GPU kernels use.
uint8_t float_to_fp8_e4m3(float f);
// Exact value of e4m3 bits (decoded by hand, independently of CUDA).
float fp8_e4m3_to_float(uint8_t q);

// ceil(log2(f)) computed exactly from the bits of f (> 0; normal or subnormal; +inf gives 128).
int ceil_log2_exact(float f);

struct Fp8Row {
  std::vector<uint8_t> q;          // [H] e4m3 bits
  std::vector<float> scale_inv;    // [H/128] stored scale: x ~= q * scale_inv
  std::vector<int> exponent;       // [H/128] scale_inv = 2^exponent; filled only with round_scale
};
// Quantizes one bf16 row per 128-channel block: amax = max(fmaxf over |x| (NaN ignored), 1e-4);
// round_scale: scale_inv = 2^ceil(log2(amax / 448)), else scale_inv = amax / 448 and
// scale = 448 / amax; q = e4m3(x * scale). hidden must be a positive multiple of 128.
Fp8Row quantize_row_fp8(const uint16_t* row, int hidden, bool round_scale);

// Packs n (0..4) UE8M0 scales: byte k (little-endian) = exponents[k] + 127; missing bytes are 0.
uint32_t pack_ue8m0(const int* exponents, int n);

// ---- Dispatch -----------------------------------------------------------------------------------

struct LlRankInput {
  int num_tokens = 0;              // N <= T
  std::vector<uint16_t> x;         // [N, H] bf16 bits
  std::vector<int64_t> topk_idx;   // [N, K], -1 = none; the experts of a token are distinct
};

// What rank `rank` receives, dense like the GPU tensors so tests can memcmp whole tensors. Rows of
// local expert j are packed in [0, recv_count[j]), ordered by (source rank, source token); padding
// rows hold 0 (recv_x, recv_scales*) or -1 (src_info, src_topk_slot).
struct LlDispatchResult {
  int num_ranks = 0, num_local_experts = 0, num_max_dispatch_tokens_per_rank = 0, hidden = 0;
  int row_bytes = 0;               // bytes of one recv_x row: H (fp8) or 2H (bf16)
  int num_scale_columns = 0;       // C: H/128 (float scales), ceil(H/512) (UE8M0) or 0 (bf16)
  std::vector<uint8_t> recv_x;     // [E_loc, R*T, row_bytes] (bf16 rows as little-endian bytes)
  // Column-major in the last two dims, as on the GPU: (j, row, c) at j*(R*T*C) + c*(R*T) + row.
  std::vector<float> recv_scales;           // fp8 with float scales, else empty
  std::vector<uint32_t> recv_scales_ue8m0;  // fp8 with UE8M0 scales, else empty
  std::vector<int32_t> recv_count;     // [E_loc]
  std::vector<int32_t> src_info;       // [E_loc, R*T] source token index of each row
  std::vector<int32_t> src_topk_slot;  // [E_loc, R*T] k of the row's expert in the source's top-k
  std::vector<int64_t> layout_range;   // [E_loc, R] (first row of source s << 32) | its row count
};

// R = inputs.size(). use_fp8 = false sends bf16 rows (round_scale and ue8m0 are then ignored);
// ue8m0 implies round_scale.
LlDispatchResult ll_dispatch(const std::vector<LlRankInput>& inputs, int rank,
                             int num_max_dispatch_tokens_per_rank, int hidden, int num_topk,
                             int num_experts, bool use_fp8, bool round_scale, bool ue8m0);

// ---- Combine ------------------------------------------------------------------------------------

// out[t][h] = bf16_rn(acc), acc = 0.f then, for k ascending over the valid slots of token t,
// acc = fma(topk_weights[t][k], y_r[j][row][h], acc) where expert topk_idx[t][k] is local expert j
// of rank r and `row` is where r's dispatch put (source `rank`, token t). Tokens with no valid slot
// give 0. dispatched_all_ranks[r]: rank r's ll_dispatch result; y_all_ranks[r]: [E_loc, R*T, H] bf16.
// Returns [num_tokens, H] bf16 bits.
std::vector<uint16_t> ll_combine(const std::vector<LlDispatchResult>& dispatched_all_ranks,
                                 const std::vector<std::vector<uint16_t>>& y_all_ranks, int rank,
                                 const std::vector<int64_t>& topk_idx,
                                 const std::vector<float>& topk_weights, int num_tokens,
                                 int num_topk, int hidden, int num_max_dispatch_tokens_per_rank,
                                 int num_experts);

}  // namespace epx::ref
