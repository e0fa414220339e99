// Parameter structs and launchers of the high-throughput kernels (one struct per kernel, passed by
// value as a __grid_constant__ argument). Built and validated by src/host/buffer.cpp.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/layout.hpp"
#include "common/op_context.hpp"

namespace epx::kernels {

// Raises this rank's abort word in every peer's window (an op failed on this rank's host).
struct AbortParams {
  device::OpContext ctx;
  uint64_t word;
};
void launch_raise_abort(const AbortParams& p, cudaStream_t stream);

// Loads every epx kernel into the current device's context, once per process (load.cu). Under
// CUDA's lazy loading (the default, and what PyTorch sets) a kernel's first launch loads it, and a
// load may wait for every running kernel of the context: with a peer rank's kernel of the same
// process spinning for this rank's next op (SimWorld), that first launch would wait until the peer
// timed out. Buffer creation calls this before its first collective step; an error names the kernel.
void load_kernels();
// Each kernel file's part of load_kernels: cudaFuncGetAttributes on each of its kernels.
void load_abort_kernels();
void load_layout_kernels();
void load_notify_kernels();
void load_dispatch_kernels();
void load_combine_kernels();
void load_combine_rings_kernels();
void load_ll_dispatch_kernels();
void load_ll_combine_kernels();
void load_transport_kernels();

struct LayoutParams {
  device::OpContext ctx;  // only err/rank/op are used (no peer traffic)
  const int64_t* topk_idx;
  int64_t topk_stride;  // elements between tokens
  int num_tokens, num_topk, num_experts, num_ranks;
  int* num_tokens_per_rank;    // [R]
  int* num_tokens_per_expert;  // [E]
  bool* is_token_in_rank;      // [N, R]
};
void launch_layout(const LayoutParams& p, cudaStream_t stream);

struct NotifyParams {
  device::OpContext ctx;
  int num_tokens, num_experts_per_rank, expert_alignment;
  const int* num_tokens_per_rank;    // [R]
  const int* num_tokens_per_expert;  // [E]
  const bool* is_token_in_rank;      // [N, R]
  int* num_recv_tokens_per_expert;   // [E_loc] or null
  // Handle outputs.
  int* count_matrix;        // [R, R]
  int* rank_prefix_matrix;  // [R, R]
  int* send_pos;            // [N, R]
  int* num_recv;            // [1]
  // The worst-case row count (0: host-synced), checked against the rows every rank receives.
  int num_worst_tokens;
  HostMailbox* mailbox;  // host-mapped, or null
};
void launch_notify(const NotifyParams& p, cudaStream_t stream);

struct DispatchParams {
  device::OpContext ctx;
  RowLayout rows;  // dispatch row layout in every rank's row region
  int num_tokens, num_topk, num_experts_per_rank;
  // Inputs.
  const char* x;
  int64_t x_row_stride_bytes;
  const uint32_t* x_scales;  // f32 or int32 (UE8M0-packed) scales: moved as 32-bit words
  int64_t scale_token_stride, scale_hidden_stride;
  const int64_t* topk_idx;
  int64_t topk_stride;
  const float* topk_weights;
  int64_t weight_stride;
  // Handle.
  const int* count_matrix;
  const int* send_pos;
  const int* num_recv;
  // Outputs (contiguous), `out_rows` rows each.
  int64_t out_rows;
  char* recv_x;
  uint32_t* recv_x_scales;
  int64_t* recv_topk_idx;
  float* recv_topk_weights;
  int* recv_src_idx;
  // Warps of each block that copy rows out as they land while the others send (dispatch.cu);
  // 1 .. warps - 1.
  int copy_warps;
  // > 0: the bounded dispatch: rows per (source rank, block) ring of every
  // receiver's row region (plan::dispatch_ring); 0: every row has its final slot there.
  int ring_slots;
};
void launch_dispatch(const DispatchParams& p, int num_blocks, int num_threads, cudaStream_t stream);

struct CombineParams {
  device::OpContext ctx;
  RowLayout rows;  // combine row layout
  int num_tokens, hidden, num_topk;
  const uint16_t* x;  // [Nr, H] bf16
  int64_t x_stride;
  const float* topk_weights;  // [Nr, K] or null
  int64_t weight_stride;
  const uint16_t* bias_0;
  int64_t bias_0_stride;
  const uint16_t* bias_1;
  int64_t bias_1_stride;
  const int* count_matrix;
  const int* send_pos;
  const int* num_recv;
  uint16_t* combined_x;  // [N, H]
  int64_t out_stride;
  float* combined_topk_weights;  // [N, K] or null
  int64_t out_weight_stride;
  // Ring combine (launch_combine_rings): channels (one per block, whose first ring_send_warps warps
  // send and the rest receive), rows per ring and rows a sending warp publishes at once; ring (r, c)
  // of rank s holds the rows r sends to s for s's channel c.
  int ring_channels, ring_slots, ring_chunk, ring_send_warps;
};
void launch_combine(const CombineParams& p, int num_blocks, int num_threads, cudaStream_t stream);
// The ring variant (p.ring_channels > 0): block c is channel c.
void launch_combine_rings(const CombineParams& p, int num_blocks, int num_threads, cudaStream_t stream);

}  // namespace epx::kernels
