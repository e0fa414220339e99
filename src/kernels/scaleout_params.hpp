// Params and launchers of the scale-out kernels (docs/scaleout.md §4), one struct per kernel,
// templated over the backend's view (common/net_view.hpp).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/net_view.hpp"
#include "common/op_context.hpp"
#include "common/scaleout_layout.hpp"
#include "common/topology.hpp"

namespace epx::kernels {

// The two-level count exchange (count_exchange.cu): this rank's row of token counts goes to every
// rank of its node over NVLink; each rank puts its node's block to its rail peer on every other
// node (one put_signal each); every rank ends with count_matrix [R, R] (row s: tokens rank s
// sends to each rank), the same on all ranks. One block; every rank of the world takes part.
template <typename NetView>
struct CountExchangeParams {
  device::OpContext ctx;           // this node's windows by local index (NVLink), rank = local index,
                                   //   num_ranks = node size; error record; timeout
  TopologyView topology;
  NetView net;                     // signals: layout.signal(m); EmuNet words at layout.signals()
  ScaleoutCountLayout layout;      // in every window
  const int* num_tokens_per_rank;  // [R] this rank's row
  int* count_matrix;               // [R, R] out
  uint64_t* epoch;                 // device word: exchanges done (0 at first); kernel boundaries order it
};

void launch_count_exchange(const CountExchangeParams<EmuNetView>& p, EmuMode mode, cudaStream_t stream);
#if EPX_HAVE_GIN
void launch_count_exchange(const CountExchangeParams<GinNetView>& p, cudaStream_t stream);
#endif
void load_count_exchange_kernels();

// get_dispatch_layout's num_tokens_per_rdma_rank (layout_scaleout.cu): from is_token_in_rank, the
// tokens with at least one destination rank on each node (once per node).
struct RdmaRankCountParams {
  const bool* is_token_in_rank;   // [N, R]
  int num_tokens, num_ranks, node_size;
  int* num_tokens_per_rdma_rank;  // [R / node_size] out
};
// Zeroes the output, then counts (both on `stream`).
void launch_rdma_rank_counts(const RdmaRankCountParams& p, cudaStream_t stream);
void load_layout_scaleout_kernels();

}  // namespace epx::kernels
