// TopologyView: where a rank sits in a world of nodes (docs/scaleout.md §2), as plain data for
// host and device. Built and validated on the host by Topology (host/topology.hpp).
//
//   rank = node_idx * node_size + local_idx
//
// A node is an NVLink domain (the NCCL LSA team) or, for tests, a virtual node: an equal split of
// one (BufferOptions::node_size). The rail peer of this rank on node m is (m, local_idx): the
// high-throughput path crosses nodes only between rail peers.
#pragma once

#include "common/hd.hpp"

namespace epx {

struct TopologyView {
  int num_ranks = 1;  // R, the world
  int rank = 0;
  int node_size = 1;  // U, ranks per node; R % U == 0

  EPX_HD int num_nodes() const { return num_ranks / node_size; }
  EPX_HD int node_of(int r) const { return r / node_size; }
  EPX_HD int local_of(int r) const { return r % node_size; }
  EPX_HD int rank_of(int node_idx, int local_idx) const { return node_idx * node_size + local_idx; }
  EPX_HD int node_idx() const { return node_of(rank); }
  EPX_HD int local_idx() const { return local_of(rank); }
  EPX_HD bool same_node(int r) const { return node_of(r) == node_idx(); }
  // This rank's peer of the same local index on node `node` (itself on its own node).
  EPX_HD int rail_peer(int node) const { return rank_of(node, local_idx()); }
};

}  // namespace epx
