// Topology: the host's view of nodes, node size and rail peers (docs/scaleout.md §2), validated
// once and handed to kernels as a TopologyView. Pure C++ (no CUDA), tested on the CPU.
#pragma once
#include <vector>

#include "common/topology.hpp"

namespace epx {

struct Topology {
  int num_ranks = 1;   // R, the world
  int rank = 0;
  int domain_size = 1; // ranks of the real NVLink domain (the NCCL LSA team; a SimWorld's whole world)
  int node_size = 1;   // U: domain_size, or the virtual node size it was split into
  bool virtual_nodes = false;  // node_size < domain_size

  // node_size_override: 0 = the NVLink domain; else a virtual node size, which must divide
  // domain_size and be at most kMaxRanks. `source` names where it came from in errors
  // ("node_size", "EPX_NODE_SIZE"). Throws Error(kInvalidArgument) naming it for a
  // size that does not divide the domain, Error(kUnsupported) for a node or world beyond the
  // limits (kMaxRanks per node, kMaxNodes nodes, kMaxWorldRanks ranks).
  static Topology make(int num_ranks, int rank, int domain_size, int node_size_override = 0,
                       const char* source = "node_size");

  TopologyView view() const { return TopologyView{num_ranks, rank, node_size}; }
  int num_nodes() const { return num_ranks / node_size; }
  int node_idx() const { return rank / node_size; }
  int local_idx() const { return rank % node_size; }
  // The world ranks of this rank's node, local index ascending (itself included).
  std::vector<int> node_ranks() const;
  // This rank's rail peer on every node, node ascending (itself at node_idx()).
  std::vector<int> rail_peers() const;
};

// The node size a Buffer asks for: `option` (BufferOptions::node_size) if > 0, else EPX_NODE_SIZE
// if set, else 0 (the NVLink domain). `source` is set to the name of the one used.
int requested_node_size(int option, const char** source);

}  // namespace epx
