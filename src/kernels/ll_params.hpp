// Parameter structs and launchers of the low-latency kernels (send and receive halves of dispatch
// and combine; the receive halves are what a hook launches later).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/ll_layout.hpp"
#include "common/op_context.hpp"

namespace epx::kernels {

struct LlCommon {
  device::OpContext ctx;  // ctx.peers point at each rank's symmetric buffer base
  size_t region_offset;   // where the low-latency region starts in the symmetric buffer
  LlLayout layout;
  LlWorkspace* ws;
  int buffer_idx;
  bool shrink;  // DeepEP's shrink mode: masked ranks are skipped, a timeout masks instead of failing
  EPX_HD char* region(int r) const { return ctx.peers[r] + region_offset; }
  EPX_HD LlSync* sync(int r) const { return reinterpret_cast<LlSync*>(region(r)); }
  // Device only (a volatile load of the mask another block or the host may write).
  EPX_HD bool masked(int r) const { return shrink && *static_cast<volatile const int*>(&ws->mask[r]) != 0; }
  // The mask word a wait for rank r passes to the bounded wait (null outside shrink mode).
  EPX_HD int* mask_of(int r) const { return shrink ? &ws->mask[r] : nullptr; }
};

struct LlDispatchParams {
  LlCommon c;
  int num_tokens;
  const uint16_t* x;  // [N, H] bf16
  int64_t x_stride;
  const int64_t* topk_idx;  // [N, K]
  int64_t topk_stride;
  bool use_fp8, round_scale, ue8m0;
  // Receive outputs.
  uint8_t* recv_x;        // [E_loc, R*T, H] fp8 or bf16
  void* recv_scales;      // f32 [E_loc, S, R*T] storage (column-major view) or int32 packed UE8M0
  int* recv_count;        // [E_loc]
  int* src_info;          // [E_loc, R*T]
  int* src_topk_slot;     // [E_loc, R*T]
  int64_t* layout_range;  // [E_loc, R]
  int* cumulative_stats;  // [E_loc] or null
  int64_t* wait_stats;    // [R] or null
  int blocks_per_expert;  // receive: blocks sharing each local expert's copies (grid % it == 0)
};
void launch_ll_dispatch_send(const LlDispatchParams& p, int num_blocks, cudaStream_t stream);
void launch_ll_dispatch_recv(const LlDispatchParams& p, int num_blocks, cudaStream_t stream);
// Non-hook mode: send and receive in one launch (num_blocks <= the SM count, co-resident).
void launch_ll_dispatch_fused(const LlDispatchParams& p, int num_blocks, cudaStream_t stream);

struct LlCombineParams {
  LlCommon c;
  const uint16_t* x;  // [E_loc, R*T, H] bf16 expert outputs
  const int* src_info;
  const int* src_topk_slot;
  const int64_t* layout_range;
  int num_tokens;
  const int64_t* topk_idx;  // [N, K]
  int64_t topk_stride;
  const float* topk_weights;  // [N, K]
  int64_t weight_stride;
  uint16_t* out;  // [N, H]
  int64_t out_stride;
};
void launch_ll_combine_send(const LlCombineParams& p, int num_blocks, cudaStream_t stream);
void launch_ll_combine_recv(const LlCombineParams& p, int num_blocks, cudaStream_t stream);
void launch_ll_combine_fused(const LlCombineParams& p, int num_blocks, cudaStream_t stream);


}  // namespace epx::kernels
