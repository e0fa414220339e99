// Device-side synchronization of epx ops: op epochs, the entry barrier, completion signals, and
// the one bounded wait (wait_geq on one flag; loops over several flags end through its idle_poll).
// Every wait has a deadline; on expiry it records an ErrorRecord (op, phase, rank, peer, observed
// vs expected), prints one line and returns false: the kernel then returns. A rank that records an error its peers cannot see
// raises its abort word in their windows; their waits end at their next check, naming it.
#pragma once
#include <cstdint>
#include <cstdio>

#include "common/layout.hpp"
#include "common/op_context.hpp"
#include "device/ptx.cuh"

namespace epx::device {

// Errors every rank detects alike (from data all ranks share, e.g. the count matrix) need no abort:
// each peer reports its own.
__device__ __forceinline__ bool every_rank_detects(DeviceErrorKind kind, Phase phase) {
  return kind == DeviceErrorKind::kBufferTooSmall || kind == DeviceErrorKind::kAborted || phase == Phase::kCapacity ||
         phase == Phase::kPlanCheck;
}

__device__ __forceinline__ void record_error(const OpContext& ctx, DeviceErrorKind kind, Phase phase,
                                             int peer, int index, unsigned long long observed,
                                             unsigned long long expected) {
  ErrorRecord* e = ctx.err;
  if (atomicCAS(&e->state, 0, 1) != 0) return;  // first error wins
  if (!every_rank_detects(kind, phase)) {
    // Tell every peer, so their waits end now with an error naming this rank instead of running
    // out their own timeout. NOTE: the fence orders nothing of the payload; the word is the message.
    const uint64_t word = AbortWord::encode(static_cast<int>(kind), ctx.op, static_cast<int>(phase), peer);
    fence_acq_rel_sys();
    for (int p = 0; p < ctx.num_ranks; ++p)
      if (p != ctx.rank) st_relaxed_sys(&ctx.sync(p)->abort[ctx.rank], word);
  }
  e->kind = static_cast<int>(kind);
  e->op = ctx.op;
  e->phase = static_cast<int>(phase);
  e->rank = ctx.first_rank + ctx.rank;
  e->peer = peer;
  e->block = blockIdx.x;
  e->index = index;
  e->observed = observed;
  e->expected = expected;
  __threadfence_system();
  st_release_sys(&e->state, 2);
  printf("epx: device error kind=%d op=%d phase=%d rank=%d peer=%d block=%d index=%d observed=%llu expected=%llu\n",
         static_cast<int>(kind), ctx.op, static_cast<int>(phase), ctx.first_rank + ctx.rank, peer, (int)blockIdx.x, index,
         observed, expected);
}

__device__ __forceinline__ bool has_error(const OpContext& ctx) {
  return ld_volatile(&ctx.err->state) != 0;
}

// The periodic check of every bounded wait: false when this rank already failed, or when a peer's
// abort word is set (then the error names that peer). Called every 256 polls.
__device__ __forceinline__ bool still_ok(const OpContext& ctx, Phase phase) {
  if (has_error(ctx)) return false;
  const SyncArea* own = ctx.sync(ctx.rank);
  for (int p = 0; p < ctx.num_ranks; ++p) {
    const uint64_t word = ld_relaxed_sys(&own->abort[p]);
    if (word != 0) {
      record_error(ctx, DeviceErrorKind::kAborted, phase, ctx.first_rank + p, -1, word, 0);
      return false;
    }
  }
  return true;
}

// Memory order of a bounded wait's load (system scope): kAcquire when the flag publishes data the
// waiter reads next, kRelaxed when only the value matters (the caller orders what follows).
enum class Order { kAcquire, kRelaxed };

template <Order kOrder>
__device__ __forceinline__ uint64_t load_flag(const uint64_t* p) {
  if constexpr (kOrder == Order::kAcquire) return ld_acquire_sys(p);
  return ld_relaxed_sys(p);
}

// The deadline of a bounded wait runs from its last progress: a wait that polls several flags in
// turn (none of which may stall the others) calls progressed() after a pass that moved, so only a
// wait that stopped moving for the whole timeout fails.
struct WaitClock {
  uint64_t idle_since = 0;  // globaltimer at the first check after the last progress (0: none yet)
  uint32_t polls = 0;
  __device__ __forceinline__ void progressed() { idle_since = 0; }
};

// What an idle poll tells the wait: keep polling, the peer is masked (low-latency shrink mode), or
// the wait failed (the error is recorded: this rank's, a peer's abort, or the timeout).
enum class Idle { kWait, kMasked, kFailed };

// Every bounded wait of epx ends here: called after each poll that found nothing new, it checks on
// every 256th call that neither this rank nor a peer failed, the shrink mask (`mask`: the awaited
// peer's word in this rank's mask, null outside shrink mode) and the deadline. On timeout a masked
// wait masks the peer instead of failing; any other records kTimeout with the value it observed.
__device__ __forceinline__ Idle idle_poll(const OpContext& ctx, WaitClock& clock, Phase phase, int peer,
                                          uint64_t observed, uint64_t target, int* mask = nullptr) {
  if ((++clock.polls & 255u) != 0) return Idle::kWait;
  if (!still_ok(ctx, phase)) return Idle::kFailed;
  if (mask != nullptr && ld_volatile(mask) != 0) return Idle::kMasked;
  const uint64_t now = globaltimer_ns();
  if (clock.idle_since == 0) clock.idle_since = now;
  if (now - clock.idle_since <= ctx.timeout_ns) return Idle::kWait;
  if (mask != nullptr) {
    if (atomicExch(mask, 1) == 0)
      printf("epx: rank %d masks rank %d: no progress for the timeout (op %d, phase %d)\n", ctx.rank, peer, ctx.op,
             static_cast<int>(phase));
    return Idle::kMasked;
  }
  record_error(ctx, DeviceErrorKind::kTimeout, phase, peer, -1, observed, target);
  return Idle::kFailed;
}

// A bounded wait's result: `ok` when the flag reached the target, or (shrink mode) the peer is
// masked — the caller reads the mask to tell the two apart; `value`, the flag's last value seen.
struct Seen {
  bool ok;
  uint64_t value;
};

// The bounded wait on one value: until load() >= target, where load() reads a flag word (wait_geq
// below) or a scale-out signal (device/net.cuh) with the order its caller needs.
template <typename Load>
__device__ __forceinline__ Seen wait_load_geq(const OpContext& ctx, const Load& load, uint64_t target, Phase phase,
                                              int peer, int* mask = nullptr) {
  WaitClock clock;
  while (true) {
    const uint64_t v = load();
    if (v >= target) return {true, v};
    const Idle idle = idle_poll(ctx, clock, phase, peer, v, target, mask);
    if (idle != Idle::kWait) return {idle == Idle::kMasked, v};
  }
}

// The bounded wait on one flag: until *flag >= target, loads of order kOrder.
template <Order kOrder = Order::kAcquire>
__device__ __forceinline__ Seen wait_geq(const OpContext& ctx, const uint64_t* flag, uint64_t target, Phase phase,
                                         int peer, int* mask = nullptr) {
  return wait_load_geq(ctx, [flag] { return load_flag<kOrder>(flag); }, target, phase, peer, mask);
}

// Start of an op, called by every block: returns this op's epoch. Block 0 tells every peer that
// this rank finished the previous op (so its buffer may be overwritten).
__device__ __forceinline__ uint64_t op_begin(const OpContext& ctx) {
  const uint64_t e = ld_relaxed_gpu(&ctx.ws->epoch) + 1;
  if (blockIdx.x == 0 && threadIdx.x < ctx.num_ranks) {
    SyncArea* peer = ctx.sync(threadIdx.x);
    st_relaxed_sys(&peer->plan[ctx.rank][e & 1][0], ctx.plan[0]);
    st_relaxed_sys(&peer->plan[ctx.rank][e & 1][1], ctx.plan[1]);
    st_release_sys(&peer->ready[ctx.rank], e);  // orders the plan words before it
  }
  return e;
}

// Block-wide: wait until every peer has started op e (finished reading its buffer for op e-1).
// Returns false (for all threads of the block) if any wait failed.
// Then checks that every peer planned op e as this rank did (the plan words of its op_begin).
__device__ __forceinline__ bool wait_peers_ready(const OpContext& ctx, uint64_t e) {
  bool ok = true;
  if (threadIdx.x < ctx.num_ranks) {
    const int peer = threadIdx.x;
    const SyncArea* own = ctx.sync(ctx.rank);
    ok = wait_geq(ctx, &own->ready[peer], e, Phase::kEntryBarrier, ctx.first_rank + peer).ok;
    for (int w = 0; ok && w < 2; ++w) {
      const uint64_t theirs = ld_relaxed_sys(&own->plan[peer][e & 1][w]);
      if (theirs != ctx.plan[w]) {
        record_error(ctx, DeviceErrorKind::kInvalidArgument, Phase::kPlanCheck, ctx.first_rank + peer, w, theirs,
                     ctx.plan[w]);
        ok = false;
      }
    }
  }
  return __syncthreads_and(ok);
}

// Scope of the fence each block's thread 0 runs before it arrives (last_block_to_arrive).
enum class ArriveFence { kNone, kGpu, kSys };

// Block-wide grid arrival on `counter` (a local word, zero between uses): true only on thread 0 of
// the last block to arrive, which has reset the counter. Each block's thread 0 first fences at
// kFence scope, so the last block (after its own fence) can publish every block's earlier accesses.
template <ArriveFence kFence>
__device__ __forceinline__ bool last_block_to_arrive(unsigned int* counter) {
  __syncthreads();
  if (threadIdx.x != 0) return false;
  if constexpr (kFence == ArriveFence::kSys) fence_acq_rel_sys();
  if constexpr (kFence == ArriveFence::kGpu) fence_acq_rel_gpu();
  if (atomicAdd(counter, 1u) != gridDim.x - 1) return false;
  *counter = 0;
  return true;
}

// Block-wide: this block finished its writes to peers for op e. The last block to arrive publishes
// done = e to every peer. NOTE: each block fences (acq_rel, sys) before arriving, so the last
// block's fence and relaxed stores (a release pattern) order every block's payload writes before the flag.
__device__ __forceinline__ void signal_sends_done(const OpContext& ctx, uint64_t e) {
  if (!last_block_to_arrive<ArriveFence::kSys>(&ctx.ws->arrive_send)) return;
  fence_acq_rel_sys();
  for (int p = 0; p < ctx.num_ranks; ++p) st_relaxed_sys(&ctx.sync(p)->done[ctx.rank], e);
}

// Block-wide: wait until `peer` has published done >= e.
__device__ __forceinline__ bool wait_peer_done(const OpContext& ctx, uint64_t e, int peer, Phase phase) {
  bool ok = true;
  if (threadIdx.x == 0) ok = wait_geq(ctx, &ctx.sync(ctx.rank)->done[peer], e, phase, ctx.first_rank + peer).ok;
  return __syncthreads_and(ok);
}

// Block-wide: wait until every peer has published done >= e.
__device__ __forceinline__ bool wait_all_done(const OpContext& ctx, uint64_t e, Phase phase) {
  bool ok = true;
  if (threadIdx.x < ctx.num_ranks)
    ok = wait_geq(ctx, &ctx.sync(ctx.rank)->done[threadIdx.x], e, phase, ctx.first_rank + threadIdx.x).ok;
  return __syncthreads_and(ok);
}

// The handle's row count is negative only when this rank's count exchange recorded an error (every
// rank then skips the op alike). A negative count without one is a handle that does not hold this
// op's routing: an error on this rank, and its abort word stops the peers that wait for it.
__device__ __forceinline__ void check_skip_is_recorded(const OpContext& ctx, int num_recv) {
  if (num_recv < 0 && threadIdx.x == 0 && blockIdx.x == 0 && !has_error(ctx))
    record_error(ctx, DeviceErrorKind::kInvalidArgument, Phase::kInputCheck, -1, -2, static_cast<unsigned long long>(num_recv), 0);
}

// Every rank computes this from the same count matrix, so all ranks skip an oversized op alike.
// rows_at(r) = rows rank r holds in its row region: received (dispatch, by_receiver) or sent back
// to it (combine). Records kBufferTooSmall (block 0) and returns false when one exceeds capacity.
__device__ __forceinline__ bool rows_fit(const OpContext& ctx, const int* count_matrix, int64_t capacity,
                                         bool by_receiver) {
  __shared__ int fits;
  if (threadIdx.x == 0) {
    const int R = ctx.num_ranks;
    int64_t worst = 0;
    int worst_rank = 0;
    for (int r = 0; r < R; ++r) {
      int64_t rows = 0;
      for (int s = 0; s < R; ++s) rows += by_receiver ? count_matrix[s * R + r] : count_matrix[r * R + s];
      if (rows > worst) { worst = rows; worst_rank = r; }
    }
    fits = worst <= capacity;
    if (!fits && blockIdx.x == 0)
      record_error(ctx, DeviceErrorKind::kBufferTooSmall, Phase::kCapacity, worst_rank, -1, worst, capacity);
  }
  __syncthreads();
  return fits != 0;
}

// End of an op, called by every block (also on early exit): the last block advances the epoch.
__device__ __forceinline__ void op_end(const OpContext& ctx, uint64_t e) {
  if (last_block_to_arrive<ArriveFence::kNone>(&ctx.ws->arrive_end)) ctx.ws->epoch = e;
}

}  // namespace epx::device
