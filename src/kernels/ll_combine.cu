// Low-latency combine. Send (a warp per packed expert row; the rows of all experts are spread over
// the whole grid): write the expert output row back to its source token's staging slot (token,
// top-k position) on the source rank; then publish data = n. Receive (a block per token): after every rank's data flag, out[t] = sum over the
// token's valid top-k slots, k ascending, of w_k * y_k with fp32 fused multiply-adds; then tell
// every rank its staging writes are consumed.
#include <cuda_bf16.h>

#include <cub/block/block_scan.cuh>

#include "device/copy.cuh"
#include "epx/buffer.hpp"  // kMaxLocalExperts
#include "kernels/launch.cuh"
#include "kernels/ll_common.cuh"

namespace epx::kernels {
namespace {

using namespace epx::device;
constexpr int kThreads = 512;
constexpr int kUnroll = 8;
constexpr int kBatch = 8;
constexpr int kExpertsPerThread = (kMaxLocalExperts + kThreads - 1) / kThreads;
using BlockScan = cub::BlockScan<int, kThreads>;

// One warp: packed row `row` of local expert j back to its source's staging slot. Not inlined:
// inlined, ptxas spills in the grid loop of ll_combine_send.
__device__ __noinline__ void send_row(const LlCombineParams& p, int j, int row, int lane, unsigned skip_ranks) {
  const LlCommon& c = p.c;
  const LlLayout& L = c.layout;
  const int R = c.ctx.num_ranks;
  const int64_t* range = p.layout_range + static_cast<size_t>(j) * R;
  int s = 0;
  while (s + 1 < R && row >= static_cast<int>(range[s + 1] >> 32)) ++s;
  if (skip_ranks & (1u << s)) return;  // shrink mode: the source is masked
  const size_t slot = static_cast<size_t>(j) * R * L.max_tokens + row;
  char* dst[1] = {reinterpret_cast<char*>(L.combine_row(c.region(s), c.buffer_idx, p.src_info[slot], p.src_topk_slot[slot]))};
  warp_copy_multicast<kUnroll>(p.x + slot * L.hidden, dst, L.hidden * 2, lane);
}

// Send half of op n; false (nothing sent) when the wait for the peers' consumption failed.
__device__ __forceinline__ bool combine_send(const LlCombineParams& p, uint64_t n) {
  // first_row[j]: packed rows of the local experts before j (first_row[E_loc] = all of them), so the
  // rows of every expert are spread over all warps of the grid at once.
  __shared__ int first_row[kMaxLocalExperts + 1];
  __shared__ BlockScan::TempStorage scan;
  const LlCommon& c = p.c;
  const LlLayout& L = c.layout;
  const int R = c.ctx.num_ranks, E_loc = L.experts_per_rank;
  if (!ll::wait_consumed(c, c.ws->last_op[c.buffer_idx])) return false;
  unsigned skip_ranks = 0;  // shrink mode: masked sources get nothing back
  for (int r = 0; r < R; ++r)
    if (c.masked(r)) skip_ranks |= 1u << r;
  int counts[kExpertsPerThread];
#pragma unroll
  for (int i = 0; i < kExpertsPerThread; ++i) {
    const int j = threadIdx.x * kExpertsPerThread + i;
    const int64_t last = j < E_loc ? p.layout_range[static_cast<size_t>(j) * R + R - 1] : 0;
    counts[i] = static_cast<int>(last >> 32) + static_cast<int>(last & 0xffffffff);
  }
  int mine = 0;
#pragma unroll
  for (int i = 0; i < kExpertsPerThread; ++i) mine += counts[i];
  int before = 0, total = 0;
  BlockScan(scan).ExclusiveSum(mine, before, total);
#pragma unroll
  for (int i = 0; i < kExpertsPerThread; ++i) {
    if (threadIdx.x * kExpertsPerThread + i < E_loc) first_row[threadIdx.x * kExpertsPerThread + i] = before;
    before += counts[i];
  }
  if (threadIdx.x == 0) first_row[E_loc] = total;
  __syncthreads();

  const int lane = threadIdx.x % kWarpSize;
  const int global_warp = blockIdx.x * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
  const int num_warps = gridDim.x * (blockDim.x / kWarpSize);
  for (int g = global_warp; g < total; g += num_warps) {
    // Expert j with first_row[j] <= g < first_row[j + 1].
    int j = 0;
#pragma unroll
    for (int step = kMaxLocalExperts / 2; step > 0; step /= 2)
      if (j + step < E_loc && first_row[j + step] <= g) j += step;
    send_row(p, j, g - first_row[j], lane, skip_ranks);
  }
  ll::finish_send(c, n, 0);
  return true;
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

__device__ __forceinline__ void combine_recv(const LlCombineParams& p, uint64_t n) {
  const LlCommon& c = p.c;
  const LlLayout& L = c.layout;
  const int R = c.ctx.num_ranks, K = L.num_topk, H = L.hidden;
  LlSync* sync = c.sync(c.ctx.rank);
  bool ok = true;
  if (threadIdx.x < R && !c.masked(threadIdx.x))
    ok = wait_geq(c.ctx, &sync->data[c.buffer_idx][threadIdx.x], n, Phase::kReceive, threadIdx.x,
                  c.mask_of(threadIdx.x)).ok;
  if (!__syncthreads_and(ok)) return;
  __shared__ float weight[kMaxLlTopk];  // 0 where the slot is -1 (never read then)
  __shared__ int valid[kMaxLlTopk];
  __shared__ int rank_masked[kMaxPeers];  // shrink mode: a masked rank's experts contribute nothing
  if (threadIdx.x < R) rank_masked[threadIdx.x] = c.masked(threadIdx.x);
  __syncthreads();
  const int E_loc = L.experts_per_rank;
  char* region = c.region(c.ctx.rank);
  for (int t = blockIdx.x; t < p.num_tokens; t += gridDim.x) {
    if (threadIdx.x < K) {
      const int64_t e = p.topk_idx[t * p.topk_stride + threadIdx.x];
      valid[threadIdx.x] = e >= 0 && (e >= static_cast<int64_t>(R) * E_loc || !rank_masked[e / E_loc]);
      weight[threadIdx.x] = valid[threadIdx.x] ? p.topk_weights[t * p.weight_stride + threadIdx.x] : 0.f;
    }
    __syncthreads();
    for (int v = threadIdx.x; v < H / 8; v += blockDim.x) {
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      // kBatch slots loaded before any is added (latency), added in k order (bits).
      for (int k0 = 0; k0 < K; k0 += kBatch) {
        int4 y[kBatch];
#pragma unroll
        for (int i = 0; i < kBatch; ++i)
          if (k0 + i < K && valid[k0 + i])
            y[i] = reinterpret_cast<const int4*>(L.combine_row(region, c.buffer_idx, t, k0 + i))[v];
#pragma unroll
        for (int i = 0; i < kBatch; ++i)
          if (k0 + i < K && valid[k0 + i]) fma_bf16x8(acc, weight[k0 + i], y[i]);
      }
      uint32_t w[4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        w[i] = __bfloat16_as_ushort(__float2bfloat16_rn(acc[2 * i])) |
               (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(acc[2 * i + 1]))) << 16);
      reinterpret_cast<int4*>(p.out + t * p.out_stride)[v] =
          make_int4(static_cast<int>(w[0]), static_cast<int>(w[1]), static_cast<int>(w[2]), static_cast<int>(w[3]));
    }
    __syncthreads();
  }
  ll::finish_recv(c, n);
}

// The op number n as in ll_dispatch.cu: read by every block before the last one advances it.
__global__ void __launch_bounds__(kThreads, 1) ll_combine_send(const __grid_constant__ LlCombineParams p) {
  combine_send(p, p.c.ws->counter + 1);
}
__global__ void __launch_bounds__(kThreads, 1) ll_combine_recv(const __grid_constant__ LlCombineParams p) {
  combine_recv(p, p.c.ws->pending[p.c.buffer_idx]);
}
// Non-hook mode: both halves in one launch, cooperative (blocks wait for each other's sends).
__global__ void __launch_bounds__(kThreads, 1) ll_combine_fused(const __grid_constant__ LlCombineParams p) {
  const uint64_t n = p.c.ws->counter + 1;
  if (combine_send(p, n)) combine_recv(p, n);
}

}  // namespace

void launch_ll_combine_send(const LlCombineParams& p, int num_blocks, cudaStream_t stream) {
  ll_combine_send<<<num_blocks, kThreads, 0, stream>>>(p);
}
void launch_ll_combine_recv(const LlCombineParams& p, int num_blocks, cudaStream_t stream) {
  ll_combine_recv<<<num_blocks, kThreads, 0, stream>>>(p);
}
// Cooperative launch: the blocks wait for each other's send halves, so the driver must place them
// all at once (an error, not a hang, when it cannot).
void launch_ll_combine_fused(const LlCombineParams& p, int num_blocks, cudaStream_t stream) {
  launch_cooperative(ll_combine_fused, num_blocks, kThreads, stream, p);
}

void load_ll_combine_kernels() {
  load_kernel(ll_combine_send, "ll_combine_send");
  load_kernel(ll_combine_recv, "ll_combine_recv");
  load_kernel(ll_combine_fused, "ll_combine_fused");
}

}  // namespace epx::kernels
