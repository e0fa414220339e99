// CPU reference model of every epx operation (design.md 4.1-4.3): the oracle of all GPU tests.
// Plain C++, no CUDA. Inputs of all ranks are given so any rank can compute its expected outputs
// (tests regenerate every rank's inputs from per-rank seeds).
#pragma once
#include <cstdint>
#include <vector>

namespace epx::ref {

// bf16 <-> float, round-to-nearest-even (same as __float2bfloat16_rn; NaN stays NaN).
uint16_t float_to_bf16(float f);
float bf16_to_float(uint16_t b);

struct Layout {
  std::vector<int> num_tokens_per_rank;    // [R]
  std::vector<int> num_tokens_per_expert;  // [E]
  std::vector<uint8_t> is_token_in_rank;   // [N, R] 0/1
};
// topk_idx [N, K] row-major. Throws epx::Error(kInvalidArgument) naming "topk_idx" for an id outside
// [-1, E), and for E % R != 0. A token counts once per rank even if several of its experts live there.
Layout get_dispatch_layout(const std::vector<int64_t>& topk_idx, int num_tokens, int num_topk,
                           int num_experts, int num_ranks);

// One rank's dispatch input. x is raw bytes, row-major [N, row_bytes] (bf16: 2*H bytes, fp8: H).
struct RankInput {
  int num_tokens = 0;
  std::vector<uint8_t> x;             // [N, row_bytes]
  std::vector<float> x_scales;        // [N, S] or empty
  std::vector<int64_t> topk_idx;      // [N, K]
  std::vector<float> topk_weights;    // [N, K] or empty
};

struct DispatchShape {
  int num_ranks = 0, num_experts = 0, num_topk = 0;
  int row_bytes = 0;    // bytes of one x row
  int num_scales = 0;   // scale columns (0 for bf16)
  int expert_alignment = 1;
};

struct DispatchResult {
  int num_recv = 0;
  std::vector<uint8_t> recv_x;             // [num_recv, row_bytes]
  std::vector<float> recv_x_scales;        // [num_recv, S] (empty if S == 0)
  std::vector<int64_t> recv_topk_idx;      // [num_recv, K] local expert ids, -1 elsewhere
  std::vector<float> recv_topk_weights;    // [num_recv, K] 0 where idx is -1 (empty if no weights)
  std::vector<int> recv_src_idx;           // [num_recv]
  std::vector<int> recv_src_rank;          // [num_recv] (not a GPU output; for combine)
  std::vector<int> num_recv_tokens_per_expert;  // [E_loc], rounded up to expert_alignment
  std::vector<int> rank_prefix_matrix;     // [R, R]: [s][r] = rows ranks 0..s send to rank r
};
// What rank `rank` receives: each token is sent once per destination rank (the ranks of its
// experts); received rows are ordered by (source rank, source token index).
DispatchResult dispatch(const std::vector<RankInput>& inputs, int rank, const DispatchShape& shape);

// One rank's combine input: its expert outputs in its dispatch's received order.
struct CombineRankInput {
  const DispatchResult* dispatched = nullptr;  // that rank's dispatch result
  std::vector<uint16_t> x;                     // [num_recv, H] bf16 bits
  std::vector<float> topk_weights;             // [num_recv, K] or empty
};
struct CombineResult {
  std::vector<uint16_t> combined_x;            // [N, H] bf16 bits
  std::vector<float> combined_topk_weights;    // [N, K] (empty if no weights)
};
// combined_x[t] = bf16_rn( ((sum over ranks r ascending that received t of x_r[row of t]) + bias_0[t])
//                          + bias_1[t] ), all in fp32, in exactly that order (bitwise reproducible).
// combined_topk_weights[t][k] = sum over the same ranks, ascending, of topk_weights_r[row][k] (fp32).
// bias_0 / bias_1: [N, H] bf16 bits or empty.
CombineResult combine(const std::vector<CombineRankInput>& inputs, int rank, int num_tokens,
                      int hidden, int num_topk, const std::vector<uint16_t>& bias_0,
                      const std::vector<uint16_t>& bias_1);

}  // namespace epx::ref
