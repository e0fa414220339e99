// CPU reference of the scale-out parts of the layout (docs/scaleout.md §4): the oracle of the GPU
// tests. Plain C++, no CUDA.
#pragma once
#include <vector>

#include "reference/reference.hpp"

namespace epx::ref {

// num_tokens_per_rdma_rank [R / node_size]: tokens of this rank with at least one expert on a rank
// of node n (rank = node * node_size + local). A token counts once per node, however many of its
// experts and ranks are there. From get_dispatch_layout's is_token_in_rank [N, R].
// Throws epx::Error(kInvalidArgument) for a node_size that does not divide R, or a mask of the
// wrong size.
std::vector<int> num_tokens_per_rdma_rank(const Layout& layout, int num_tokens, int num_ranks, int node_size);

}  // namespace epx::ref
