// Layout of the RDMA part of the window (num_rdma_bytes, docs/scaleout.md §4, docs/protocol.md
// "RDMA region"): the bounded rings of the high-throughput path across nodes, the same offsets on
// every rank. Plain data for host sizing and device addressing alike.
//
// With N nodes, C channels, S = ring_slots (Config.num_max_rdma_chunked_recv_tokens) and a chunk of
// Q = chunk_tokens (Config.num_max_rdma_chunked_send_tokens; S is a multiple of Q, Q < S), at `base`:
//   signals[2][N][C]   uint64, EmuNet's emulated signal words (GinNet's signals are NCCL ids with
//                      the same numbering, not in the window). tail_signal(m, c): messages the rail
//                      peer on node m has put into my recv ring (m, c), cumulative, one add per chunk
//                      (put_signal). head_signal(m, c): slots of my send ring's stream to node m,
//                      channel c, that the rail peer there consumed (its ack), cumulative.
//   words[2][N][C]     uint64, local workspace (never written remotely): sent(m, c) = messages this
//                      rank put to node m on channel c; consumed(m, c) = messages this rank consumed
//                      from node m's ring c. Cumulative, the waiters' targets; zeroed only by the
//                      collective reset while quiescent, as the signals.
//   send[N][C][S]      message slots: the put sources (staging) of the stream to node m, channel c.
//                      Slot i of a stream holds its message i % S; rewritten only after flush() and
//                      after head_signal(m, c) > i - S (the receiver freed it).
//   recv[N][C][S]      message slots written by the rail peer on node m (its send slots, same index).
// Ring (m, c) exists for every node m, the own node included, so that offsets index by node alike
// on every rank (dispatch writes node-local rows over NVLink and leaves the own node's ring unused).
// A message: payload (hidden_bytes), fp8 scales (4 bytes per 128 payload bytes), top-k global ids
// (int32) and weights (f32) for num_topk, source meta (the source token index, -1 for the stream's
// end marker of an op; then, per local rank u of the destination node, the token's position among
// the source's rows to that rank, -1 where u does not take it), each part 16-byte aligned. Combine sends partial rows (bf16,
// hidden_bytes) and their weights back through the same rings.
// Regions start at multiples of kRdmaAlign; the rings are whole slots, each a multiple of 16 bytes.
#pragma once
#include <cstddef>
#include <cstdint>

#include "common/hd.hpp"
#include "common/layout.hpp"

namespace epx {

constexpr size_t kRdmaAlign = 128;

struct RdmaLayout {
  int num_nodes = 1;
  int num_channels = 1;
  int ring_slots = 1;    // S
  int chunk_tokens = 1;  // Q
  size_t hidden_bytes = 0;
  int num_topk = 0;
  size_t base = 0;

  // Message parts, relative to a slot.
  EPX_HD size_t payload_bytes() const { return align_up(hidden_bytes, 16); }
  EPX_HD size_t scales_offset() const { return payload_bytes(); }
  EPX_HD size_t scales_bytes() const { return align_up((hidden_bytes + 127) / 128 * 4, 16); }
  EPX_HD size_t topk_idx_offset() const { return scales_offset() + scales_bytes(); }
  EPX_HD size_t topk_bytes() const { return align_up(static_cast<size_t>(num_topk) * 4, 16); }
  EPX_HD size_t topk_weights_offset() const { return topk_idx_offset() + topk_bytes(); }
  EPX_HD size_t meta_offset() const { return topk_weights_offset() + topk_bytes(); }
  // int32 source token (-1: end of the op's stream), int32 position on each local rank, padding.
  static constexpr size_t kMetaBytes = align_up(4 * (1 + kMaxRanks), 16);
  EPX_HD size_t slot_bytes() const { return meta_offset() + kMetaBytes; }

  EPX_HD size_t streams() const { return static_cast<size_t>(num_nodes) * num_channels; }
  EPX_HD size_t stream(int node, int channel) const { return static_cast<size_t>(node) * num_channels + channel; }
  // Signal ids (also the index of EmuNet's word in signals()).
  EPX_HD int tail_signal(int node, int channel) const { return static_cast<int>(stream(node, channel)); }
  EPX_HD int head_signal(int node, int channel) const { return static_cast<int>(streams() + stream(node, channel)); }
  EPX_HD int num_signals() const { return static_cast<int>(2 * streams()); }

  EPX_HD size_t signals() const { return base; }
  EPX_HD size_t signal_word(int id) const { return signals() + 8 * static_cast<size_t>(id); }
  EPX_HD size_t words() const { return align_up(signals() + 8 * 2 * streams(), kRdmaAlign); }
  EPX_HD size_t sent_word(int node, int channel) const { return words() + 8 * stream(node, channel); }
  EPX_HD size_t consumed_word(int node, int channel) const { return words() + 8 * (streams() + stream(node, channel)); }
  EPX_HD size_t ring_bytes() const { return static_cast<size_t>(ring_slots) * slot_bytes(); }
  EPX_HD size_t send_rings() const { return align_up(words() + 8 * 2 * streams(), kRdmaAlign); }
  EPX_HD size_t send_slot(int node, int channel, int64_t i) const {
    return send_rings() + stream(node, channel) * ring_bytes() + static_cast<size_t>(i % ring_slots) * slot_bytes();
  }
  EPX_HD size_t recv_rings() const { return align_up(send_rings() + streams() * ring_bytes(), kRdmaAlign); }
  EPX_HD size_t recv_slot(int node, int channel, int64_t i) const {
    return recv_rings() + stream(node, channel) * ring_bytes() + static_cast<size_t>(i % ring_slots) * slot_bytes();
  }
  EPX_HD size_t end() const { return align_up(recv_rings() + streams() * ring_bytes(), kRdmaAlign); }
  EPX_HD size_t num_bytes() const { return end() - base; }
};

}  // namespace epx
