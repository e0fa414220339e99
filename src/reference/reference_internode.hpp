// CPU reference of high-throughput dispatch and combine across nodes (docs/scaleout.md §4,
// docs/protocol.md "Internode dispatch and combine"): the oracle of the internode GPU tests.
// Plain C++, no CUDA. rank = node * node_size + local; the rail peer of rank (n, l) on node m is
// (m, l).
//
// Dispatch, modelled hop by hop: source rank s = (n, l) sends each token once to every node m that
// holds one of its experts, to its rail peer f = (m, l) (for m == n, f is s itself: the node-local
// leg has no RDMA hop but the same bookkeeping). The forwarder f copies the token into its final
// row on every rank of node m that holds one of its experts.
//   - A forwarder's RDMA-received tokens are ordered by source node, then source token index (one
//     source rank per node: the forwarder's rail peer there).
//   - A receiver's rows are ordered by source node, then source rank (local index) within it, then
//     source token index: since rank = node * node_size + local this is exactly the (source rank,
//     token) order of the intranode dispatch (ref::dispatch), and the rows, scales, top-k ids
//     (local ids, -1 elsewhere) and weights, source indices and per-expert counts are identical.
//
// Combine, two levels: for token t of owner o = (n, l) and each node m that received it, the
// forwarder (m, l) sums in fp32 the rows of t on the ranks of node m, local index ascending: the
// partial P_m. A remote partial (m != n) crosses the network as bf16 (rounded to nearest even
// once); the owner's own node partial stays fp32. The owner then computes in fp32
//   acc = sum over m ascending of (m == n ? P_m : bf16_rn(P_m)); acc += bias_0; acc += bias_1;
//   combined_x[t] = bf16_rn(acc).
// Weights take the same two-level order, all fp32 (no rounding across the network). With
// node_size 1 every partial is one bf16 row, so the result equals ref::combine bitwise.
#pragma once
#include <cstdint>
#include <vector>

#include "reference/reference.hpp"

namespace epx::ref {

struct InternodeShape {
  DispatchShape base;    // base.num_ranks = R
  int node_size = 1;     // U, divides R; N = R / U nodes
  int num_channels = 1;  // channels (blocks) of the sender; channel c holds the contiguous token
                         // range [c * q, min((c + 1) * q, T)) of a rank of T tokens, q = ceil(T / C)
};

// DeepEP's SourceMeta of a received row: the source node and which ranks of the receiver's node
// (bit l = local index l) receive the token.
struct SourceMeta {
  int src_rdma_rank = 0;
  uint32_t is_token_in_nvl_ranks = 0;
};

// The data of DeepEP's internode handle for one rank, its 10-tuple order:
// (is_token_in_rank, rdma_channel_prefix_matrix, gbl_channel_prefix_matrix,
//  recv_rdma_channel_prefix_matrix, recv_rdma_rank_prefix_sum, recv_gbl_channel_prefix_matrix,
//  recv_gbl_rank_prefix_sum, recv_src_meta, send_rdma_head, send_nvl_head).
// "Prefix" below is inclusive over the index named, counts of tokens (a token counts once per
// node for the rdma entries, once per rank for the gbl entries).
struct InternodeHandle {
  std::vector<uint8_t> is_token_in_rank;             // [T, R] this rank's tokens
  std::vector<int> rdma_channel_prefix_matrix;       // [N, C]: [m][c] tokens of channels 0..c sent to node m
  std::vector<int> gbl_channel_prefix_matrix;        // [R, C]: [r][c] tokens of channels 0..c sent to rank r
  std::vector<int> recv_rdma_channel_prefix_matrix;  // [N, C]: as forwarder, [m][c] tokens of channels 0..c
                                                     // of the rail peer on node m received (to forward)
  std::vector<int> recv_rdma_rank_prefix_sum;        // [N]: [m] tokens received as forwarder from nodes 0..m
  std::vector<int> recv_gbl_channel_prefix_matrix;   // [R, C]: [s][c] first row (absolute) of source rank s's
                                                     // channel c in this rank's received rows
  std::vector<int> recv_gbl_rank_prefix_sum;         // [R]: [s] rows received from source ranks 0..s
  std::vector<SourceMeta> recv_src_meta;             // [num_recv]
  std::vector<int> send_rdma_head;                   // [T, N]: position of token t among this rank's tokens
                                                     // sent to node m (token order), -1 if not sent there
  std::vector<int> send_nvl_head;                    // [num_rdma_recv, U]: as forwarder, the row of its
                                                     // j-th RDMA-received token on local rank u, -1 if none
};

struct InternodeDispatchResult {
  DispatchResult recv;  // receiver-side outputs, exactly as ref::dispatch gives them
  InternodeHandle handle;
  int num_rdma_recv = 0;                 // tokens received as forwarder
  std::vector<int> rdma_recv_src_rank;   // [num_rdma_recv] global source rank
  std::vector<int> rdma_recv_src_idx;    // [num_rdma_recv] source token index
};

// Every rank's internode dispatch (the forwarding hop needs all of them). Throws
// epx::Error(kInvalidArgument) naming the argument: node_size not dividing R, more than 32 nodes
// or node_size > 8 (scaleout.md §2), num_channels < 1, and every check of ref::dispatch.
std::vector<InternodeDispatchResult> internode_dispatch(const std::vector<RankInput>& inputs,
                                                        const InternodeShape& shape);

// The two-level combine for owner `rank` (order in the header comment). `x[r]` / `topk_weights[r]`:
// rank r's expert outputs [num_recv_r, H] bf16 bits / [num_recv_r, K] (all empty: no weights) in
// its received order. bias_0 / bias_1: [T, H] bf16 bits or empty. Reads only the handles, as the
// kernels do. Throws epx::Error(kInvalidArgument) naming the argument on a size mismatch.
CombineResult internode_combine(const std::vector<InternodeDispatchResult>& dispatched,
                                const std::vector<std::vector<uint16_t>>& x,
                                const std::vector<std::vector<float>>& topk_weights, int rank,
                                const InternodeShape& shape, int hidden,
                                const std::vector<uint16_t>& bias_0, const std::vector<uint16_t>& bias_1);

}  // namespace epx::ref
