#include "internode_model.hpp"

#include <algorithm>

#include "common/rdma_layout.hpp"

namespace epx::bench {

size_t rdma_message_bytes(int64_t row_bytes, int num_topk) {
  RdmaLayout l;
  l.hidden_bytes = static_cast<size_t>(row_bytes);
  l.num_topk = num_topk;
  return l.slot_bytes();
}

int64_t tokens_to_node(const std::vector<int64_t>& topk_idx, int num_topk, int num_experts, int num_ranks,
                       int node_size, int node) {
  const int64_t experts_per_node = static_cast<int64_t>(num_experts / num_ranks) * node_size;
  int64_t tokens = 0;
  for (size_t t = 0; t + num_topk <= topk_idx.size(); t += num_topk) {
    bool hit = false;
    for (int k = 0; k < num_topk && !hit; ++k) {
      const int64_t e = topk_idx[t + k];
      hit = e >= 0 && e / experts_per_node == node;
    }
    tokens += hit;
  }
  return tokens;
}

int64_t dispatch_rdma_messages(const std::vector<int64_t>& topk_idx, int num_topk, int num_experts, int num_ranks,
                               int node_size, int rank) {
  int64_t messages = 0;
  for (int m = 0; m < num_ranks / node_size; ++m)
    if (m != rank / node_size) messages += tokens_to_node(topk_idx, num_topk, num_experts, num_ranks, node_size, m);
  return messages;
}

int64_t combine_rdma_messages(const std::vector<std::vector<int64_t>>& routing, int num_topk, int num_experts,
                              int node_size, int rank) {
  const int num_ranks = static_cast<int>(routing.size());
  int64_t messages = 0;
  for (int m = 0; m < num_ranks / node_size; ++m) {
    if (m == rank / node_size) continue;
    const int rail_peer = m * node_size + rank % node_size;
    messages += tokens_to_node(routing[rail_peer], num_topk, num_experts, num_ranks, node_size, rank / node_size);
  }
  return messages;
}

int64_t nvlink_rows_received(const std::vector<int>& count_matrix, int num_ranks, int node_size, int rank) {
  int64_t rows = 0;
  for (int s = 0; s < num_ranks; ++s)
    if (s % node_size != rank % node_size) rows += count_matrix[static_cast<size_t>(s) * num_ranks + rank];
  return rows;
}

double ib_model_us(double rdma_bytes, double ib_gbps) { return rdma_bytes / (ib_gbps * 1e3); }

double modelled_rdma_gbps(double rdma_bytes, double measured_us, double ib_gbps) {
  const double us = std::max(measured_us, ib_model_us(rdma_bytes, ib_gbps));
  return rdma_bytes > 0 && us > 0 ? rdma_bytes / us / 1e3 : 0;
}

}  // namespace epx::bench
