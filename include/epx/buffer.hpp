// Buffer: the symmetric NVLink buffer of one rank and the expert-parallel operations on it.
//
// Every operation except get_dispatch_layout is collective over the Communicator's ranks and
// enqueued on the given stream; all ranks must issue the same sequence of operations. Inputs and
// outputs are device Views; all outputs are fully written (padding rows included) unless stated.
// Arguments are validated on the host and violations raise Error(kInvalidArgument) naming the
// argument. Device-side failures (timeouts, expert ids out of range) are recorded and raised as
// Error at the next host check point (a host-synced dispatch, `check()`, `synchronize()`).
// Failures are collective: a collective op that raises on one rank (for any reason, bad arguments
// included), or a device error its peers cannot see, raises that rank's abort word in every peer's
// window, and the peers' waits end at once with Error(kAborted) naming it. After any failure the
// Buffer refuses work (Error(kState)) until `reset()`, which every rank calls.
//
// Notation: R ranks, E experts (E % R == 0, E_loc = E / R; expert e lives on rank e / E_loc),
// N tokens on this rank, H hidden, K top-k, S = ceil(H / 128) fp8 scale columns.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <memory>

#include "epx/communicator.hpp"
#include "epx/config.hpp"
#include "epx/error.hpp"
#include "epx/limits.hpp"
#include "epx/types.hpp"

namespace epx {


// Routing state of one dispatch: what combine and a cached re-dispatch need. Device arrays are
// owned by the handle (allocate it once with Buffer::make_handle, before any CUDA-graph capture;
// a dispatch fills it in stream order).
struct DispatchHandle {
  int num_ranks = 0, rank = 0, num_tokens = 0, num_experts = 0;
  // Rows this rank receives: known on the host after a host-synced dispatch, else -1.
  int num_recv_tokens = -1;
  // Max over ranks of rows received (host-synced dispatch only, else -1): more than the row region
  // holds = the bounded dispatch (rings).
  long long max_recv_tokens = -1;
  // Max over ranks of rows sent, i.e. the rows a combine returns to its busiest rank (host-synced
  // dispatch only, else -1): more than the row region holds = the ring combine.
  long long max_sent_tokens = -1;
  // Row capacity of the recv tensors in worst-case mode (0 = host-synced sizing).
  int num_worst_tokens = 0;
  bool filled = false;
  // Device arrays:
  int* rank_prefix_matrix = nullptr;  // [R, R] int32: inclusive prefix over source ranks of rows
                                      //   each destination receives (DeepEP's rank_prefix_matrix).
  int* count_matrix = nullptr;        // [R, R] int32: rows rank s sends to rank r.
  int* send_pos = nullptr;            // [N, R] int32: slot of token t among this rank's rows to r,
                                      //   -1 if t is not sent to r.
  int* num_recv_device = nullptr;     // [1] int32: rows received (device copy of num_recv_tokens).
  std::shared_ptr<void> storage;      // owns the device arrays
  // Across nodes: what this rank forwarded as the rail peer of the other nodes' ranks of its local
  // index, for the combine: [forward_slots, kForwardRecordInts] int32 records (source token, its
  // channel, its row position on each rank of this node or -1), -1 tokens in unused slots.
  // Allocated and cleared by dispatch_notify, filled by the dispatch (a cached re-dispatch writes
  // the same records again).
  int* forward_records = nullptr;
  int64_t forward_slots = 0;
  std::shared_ptr<void> forward_storage;
};

struct DispatchInputs {
  View x;                      // [N, H] bf16, or fp8 e4m3 (any row stride, 16-byte aligned rows)
  View x_scales;               // [N, C] or [N], f32 or int32 (UE8M0-packed), any strides; required iff
                               //   x is fp8; moved as 32-bit words (C = ceil(H / 128) for DeepEP's
                               //   per-128 f32 scales, ceil(H / 512) for packed UE8M0)
  View topk_idx;               // [N, K] int64, -1 = none; optional (without it only x and its scales
                               //   move, routed by the layout tensors)
  View topk_weights;           // [N, K] f32; optional (needs topk_idx)
  View num_tokens_per_rank;    // [R] int32 (from get_dispatch_layout); fresh dispatch only
  View is_token_in_rank;       // [N, R] bool; fresh dispatch only
  View num_tokens_per_expert;  // [E] int32; fresh dispatch only
  int expert_alignment = 1;    // num_recv_tokens_per_expert is rounded up to this
  // > 0: worst-case sizing: the recv tensors have this many rows, nothing syncs with the host
  // (CUDA-graph capturable); rows past the received count are padded (topk_idx -1, weights 0,
  // src_idx -1, x zero).
  int num_worst_tokens = 0;
};

struct DispatchOutputs {
  View recv_x;                      // [Nr or num_worst_tokens, H], dtype of x, contiguous
  View recv_x_scales;               // [rows, C] or [rows], x_scales' dtype, contiguous, iff x is fp8
  View recv_topk_idx;               // [rows, K] int64, local expert ids (-1 elsewhere); optional
  View recv_topk_weights;           // [rows, K] f32, 0 where idx is -1; optional
  View recv_src_idx;                // [rows] int32: token index on the source rank; optional
  View num_recv_tokens_per_expert;  // [E_loc] int32, each rounded up to expert_alignment; optional
};

struct CombineInputs {
  View x;             // [Nr (or the worst-case rows), H] bf16 in the dispatch's received order
  View topk_weights;  // [Nr, K] f32; optional: summed per token into combined_topk_weights
  View bias_0;        // [N, H] bf16; optional
  View bias_1;        // [N, H] bf16; optional
};

struct CombineOutputs {
  View combined_x;             // [N, H] bf16 = sum over receiving ranks (fp32) + biases
  View combined_topk_weights;  // [N, K] f32; required iff topk_weights is given
};

// ---- Low-latency mode (design.md 4.4-4.5) ---------------------------------------------------
// T = num_max_dispatch_tokens_per_rank (same on all ranks), E_loc local experts, slots per local
// expert = R * T. Rows of local expert j are packed in [0, recv_count[j]), ordered by (source
// rank, source token); rows past recv_count[j] (recv_x, scales, src_info, src_topk_slot) are not
// written (the one exception to "every output fully written": zeroing them would cost more than
// the exchange). Ops on one Buffer must be stream-ordered; at most two low-latency results may
// wait for their receive (hook) at once.

struct LowLatencyHandle {
  int num_max_dispatch_tokens_per_rank = 0, hidden = 0, num_experts = 0, num_topk = 0;
  int buffer_idx = 0;  // which of the two LL buffers the dispatch used
  View src_info;       // [E_loc, R*T] int32: source token index of each packed row
  View layout_range;   // [E_loc, R] int64: (first row << 32) | count of rows from each source rank
  View src_topk_slot;  // [E_loc, R*T] int32: k of the row's expert in the source token's top-k
};

enum class LowLatencyScale { kFloat, kUE8M0 };

struct LowLatencyDispatchArgs {
  View x;             // [N <= T, H] bf16, rows 16-byte aligned; H % 128 == 0
  View topk_idx;      // [N, K] int64, -1 = none
  int num_max_dispatch_tokens_per_rank = 0;
  int num_experts = 0;
  bool use_fp8 = true;
  bool round_scale = false;  // power-of-two scales (implied by UE8M0)
  LowLatencyScale scale_format = LowLatencyScale::kFloat;
  View cumulative_local_expert_recv_stats;  // optional [E_loc] int32: += rows received per expert
  View dispatch_wait_recv_cost_stats;       // optional [R] int64: += wait cycles per source rank
  bool return_recv_hook = false;  // true: launch only the send; call low_latency_receive later
};

struct LowLatencyDispatchOutputs {
  View recv_x;       // [E_loc, R*T, H] fp8 e4m3 (use_fp8) or bf16, contiguous
  View recv_scales;  // fp8 only: [E_loc, R*T, H/128] f32 or [E_loc, R*T, H/512] int32 (UE8M0),
                     //   column-major in the last two dims: strides (R*T*C, 1, R*T)
  View recv_count;   // [E_loc] int32
  View src_info;     // [E_loc, R*T] int32       (become the handle's views)
  View layout_range; // [E_loc, R] int64
  View src_topk_slot;  // [E_loc, R*T] int32
};

struct LowLatencyCombineArgs {
  View x;             // [E_loc, R*T, H] bf16 expert outputs in the dispatch layout, contiguous;
                      //   with zero_copy: optional, only its shape and dtype are checked
  View topk_idx;      // [N, K] int64 as given to the dispatch
  View topk_weights;  // [N, K] f32
  // The expert outputs were written into next_combine_buffer(handle), and the combine sends from
  // there. Needs the zero-copy buffers (BufferOptions::ll_zero_copy): without them the op raises
  // Error(kBufferTooSmall) on this rank and, like every collective failure, aborts it on its peers.
  bool zero_copy = false;
  bool return_recv_hook = false;
};

// Whether the low-latency region lays out the two zero-copy combine buffers (next_combine_buffer,
// E_loc * R * T * H bf16 each: most of the region at decode sizes). The combine stores from `x`
// wherever it lives, so they only serve callers that write expert outputs into the buffer itself.
// Resolved per op shape (T, H, K, E) identically on every rank, so peers address buffer 1 alike.
enum class LlZeroCopy {
  kOff,     // no zero-copy buffers; next_combine_buffer and zero_copy combines raise kBufferTooSmall
  kOn,      // always: a region that cannot hold them fails every low-latency op (kBufferTooSmall)
  kIfRoom,  // when num_ll_bytes holds the layout with them (low_latency_size_hint(..., true)), else off
};

struct BufferOptions {
  Config config{};
  // Bytes of the low-latency region (0 = no low-latency mode); see low_latency_size_hint.
  size_t num_ll_bytes = 0;
  // Zero-copy combine buffers in the low-latency region; must be equal on all ranks.
  LlZeroCopy ll_zero_copy = LlZeroCopy::kOff;
  // DeepEP's shrink mode (low-latency ops only): a masked rank is neither sent to nor waited for
  // (its experts receive nothing and contribute nothing to a combine), and a wait that times out
  // masks the rank it waited for instead of failing the op. See low_latency_*_mask_buffer.
  bool enable_shrink = false;
  // Ranks per node (docs/scaleout.md §2). 0 = EPX_NODE_SIZE if set, else the NVLink domain (the
  // NCCL LSA team; a SimWorld's whole world). A smaller size splits the domain into virtual nodes
  // (it must divide the domain: Error(kInvalidArgument) naming node_size otherwise), so the
  // scale-out path runs inside one NVLink domain. Nodes hold at most kMaxRanks ranks.
  int node_size = 0;
  // Bytes of the RDMA region (DeepEP's num_rdma_bytes): the bounded per-(node, channel) rings of
  // the high-throughput path across nodes (docs/protocol.md, "RDMA region"). Required (> 0) when
  // the world spans more than one node, and must hold the rings of every row shape used
  // (plan::rdma_bytes_for; an op whose rings do not fit raises Error(kBufferTooSmall) naming the
  // minimum); 0 within one node. Across nodes the ring channels are Config.num_sms at construction
  // (a later Config must keep it), and the low-latency region is not available (num_ll_bytes = 0).
  // Virtual nodes inside one NVLink domain move the RDMA leg through the NVLink emulation (EmuNet).
  // A world of several real NVLink domains (NCCL nodes) asks NCCL for a devComm with GIN resources
  // (docs/design.md §6); where GIN is unavailable (headers or NCCL without it, no GIN-capable NIC)
  // the Buffer raises Error(kUnsupported) naming GIN and the NCCL version.
  size_t num_rdma_bytes = 0;
  // Messages per put_signal (DeepEP's num_max_rdma_chunked_send_tokens) and messages per ring
  // (num_max_rdma_chunked_recv_tokens: a multiple of the chunk, above it) of the RDMA rings.
  int rdma_chunk_tokens = 6;
  int rdma_ring_slots = 252;
};

namespace detail {
struct BufferAccess;  // the library's own reach into a Buffer's state (src/host/buffer.cpp)
}

class Buffer {
 public:
  // Collective: allocates `num_nvl_bytes` of symmetric memory on every rank (ncclMemAlloc +
  // symmetric window) for the high-throughput mode.
  Buffer(Communicator& comm, size_t num_nvl_bytes, BufferOptions options = {});
  ~Buffer();
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  Communicator& comm() const;
  const Config& config() const;
  void set_config(const Config& config);  // validated
  int rank() const;
  int num_ranks() const;
  // Ranks per (virtual) node and nodes of the world (BufferOptions::node_size).
  int node_size() const;
  int num_nodes() const;

  // Bytes of `num_nvl_bytes` whose row region holds `max_rows` rows per rank (max over ranks of rows
  // received in dispatch or sent in combine) of the given row shape: calls within it take the
  // all-rows path. Larger calls stream through bounded rings (docs/protocol.md, "dispatch,
  // bounded"); Config::get_nvl_buffer_size_hint sizes a buffer that serves any batch.
  static size_t get_nvl_buffer_size_hint(int64_t max_rows, int hidden, DType x_dtype, int num_topk,
                                         int num_ranks);
  // Rows the buffer's row region holds for this dispatch row shape (more stream through rings).
  int64_t row_capacity(int hidden, DType x_dtype, int num_topk) const;

  // --- Layout (design.md 4.1) ---------------------------------------------------------------
  // topk_idx [N, K] int64 -> num_tokens_per_rank [R] int32, num_tokens_per_expert [E] int32,
  // is_token_in_rank [N, R] bool. Expert ids outside [-1, E) are recorded as an error.
  void get_dispatch_layout(const View& topk_idx, int num_experts, const View& num_tokens_per_rank,
                           const View& num_tokens_per_expert, const View& is_token_in_rank,
                           cudaStream_t stream);
  // With DeepEP's num_tokens_per_rdma_rank [num_nodes()] int32 (optional: a null view skips it):
  // tokens with at least one expert on a rank of each node, a token counted once per node.
  void get_dispatch_layout(const View& topk_idx, int num_experts, const View& num_tokens_per_rank,
                           const View& num_tokens_per_rdma_rank, const View& num_tokens_per_expert,
                           const View& is_token_in_rank, cudaStream_t stream);

  // --- High-throughput dispatch (design.md 4.2) ---------------------------------------------
  // A handle with device storage for `num_tokens` tokens on this rank.
  DispatchHandle make_handle(int num_tokens) const;

  // Step 1 (fresh dispatch): exchange counts, fill `handle`, write num_recv_tokens_per_expert.
  // in.num_worst_tokens == 0: host-synced: waits for the counts and returns the rows this rank
  // receives (also in handle.num_recv_tokens); allocate the recv tensors with that many rows.
  // in.num_worst_tokens > 0: nothing syncs with the host (graph-capturable); returns -1.
  int dispatch_notify(const DispatchInputs& in, DispatchHandle& handle,
                      const View& num_recv_tokens_per_expert, cudaStream_t stream);
  // Step 2: move the rows. With a handle from step 1 (fresh) or from an earlier dispatch (cached
  // re-dispatch: the same routing; the layout inputs are ignored).
  void dispatch(const DispatchInputs& in, const DispatchHandle& handle, const DispatchOutputs& out,
                cudaStream_t stream);

  // --- High-throughput combine (design.md 4.3) ----------------------------------------------
  void combine(const CombineInputs& in, const DispatchHandle& handle, const CombineOutputs& out,
               cudaStream_t stream);

  // --- Low-latency dispatch / combine (design.md 4.4-4.5) ------------------------------------
  // Bytes of BufferOptions::num_ll_bytes needed for (T, H, R, E) with top-k K; zero_copy: with the
  // zero-copy combine buffers (BufferOptions::ll_zero_copy kOn / kIfRoom), 2 * E_loc * R * T * H * 2
  // bytes more.
  static size_t low_latency_size_hint(int num_max_dispatch_tokens_per_rank, int hidden, int num_ranks,
                                      int num_experts, int num_topk, bool zero_copy = false);

  // Sends (and, unless return_recv_hook, receives). Fills `out`, whose views become the handle's.
  // With return_recv_hook the receive runs at low_latency_receive(handle): no SM is held between.
  LowLatencyHandle low_latency_dispatch(const LowLatencyDispatchArgs& args, const LowLatencyDispatchOutputs& out,
                                        cudaStream_t stream);
  // out: [N, H] bf16 = sum_k w_k * y_k (fp32, k ascending), tokens' -1 slots skipped. Returns the
  // index of the LL buffer the combine used (the one its low_latency_receive takes in hook mode).
  int low_latency_combine(const LowLatencyCombineArgs& args, const LowLatencyHandle& handle, const View& out,
                           cudaStream_t stream);
  // The receive half of the last hook-mode dispatch or combine on `buffer_idx` (see the handle or
  // low_latency_pending_combine_buffer).
  void low_latency_receive(int buffer_idx, cudaStream_t stream);
  // [E_loc, R*T, H] bf16 view inside the symmetric buffer: write expert outputs here, then call
  // low_latency_combine with zero_copy (the combine sends from it). Needs the zero-copy buffers
  // (BufferOptions::ll_zero_copy); without them Error(kBufferTooSmall) names the bytes they need.
  // Local (not collective): every rank with the same options and shape gets the same answer.
  View next_combine_buffer(const LowLatencyHandle& handle) const;
  // Index of the LL buffer the next low-latency op will use (two alternate).
  int next_low_latency_buffer() const;
  // Collective: zero the low-latency flags (not needed between ops; for recovery). Shrink-mode
  // masks are kept.
  void clean_low_latency_buffer();

  // Shrink mode (BufferOptions::enable_shrink; Error(kState) otherwise). This rank's view of which
  // ranks are masked; each rank keeps its own. Masks (mask = true) or unmasks `rank_to_mask`
  // (host-blocking, takes effect for ops launched afterwards).
  void low_latency_update_mask_buffer(int rank_to_mask, bool mask);
  // Copies the mask (1 = masked) into mask_status [R] int32 (device), ordered on `stream`.
  void low_latency_query_mask_buffer(const View& mask_status, cudaStream_t stream);
  // Unmasks every rank (host-blocking). A rank that comes back after being masked rejoins through
  // the collective clean_low_latency_buffer() on every rank, then this.
  void low_latency_clean_mask_buffer();

  // --- Errors -------------------------------------------------------------------------------
  // Throws the recorded device error, if any (non-blocking: reads host-mapped memory).
  void check();
  // Synchronizes `stream` (bounded by the config timeout), then check().
  void synchronize(cudaStream_t stream);
  bool failed() const;
  // The symmetric buffer as `peer` sees it mapped here (for tools such as the store-ceiling bench).
  void* peer_pointer(int peer) const;
  size_t num_nvl_bytes() const;
  // Bytes at the start of this rank's high-throughput part (`low_latency` false) or of its
  // low-latency region (true, which begins `num_nvl_bytes()` past the high-throughput part) that
  // hold the protocol's state: flags, epochs, counts, control words. The rest of each region stages
  // rows, which every op writes before it reads them: with no op in flight it may be overwritten.
  // Overwritten flags leave the next op waiting for a peer until reset() (high-throughput) or
  // clean_low_latency_buffer() (low-latency) on every rank. Neither region holds flags at its end.
  static size_t flag_bytes(bool low_latency);
  // Collective: clears the error state and the buffer's flags so work can start again.
  void reset();

  struct Impl;

 private:
  friend struct detail::BufferAccess;
  std::unique_ptr<Impl> impl_;
};

}  // namespace epx
