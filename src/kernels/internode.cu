// High-throughput dispatch across nodes with NVLink forwarding (docs/scaleout.md §4, docs/protocol.md
// "Internode dispatch"), templated over the scale-out backend (device/net.cuh).
//
// internode_notify (one block): the count exchange. Each rank's row [token counts per rank |
// token counts per expert] goes to every rank of its node over NVLink; each rank then puts, with
// one put_signal per remote node m, its node's count rows and the node's expert counts for node
// m's experts to its rail peer there. Every rank ends with the [R, R] count matrix (so all ranks
// take the same decisions) and the counts of its own experts. Layout: InternodeCountLayout.
//
// internode_dispatch: block c is channel c, the token range block_tokens gives it. After the
// node's entry barrier its warps play three roles at once:
//   senders    (send_warps): each token of the channel goes once to every remote node m holding
//              one of its destination ranks, as a message in the bounded stream (m, c) to the rail
//              peer (m, local): written into send slot i % S, put to the rail peer's recv slot of
//              the same index with one put_signal per chunk of Q messages (tail += messages);
//              slot i is rewritten only after head(m, c) > i - S (the rail peer's acks). An end
//              marker (token -1) closes each stream every op.
//   forwarders (forward_warps): for every remote node m, the stream the rail peer there sends
//              this rank on channel c: whatever tail(m, c) announces is read and each message is
//              written over NVLink into its final row on every rank of this node that takes it
//              (the row the intranode dispatch gives it: rows by source rank, then token), then
//              acknowledged (head += messages) — up to the end marker.
//   node rows  (the other warps): the channel's tokens to the ranks of this node, over NVLink
//              into their final rows.
// Then done over the node (signal_sends_done), and each rank copies its rows out of its row region
// (every row has its final slot there: every block checks from the count matrix that the busiest
// receiver's rows fit, else the op is skipped on every rank alike with kBufferTooSmall) and pads
// the rest of a worst-case output.
// No cycle of waits: forwarders wait only for tails, polling all their streams in turn (never one
// stream alone), and consume whatever is announced; a sender waits only for the head of a stream
// whose unannounced messages are fewer than Q < S, so the slots it waits for hold announced
// messages, which the forwarder consumes in bounded time. The node-row writers wait for nothing.
#include <cub/block/block_scan.cuh>

#include "device/net.cuh"
#include "device/net_emu.cuh"
#include "device/net_gin.cuh"
#include "device/ptx.cuh"
#include "device/sync.cuh"
#include "kernels/combine_common.cuh"
#include "kernels/dispatch_common.cuh"
#include "kernels/internode_params.hpp"
#include "kernels/launch.cuh"

namespace epx::kernels {
namespace {

using namespace epx::device;

template <typename T>
__device__ __forceinline__ T* at(char* window, size_t offset) {
  return reinterpret_cast<T*>(window + offset);
}

// ---------------------------------------------------------------------------------------------
// Count exchange

constexpr int kNotifyThreads = 1024;
// Launch bounds of the dispatch and combine over Net. EmuNet: kMaxHtThreads, no minimum of blocks
// per SM (0: the bounds of a plain __launch_bounds__(kMaxHtThreads)). GinNet: kGinInternodeThreads
// (internode_params.hpp) and one block per SM: without that minimum ptxas aims at 128 registers
// per thread whatever the thread bound, and GIN's inline posting spills there.
template <typename Net>
struct InternodeBounds {
  static constexpr int kThreads = kMaxHtThreads;
  static constexpr int kMinBlocks = 0;
};
#if EPX_HAVE_GIN
template <>
struct InternodeBounds<device::GinNet> {
  static constexpr int kThreads = kGinInternodeThreads;
  static constexpr int kMinBlocks = 1;
};
#endif
using NotifyScan = cub::BlockScan<int, kNotifyThreads>;

// send_pos[t][r] for the world's R ranks (as notify.cu's), and the check that the layout inputs agree.
__device__ void world_send_pos(const NotifyParams& p, int R, NotifyScan::TempStorage& scan) {
  for (int r = 0; r < R; ++r) {
    int running = 0;
    for (int base = 0; base < p.num_tokens; base += kNotifyThreads) {
      const int t = base + threadIdx.x;
      const int flag = t < p.num_tokens && p.is_token_in_rank[static_cast<int64_t>(t) * R + r] ? 1 : 0;
      int prefix, total;
      NotifyScan(scan).ExclusiveSum(flag, prefix, total);
      if (t < p.num_tokens) p.send_pos[static_cast<int64_t>(t) * R + r] = flag ? running + prefix : -1;
      running += total;
      __syncthreads();
    }
    if (threadIdx.x == 0 && running != p.num_tokens_per_rank[r])
      record_error(p.ctx, DeviceErrorKind::kInvalidArgument, Phase::kInputCheck, r, -1, p.num_tokens_per_rank[r],
                   running);
  }
}

template <typename Net>
__global__ void __launch_bounds__(kNotifyThreads, 1)
    internode_notify_kernel(const __grid_constant__ InternodeNotifyParams<typename Net::View> p) {
  __shared__ NotifyScan::TempStorage scan;
  const NotifyParams& q = p.base;
  const OpContext& ctx = q.ctx;
  const TopologyView& t = p.topology;
  const InternodeCountLayout& l = p.layout;
  const int R = t.num_ranks, U = t.node_size, N = t.num_nodes();
  const int my_node = t.node_idx(), my_local = t.local_idx();
  const int E = p.num_experts, E_loc = q.num_experts_per_rank;
  const uint64_t x = *p.exchanges + 1;
  const int parity = static_cast<int>(x & 1);
  char* own = ctx.peers[my_local];
  const size_t row_ints = l.row_ints();

  // 1. This rank's row into node_rows[parity][my_local] of every rank of the node, then its flag.
  for (int u = 0; u < U; ++u) {
    int* row = at<int>(ctx.peers[u], l.node_row(parity, my_local));
    for (int i = threadIdx.x; i < R; i += blockDim.x) row[i] = q.num_tokens_per_rank[i];
    for (int i = threadIdx.x; i < E; i += blockDim.x) row[R + i] = q.num_tokens_per_expert[i];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    fence_acq_rel_sys();  // with the relaxed stores: a release of every thread's row
    for (int u = 0; u < U; ++u) st_relaxed_sys(at<uint64_t>(ctx.peers[u], l.flags()) + my_local, x);
  }

  // 2. Local work meanwhile.
  world_send_pos(q, R, scan);

  // 3. The node's rows.
  bool ok = true;
  if (threadIdx.x < U)
    ok = wait_geq(ctx, at<uint64_t>(own, l.flags()) + threadIdx.x, x, Phase::kCountExchange,
                  t.rank_of(my_node, threadIdx.x)).ok;
  if (!__syncthreads_and(ok)) return;

  // 4. The block for every node m: the node's count rows, and its expert counts for node m's experts
  //    (the own node's block straight into its receive slot).
  const int* rows = at<int>(own, l.node_row(parity, 0));
  for (int m = 0; m < N; ++m) {
    int* block = at<int>(own, m == my_node ? l.recv_block(parity, m) : l.send_block(parity, m));
    for (int i = threadIdx.x; i < U * R; i += blockDim.x) block[i] = rows[(i / R) * row_ints + i % R];
    for (int i = threadIdx.x; i < U * E_loc; i += blockDim.x) {
      const int u = i / E_loc, j = i % E_loc;
      const int expert = (m * U + u) * E_loc + j;
      int sum = 0;
      for (int v = 0; v < U; ++v) sum += rows[v * row_ints + R + expert];
      block[U * R + u * kMaxLocalExperts + j] = sum;
    }
  }
  __syncthreads();

  // 5. Scale-out (warp 0): the blocks to the rail peers, then theirs.
  if (threadIdx.x < kWarpSize) {
    typename Net::Warp net(p.net);
    for (int m = 0; m < N; ++m)
      if (m != my_node)
        net.put_signal(0, t.rail_peer(m), l.recv_block(parity, my_node), l.send_block(parity, m), l.block_bytes(),
                       l.signal(my_node), 1);
    for (int m = 0; ok && m < N; ++m)
      if (m != my_node) ok = net_wait_geq(ctx, net, l.signal(m), x, Phase::kCountExchange, t.rail_peer(m));
    net.flush();
  }
  if (!__syncthreads_and(ok)) return;

  // 6. The matrix, its prefix over source ranks, this rank's experts, the host's numbers.
  for (int i = threadIdx.x; i < R * R; i += blockDim.x) {
    const int s = i / R, r = i % R;
    q.count_matrix[i] = at<int>(own, l.recv_block(parity, t.node_of(s)))[t.local_of(s) * R + r];
  }
  if (q.num_recv_tokens_per_expert != nullptr) {
    for (int j = threadIdx.x; j < E_loc; j += blockDim.x) {
      int sum = 0;
      for (int m = 0; m < N; ++m) sum += at<int>(own, l.recv_block(parity, m))[U * R + my_local * kMaxLocalExperts + j];
      const int a = q.expert_alignment;
      q.num_recv_tokens_per_expert[j] = (sum + a - 1) / a * a;
    }
  }
  __syncthreads();  // count_matrix written by the block
  for (int r = threadIdx.x; r < R; r += blockDim.x) {
    int running = 0;
    for (int s = 0; s < R; ++s) {
      running += q.count_matrix[s * R + r];
      q.rank_prefix_matrix[s * R + r] = running;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    long long max_rows = 0, max_sent = 0;
    int worst_rank = 0;
    for (int r = 0; r < R; ++r) {
      long long sent = 0;
      for (int s = 0; s < R; ++s) sent += q.count_matrix[r * R + s];
      const long long rows_r = q.rank_prefix_matrix[(R - 1) * R + r];
      if (rows_r > max_rows) {
        max_rows = rows_r;
        worst_rank = r;
      }
      if (sent > max_sent) max_sent = sent;
    }
    const int num_recv = q.rank_prefix_matrix[(R - 1) * R + t.rank];
    // Worst-case sizing: every rank sees the same matrix, so every rank skips alike (no abort word).
    const bool over = q.num_worst_tokens > 0 && max_rows > q.num_worst_tokens;
    if (over)
      record_error(ctx, DeviceErrorKind::kInvalidArgument, Phase::kCapacity, worst_rank, -1, max_rows,
                   q.num_worst_tokens);
    *q.num_recv = over ? -1 : num_recv;
    if (q.mailbox != nullptr) {
      q.mailbox->num_recv = num_recv;
      q.mailbox->max_rows = max_rows;
      q.mailbox->max_sent_rows = max_sent;
      // The forward records' slots: rows the rail peers on the other nodes send to this node.
      long long forward = 0;
      for (int m = 0; m < N; ++m)
        if (m != my_node)
          for (int u = 0; u < U; ++u) forward += q.count_matrix[t.rank_of(m, my_local) * R + t.rank_of(my_node, u)];
      q.mailbox->forward_slots = forward;
    }
    *p.exchanges = x;
  }
}

// ---------------------------------------------------------------------------------------------
// Dispatch

// One warp writes a row into a node rank's row region: payload, scales, top-k as the destination's
// local ids (-1 elsewhere), weights (0 where -1), source token.
template <typename Scale, typename Id, typename Weight>
__device__ __forceinline__ void write_row(const RowLayout& L, char* region, int64_t row, const char* payload,
                                          const Scale& scale, const Id& id, const Weight& weight, bool with_weights,
                                          int64_t first_expert, int num_experts_per_rank, int src_token, int lane) {
  coop_copy<2>(L.row(region, row), payload, L.row_bytes, lane, kWarpSize);
  uint32_t* scales = reinterpret_cast<uint32_t*>(L.scales(region, row));
  for (int j = lane; j < L.num_scales; j += kWarpSize) scales[j] = scale(j);
  for (int k = lane; k < L.num_topk_idx; k += kWarpSize) {
    const int64_t e = id(k);
    const int local_e =
        (e >= first_expert && e < first_expert + num_experts_per_rank) ? static_cast<int>(e - first_expert) : -1;
    L.topk_idx(region, row)[k] = local_e;
    if (L.num_topk_weights) L.topk_weights(region, row)[k] = with_weights && local_e >= 0 ? weight(k) : 0.f;
  }
  if (lane == 0) *L.src_idx(region, row) = src_token;
}

// Warp-wide bounded wait on one of this rank's signals; `seen` = the value it saw.
template <typename NetWarp>
__device__ __forceinline__ bool wait_signal(const OpContext& ctx, const NetWarp& net, int sig, uint64_t target,
                                            Phase phase, int peer, uint64_t& seen) {
  Seen s{true, 0};
  if (threadIdx.x % kWarpSize == 0) s = wait_load_geq(ctx, [&] { return net.read(sig); }, target, phase, peer);
  const bool ok = __shfl_sync(0xffffffffu, s.ok, 0);
  seen = __shfl_sync(0xffffffffu, s.value, 0);
  __syncwarp();  // lane 0's acquire before every lane's reads
  return ok;
}

// The node of the k-th remote node (nodes ascending, the own node left out).
__device__ __forceinline__ int remote_node(int k, int my_node) { return k < my_node ? k : k + 1; }

// Key of the first row that rail source (m, local) (m another node) sends to this node's rank u,
// among the rows the rail peers send this node: nodes ascending, then local rank, then position.
// A forwarded token's key is its row key on the first rank of this node that takes it.
__device__ __forceinline__ int forward_key(const TopologyView& t, const int* count_matrix, int m, int u) {
  const int R = t.num_ranks, n = t.node_idx(), l = t.local_idx();
  int key = 0;
  for (int m2 = 0; m2 < m; ++m2)
    if (m2 != n)
      for (int u2 = 0; u2 < t.node_size; ++u2) key += count_matrix[t.rank_of(m2, l) * R + t.rank_of(n, u2)];
  for (int u2 = 0; u2 < u; ++u2) key += count_matrix[t.rank_of(m, l) * R + t.rank_of(n, u2)];
  return key;
}

// Per-block state of the streams (indexed by node; each node's entries belong to one warp).
struct StreamState {
  uint64_t sent[kMaxNodes];     // sender: messages written into stream (m, c), cumulative
  uint64_t posted[kMaxNodes];   // sender: messages put and signalled
  uint64_t head[kMaxNodes];     // sender: the last head(m, c) seen
  uint64_t consumed[kMaxNodes]; // forwarder: messages of ring (m, c) consumed
  int done[kMaxNodes];          // forwarder: ring (m, c) reached this op's end marker
};

// One warp's end of the streams (m, c) it sends on: slots with room, chunked put_signal.
template <typename Net>
struct Stream {
  const OpContext& ctx;
  const TopologyView& t;
  const RdmaLayout& L;
  typename Net::Warp& net;
  StreamState& st;
  int channel, lane;

  __device__ int ctx_id() const { return channel % kMaxNetContexts; }

  // At the op's start: every earlier message of stream (m, c) was consumed (ring slots and their
  // count may differ from op to op: row shape, num_rdma_bytes). False when the wait failed.
  __device__ bool open(int m) {
    const uint64_t sent = *at<uint64_t>(ctx.peers[t.local_idx()], L.sent_word(m, channel));
    uint64_t head = 0;
    if (!wait_signal(ctx, net, L.head_signal(m, channel), sent, Phase::kSend, t.rail_peer(m), head)) return false;
    if (lane == 0) {
      st.sent[m] = st.posted[m] = sent;
      st.head[m] = head;
    }
    __syncwarp();
    return true;
  }
  __device__ void close(int m) {
    if (lane == 0) *at<uint64_t>(ctx.peers[t.local_idx()], L.sent_word(m, channel)) = st.sent[m];
  }

  // Puts messages [posted, sent) of stream (m, c) (one or two runs of slots) and signals them.
  __device__ void post(int m) {
    const uint64_t first = st.posted[m], count = st.sent[m] - first;
    if (count == 0) return;
    const int peer = t.rail_peer(m), my_node = t.node_idx();
    const uint64_t S = static_cast<uint64_t>(L.ring_slots);
    const uint64_t room = S - first % S;
    const uint64_t run = count < room ? count : room;
    net.put(ctx_id(), peer, L.recv_slot(my_node, channel, static_cast<int64_t>(first)),
            L.send_slot(m, channel, static_cast<int64_t>(first)), run * L.slot_bytes());
    if (count > run)
      net.put(ctx_id(), peer, L.recv_slot(my_node, channel, static_cast<int64_t>(first + run)),
              L.send_slot(m, channel, static_cast<int64_t>(first + run)), (count - run) * L.slot_bytes());
    net.signal(ctx_id(), peer, L.tail_signal(my_node, channel), count);
    __syncwarp();
    if (lane == 0) st.posted[m] = st.sent[m];
    __syncwarp();
  }

  // The slot of the next message of stream (m, c), once free (the rail peer consumed message
  // i - S). False when the wait failed.
  __device__ bool reserve(int m, char*& slot) {
    const uint64_t i = st.sent[m];
    const uint64_t S = static_cast<uint64_t>(L.ring_slots);
    if (i + 1 > st.head[m] + S) {
      uint64_t head = 0;
      if (!wait_signal(ctx, net, L.head_signal(m, channel), i + 1 - S, Phase::kSend, t.rail_peer(m), head))
        return false;
      if (lane == 0) st.head[m] = head;
      __syncwarp();
    }
    slot = ctx.peers[t.local_idx()] + L.send_slot(m, channel, static_cast<int64_t>(i));
    return true;
  }
  // The reserved slot is written (by this warp): count it; post the chunk when full or at the end.
  __device__ void advance(int m, bool end) {
    __syncwarp();
    if (lane == 0) st.sent[m] = st.sent[m] + 1;
    __syncwarp();
    if (end || st.sent[m] - st.posted[m] >= static_cast<uint64_t>(L.chunk_tokens)) post(m);
  }
};

// Warp w of `warps` of channel c drains rings (m, c) for the remote nodes k with k % warps == w,
// polled in turn, until each reaches this op's end marker (meta[0] < 0): every other message goes
// to on_message(m, slot, meta) (every lane), then the consumed slots are acknowledged to the rail
// peer, which may reuse them. An idle wait past the bound fails in `phase`. False when it failed.
template <typename Net, typename OnMessage>
__device__ __forceinline__ bool drain_rail_rings(const OpContext& ctx, const TopologyView& t, const RdmaLayout& L,
                                                 typename Net::Warp& net, StreamState& st, int w, int warps, int lane,
                                                 Phase phase, const OnMessage& on_message) {
  const int c = blockIdx.x, my_node = t.node_idx(), num_remote = t.num_nodes() - 1;
  char* own = ctx.peers[t.local_idx()];
  for (int k = w; k < num_remote; k += warps) {
    const int m = remote_node(k, my_node);
    if (lane == 0) {
      st.consumed[m] = *at<uint64_t>(own, L.consumed_word(m, c));
      st.done[m] = 0;
    }
  }
  __syncwarp();
  WaitClock clock;
  while (true) {
    bool progressed = false;
    int pending = -1;
    uint64_t observed = 0, target = 0;
    for (int k = w; k < num_remote; k += warps) {
      const int m = remote_node(k, my_node);
      if (st.done[m]) continue;
      const uint64_t first = st.consumed[m];
      uint64_t announced = lane == 0 ? net.read(L.tail_signal(m, c)) : 0;
      announced = __shfl_sync(0xffffffffu, announced, 0);
      __syncwarp();  // lane 0's acquire before every lane's reads of the slots
      uint64_t i = first;
      bool done = false;
      for (; i < announced && !done; ++i) {
        const char* slot = own + L.recv_slot(m, c, static_cast<int64_t>(i));
        const int* meta = reinterpret_cast<const int*>(slot + L.meta_offset());
        if (meta[0] < 0) {
          done = true;
          continue;
        }
        on_message(m, slot, meta);
      }
      if (i > first) {
        // The slots were read (every lane, before the signal's release): the rail peer may reuse them.
        net.signal(c % kMaxNetContexts, t.rail_peer(m), L.head_signal(my_node, c), i - first);
        if (lane == 0) {
          st.consumed[m] = i;
          st.done[m] = done ? 1 : 0;
        }
        __syncwarp();
        progressed = true;
      }
      if (!done && pending < 0) {
        pending = m;
        observed = announced;
        target = i + 1;
      }
    }
    if (pending < 0) break;
    if (progressed) {
      clock.progressed();
    } else {
      int failed = 0;
      if (lane == 0) failed = idle_poll(ctx, clock, phase, t.rail_peer(pending), observed, target) != Idle::kWait;
      if (__shfl_sync(0xffffffffu, failed, 0)) return false;
    }
  }
  for (int k = w; k < num_remote; k += warps) {
    const int m = remote_node(k, my_node);
    if (lane == 0) *at<uint64_t>(own, L.consumed_word(m, c)) = st.consumed[m];
  }
  return true;
}

// Writes dispatch token `token` (-1: the end marker) as the next message of stream (m, c).
template <typename Net>
__device__ bool dispatch_message(const DispatchParams& d, Stream<Net>& stream, int m, int token) {
  const RdmaLayout& L = stream.L;
  const TopologyView& t = stream.t;
  const int lane = stream.lane, R = t.num_ranks;
  char* slot = nullptr;
  if (!stream.reserve(m, slot)) return false;
  if (token >= 0) {
    coop_copy<2>(slot, d.x + token * d.x_row_stride_bytes, d.rows.row_bytes, lane, kWarpSize);
    uint32_t* scales = reinterpret_cast<uint32_t*>(slot + L.scales_offset());
    for (int j = lane; j < d.rows.num_scales; j += kWarpSize)
      scales[j] = d.x_scales[token * d.scale_token_stride + j * d.scale_hidden_stride];
    int* ids = reinterpret_cast<int*>(slot + L.topk_idx_offset());
    float* weights = reinterpret_cast<float*>(slot + L.topk_weights_offset());
    for (int k = lane; k < d.num_topk; k += kWarpSize) {
      const int64_t e = d.topk_idx[token * d.topk_stride + k];
      ids[k] = e < 0 || e > 0x7fffffff ? -1 : static_cast<int>(e);
      weights[k] = d.topk_weights != nullptr ? d.topk_weights[token * d.weight_stride + k] : 0.f;
    }
  }
  int* meta = reinterpret_cast<int*>(slot + L.meta_offset());
  if (lane == 0) meta[0] = token;
  if (lane < t.node_size)
    meta[1 + lane] = token >= 0 ? d.send_pos[static_cast<int64_t>(token) * R + t.rank_of(m, lane)] : -1;
  stream.advance(m, token < 0);
  return true;
}

// Sender warp w of channel c: streams (m, c) for the remote nodes k with k % send_warps == w.
template <typename Net>
__device__ __noinline__ bool send_to_rail_peers(const InternodeDispatchParams<typename Net::View>& p, StreamState& st,
                                                int w, int lane) {
  const DispatchParams& d = p.base;
  const TopologyView& t = p.topology;
  const int c = blockIdx.x, my_node = t.node_idx(), num_remote = t.num_nodes() - 1, R = t.num_ranks;
  typename Net::Warp net(p.net);
  Stream<Net> stream{d.ctx, t, p.rdma, net, st, c, lane};
  for (int k = w; k < num_remote; k += p.send_warps)
    if (!stream.open(remote_node(k, my_node))) return false;
  const TokenRange tokens = block_tokens(d.num_tokens);
  for (int token = tokens.begin; token < tokens.end; ++token) {
    for (int k = w; k < num_remote; k += p.send_warps) {
      const int m = remote_node(k, my_node);
      const int pos = lane < t.node_size ? d.send_pos[static_cast<int64_t>(token) * R + t.rank_of(m, lane)] : -1;
      if (__ballot_sync(0xffffffffu, pos >= 0) == 0) continue;
      if (!dispatch_message(d, stream, m, token)) return false;
    }
  }
  for (int k = w; k < num_remote; k += p.send_warps) {
    const int m = remote_node(k, my_node);
    if (!dispatch_message(d, stream, m, -1)) return false;
    stream.close(m);
  }
  net.flush();
  return true;
}

// Forwarder warp w of channel c: rings (m, c) for the remote nodes k with k % forward_warps == w,
// polled in turn; each message to its final rows on this node's ranks, then acknowledged.
template <typename Net>
__device__ __noinline__ bool forward_from_rail_peers(const InternodeDispatchParams<typename Net::View>& p, StreamState& st,
                                        const int (*forward_base)[kMaxRanks], const int (*keys)[kMaxRanks], int w,
                                        int lane) {
  const DispatchParams& d = p.base;
  const TopologyView& t = p.topology;
  const RdmaLayout& L = p.rdma;
  const int c = blockIdx.x, my_node = t.node_idx(), U = t.node_size;
  const int E_loc = d.num_experts_per_rank;
  typename Net::Warp net(p.net);
  return drain_rail_rings<Net>(d.ctx, t, L, net, st, w, p.forward_warps, lane, Phase::kReceive,
                               [&](int m, const char* slot, const int* meta) {
    const int token = meta[0];
    const uint32_t* scales = reinterpret_cast<const uint32_t*>(slot + L.scales_offset());
    const int* ids = reinterpret_cast<const int*>(slot + L.topk_idx_offset());
    const float* weights = reinterpret_cast<const float*>(slot + L.topk_weights_offset());
    for (int u = 0; u < U; ++u) {
      const int pos = meta[1 + u];
      if (pos < 0) continue;
      const int r = t.rank_of(my_node, u);
      // The rail peer's weights (0 where it passed none), whatever this rank's own inputs.
      write_row(
          d.rows, d.ctx.rows(u), static_cast<int64_t>(forward_base[m][u]) + pos, slot,
          [&](int j) { return scales[j]; }, [&](int kk) { return static_cast<int64_t>(ids[kk]); },
          [&](int kk) { return weights[kk]; }, true, static_cast<int64_t>(r) * E_loc, E_loc, token, lane);
    }
    if (p.forward_records != nullptr) {
      int u0 = 0;
      while (u0 < U && meta[1 + u0] < 0) ++u0;
      const int64_t key = u0 < U ? static_cast<int64_t>(keys[m][u0]) + meta[1 + u0] : -1;
      if (key >= 0 && key < p.forward_slots) {
        int* record = p.forward_records + key * kForwardRecordInts;
        if (lane == 0) {
          record[0] = token;
          record[1] = c;
        }
        if (lane < U) record[2 + lane] = meta[1 + lane];
      }
    }
  });
}

// Node-row warps (nw of them, this one w): the channel's tokens to the ranks of this node.
__device__ __noinline__ void write_node_rows(const DispatchParams& d, const TopologyView& t, const int* local_base, int w, int nw,
                                int lane) {
  const TokenRange tokens = block_tokens(d.num_tokens);
  const int R = t.num_ranks, E_loc = d.num_experts_per_rank;
  for (int token = tokens.begin + w; token < tokens.end; token += nw) {
    for (int u = 0; u < t.node_size; ++u) {
      const int r = t.rank_of(t.node_idx(), u);
      const int pos = d.send_pos[static_cast<int64_t>(token) * R + r];
      if (pos < 0) continue;
      write_row(
          d.rows, d.ctx.rows(u), static_cast<int64_t>(local_base[u]) + pos, d.x + token * d.x_row_stride_bytes,
          [&](int j) { return d.x_scales[token * d.scale_token_stride + j * d.scale_hidden_stride]; },
          [&](int k) { return d.topk_idx[token * d.topk_stride + k]; },
          [&](int k) { return d.topk_weights[token * d.weight_stride + k]; }, d.topk_weights != nullptr,
          static_cast<int64_t>(r) * E_loc, E_loc, token, lane);
    }
  }
}

template <typename Net>
__global__ void __launch_bounds__(InternodeBounds<Net>::kThreads, InternodeBounds<Net>::kMinBlocks)
    internode_dispatch_kernel(const __grid_constant__ InternodeDispatchParams<typename Net::View> p) {
  __shared__ int local_base[kMaxRanks];                // first row of this rank's rows on each node rank
  __shared__ int forward_base[kMaxNodes][kMaxRanks];   // first row of rail source (m, local)'s rows there
  __shared__ int keys[kMaxNodes][kMaxRanks];           // forward_key(m, u)
  __shared__ StreamState streams;
  const DispatchParams& d = p.base;
  const OpContext& ctx = d.ctx;
  const TopologyView& t = p.topology;
  const int R = t.num_ranks, U = t.node_size, N = t.num_nodes(), my_node = t.node_idx(), my_local = t.local_idx();
  const uint64_t e = op_begin(ctx);
  const int num_recv = *d.num_recv;
  check_skip_is_recorded(ctx, num_recv);
  // Every row has its final slot in the receiver's row region: the busiest receiver of the world
  // (column sums of the count matrix, the same on every rank, so every rank skips alike).
  __shared__ int worst_rows, worst_rank;
  auto rows_to = [&](int r) {
    int rows = 0;
    for (int s = 0; s < R; ++s) rows += d.count_matrix[s * R + r];
    return rows;
  };
  if (threadIdx.x == 0) {
    worst_rows = -1;
    worst_rank = R;
  }
  __syncthreads();
  for (int r = threadIdx.x; r < R; r += blockDim.x) atomicMax(&worst_rows, rows_to(r));
  __syncthreads();
  for (int r = threadIdx.x; r < R; r += blockDim.x)
    if (rows_to(r) == worst_rows) atomicMin(&worst_rank, r);
  __syncthreads();
  if (num_recv < 0 || worst_rows > d.rows.capacity) {
    if (num_recv >= 0 && blockIdx.x == 0 && threadIdx.x == 0)
      record_error(ctx, DeviceErrorKind::kBufferTooSmall, Phase::kCapacity, worst_rank, -1, worst_rows,
                   d.rows.capacity);
    op_end(ctx, e);
    return;
  }
  // Final rows start where the rows of lower source ranks end (the intranode order).
  for (int i = threadIdx.x; i < (N + 1) * U; i += blockDim.x) {
    const int u = i % U;
    const int r = t.rank_of(my_node, u);
    const int s = i < N * U ? t.rank_of(i / U, my_local) : t.rank;
    int sum = 0;
    for (int s2 = 0; s2 < s; ++s2) sum += d.count_matrix[s2 * R + r];
    if (i < N * U) {
      forward_base[i / U][u] = sum;
      keys[i / U][u] = i / U == my_node ? 0 : forward_key(t, d.count_matrix, i / U, u);
    } else {
      local_base[u] = sum;
    }
  }
  __syncthreads();
  if (!wait_peers_ready(ctx, e)) return;

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize, warps = blockDim.x / kWarpSize;
  bool ok = true;
  if (warp < p.send_warps) {
    ok = send_to_rail_peers<Net>(p, streams, warp, lane);
  } else if (warp < p.send_warps + p.forward_warps) {
    ok = forward_from_rail_peers<Net>(p, streams, forward_base, keys, warp - p.send_warps, lane);
  } else {
    const int first = p.send_warps + p.forward_warps;
    write_node_rows(d, t, local_base, warp - first, warps - first, lane);
  }
  if (!__syncthreads_and(ok)) return;
  signal_sends_done(ctx, e);
  if (!wait_all_done(ctx, e, Phase::kReceive)) return;
  const size_t grid_tid = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const size_t grid_threads = static_cast<size_t>(gridDim.x) * blockDim.x;
  copy_out(d, 0, 0, num_recv, grid_tid, grid_threads);
  pad_rows(d, num_recv, grid_tid, grid_threads);
  op_end(ctx, e);
}

// ---------------------------------------------------------------------------------------------
// Combine

// forward_key for the forwarder of local index `l` on this node.
__device__ __forceinline__ int forward_key_of(const TopologyView& t, const int* count_matrix, int l, int m, int u) {
  const int R = t.num_ranks, n = t.node_idx();
  int key = 0;
  for (int m2 = 0; m2 < m; ++m2)
    if (m2 != n)
      for (int u2 = 0; u2 < t.node_size; ++u2) key += count_matrix[t.rank_of(m2, l) * R + t.rank_of(n, u2)];
  for (int u2 = 0; u2 < u; ++u2) key += count_matrix[t.rank_of(m, l) * R + t.rank_of(n, u2)];
  return key;
}

// Rows rank x sent to the other nodes below node m, then to node m's ranks below local u: the
// start of x's partials from node m whose first rank there is u (InternodeCombineParams, part).
__device__ __forceinline__ int part_key(const TopologyView& t, const int* count_matrix, int x, int m, int u) {
  const int R = t.num_ranks, n = t.node_of(x);
  int key = 0;
  for (int m2 = 0; m2 < m; ++m2)
    if (m2 != n)
      for (int u2 = 0; u2 < t.node_size; ++u2) key += count_matrix[x * R + t.rank_of(m2, u2)];
  for (int u2 = 0; u2 < u; ++u2) key += count_matrix[x * R + t.rank_of(m, u2)];
  return key;
}

// Rows of rank x's combine row region: own (returned by its node), fwd (as forwarder), part.
struct CombineRows {
  int own, fwd, part;
};
__device__ __forceinline__ CombineRows combine_rows_of(const TopologyView& t, const int* count_matrix, int x) {
  const int R = t.num_ranks, n = t.node_of(x), l = t.local_of(x);
  CombineRows g{0, 0, 0};
  for (int r = 0; r < R; ++r) {
    if (t.node_of(r) == n) g.own += count_matrix[x * R + r];
    else g.part += count_matrix[x * R + r];
  }
  for (int m = 0; m < t.num_nodes(); ++m)
    if (m != n)
      for (int u = 0; u < t.node_size; ++u) g.fwd += count_matrix[t.rank_of(m, l) * R + t.rank_of(n, u)];
  return g;
}

// Forwarder warp w of channel c: for every remote node m (k mod send_warps = w), the partials of
// the rail source (m, local)'s channel-c tokens it forwarded (its records), each the sum in fp32 of
// the token's rows returned by this node's ranks, local index ascending, rounded to bf16 once; a
// message per token (payload, weight sums, the source token and its partial's key there), then
// the end marker.
template <typename Net>
__device__ __noinline__ bool send_partials(const InternodeCombineParams<typename Net::View>& p, StreamState& st,
                                           const int (*fwd_keys)[kMaxRanks], const int (*fwd_part)[kMaxRanks],
                                           int fwd_offset, int num_fwd, int w, int lane) {
  const CombineParams& q = p.base;
  const TopologyView& t = p.topology;
  const RdmaLayout& L = p.rdma;
  const RowLayout& rows = q.rows;
  const int c = blockIdx.x, my_node = t.node_idx(), num_remote = t.num_nodes() - 1, U = t.node_size;
  const int H = q.hidden, K = rows.num_topk_weights;
  char* region = q.ctx.rows(t.local_idx());
  typename Net::Warp net(p.net);
  Stream<Net> stream{q.ctx, t, L, net, st, c, lane};
  for (int k = w; k < num_remote; k += p.send_warps)
    if (!stream.open(remote_node(k, my_node))) return false;
  for (int k = w; k < num_remote; k += p.send_warps) {
    const int m = remote_node(k, my_node);
    const int first_key = fwd_keys[m][0];
    const int next = m + 1 == my_node ? m + 2 : m + 1;  // the next remote node, if any
    const int end_key = next < t.num_nodes() ? fwd_keys[next][0] : num_fwd;
    for (int key = first_key; key < end_key && key < p.forward_slots; ++key) {
      const int* record = p.forward_records + static_cast<int64_t>(key) * kForwardRecordInts;
      const int token = record[0];
      if (token < 0 || record[1] != c) continue;
      char* slot = nullptr;
      if (!stream.reserve(m, slot)) return false;
      uint16_t* out = reinterpret_cast<uint16_t*>(slot);
      for (int v = lane; v < H / 8; v += kWarpSize) {
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int u = 0; u < U; ++u) {
          const int pos = record[2 + u];
          if (pos < 0) continue;
          const int64_t row = fwd_offset + fwd_keys[m][u] + pos;
          add_bf16x8(acc, reinterpret_cast<const int4*>(rows.row(region, row))[v]);
        }
        reinterpret_cast<int4*>(out)[v] = pack_bf16x8(acc);
      }
      float* weights = reinterpret_cast<float*>(slot + L.topk_weights_offset());
      for (int kk = lane; kk < K; kk += kWarpSize) {
        float acc = 0.f;
        for (int u = 0; u < U; ++u) {
          const int pos = record[2 + u];
          if (pos >= 0) acc += rows.topk_weights(region, fwd_offset + fwd_keys[m][u] + pos)[kk];
        }
        weights[kk] = acc;
      }
      int u0 = 0;
      while (u0 < U && record[2 + u0] < 0) ++u0;
      int* meta = reinterpret_cast<int*>(slot + L.meta_offset());
      if (lane == 0) {
        meta[0] = token;
        meta[1] = u0 < U ? fwd_part[m][u0] + record[2 + u0] : -1;
      }
      stream.advance(m, false);
    }
    char* slot = nullptr;
    if (!stream.reserve(m, slot)) return false;
    if (lane == 0) reinterpret_cast<int*>(slot + L.meta_offset())[0] = -1;
    stream.advance(m, true);
    stream.close(m);
  }
  net.flush();
  return true;
}

// Owner warp w of channel c: the partials of its channel-c tokens from every remote node m
// (k mod recv_warps = w), polled in turn, each into its part row; acknowledged as consumed.
template <typename Net>
__device__ __noinline__ bool receive_partials(const InternodeCombineParams<typename Net::View>& p, StreamState& st,
                                              int part_offset, int num_part, int w, int lane) {
  const CombineParams& q = p.base;
  const TopologyView& t = p.topology;
  const RdmaLayout& L = p.rdma;
  const RowLayout& rows = q.rows;
  const int K = rows.num_topk_weights;
  char* region = q.ctx.rows(t.local_idx());
  typename Net::Warp net(p.net);
  return drain_rail_rings<Net>(q.ctx, t, L, net, st, w, p.recv_warps, lane, Phase::kReduce,
                               [&](int, const char* slot, const int* meta) {
    const int key = meta[1];
    if (key < 0 || key >= num_part) return;
    coop_copy<2>(rows.row(region, part_offset + key), slot, rows.row_bytes, lane, kWarpSize);
    const float* weights = reinterpret_cast<const float*>(slot + L.topk_weights_offset());
    for (int kk = lane; kk < K; kk += kWarpSize) rows.topk_weights(region, part_offset + key)[kk] = weights[kk];
  });
}

template <typename Net>
__global__ void __launch_bounds__(InternodeBounds<Net>::kThreads, InternodeBounds<Net>::kMinBlocks)
    internode_combine_kernel(const __grid_constant__ InternodeCombineParams<typename Net::View> p) {
  __shared__ int recv_base[kMaxWorldRanks + 1];  // first received row of each source rank
  __shared__ int own_base[kMaxRanks];            // first row of my rows returned by node rank u
  __shared__ int part_base[kMaxNodes][kMaxRanks];  // part_key(me, m, u)
  __shared__ int fwd_keys[kMaxNodes][kMaxRanks];   // forward_key(m, u) (as forwarder)
  __shared__ int fwd_part[kMaxNodes][kMaxRanks];   // part_key(rail source (m, local), my node, u)
  __shared__ int worst_rows, worst_rank, my_fwd_offset, my_part_offset, my_part_rows;
  __shared__ StreamState streams;
  const CombineParams& q = p.base;
  const OpContext& ctx = q.ctx;
  const TopologyView& t = p.topology;
  const RowLayout& rows = q.rows;
  const int R = t.num_ranks, U = t.node_size, N = t.num_nodes(), me = t.rank, my_node = t.node_idx();
  const int my_local = t.local_idx(), H = q.hidden, K = rows.num_topk_weights;
  const int* cm = q.count_matrix;
  const uint64_t e = op_begin(ctx);
  const int num_recv = *q.num_recv;
  check_skip_is_recorded(ctx, num_recv);
  // Every rank's rows fit its row region (the same matrix on every rank: every rank skips alike).
  if (threadIdx.x == 0) {
    worst_rows = -1;
    worst_rank = R;
  }
  __syncthreads();
  for (int x = threadIdx.x; x < R; x += blockDim.x) {
    const CombineRows g = combine_rows_of(t, cm, x);
    atomicMax(&worst_rows, g.own + g.fwd + g.part);
  }
  __syncthreads();
  for (int x = threadIdx.x; x < R; x += blockDim.x) {
    const CombineRows g = combine_rows_of(t, cm, x);
    if (g.own + g.fwd + g.part == worst_rows) atomicMin(&worst_rank, x);
  }
  if (threadIdx.x == 0) {
    const CombineRows g = combine_rows_of(t, cm, me);
    my_fwd_offset = g.own;
    my_part_offset = g.own + g.fwd;
    my_part_rows = g.part;
    recv_base[0] = 0;
    for (int s = 0; s < R; ++s) recv_base[s + 1] = recv_base[s] + cm[s * R + me];
  }
  for (int i = threadIdx.x; i < N * U; i += blockDim.x) {
    const int m = i / U, u = i % U;
    part_base[m][u] = m == my_node ? 0 : part_key(t, cm, me, m, u);
    fwd_keys[m][u] = m == my_node ? 0 : forward_key_of(t, cm, my_local, m, u);
    fwd_part[m][u] = m == my_node ? 0 : part_key(t, cm, t.rank_of(m, my_local), my_node, u);
  }
  if (threadIdx.x < U) {
    int sum = 0;
    for (int u = 0; u < static_cast<int>(threadIdx.x); ++u) sum += cm[me * R + t.rank_of(my_node, u)];
    own_base[threadIdx.x] = sum;
  }
  __syncthreads();
  if (num_recv < 0 || worst_rows > rows.capacity) {
    if (num_recv >= 0 && blockIdx.x == 0 && threadIdx.x == 0)
      record_error(ctx, DeviceErrorKind::kBufferTooSmall, Phase::kCapacity, worst_rank, -1, worst_rows, rows.capacity);
    op_end(ctx, e);
    return;
  }
  if (!wait_peers_ready(ctx, e)) return;

  // 1. Every received row back over NVLink: to its source (own node) or to the source's rail peer
  //    on this node (its fwd rows), at the row the source's forwarder or the source reads it from.
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize, warps = blockDim.x / kWarpSize;
  const int grid_warp = blockIdx.x * warps + warp, grid_warps = gridDim.x * warps;
  for (int j = grid_warp; j < num_recv; j += grid_warps) {
    int lo = 0, hi = R;  // the source s: recv_base[s] <= j < recv_base[s + 1]
    while (hi - lo > 1) {
      const int mid = (lo + hi) / 2;
      if (recv_base[mid] <= j) lo = mid;
      else hi = mid;
    }
    const int s = lo, pos = j - recv_base[s];
    int dst_local, dst_row;
    if (t.node_of(s) == my_node) {
      dst_local = t.local_of(s);
      int sum = 0;
      for (int u = 0; u < my_local; ++u) sum += cm[s * R + t.rank_of(my_node, u)];
      dst_row = sum + pos;
    } else {
      dst_local = t.local_of(s);
      const CombineRows g = combine_rows_of(t, cm, t.rank_of(my_node, dst_local));
      dst_row = g.own + forward_key_of(t, cm, dst_local, t.node_of(s), my_local) + pos;
    }
    char* region = ctx.rows(dst_local);
    coop_copy<2>(rows.row(region, dst_row), q.x + static_cast<int64_t>(j) * q.x_stride, rows.row_bytes, lane, kWarpSize);
    for (int kk = lane; kk < K; kk += kWarpSize)
      rows.topk_weights(region, dst_row)[kk] = q.topk_weights[static_cast<int64_t>(j) * q.weight_stride + kk];
  }
  signal_sends_done(ctx, e);
  if (!wait_all_done(ctx, e, Phase::kReduce)) return;

  // 2. Partials across nodes: forwarders send, owners receive; the other warps wait.
  bool ok = true;
  if (warp < p.send_warps)
    ok = send_partials<Net>(p, streams, fwd_keys, fwd_part, my_fwd_offset, my_part_offset - my_fwd_offset, warp, lane);
  else if (warp < p.send_warps + p.recv_warps)
    ok = receive_partials<Net>(p, streams, my_part_offset, my_part_rows, warp - p.send_warps, lane);
  if (!__syncthreads_and(ok)) return;

  // 3. This channel's tokens: nodes ascending, the own node's rows summed in fp32 (local index
  //    ascending), a remote node's bf16 partial; then the biases; rounded to bf16 once.
  char* region = ctx.rows(my_local);
  const TokenRange tokens = block_tokens(q.num_tokens);
  for (int token = tokens.begin + warp; token < tokens.end; token += warps) {
    const int* pos_row = q.send_pos + static_cast<int64_t>(token) * R;
    for (int v = lane; v < H / 8; v += kWarpSize) {
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int m = 0; m < N; ++m) {
        if (m == my_node) {
          float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
          bool any = false;
          for (int u = 0; u < U; ++u) {
            const int pos = pos_row[t.rank_of(m, u)];
            if (pos < 0) continue;
            any = true;
            add_bf16x8(part, reinterpret_cast<const int4*>(rows.row(region, own_base[u] + pos))[v]);
          }
          if (any)
            for (int h = 0; h < 8; ++h) acc[h] += part[h];
        } else {
          int u0 = 0;
          while (u0 < U && pos_row[t.rank_of(m, u0)] < 0) ++u0;
          if (u0 == U) continue;
          const int64_t row = my_part_offset + part_base[m][u0] + pos_row[t.rank_of(m, u0)];
          add_bf16x8(acc, reinterpret_cast<const int4*>(rows.row(region, row))[v]);
        }
      }
      if (q.bias_0 != nullptr) add_bf16x8(acc, reinterpret_cast<const int4*>(q.bias_0 + token * q.bias_0_stride)[v]);
      if (q.bias_1 != nullptr) add_bf16x8(acc, reinterpret_cast<const int4*>(q.bias_1 + token * q.bias_1_stride)[v]);
      reinterpret_cast<int4*>(q.combined_x + token * q.out_stride)[v] = pack_bf16x8(acc);
    }
    if (q.combined_topk_weights != nullptr) {
      for (int kk = lane; kk < q.num_topk; kk += kWarpSize) {
        float acc = 0.f;
        for (int m = 0; m < N; ++m) {
          if (m == my_node) {
            float part = 0.f;
            bool any = false;
            for (int u = 0; u < U; ++u) {
              const int pos = pos_row[t.rank_of(m, u)];
              if (pos < 0) continue;
              any = true;
              part += rows.topk_weights(region, own_base[u] + pos)[kk];
            }
            if (any) acc += part;
          } else {
            int u0 = 0;
            while (u0 < U && pos_row[t.rank_of(m, u0)] < 0) ++u0;
            if (u0 == U) continue;
            acc += rows.topk_weights(region, my_part_offset + part_base[m][u0] + pos_row[t.rank_of(m, u0)])[kk];
          }
        }
        q.combined_topk_weights[token * q.out_weight_stride + kk] = acc;
      }
    }
  }
  op_end(ctx, e);
}

}  // namespace

void launch_internode_notify(const InternodeNotifyParams<EmuNetView>& p, EmuMode mode, cudaStream_t stream) {
  if (mode == EmuMode::kAdversarial)
    internode_notify_kernel<EmuNetAdversarial><<<1, kNotifyThreads, 0, stream>>>(p);
  else
    internode_notify_kernel<EmuNetDirect><<<1, kNotifyThreads, 0, stream>>>(p);
}

void launch_internode_dispatch(const InternodeDispatchParams<EmuNetView>& p, EmuMode mode, int num_blocks,
                               int num_threads, cudaStream_t stream) {
  if (mode == EmuMode::kAdversarial)
    internode_dispatch_kernel<EmuNetAdversarial><<<num_blocks, num_threads, 0, stream>>>(p);
  else
    internode_dispatch_kernel<EmuNetDirect><<<num_blocks, num_threads, 0, stream>>>(p);
}

void launch_internode_combine(const InternodeCombineParams<EmuNetView>& p, EmuMode mode, int num_blocks,
                              int num_threads, cudaStream_t stream) {
  if (mode == EmuMode::kAdversarial)
    internode_combine_kernel<EmuNetAdversarial><<<num_blocks, num_threads, 0, stream>>>(p);
  else
    internode_combine_kernel<EmuNetDirect><<<num_blocks, num_threads, 0, stream>>>(p);
}

#if EPX_HAVE_GIN
void launch_internode_notify(const InternodeNotifyParams<GinNetView>& p, cudaStream_t stream) {
  internode_notify_kernel<device::GinNet><<<1, kNotifyThreads, 0, stream>>>(p);
}

void launch_internode_dispatch(const InternodeDispatchParams<GinNetView>& p, int num_blocks, int num_threads,
                               cudaStream_t stream) {
  internode_dispatch_kernel<device::GinNet><<<num_blocks, num_threads, 0, stream>>>(p);
}

void launch_internode_combine(const InternodeCombineParams<GinNetView>& p, int num_blocks, int num_threads,
                              cudaStream_t stream) {
  internode_combine_kernel<device::GinNet><<<num_blocks, num_threads, 0, stream>>>(p);
}
#endif

void load_internode_kernels() {
  load_kernel(internode_notify_kernel<EmuNetDirect>, "internode_notify_kernel<EmuNetDirect>");
  load_kernel(internode_notify_kernel<EmuNetAdversarial>, "internode_notify_kernel<EmuNetAdversarial>");
  load_kernel(internode_dispatch_kernel<EmuNetDirect>, "internode_dispatch_kernel<EmuNetDirect>");
  load_kernel(internode_dispatch_kernel<EmuNetAdversarial>, "internode_dispatch_kernel<EmuNetAdversarial>");
  load_kernel(internode_combine_kernel<EmuNetDirect>, "internode_combine_kernel<EmuNetDirect>");
  load_kernel(internode_combine_kernel<EmuNetAdversarial>, "internode_combine_kernel<EmuNetAdversarial>");
}

}  // namespace epx::kernels
