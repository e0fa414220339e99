// Params and launchers of the high-throughput kernels across nodes (kernels/internode.cu,
// docs/protocol.md "Internode dispatch"), templated over the scale-out backend's view
// (common/net_view.hpp). Built and validated by src/host/buffer.cpp (internode_dispatch and the
// combine across nodes).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/layout.hpp"
#include "common/net_view.hpp"
#include "common/op_context.hpp"
#include "common/rdma_layout.hpp"
#include "common/scaleout_layout.hpp"
#include "common/topology.hpp"
#include "kernels/ht_params.hpp"

namespace epx::kernels {

// The count exchange of a fresh internode dispatch (one block): the notify's outputs of
// NotifyParams (count_matrix, rank_prefix_matrix, send_pos, num_recv, per-expert counts, the
// mailbox), for a world of nodes. ctx: this node's windows by local index (NVLink), rank = local
// index, num_ranks = node size, first_rank = the node's first world rank.
template <typename NetView>
struct InternodeNotifyParams {
  NotifyParams base;            // base.ctx as above; num_tokens_per_rank [R], is_token_in_rank [N, R]
  TopologyView topology;
  NetView net;                  // signals: layout.signal(m); EmuNet words at layout.signals()
  InternodeCountLayout layout;  // in every window
  int num_experts;              // E = R * E_loc (<= R * kMaxLocalExperts)
  uint64_t* exchanges;          // device word: exchanges done (kernel boundaries order it)
};

// Internode dispatch (rows that fit every receiver's row region; host-synced, cached or worst-case
// sizing, the kernel checks the fit on every rank alike): grid = the RDMA
// region's channels, block c = channel c (the token range of block_tokens). ctx as above.
template <typename NetView>
struct InternodeDispatchParams {
  DispatchParams base;  // rows, inputs, world-sized count_matrix [R, R] and send_pos [N, R], outputs
  TopologyView topology;
  NetView net;          // signals: rdma.tail_signal / head_signal; EmuNet words at rdma.signals()
  RdmaLayout rdma;      // in every window (rdma.base: its offset)
  int send_warps;       // warps of a block that stream to the remote nodes (rail peers)
  int forward_warps;    // warps that forward what the rail peers sent (the rest write node-local rows)
  // The handle's forward records (null: none kept): record of forwarded row key k (forward_key)
  // at forward_records[k * kForwardRecordInts], k < forward_slots; pre-filled with -1.
  int* forward_records;
  int64_t forward_slots;
};

// Internode combine (kernels/internode.cu): the mirror of the dispatch through the same rings.
// Row region of every rank X = (n, l), combine rows (bf16 payload, K weights):
//   own    [A = rows X sent to its node's ranks]: rows the node's ranks return to X, at
//          (rows X sent to lower local ranks) + position;
//   fwd    [F = rows X's rail peers on the other nodes sent to X's node]: rows the node's ranks
//          return to X as forwarder, at forward_key(m, u) + position;
//   part   [P = rows X sent to the other nodes' ranks]: the partial of X's token from node m, at
//          (rows X sent to lower remote nodes) + (rows to node m's lower local ranks than the
//          token's first there) + its position there.
template <typename NetView>
struct InternodeCombineParams {
  CombineParams base;   // ctx (the node), rows (combine rows), x, weights, biases, handle arrays, outputs
  TopologyView topology;
  NetView net;
  RdmaLayout rdma;      // messages of 2 * hidden payload bytes and num_topk weights
  const int* forward_records;
  int64_t forward_slots;
  int send_warps;       // warps that send partials (as forwarder)
  int recv_warps;       // warps that receive partials (as owner); the rest reduce afterwards
};

void launch_internode_notify(const InternodeNotifyParams<EmuNetView>& p, EmuMode mode, cudaStream_t stream);
void launch_internode_dispatch(const InternodeDispatchParams<EmuNetView>& p, EmuMode mode, int num_blocks,
                               int num_threads, cudaStream_t stream);
void launch_internode_combine(const InternodeCombineParams<EmuNetView>& p, EmuMode mode, int num_blocks,
                              int num_threads, cudaStream_t stream);
#if EPX_HAVE_GIN
// The kernels over NCCL GIN (built wherever the headers have GIN), launched by a Buffer whose world
// spans NCCL nodes. The dispatch and combine blocks have at most kGinInternodeThreads threads
// (one block per SM in their launch bounds, so that GIN's posting gets the registers it needs).
constexpr int kGinInternodeThreads = 256;
void launch_internode_notify(const InternodeNotifyParams<GinNetView>& p, cudaStream_t stream);
void launch_internode_dispatch(const InternodeDispatchParams<GinNetView>& p, int num_blocks, int num_threads,
                               cudaStream_t stream);
void launch_internode_combine(const InternodeCombineParams<GinNetView>& p, int num_blocks, int num_threads,
                              cudaStream_t stream);
#endif
void load_internode_kernels();

}  // namespace epx::kernels
