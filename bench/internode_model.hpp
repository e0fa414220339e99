// The bytes of the internode workload (`epx_bench --mode internode`) and the InfiniBand time they
// would take (docs/benchmarks.md, "Internode rows"): pure arithmetic on a routing, no GPU.
//
// A rank (n, l) of node n puts each of its tokens once to every other node m holding one of the
// token's experts, as one message of the RDMA ring slot (RdmaLayout::slot_bytes) to its rail peer
// (m, l); in the combine each forwarder puts one partial per (token, node) back the same way. The
// model: on a fabric of `ib_gbps` GB/s per GPU those bytes take bytes / ib_gbps, so the op cannot
// end before max(measured time, IB time); the modelled RDMA GB/s is the bytes over that.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace epx::bench {

// The per-GPU line rate of the model (a 400 Gb/s NIC per GPU).
constexpr double kIbGbpsPerGpu = 50;

// Bytes of one RDMA message: the ring slot of rows of `row_bytes` (bf16: 2 x hidden; fp8: hidden)
// with `num_topk` top-k ids and weights (payload, scales, top-k, source meta; rdma_layout.hpp).
size_t rdma_message_bytes(int64_t row_bytes, int num_topk);

// Tokens of one rank's routing (topk_idx [num_tokens, num_topk], global expert ids, -1 = none)
// with at least one expert on a rank of node `node` (experts_per_rank = num_experts / num_ranks).
int64_t tokens_to_node(const std::vector<int64_t>& topk_idx, int num_topk, int num_experts, int num_ranks,
                       int node_size, int node);

// Messages rank `rank` puts across nodes in a dispatch of its routing: each token once per node
// other than its own that holds one of its experts.
int64_t dispatch_rdma_messages(const std::vector<int64_t>& topk_idx, int num_topk, int num_experts, int num_ranks,
                               int node_size, int rank);

// Messages rank `rank` puts across nodes in the combine (one partial per token it forwarded):
// the tokens of its rail peers on the other nodes with an expert on its node. `routing[r]` is
// rank r's topk_idx (only the rail peers' are read).
int64_t combine_rdma_messages(const std::vector<std::vector<int64_t>>& routing, int num_topk, int num_experts,
                              int node_size, int rank);

// Rows a rank receives whose last hop is another GPU's NVLink store: from the count matrix
// (counts[s * R + r] = rows rank s sends to rank r), the rows of the sources whose local index
// differs from `rank`'s (the others come from itself, or from another node through itself as the
// forwarder).
int64_t nvlink_rows_received(const std::vector<int>& count_matrix, int num_ranks, int node_size, int rank);

// The model's IB time of `rdma_bytes` at `ib_gbps` GB/s (1 GB = 1e9 bytes), in microseconds.
double ib_model_us(double rdma_bytes, double ib_gbps = kIbGbpsPerGpu);
// RDMA GB/s of an op measured at `measured_us` that puts `rdma_bytes` across nodes, were its RDMA
// leg the model's IB: bytes / max(measured, IB time). At most ib_gbps; below it when the op itself
// is slower than the fabric. 0 without bytes or time.
double modelled_rdma_gbps(double rdma_bytes, double measured_us, double ib_gbps = kIbGbpsPerGpu);

}  // namespace epx::bench
