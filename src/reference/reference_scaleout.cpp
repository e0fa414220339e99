#include "reference/reference_scaleout.hpp"

#include "epx/error.hpp"

namespace epx::ref {

std::vector<int> num_tokens_per_rdma_rank(const Layout& layout, int num_tokens, int num_ranks, int node_size) {
  EPX_ARG_CHECK(num_ranks >= 1 && node_size >= 1 && num_ranks % node_size == 0, "node_size: expected a divisor of ",
                num_ranks, " ranks, got ", node_size);
  EPX_ARG_CHECK(num_tokens >= 0 && layout.is_token_in_rank.size() == static_cast<size_t>(num_tokens) * num_ranks,
                "layout.is_token_in_rank: ", layout.is_token_in_rank.size(), " entries, want ", num_tokens, " x ",
                num_ranks);
  const int num_nodes = num_ranks / node_size;
  std::vector<int> counts(num_nodes, 0);
  for (int t = 0; t < num_tokens; ++t) {
    for (int n = 0; n < num_nodes; ++n) {
      bool in_node = false;
      for (int l = 0; l < node_size; ++l) in_node |= layout.is_token_in_rank[static_cast<size_t>(t) * num_ranks + n * node_size + l] != 0;
      counts[n] += in_node;
    }
  }
  return counts;
}

}  // namespace epx::ref
