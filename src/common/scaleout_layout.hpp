// Typed layouts of the scale-out region of a window (docs/scaleout.md §4), the same offsets on
// every rank. Plain data for host sizing and device addressing alike.
#pragma once
#include <cstddef>
#include <cstdint>

#include "common/hd.hpp"
#include "common/layout.hpp"
#include "epx/limits.hpp"

namespace epx {

// The two-level count exchange (kernels/count_exchange.cu): every rank ends with the whole
// [R, R] count matrix. At `base` in every window, with U = node_size, N = R / U:
//   signals[kMaxNodes]   uint64: EmuNet's emulated signal words (GinNet's signals are NCCL ids
//                        0..N-1, not in the window). signal(m): from the rail peer on node m, +1
//                        per exchange (cumulative: the waiter's target is the exchange's epoch e).
//                        Zeroed only while no exchange runs (before the first).
//   flags[kMaxRanks]     uint64: flags[l] = e written by node rank l (fence acq_rel sys, relaxed
//                        sys store) after its row of exchange e landed here; read with acquire.
//   node_rows[2][U][R]   int32: row of node rank l for exchange e in [e & 1][l], written by l over
//                        NVLink. NOTE: two slots: l may begin exchange e + 1 before this rank
//                        finished reading e, never e + 2 (e + 1 waits for this rank's flag).
//   blocks[2][N][U][R]   int32: [e & 1][m] = node m's rows, put by the rail peer on node m (this
//                        rank's own node: copied here from node_rows, the source of its puts).
//                        NOTE: two slots, for the same reason across nodes; the put source is
//                        rewritten two exchanges later, after this rank's flush.
// Rows are padded to 16 bytes (puts move multiples of 16).
struct ScaleoutCountLayout {
  int num_ranks = 1;
  int node_size = 1;
  size_t base = 0;

  EPX_HD int num_nodes() const { return num_ranks / node_size; }
  EPX_HD size_t row_bytes() const { return align_up(static_cast<size_t>(num_ranks) * 4, 16); }
  EPX_HD size_t signals() const { return base; }
  EPX_HD int signal(int node) const { return node; }
  EPX_HD size_t flags() const { return base + 8 * kMaxNodes; }
  EPX_HD size_t node_row(int parity, int local) const {
    return align_up(flags() + 8 * kMaxRanks, 16) + static_cast<size_t>(parity * node_size + local) * row_bytes();
  }
  EPX_HD size_t block_bytes() const { return static_cast<size_t>(node_size) * row_bytes(); }
  EPX_HD size_t block(int parity, int node) const {
    return node_row(2, 0) + static_cast<size_t>(parity * num_nodes() + node) * block_bytes();
  }
  EPX_HD size_t end() const { return block(2, 0); }
  EPX_HD size_t num_bytes() const { return end() - base; }
};

// The count exchange of an internode dispatch (kernels/internode.cu, internode_notify): every rank
// ends with the [R, R] count matrix and the received-token counts of its own experts. A row of
// rank s is [R token counts | E_max expert counts] (E_max = R * kMaxLocalExperts: the region is
// sized once, for any expert count). At `base` in every window, U = node_size, N = R / U, x the
// exchange's number (1, 2, ...; the waiters' cumulative target):
//   signals[kMaxNodes]   uint64: EmuNet's signal words (GinNet: NCCL ids 0..N-1). signal(m): from
//                        the rail peer on node m, +1 per exchange.
//   flags[kMaxRanks]     uint64: flags[l] = x, written by node rank l (fence acq_rel sys, relaxed
//                        sys store) after its row of exchange x landed here.
//   node_rows[2][U]      rows of the node's ranks, [x & 1][l] written by l over NVLink.
//   send[2][N]           blocks: [x & 1][m] = what this rank puts to its rail peer on node m.
//   recv[2][N]           blocks: [x & 1][m] = what the rail peer on node m put here (the own node's
//                        is computed here).
// A block: the U rows' token counts [U][R], then the node's expert counts summed over its U ranks
// for the U * kMaxLocalExperts experts of the receiving node ([U][kMaxLocalExperts], only E_loc of
// each row used). Two slots by parity: a peer may begin exchange x + 1 before this rank finished
// reading x, never x + 2 (x + 1 waits for this rank's flag and signal of x + 1); a put source is
// rewritten two exchanges later, after this rank's flush.
struct InternodeCountLayout {
  int num_ranks = 1;
  int node_size = 1;
  size_t base = 0;

  EPX_HD int num_nodes() const { return num_ranks / node_size; }
  EPX_HD size_t row_ints() const { return align_up(static_cast<size_t>(num_ranks) * (1 + kMaxLocalExperts), 4); }
  EPX_HD size_t block_ints() const {
    return align_up(static_cast<size_t>(node_size) * (num_ranks + kMaxLocalExperts), 4);
  }
  EPX_HD size_t block_bytes() const { return 4 * block_ints(); }
  EPX_HD size_t signals() const { return base; }
  EPX_HD int signal(int node) const { return node; }
  EPX_HD size_t flags() const { return base + 8 * kMaxNodes; }
  EPX_HD size_t node_row(int parity, int local) const {
    return align_up(flags() + 8 * kMaxRanks, 16) + 4 * static_cast<size_t>(parity * node_size + local) * row_ints();
  }
  EPX_HD size_t send_block(int parity, int node) const {
    return node_row(2, 0) + static_cast<size_t>(parity * num_nodes() + node) * block_bytes();
  }
  EPX_HD size_t recv_block(int parity, int node) const {
    return send_block(2, 0) + static_cast<size_t>(parity * num_nodes() + node) * block_bytes();
  }
  EPX_HD size_t end() const { return align_up(recv_block(2, 0), 128); }
  EPX_HD size_t num_bytes() const { return end() - base; }
};

}  // namespace epx
