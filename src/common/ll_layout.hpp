// Layout of the low-latency region (inside the symmetric buffer, after the high-throughput part).
//
//   [ LlSync | buffer 0 | buffer 1 ]     each buffer: dispatch staging, combine staging[, zero-copy]
//
// The zero-copy combine buffer (E_loc * R * T rows of H bf16, Buffer::next_combine_buffer) is
// placed only when asked for (BufferOptions::ll_zero_copy): it is local to the rank (the combine
// reads it like any other `x`), but it moves buffer 1, so every rank must place it alike.
//
// Ordering contract:
//   LlSync::data[b][s]      written by rank s (release.sys) with op number n once all of s's writes
//                           into this rank's buffer b for op n are done (last sending block, after
//                           every sending block fenced). Read (acquire.sys) by this rank's receive.
//   LlSync::consumed[b][r]  written by rank r (release.sys) with op number n once r finished reading
//                           what this rank wrote into r's buffer b for op n. Read (acquire.sys) by
//                           this rank before it writes into r's buffer b again.
//   Both only grow; zeroed only by Buffer::clean_low_latency_buffer / reset (collective).
// Dispatch staging: slot (source s, token t) holds the row once per destination rank: the payload
// (fp8 + f32 scales, or bf16) and the token's top-k as this rank's local expert ids (-1 elsewhere).
// Combine staging: slot (token t, top-k position k) holds expert output row y (bf16).
#pragma once
#include <cstddef>
#include <cstdint>

#include "common/layout.hpp"

namespace epx {

struct LlSync {
  uint64_t data[2][kMaxPeers];
  uint64_t consumed[2][kMaxPeers];
  int num_tokens[2][kMaxPeers];  // tokens source s dispatched (written before data[b][s])
};

struct LlLayout {
  int num_ranks = 0, max_tokens = 0, hidden = 0, num_topk = 0, experts_per_rank = 0;
  size_t row_bytes = 0;      // dispatch staging payload: bf16 row, or fp8 row + scales
  size_t meta_bytes = 0;     // K int32 local ids
  bool has_zero_copy = false;
  size_t off_dispatch = 0, off_dispatch_meta = 0, off_combine = 0, buffer_bytes = 0;
  size_t off_zero_copy = 0;  // meaningful only with has_zero_copy
  static constexpr size_t kSyncBytes = 4096;

  EPX_HD void place(int R, int T, int H, int K, int E_loc, bool with_zero_copy) {
    num_ranks = R; max_tokens = T; hidden = H; num_topk = K; experts_per_rank = E_loc;
    has_zero_copy = with_zero_copy;
    row_bytes = align_up(static_cast<size_t>(H) * 2, 16);  // >= fp8 row + H/128 f32 scales
    meta_bytes = align_up(static_cast<size_t>(K) * 4, 16);
    const size_t slots = static_cast<size_t>(R) * T;
    off_dispatch = 0;
    off_dispatch_meta = align_up(off_dispatch + slots * row_bytes, 128);
    off_combine = align_up(off_dispatch_meta + slots * meta_bytes, 128);
    const size_t staging_end = off_combine + static_cast<size_t>(T) * K * H * 2;
    off_zero_copy = with_zero_copy ? align_up(staging_end, 128) : 0;
    const size_t end = with_zero_copy ? off_zero_copy + zero_copy_bytes() : staging_end;
    buffer_bytes = align_up(end, 4096);
  }
  // Bytes of one buffer's zero-copy combine buffer ([E_loc, R*T, H] bf16), placed or not.
  EPX_HD size_t zero_copy_bytes() const {
    return static_cast<size_t>(experts_per_rank) * num_ranks * max_tokens * hidden * 2;
  }
  EPX_HD size_t num_bytes() const { return kSyncBytes + 2 * buffer_bytes; }
  EPX_HD char* buffer(char* region, int b) const { return region + kSyncBytes + b * buffer_bytes; }
  EPX_HD char* dispatch_row(char* region, int b, int src, int t) const {
    return buffer(region, b) + off_dispatch + (static_cast<size_t>(src) * max_tokens + t) * row_bytes;
  }
  EPX_HD int* dispatch_meta(char* region, int b, int src, int t) const {
    return reinterpret_cast<int*>(buffer(region, b) + off_dispatch_meta +
                                  (static_cast<size_t>(src) * max_tokens + t) * meta_bytes);
  }
  EPX_HD uint16_t* combine_row(char* region, int b, int t, int k) const {
    return reinterpret_cast<uint16_t*>(buffer(region, b) + off_combine +
                                       (static_cast<size_t>(t) * num_topk + k) * hidden * 2);
  }
  // nullptr without has_zero_copy.
  EPX_HD uint16_t* zero_copy(char* region, int b) const {
    return has_zero_copy ? reinterpret_cast<uint16_t*>(buffer(region, b) + off_zero_copy) : nullptr;
  }
};

// Device-local low-latency state (not symmetric).
//   counter: LL op number, n = counter + 1 read by the send kernel, stored by its last block.
//   last_op[b]: n of the latest op on buffer b (the one whose consumption a new op waits for).
//   pending[b]: n of the op whose receive has not run yet on buffer b (read by the receive).
//   arrive_*: block arrival counters, reset by the last block.
//   mask[r]: shrink mode only: 1 = rank r is masked (neither sent to nor waited for). Set by a
//            wait that timed out on r (atomicExch) or by the host (update / clean mask buffer);
//            read (volatile) by every low-latency kernel. Last, so that clean_low_latency_buffer
//            can zero the rest and keep the masks; Buffer::reset() zeroes them too.
struct LlWorkspace {
  uint64_t counter;
  uint64_t last_op[2];
  uint64_t pending[2];
  unsigned int arrive_send[2];
  unsigned int arrive_recv[2];
  int mask[kMaxPeers];
};

}  // namespace epx
