// Typed layouts of the memory epx shares between host, device and peers. Every offset used by a
// kernel or by host sizing comes from here (no ad-hoc pointer arithmetic elsewhere).
//
// Per rank, the symmetric buffer (same size and offsets on every rank) is:
//   [ SyncArea | NotifyArea | row region ]
// Ordering contract of every flag (see docs/protocol.md for the whole protocol):
//   SyncArea::ready[p]  written by rank p (release.sys) at the start of its op number e, value e:
//                       "p finished op e-1, so its buffer may be overwritten for op e".
//                       Read by this rank (acquire.sys) before it writes into p's buffer.
//   SyncArea::done[p]   written by rank p (release.sys, after a fence by every sending block) when
//                       all of op e's writes into this rank's buffer are done, value e.
//                       Read by this rank (acquire.sys) before it reads what p wrote.
//   Both only grow (epochs); they are reset to 0 only by the collective Buffer::reset().
//   SyncArea::abort[p]  written by rank p (relaxed.sys, after a fence) when one of its ops failed
//                       in a way its peers cannot see themselves (a timeout, bad input seen by a
//                       kernel; or, by a one-thread kernel, any error of the op on p's host):
//                       an AbortWord. Every bounded wait of this rank polls its own
//                       abort words and, seeing one, ends with an error naming rank p. Reset to
//                       0 only by Buffer::reset().
#pragma once
#include <cstddef>
#include <cstdint>

#include "common/hd.hpp"
#include "epx/limits.hpp"

namespace epx {

constexpr int kMaxPeers = kMaxRanks;  // entries of every per-peer table

EPX_HD constexpr size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

//   SyncArea::plan[p][e & 1] written by rank p (relaxed.sys) at the start of its op e, before
//                       its ready store (whose release orders it): the two words of what p derived
//                       its peer addressing from (host/plan.hpp, OpPlan). Read by this rank after
//                       ready[p] >= e (acquire) and compared with its own: a mismatch is an error
//                       naming the field. Two slots: p may already have begun op e + 1, never e + 2.
struct SyncArea {
  uint64_t ready[kMaxPeers];
  uint64_t done[kMaxPeers];
  uint64_t abort[kMaxPeers];
  uint64_t plan[kMaxPeers][2][2];
};

// An abort word: what failed on the rank that wrote it (op, phase, error kind, the peer it waited
// for or -1), with the top bit set so a valid word is never 0.
struct AbortWord {
  static constexpr uint64_t kValid = 1ull << 63;
  EPX_HD static uint64_t encode(int kind, int op, int phase, int peer) {
    return kValid | (static_cast<uint64_t>(kind & 0xff) << 40) | (static_cast<uint64_t>(op & 0xff) << 32) |
           (static_cast<uint64_t>(phase & 0xff) << 24) | static_cast<uint64_t>((peer + 1) & 0xffff);
  }
  EPX_HD static int kind(uint64_t w) { return static_cast<int>((w >> 40) & 0xff); }
  EPX_HD static int op(uint64_t w) { return static_cast<int>((w >> 32) & 0xff); }
  EPX_HD static int phase(uint64_t w) { return static_cast<int>((w >> 24) & 0xff); }
  EPX_HD static int peer(uint64_t w) { return static_cast<int>(w & 0xffff) - 1; }
};

// Counts each source rank s writes into this rank during notify (slot s):
//   tokens_per_rank[r]: rows s sends to every rank r (so every rank knows the full matrix)
//   tokens_per_expert[j]: rows s sends to this rank's local expert j
struct NotifySlot {
  int tokens_per_rank[kMaxPeers];
  int tokens_per_expert[kMaxLocalExperts];
};

struct NotifyArea {
  NotifySlot slot[kMaxPeers];
};

// Control words of the ring combine (combine_rings.cu) and of the dispatch
// (dispatch.cu: tail[s][b][0], bound[s][b], and bounded head[r][b]), all (op epoch << 32) | count,
// grow only, zeroed by reset(). On rank X (for the combine):
//   tail[r][c][w]: rows sender warp w of rank r has written into its ring (r, c) in X's row region
//                  (a peer's stream is dealt round-robin over the W warps serving it: row i is warp
//                  i % W's (i / W)-th);
//   head[s][c]:    rows receiver s has consumed from X's ring (X, c) in s's row region;
//   bound[s][c]:   first position, among s's rows to X, of receiver s's channel c (c = channels: the end).
constexpr int kMaxRingChannels = kMaxHtBlocks;  // a channel per block (dispatch and ring combine)
constexpr int kMaxRingWarps = 16;  // 512 threads
constexpr int kMinRingSlots = 64;  // rows per ring below which combine uses the row region
static_assert(kMaxHtThreads == kMaxRingWarps * 32, "a ring's per-warp words cover the largest block");
struct RingCtl {
  uint64_t tail[kMaxPeers][kMaxRingChannels][kMaxRingWarps];
  uint64_t head[kMaxPeers][kMaxRingChannels];
  uint64_t bound[kMaxPeers][kMaxRingChannels + 1];
};

struct SymmetricLayout {
  static constexpr size_t kSyncOffset = 0;
  static constexpr size_t kNotifyOffset = 4096;
  static constexpr size_t kRingCtlOffset = align_up(kNotifyOffset + sizeof(NotifyArea), 4096);
  static constexpr size_t kRowsOffset = align_up(kRingCtlOffset + sizeof(RingCtl), 4096);
  static constexpr size_t kMinBytes = kRowsOffset + 4096;
};
static_assert(sizeof(SyncArea) <= SymmetricLayout::kNotifyOffset, "SyncArea must fit before the NotifyArea");

// Struct-of-arrays row storage inside the row region: payload rows, fp8 scales, top-k ids and
// weights, source token index. Arrays a row shape does not use have zero size.
struct RowLayout {
  int64_t capacity = 0;    // rows
  int row_bytes = 0;       // payload bytes of one row (H * element size)
  int num_scales = 0;      // f32 scales per row
  int num_topk_idx = 0;    // int32 top-k ids per row
  int num_topk_weights = 0;  // f32 weights per row
  bool has_src_idx = false;
  size_t off_scales = 0, off_topk_idx = 0, off_topk_weights = 0, off_src_idx = 0, num_bytes = 0;

  EPX_HD size_t bytes_per_row() const {
    return static_cast<size_t>(row_bytes) + 4u * (num_scales + num_topk_idx + num_topk_weights) +
           (has_src_idx ? 4u : 0u);
  }
  // Fills the offsets for `capacity` rows.
  EPX_HD void place(int64_t cap) {
    capacity = cap;
    size_t off = align_up(static_cast<size_t>(cap) * row_bytes, 16);
    off_scales = off;
    off = align_up(off + static_cast<size_t>(cap) * num_scales * 4, 16);
    off_topk_idx = off;
    off = align_up(off + static_cast<size_t>(cap) * num_topk_idx * 4, 16);
    off_topk_weights = off;
    off = align_up(off + static_cast<size_t>(cap) * num_topk_weights * 4, 16);
    off_src_idx = off;
    off = align_up(off + (has_src_idx ? static_cast<size_t>(cap) * 4 : 0), 16);
    num_bytes = off;
  }
  // The largest capacity that fits in `region_bytes`.
  EPX_HD void fit(size_t region_bytes) {
    const size_t slack = 5 * 16;
    int64_t cap = region_bytes > slack ? static_cast<int64_t>((region_bytes - slack) / bytes_per_row()) : 0;
    place(cap);
  }
  EPX_HD char* row(char* base, int64_t i) const { return base + i * row_bytes; }
  EPX_HD float* scales(char* base, int64_t i) const {
    return reinterpret_cast<float*>(base + off_scales) + i * num_scales;
  }
  EPX_HD int* topk_idx(char* base, int64_t i) const {
    return reinterpret_cast<int*>(base + off_topk_idx) + i * num_topk_idx;
  }
  EPX_HD float* topk_weights(char* base, int64_t i) const {
    return reinterpret_cast<float*>(base + off_topk_weights) + i * num_topk_weights;
  }
  EPX_HD int* src_idx(char* base, int64_t i) const {
    return reinterpret_cast<int*>(base + off_src_idx) + i;
  }
};

// Dispatch rows: payload + scales + top-k ids/weights + source index.
EPX_HD RowLayout dispatch_row_layout(size_t region_bytes, int row_bytes, int num_scales, int num_topk,
                                     bool with_weights) {
  RowLayout l;
  l.row_bytes = row_bytes;
  l.num_scales = num_scales;
  l.num_topk_idx = num_topk;
  l.num_topk_weights = with_weights ? num_topk : 0;
  l.has_src_idx = true;
  l.fit(region_bytes);
  return l;
}

// Combine rows: bf16 payload + optional top-k weights.
EPX_HD RowLayout combine_row_layout(size_t region_bytes, int hidden, int num_weights) {
  RowLayout l;
  l.row_bytes = hidden * 2;
  l.num_topk_weights = num_weights;
  l.fit(region_bytes);
  return l;
}

// Operations and phases named in error records.
// NOTE: the host names them by these numbers (buffer_impl.hpp's kOps / kPhases tables, same order):
// a value is never removed or reordered. kSend: a bounded dispatch's sender waiting for ring room.
enum class OpCode : int { kNone = 0, kLayout, kNotify, kDispatch, kCombine, kLlDispatch, kLlCombine };
enum class Phase : int { kNone = 0, kEntryBarrier, kInputCheck, kCountExchange, kSend, kReceive,
                         kReduce, kCapacity, kPlanCheck };
// Error kinds recorded by the device (mapped onto epx::ErrorKind by the host).
// kAborted: a peer's abort word ended a wait (ErrorRecord::peer = that rank, observed = its word).
// kHostError: only in abort words: the op failed on the host of the rank that wrote it.
enum class DeviceErrorKind : int { kNone = 0, kTimeout, kInvalidArgument, kBufferTooSmall, kAborted, kHostError };

// Host-mapped (pinned) record of the first device error. The device claims it with atomicCAS on
// `state` 0 -> 1, writes the fields, fences (sys) and stores state = 2; the host reads fields only
// once it sees state == 2. Reset by the host (Buffer::reset).
struct ErrorRecord {
  int state;
  int kind;
  int op;
  int phase;
  int rank;
  int peer;
  int block;
  int index;  // a token/row index where useful, else -1
  unsigned long long observed;
  unsigned long long expected;
};

// Host-mapped mailbox the notify kernel fills for a host-synced dispatch. Written by notify's
// thread 0 with plain stores; the host reads it only after the notify's stream has completed
// (dispatch_notify waits for it), which makes the writes visible: no flag, no fence.
struct HostMailbox {
  int num_recv;             // rows this rank receives
  long long max_rows;       // max over ranks of rows received (dispatch: whether they fit the row region)
  long long max_sent_rows;  // max over ranks of rows sent (the rows combine returns to that rank)
  long long forward_slots;  // across nodes: rows this rank's node receives from its rail peers
};

// Device-local state of a Buffer (plain device memory, not symmetric).
//   epoch: op counter, read by every block at the start of an op (e = epoch + 1), written (e) by the
//          last block to finish; kernel boundaries order it.
//   arrive_send / arrive_end: block arrival counters, reset by the last arriving block.
struct Workspace {
  uint64_t epoch;
  unsigned int arrive_send;
  unsigned int arrive_end;
};

}  // namespace epx
