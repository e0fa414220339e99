// The device arrays of a DispatchHandle live in one int32 allocation; this is the only definition of
// where each array sits in it. Buffer::make_handle allocates by it, and the Python binding builds
// handles in a torch tensor by it and exports it (DispatchHandle.storage_layout) so Python slices
// the same arrays.
#pragma once
#include <cstdint>

#include "epx/buffer.hpp"

namespace epx::host {

// Offsets and the total, in int32 elements; the arrays are contiguous, in this order, no padding.
struct HandleStorageLayout {
  int64_t rank_prefix_matrix;  // [R, R]
  int64_t count_matrix;        // [R, R]
  int64_t send_pos;            // [N, R]
  int64_t num_recv;            // [1]
  int64_t total;
};

inline HandleStorageLayout handle_storage_layout(int num_ranks, int64_t num_tokens) {
  const int64_t R = num_ranks;
  HandleStorageLayout l{};
  l.rank_prefix_matrix = 0;
  l.count_matrix = l.rank_prefix_matrix + R * R;
  l.send_pos = l.count_matrix + R * R;
  l.num_recv = l.send_pos + num_tokens * R;
  l.total = l.num_recv + 1;
  return l;
}

// Points h's device arrays into `base` (handle_storage_layout(h.num_ranks, h.num_tokens).total int32
// elements); ownership (h.storage) stays with the caller.
inline void place_handle_arrays(DispatchHandle& h, int* base) {
  const HandleStorageLayout l = handle_storage_layout(h.num_ranks, h.num_tokens);
  h.rank_prefix_matrix = base + l.rank_prefix_matrix;
  h.count_matrix = base + l.count_matrix;
  h.send_pos = base + l.send_pos;
  h.num_recv_device = base + l.num_recv;
}

}  // namespace epx::host
