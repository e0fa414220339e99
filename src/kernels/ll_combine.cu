// Low-latency combine. Send (a warp per packed expert row): write the expert output row back to
// its source token's staging slot (token, top-k position) on the source rank; then publish
// data = n. Receive (a block per token): after every rank's data flag, out[t] = sum over the
// token's valid top-k slots, k ascending, of w_k * y_k with fp32 fused multiply-adds; then tell
// every rank its staging writes are consumed.
#include <cuda_bf16.h>

#include "device/copy.cuh"
#include "kernels/ll_params.hpp"

namespace epx::kernels {
namespace {

using namespace epx::device;
constexpr int kThreads = 512;
constexpr int kUnroll = 4;

__global__ void __launch_bounds__(kThreads) ll_combine_send(const __grid_constant__ LlCombineParams p) {
  const LlCommon& c = p.c;
  const LlLayout& L = c.layout;
  const int R = c.ctx.num_ranks, E_loc = L.experts_per_rank, H = L.hidden, RT = R * L.max_tokens;
  const uint64_t n = c.ws->counter + 1;
  if (!ll::wait_consumed(c, c.ws->last_op[c.buffer_idx])) return;
  const int lane = threadIdx.x % kWarpSize;
  const int global_warp = blockIdx.x * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
  const int num_warps = gridDim.x * (blockDim.x / kWarpSize);
  for (int j = 0; j < E_loc; ++j) {
    const int64_t* range = p.layout_range + static_cast<size_t>(j) * R;
    const int64_t last = range[R - 1];
    const int count = static_cast<int>(last >> 32) + static_cast<int>(last & 0xffffffff);
    for (int row = global_warp; row < count; row += num_warps) {
      int s = 0;
      while (s + 1 < R && row >= static_cast<int>(range[s + 1] >> 32)) ++s;
      const size_t slot = static_cast<size_t>(j) * RT + row;
      char* dst[1] = {reinterpret_cast<char*>(L.combine_row(c.region(s), c.buffer_idx, p.src_info[slot], p.src_topk_slot[slot]))};
      warp_copy_multicast<kUnroll>(p.x + slot * H, dst, H * 2, lane);
    }
  }
  ll::finish_send(c, n, 0);
}

__device__ __forceinline__ void fma_bf16x8(float (&acc)[8], float w, const int4& v) {
  const uint32_t u[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y), static_cast<uint32_t>(v.z),
                         static_cast<uint32_t>(v.w)};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    acc[2 * i] = __fmaf_rn(w, __uint_as_float(u[i] << 16), acc[2 * i]);
    acc[2 * i + 1] = __fmaf_rn(w, __uint_as_float(u[i] & 0xffff0000u), acc[2 * i + 1]);
  }
}

__global__ void __launch_bounds__(kThreads) ll_combine_recv(const __grid_constant__ LlCombineParams p) {
  const LlCommon& c = p.c;
  const LlLayout& L = c.layout;
  const int R = c.ctx.num_ranks, K = L.num_topk, H = L.hidden;
  const uint64_t n = c.ws->pending[c.buffer_idx];
  LlSync* sync = c.sync(c.ctx.rank);
  bool ok = true;
  if (threadIdx.x < R) ok = wait_flag_geq(c.ctx, &sync->data[c.buffer_idx][threadIdx.x], n, Phase::kReceive, threadIdx.x);
  if (!__syncthreads_and(ok)) return;
  char* region = c.region(c.ctx.rank);
  for (int t = blockIdx.x; t < p.num_tokens; t += gridDim.x) {
    for (int v = threadIdx.x; v < H / 8; v += blockDim.x) {
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int k = 0; k < K; ++k) {
        if (p.topk_idx[t * p.topk_stride + k] < 0) continue;
        const int4 y = reinterpret_cast<const int4*>(L.combine_row(region, c.buffer_idx, t, k))[v];
        fma_bf16x8(acc, p.topk_weights[t * p.weight_stride + k], y);
      }
      uint32_t w[4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        w[i] = __bfloat16_as_ushort(__float2bfloat16_rn(acc[2 * i])) |
               (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(acc[2 * i + 1]))) << 16);
      reinterpret_cast<int4*>(p.out + t * p.out_stride)[v] =
          make_int4(static_cast<int>(w[0]), static_cast<int>(w[1]), static_cast<int>(w[2]), static_cast<int>(w[3]));
    }
  }
  ll::finish_recv(c, n);
}

}  // namespace

void launch_ll_combine_send(const LlCombineParams& p, int num_blocks, cudaStream_t stream) {
  ll_combine_send<<<num_blocks, kThreads, 0, stream>>>(p);
}
void launch_ll_combine_recv(const LlCombineParams& p, int num_blocks, cudaStream_t stream) {
  ll_combine_recv<<<num_blocks, kThreads, 0, stream>>>(p);
}

}  // namespace epx::kernels
