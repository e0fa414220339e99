// Device-side synchronization of epx ops: op epochs, the entry barrier, completion signals, and
// the bounded waits (one flag, or several polled in turn). Every wait has a deadline; on expiry
// it records an ErrorRecord (op, phase, rank, peer, observed vs expected), prints one line and
// returns false: the kernel then returns. A rank that records an error its peers cannot see
// raises its abort word in their windows; their waits end at their next check, naming it.
#pragma once
#include <cstdint>
#include <cstdio>

#include "common/layout.hpp"
#include "common/op_context.hpp"
#include "device/ptx.cuh"

namespace epx::device {

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
  e->rank = ctx.rank;
  e->peer = peer;
  e->block = blockIdx.x;
  e->index = index;
  e->observed = observed;
  e->expected = expected;
  __threadfence_system();
  st_release_sys(&e->state, 2);
  printf("epx: device error kind=%d op=%d phase=%d rank=%d peer=%d block=%d index=%d observed=%llu expected=%llu\n",
         static_cast<int>(kind), ctx.op, static_cast<int>(phase), ctx.rank, peer, (int)blockIdx.x, index,
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
      record_error(ctx, DeviceErrorKind::kAborted, phase, p, -1, word, 0);
      return false;
    }
  }
  return true;
}

// The one bounded wait: until load() >= target, where load() is an acquire load (of a flag word,
// or of a scale-out signal: device/net.cuh). With `mask` (low-latency shrink mode: the
// waited-for peer's word in this rank's mask), a peer that is or becomes masked ends the wait, and
// a timeout masks the peer instead of failing: true then too, the caller reads the mask to tell
// the two apart.
template <typename Load>
__device__ __forceinline__ bool wait_geq(const OpContext& ctx, const Load& load, uint64_t target, Phase phase,
                                         int peer, int* mask = nullptr) {
  const uint64_t start = globaltimer_ns();
  for (uint32_t iter = 0;; ++iter) {
    const uint64_t v = load();
    if (v >= target) return true;
    if ((iter & 255u) == 255u) {
      // Another block or rank already failed: stop waiting for work that will not come.
      if (!still_ok(ctx, phase)) return false;
      if (mask != nullptr && ld_volatile(mask) != 0) return true;
      if (globaltimer_ns() - start > ctx.timeout_ns) {
        if (mask != nullptr) {
          if (atomicExch(mask, 1) == 0)
            printf("epx: rank %d masks rank %d: no progress for the timeout (op %d, phase %d)\n", ctx.rank, peer,
                   ctx.op, static_cast<int>(phase));
          return true;
        }
        record_error(ctx, DeviceErrorKind::kTimeout, phase, peer, -1, v, target);
        return false;
      }
    }
  }
}

// wait_geq on a flag word: until *flag >= target (acquire, system scope).
__device__ __forceinline__ bool wait_flag_geq(const OpContext& ctx, const uint64_t* flag, uint64_t target,
                                              Phase phase, int peer, int* mask = nullptr) {
  return wait_geq(ctx, [flag] { return ld_acquire_sys(flag); }, target, phase, peer, mask);
}

// The bound of a loop that polls several flags in turn (none of them may stall the others): call
// it after every pass that made no progress, and set idle_since = 0 after one that did. Every
// 256th call checks: false when another block or rank failed, or, once `timeout_ns` has passed
// since the last progress, with the error recorded.
struct PollClock {
  uint64_t idle_since = 0;
  uint32_t passes = 0;
};
__device__ __forceinline__ bool poll_still_ok(const OpContext& ctx, PollClock& clock, Phase phase, int peer,
                                              uint64_t observed, uint64_t target) {
  if ((++clock.passes & 255u) != 0) return true;
  if (!still_ok(ctx, phase)) return false;
  const uint64_t now = globaltimer_ns();
  if (clock.idle_since == 0) clock.idle_since = now;
  if (now - clock.idle_since <= ctx.timeout_ns) return true;
  record_error(ctx, DeviceErrorKind::kTimeout, phase, peer, -1, observed, target);
  return false;
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
    ok = wait_flag_geq(ctx, &own->ready[peer], e, Phase::kEntryBarrier, peer);
    for (int w = 0; ok && w < 2; ++w) {
      const uint64_t theirs = ld_relaxed_sys(&own->plan[peer][e & 1][w]);
      if (theirs != ctx.plan[w]) {
        record_error(ctx, DeviceErrorKind::kInvalidArgument, Phase::kPlanCheck, peer, w, theirs, ctx.plan[w]);
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
  if (threadIdx.x == 0) ok = wait_flag_geq(ctx, &ctx.sync(ctx.rank)->done[peer], e, phase, peer);
  return __syncthreads_and(ok);
}

// Block-wide: wait until every peer has published done >= e.
__device__ __forceinline__ bool wait_all_done(const OpContext& ctx, uint64_t e, Phase phase) {
  bool ok = true;
  if (threadIdx.x < ctx.num_ranks)
    ok = wait_flag_geq(ctx, &ctx.sync(ctx.rank)->done[threadIdx.x], e, phase, threadIdx.x);
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
