#include "host/topology.hpp"

#include "epx/error.hpp"
#include "epx/limits.hpp"
#include "host/env.hpp"

namespace epx {

Topology Topology::make(int num_ranks, int rank, int domain_size, int node_size_override, const char* source) {
  EPX_ARG_CHECK(num_ranks >= 1, "num_ranks: expected >= 1, got ", num_ranks);
  EPX_ARG_CHECK(rank >= 0 && rank < num_ranks, "rank: expected [0, ", num_ranks, "), got ", rank);
  EPX_ARG_CHECK(domain_size >= 1 && num_ranks % domain_size == 0, "NVLink domain size: expected a divisor of the ",
                num_ranks, " ranks, got ", domain_size);
  EPX_CHECK(num_ranks <= kMaxWorldRanks, ErrorKind::kUnsupported, "world of ", num_ranks,
            " ranks exceeds the limit of ", kMaxWorldRanks, " ranks (", kMaxNodes, " nodes of ", kMaxRanks, ")");
  Topology t;
  t.num_ranks = num_ranks;
  t.rank = rank;
  t.domain_size = domain_size;
  t.node_size = domain_size;
  if (node_size_override > 0) {
    // A virtual node is a split of one NVLink domain, never a union of several: ranks of one node
    // must reach each other over NVLink.
    EPX_ARG_CHECK(domain_size % node_size_override == 0, source, ": ", node_size_override,
                  " does not divide the NVLink domain of ", domain_size, " ranks (virtual nodes split one domain)");
    t.node_size = node_size_override;
  } else {
    EPX_ARG_CHECK(node_size_override == 0, source, ": expected >= 1 (0 = the NVLink domain), got ",
                  node_size_override);
  }
  t.virtual_nodes = t.node_size < domain_size;
  EPX_CHECK(t.node_size <= kMaxRanks, ErrorKind::kUnsupported, "node of ", t.node_size,
            " ranks exceeds the limit of ", kMaxRanks, " ranks per node",
            t.virtual_nodes ? "" : " (split the NVLink domain into virtual nodes with node_size / EPX_NODE_SIZE)");
  EPX_CHECK(t.num_nodes() <= kMaxNodes, ErrorKind::kUnsupported, num_ranks, " ranks in nodes of ", t.node_size,
            " make ", t.num_nodes(), " nodes, more than the limit of ", kMaxNodes);
  return t;
}

std::vector<int> Topology::node_ranks() const {
  std::vector<int> ranks;
  for (int l = 0; l < node_size; ++l) ranks.push_back(view().rank_of(node_idx(), l));
  return ranks;
}

std::vector<int> Topology::rail_peers() const {
  std::vector<int> ranks;
  for (int n = 0; n < num_nodes(); ++n) ranks.push_back(view().rail_peer(n));
  return ranks;
}

int requested_node_size(int option, const char** source) {
  if (option != 0) {
    *source = "node_size";
    return option;
  }
  const int from_env = env::node_size();
  *source = from_env > 0 ? "EPX_NODE_SIZE" : "node_size";
  return from_env;
}

}  // namespace epx
