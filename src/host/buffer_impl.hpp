// Buffer::Impl: state shared by the high-throughput (buffer.cpp) and low-latency (buffer_ll.cpp)
// halves of the Buffer.
#pragma once
#include <nccl.h>
#include <nccl_device.h>

#include <chrono>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>

#include "common/ll_layout.hpp"
#include "common/net_view.hpp"
#include "common/rdma_layout.hpp"
#include "common/scaleout_layout.hpp"
#include "epx/buffer.hpp"
#include "host/checks.hpp"
#include "host/device_arena.hpp"
#include "host/env.hpp"
#include "host/net_plan.hpp"
#include "host/plan.hpp"
#include "host/staged_copy.hpp"
#include "host/symmetric.hpp"
#include "host/topology.hpp"
#include "kernels/ht_params.hpp"
#include "kernels/internode_params.hpp"
#include "kernels/ll_params.hpp"

namespace epx {

struct Buffer::Impl {
  Communicator* comm = nullptr;
  Topology topology;  // nodes of the world (BufferOptions::node_size)
  Config config;
  Tuning tuning;  // set_tuning (bench and tests); default-constructed: the measured winners
  double timeout_seconds = 0;  // effective_timeout_s(config), read once per config (not per op)
  size_t num_nvl_bytes = 0;
  std::shared_ptr<DeviceArena> arena;
  std::unique_ptr<SymmetricMemory> memory;
  char* symmetric = nullptr;  // this rank's window (memory->local())
  // Every window of this rank's node by local index (within one node: every rank's).
  char* peers[kMaxPeers] = {};
  // A world across nodes (docs/protocol.md, "Internode dispatch"): after the high-throughput and
  // low-latency parts, the RDMA region (num_rdma_bytes at rdma_offset) and the internode count
  // exchange's region (InternodeCountLayout at count_offset, count_bytes).
  bool internode = false;
  // The scale-out backend (host/net_plan.hpp): EmuNet for nodes inside one NVLink domain, GinNet
  // for a world that spans NCCL nodes (its signals: gin.count_signal_base and up for the count
  // exchange, below for the RDMA rings).
  NetBackend net = NetBackend::kNone;
  GinRequest gin;
  size_t rdma_offset = 0, num_rdma_bytes = 0, count_offset = 0, count_bytes = 0;
  int rdma_channels = 0, rdma_chunk_tokens = 0, rdma_ring_slots = 0;  // fixed at construction
  char** windows_device = nullptr;  // [R] every rank's window as mapped here (EmuNet's view)
  uint64_t* exchanges = nullptr;    // device word: internode count exchanges done
  Workspace* workspace = nullptr;
  ErrorRecord* error = nullptr;  // host-mapped
  ErrorRecord* error_device = nullptr;
  HostMailbox* mailbox = nullptr;  // host-mapped
  HostMailbox* mailbox_device = nullptr;
  bool failed = false;
  std::string failure;
  // Low-latency region (design.md 4.4-4.5), at `ll_offset` in the symmetric allocation.
  size_t ll_offset = 0, num_ll_bytes = 0;
  LlZeroCopy ll_zero_copy = LlZeroCopy::kOff;  // BufferOptions::ll_zero_copy (equal on all ranks)
  bool shrink = false;  // BufferOptions::enable_shrink
  LlWorkspace* ll_ws = nullptr;
  int ll_next = 0;  // buffer the next low-latency op uses
  struct PendingReceive {
    enum class Kind { kNone, kDispatch, kCombine } kind = Kind::kNone;
    kernels::LlDispatchParams dispatch{};
    kernels::LlCombineParams combine{};
    int num_blocks = 0;
  } pending[2];

  device::OpContext context(OpCode op) const {
    device::OpContext c;
    for (int p = 0; p < kMaxPeers; ++p) c.peers[p] = peers[p];
    c.rank = internode ? topology.local_idx() : comm->rank();
    c.num_ranks = internode ? topology.node_size : comm->world();
    c.first_rank = internode ? topology.node_idx() * topology.node_size : 0;
    c.ws = workspace;
    c.err = error_device;
    c.timeout_ns = static_cast<uint64_t>(timeout_seconds * 1e9);
    c.op = static_cast<int>(op);
    return c;
  }
  double timeout_s() const { return timeout_seconds; }
  EmuMode net_mode() const { return tuning.net_adversarial ? EmuMode::kAdversarial : EmuMode::kDirect; }
  // The RDMA region's layout up to its rings (signals and counters: they depend on the nodes and
  // channels only, fixed at construction), at rdma_offset.
  RdmaLayout rdma_state_layout() const {
    RdmaLayout l;
    l.num_nodes = topology.num_nodes();
    l.num_channels = rdma_channels;
    l.base = rdma_offset;
    return l;
  }
  size_t rdma_state_bytes() const { return rdma_state_layout().send_rings() - rdma_offset; }
  InternodeCountLayout count_layout() const {
    InternodeCountLayout l;
    l.num_ranks = comm->world();
    l.node_size = topology.node_size;
    l.base = count_offset;
    return l;
  }
  // EmuNet's view of the world with its signal words at `signal_offset` of every window.
  EmuNetView emu_view(size_t signal_offset, int num_signals) const {
    EmuNetView v;
    v.windows = windows_device;
    v.rank = comm->rank();
    v.num_ranks = comm->world();
    v.signal_offset = signal_offset;
    v.num_signals = num_signals;
    return v;
  }
#if EPX_HAVE_GIN
  // GinNet's view: the devComm with GIN resources and the window; the op's signals are the
  // devComm's ids [signal_base, signal_base + num_signals).
  GinNetView gin_view(int signal_base, int num_signals, int num_contexts) const {
    GinNetView v;
    v.comm = *memory->gin_comm();
    v.window = memory->window();
    v.rank = comm->rank();
    v.num_ranks = comm->world();
    v.num_contexts = num_contexts;
    v.num_signals = num_signals;
    v.signal_base = signal_base;
    return v;
  }
#endif
  // Threads per block of the dispatch and combine across nodes: GinNet's kernels take at most
  // kGinInternodeThreads (their launch bounds), EmuNet's Config.num_threads.
  int internode_threads() const {
#if EPX_HAVE_GIN
    if (net == NetBackend::kGin && config.num_threads > kernels::kGinInternodeThreads)
      return kernels::kGinInternodeThreads;
#endif
    return config.num_threads;
  }
  void set_config(const Config& c) {
    config = c;
    timeout_seconds = effective_timeout_s(c);
    if (arena) arena->set_timeout(timeout_seconds + 10);
  }

  // Zeroes the flags and workspaces on the control stream and waits for it. The caller has
  // quiesced this rank's ops (and kept the ranks in step, except at creation).
  void zero_state() {
    const cudaStream_t s = arena->stream();
    EPX_CUDA_CHECK(cudaMemsetAsync(symmetric, 0, SymmetricLayout::kRowsOffset, s));
    EPX_CUDA_CHECK(cudaMemsetAsync(workspace, 0, sizeof(Workspace), s));
    if (internode) {
      // The RDMA signals and counters (the rings' slots are written before they are read), the
      // count exchange's region and its counter.
      EPX_CUDA_CHECK(cudaMemsetAsync(symmetric + rdma_offset, 0, rdma_state_bytes(), s));
      EPX_CUDA_CHECK(cudaMemsetAsync(symmetric + count_offset, 0, count_bytes, s));
      EPX_CUDA_CHECK(cudaMemsetAsync(exchanges, 0, sizeof(uint64_t), s));
    }
    if (num_ll_bytes > 0) zero_ll_state();
    ll_next = 0;
    pending[0] = pending[1] = PendingReceive{};
    std::memset(error, 0, sizeof(ErrorRecord));
    std::memset(mailbox, 0, sizeof(HostMailbox));
    host_wait_stream(s, timeout_s() + 10, "Buffer (zeroing its flags)", comm->rank());
  }
  // keep_masks: the shrink mode's masks survive (clean_low_latency_buffer); reset() clears them.
  void zero_ll_state(bool keep_masks = false) {
    const cudaStream_t s = arena->stream();
    EPX_CUDA_CHECK(cudaMemsetAsync(symmetric + ll_offset, 0, LlLayout::kSyncBytes, s));
    EPX_CUDA_CHECK(cudaMemsetAsync(ll_ws, 0, keep_masks ? offsetof(LlWorkspace, mask) : sizeof(LlWorkspace), s));
  }
  void quiesce(const char* what) { arena->quiesce(what); }

  // Runs the body of a collective op. An Error from it (bad arguments, a device error, a host
  // wait) fails the op on every rank: this Buffer fails, and its abort word goes to every peer,
  // whose waits in this op end at once with an error naming this rank. Every rank then resets.
  template <typename Body>
  auto collective(OpCode op, Body&& body) -> decltype(body()) {
    try {
      return body();
    } catch (const Error& e) {
      fail_collectively(op, e);
      throw;
    }
  }
  // A plan made only from values every rank has (sizes, Config, the shared counts or
  // num_worst_tokens) fails alike on every rank: such an Error fails this Buffer without abort
  // words, so each peer raises the same error itself. An abort word could instead reach a peer in
  // its previous op, still running without a host sync, and end it as kAborted.
  template <typename Plan>
  auto agreed(Plan&& plan) -> decltype(plan()) {
    try {
      return plan();
    } catch (const Error& e) {
      if (!failed) {
        failed = true;
        failure = e.message();
      }
      throw;
    }
  }
  void fail_collectively(OpCode op, const Error& e) noexcept {
    if (failed) return;  // an earlier failure (a recorded device error raised its own abort word)
    failed = true;
    failure = e.message();
    if (comm->world() < 2) return;
    try {
      kernels::AbortParams p{};
      p.ctx = context(op);
      p.word = AbortWord::encode(static_cast<int>(DeviceErrorKind::kHostError), static_cast<int>(op),
                                 static_cast<int>(Phase::kInputCheck), -1);
      kernels::launch_raise_abort(p, arena->stream());
      host_wait_stream(arena->stream(), 10, "raising the abort word", comm->rank());
    } catch (...) {
      // The peers then end by their own timeout, naming this rank.
    }
  }

  // Refuses work on a failed buffer; surfaces a device error recorded since the last check.
  void check_usable() {
    EPX_CHECK(!failed, ErrorKind::kState, "Buffer failed earlier (", failure,
              "); call reset() (collective) or destroy it");
    raise_recorded_error();
  }

  // What this rank's window says about every peer, read when a timeout is raised (the state a
  // hang is diagnosed from): this rank's op epoch and the last ready / done epoch of each peer.
  std::string sync_snapshot() {
    try {
      SyncArea area{};
      Workspace ws{};
      const cudaStream_t s = arena->stream();
      detail::copy_to_host(&area, symmetric + SymmetricLayout::kSyncOffset, sizeof(area), s, 10,
                           "reading the sync flags", comm->rank());
      detail::copy_to_host(&ws, workspace, sizeof(ws), s, 10, "reading the sync flags", comm->rank());
      std::string ready, done;
      for (int p = 0; p < context(OpCode::kNone).num_ranks; ++p) {
        ready += detail::concat(p ? " " : "", area.ready[p]);
        done += detail::concat(p ? " " : "", area.done[p]);
      }
      return detail::concat("; this rank's op epoch ", ws.epoch, ", ready by rank [", ready, "], done by rank [",
                            done, "]");
    } catch (const Error&) {
      return {};
    }
  }

  // Raises the recorded device error once; afterwards the buffer is failed (kState) until reset.
  void raise_recorded_error() {
    const volatile ErrorRecord* e = error;
    if (e->state != 2 || failed) return;
    static const char* kOps[] = {"none", "layout", "notify", "dispatch", "combine", "low_latency_dispatch",
                                 "low_latency_combine"};
    static const char* kPhases[] = {"none", "entry barrier", "input check", "count exchange", "send",
                                    "receive", "reduce", "capacity check", "plan check"};
    const int op = e->op >= 0 && e->op < 7 ? e->op : 0;
    const int phase = e->phase >= 0 && e->phase < 9 ? e->phase : 0;
    std::string msg;
    ErrorKind kind = ErrorKind::kState;
    switch (static_cast<DeviceErrorKind>(e->kind)) {
      case DeviceErrorKind::kTimeout:
        kind = ErrorKind::kTimeout;
        msg = detail::concat(kOps[op], " timed out in phase '", kPhases[phase], "' on rank ", e->rank,
                             " waiting for peer ", e->peer, " (block ", e->block, ", flag ", e->observed,
                             ", expected >= ", e->expected, ", timeout ", timeout_s(), " s)", sync_snapshot());
        break;
      case DeviceErrorKind::kInvalidArgument:
        kind = ErrorKind::kInvalidArgument;
        if (phase == static_cast<int>(Phase::kPlanCheck)) {
          std::string theirs, mine;
          const std::string field = plan::plan_difference(e->index, e->observed, e->expected, &theirs, &mine);
          msg = detail::concat(kOps[op], ": rank ", e->peer, " planned it with ", field, " = ", theirs, ", rank ",
                               e->rank, " with ", mine, "; every rank must give a collective op the same Config, "
                               "Tuning, row shape and optional tensors");
        } else if (e->index == -2) {
          msg = detail::concat(kOps[op], ": the handle's row count is ", static_cast<long long>(static_cast<int>(e->observed)),
                               " without a failed count exchange on rank ", e->rank,
                               ": the handle does not hold this op's routing (freed, overwritten, or from another Buffer)");
        } else if (op == static_cast<int>(OpCode::kLayout) || op == static_cast<int>(OpCode::kLlDispatch))
          msg = detail::concat("topk_idx: expert id ", static_cast<long long>(e->observed), " at token ", e->index,
                               " outside [-1, ", e->expected, ") (rank ", e->rank, ")");
        else if (phase == static_cast<int>(Phase::kCapacity))
          msg = detail::concat("num_worst_tokens: rank ", e->peer, " receives ", e->observed,
                               " rows, more than num_worst_tokens = ", e->expected);
        else
          msg = detail::concat("is_token_in_rank / num_tokens_per_rank disagree for rank ", e->peer,
                               ": num_tokens_per_rank says ", e->observed, ", is_token_in_rank has ", e->expected,
                               " (rank ", e->rank, ")");
        break;
      case DeviceErrorKind::kBufferTooSmall:
        kind = ErrorKind::kBufferTooSmall;
        msg = detail::concat(kOps[op], ": rank ", e->peer, " needs ", e->observed, " rows but the buffer holds ",
                             e->expected, " rows of this shape; num_nvl_bytes = ", num_nvl_bytes,
                             " is too small (see Buffer::get_nvl_buffer_size_hint)");
        break;
      case DeviceErrorKind::kAborted: {
        kind = ErrorKind::kAborted;
        const uint64_t w = e->observed;
        const int peer_op = AbortWord::op(w) >= 0 && AbortWord::op(w) < 7 ? AbortWord::op(w) : 0;
        const int peer_phase = AbortWord::phase(w) >= 0 && AbortWord::phase(w) < 9 ? AbortWord::phase(w) : 0;
        const char* what = AbortWord::kind(w) == static_cast<int>(DeviceErrorKind::kTimeout) ? "timed out"
                           : AbortWord::kind(w) == static_cast<int>(DeviceErrorKind::kInvalidArgument)
                               ? "saw invalid input"
                           : AbortWord::kind(w) == static_cast<int>(DeviceErrorKind::kHostError)
                               ? "raised an error on the host"
                               : "failed";
        msg = detail::concat(kOps[op], " aborted in phase '", kPhases[phase], "' on rank ", e->rank, ": rank ",
                             e->peer, " failed (its ", kOps[peer_op], " ", what, " in phase '", kPhases[peer_phase],
                             "'", AbortWord::peer(w) >= 0 ? detail::concat(" waiting for peer ", AbortWord::peer(w)) : "",
                             "); call reset() on every rank");
        break;
      }
      default:
        msg = "unknown device error";
    }
    failed = true;
    failure = msg;
    // Keep the record (state stays 2) so every later call names the first failure.
    throw Error(kind, msg, __FILE__, __LINE__);
  }

  void after_launch(const char* what, cudaStream_t stream) {
    const cudaError_t st = cudaPeekAtLastError();
    if (st != cudaSuccess) {
      cudaGetLastError();
      EPX_FAIL(ErrorKind::kCuda, what, ": launch failed: ", cudaGetErrorString(st));
    }
    arena->join(stream);
    if (env::debug()) {
      const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
      std::fprintf(stderr, "epx[rank %d] %.3f ms: %s launched\n", comm->rank(), ms, what);
    }
  }
};

}  // namespace epx
