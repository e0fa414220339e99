// High-throughput combine: push each received row back to its source's row region, then every
// rank reduces its own tokens. Roles of each block, in order:
//   send:    a warp per received row writes it (and its top-k weights) to slot
//            (rows of this rank before it) + (row's position among this rank's rows) of the source;
//            rows that came from this rank itself stay where they are;
//   signal:  the last block publishes done = e to every peer;
//   reduce:  after every peer's done, a warp per token sums its contributions in rank order in
//            fp32 (own rows read straight from x), adds the biases, rounds to bf16.
#include <cuda_bf16.h>

#include "device/copy.cuh"
#include "kernels/ht_params.hpp"

namespace epx::kernels {
namespace {

using namespace epx::device;
constexpr int kUnroll = 4;

__device__ __forceinline__ float bf16_bits_to_float(uint32_t bits16) { return __uint_as_float(bits16 << 16); }

__device__ __forceinline__ void add_bf16x8(float (&acc)[8], const int4& v) {
  const uint32_t w[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y), static_cast<uint32_t>(v.z),
                         static_cast<uint32_t>(v.w)};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    acc[2 * i] += bf16_bits_to_float(w[i] & 0xffffu);
    acc[2 * i + 1] += bf16_bits_to_float(w[i] >> 16);
  }
}

__device__ __forceinline__ int4 pack_bf16x8(const float (&acc)[8]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t lo = __bfloat16_as_ushort(__float2bfloat16_rn(acc[2 * i]));
    const uint32_t hi = __bfloat16_as_ushort(__float2bfloat16_rn(acc[2 * i + 1]));
    w[i] = lo | (hi << 16);
  }
  return make_int4(static_cast<int>(w[0]), static_cast<int>(w[1]), static_cast<int>(w[2]), static_cast<int>(w[3]));
}

__device__ void send_rows(const CombineParams& p, const int* recv_base, const int* dst_base, int num_recv) {
  const OpContext& ctx = p.ctx;
  const int R = ctx.num_ranks, me = ctx.rank;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  // Only rows from other ranks travel (own rows are reduced in place): spread those evenly.
  const int num_own = recv_base[me + 1] - recv_base[me];
  const int num_remote = num_recv - num_own;
  const int per_block = (num_remote + gridDim.x - 1) / gridDim.x;
  const int v_begin = blockIdx.x * per_block;
  const int v_end = min(num_remote, v_begin + per_block);
  for (int v = v_begin + warp; v < v_end; v += warps) {
    const int i = v < recv_base[me] ? v : v + num_own;
    int s = 0;
    while (s + 1 < R && i >= recv_base[s + 1]) ++s;
    const int64_t slot = dst_base[s] + (i - recv_base[s]);
    char* base = ctx.rows(s);
    char* dst[1] = {p.rows.row(base, slot)};
    warp_copy_multicast<kUnroll>(p.x + i * p.x_stride, dst, p.rows.row_bytes, lane);
    if (p.rows.num_topk_weights)
      for (int k = lane; k < p.num_topk; k += kWarpSize)
        p.rows.topk_weights(base, slot)[k] = p.topk_weights[i * p.weight_stride + k];
  }
}

__device__ void reduce_tokens(const CombineParams& p, const int* recv_base) {
  const OpContext& ctx = p.ctx;
  const int R = ctx.num_ranks, me = ctx.rank;
  __shared__ int send_base[kMaxPeers];  // first slot of each rank's contributions here
  if (threadIdx.x == 0) {
    int sum = 0;
    for (int r = 0; r < R; ++r) { send_base[r] = sum; sum += p.count_matrix[me * R + r]; }
  }
  __syncthreads();
  char* base = ctx.rows(me);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int global_warp = blockIdx.x * (blockDim.x / kWarpSize) + warp;
  const int num_warps = gridDim.x * (blockDim.x / kWarpSize);
  const int num_vec = p.hidden / 8;
  for (int t = global_warp; t < p.num_tokens; t += num_warps) {
    // Contribution rows in rank order (the reduction order the reference uses).
    const int4* src[kMaxPeers];
    const float* wsrc[kMaxPeers];
#pragma unroll
    for (int r = 0; r < kMaxPeers; ++r) {
      const int pos = r < R ? p.send_pos[static_cast<int64_t>(t) * R + r] : -1;
      src[r] = nullptr;
      wsrc[r] = nullptr;
      if (pos < 0) continue;
      if (r == me) {
        const int64_t row = recv_base[me] + pos;
        src[r] = reinterpret_cast<const int4*>(p.x + row * p.x_stride);
        if (p.topk_weights) wsrc[r] = p.topk_weights + row * p.weight_stride;
      } else {
        src[r] = reinterpret_cast<const int4*>(p.rows.row(base, send_base[r] + pos));
        if (p.rows.num_topk_weights) wsrc[r] = p.rows.topk_weights(base, send_base[r] + pos);
      }
    }
    for (int v = lane; v < num_vec; v += kWarpSize) {
      int4 val[kMaxPeers];
#pragma unroll
      for (int r = 0; r < kMaxPeers; ++r)
        if (src[r] != nullptr) val[r] = r == me ? ld_nc_na_v4(src[r] + v) : src[r][v];
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll
      for (int r = 0; r < kMaxPeers; ++r)
        if (src[r] != nullptr) add_bf16x8(acc, val[r]);
      if (p.bias_0) add_bf16x8(acc, ld_nc_na_v4(reinterpret_cast<const int4*>(p.bias_0 + t * p.bias_0_stride) + v));
      if (p.bias_1) add_bf16x8(acc, ld_nc_na_v4(reinterpret_cast<const int4*>(p.bias_1 + t * p.bias_1_stride) + v));
      reinterpret_cast<int4*>(p.combined_x + t * p.out_stride)[v] = pack_bf16x8(acc);
    }
    if (p.combined_topk_weights != nullptr) {
      for (int k = lane; k < p.num_topk; k += kWarpSize) {
        float acc = 0.f;
#pragma unroll
        for (int r = 0; r < kMaxPeers; ++r)
          if (wsrc[r] != nullptr) acc += wsrc[r][k];
        p.combined_topk_weights[t * p.out_weight_stride + k] = acc;
      }
    }
  }
}

__global__ void __launch_bounds__(kMaxHtThreads) combine_kernel(const __grid_constant__ CombineParams p) {
  __shared__ int recv_base[kMaxPeers + 1];  // first received row from each source
  __shared__ int dst_base[kMaxPeers];       // first slot of this rank's rows on each source
  const OpContext& ctx = p.ctx;
  const int R = ctx.num_ranks, me = ctx.rank;
  const uint64_t e = op_begin(ctx);
  const int num_recv = *p.num_recv;
  if (num_recv < 0 || !rows_fit(ctx, p.count_matrix, p.rows.capacity, /*by_receiver=*/false)) {
    op_end(ctx, e);
    return;
  }
  if (threadIdx.x == 0) {
    recv_base[0] = 0;
    for (int s = 0; s < R; ++s) {
      recv_base[s + 1] = recv_base[s] + p.count_matrix[s * R + me];
      int sum = 0;
      for (int r = 0; r < me; ++r) sum += p.count_matrix[s * R + r];
      dst_base[s] = sum;
    }
  }
  if (!wait_peers_ready(ctx, e)) return;
  send_rows(p, recv_base, dst_base, num_recv);
  signal_sends_done(ctx, e);
  if (!wait_all_done(ctx, e, Phase::kReduce)) return;
  reduce_tokens(p, recv_base);
  op_end(ctx, e);
}

}  // namespace

void launch_combine(const CombineParams& p, int num_blocks, int num_threads, cudaStream_t stream) {
  combine_kernel<<<num_blocks, num_threads, 0, stream>>>(p);
}

}  // namespace epx::kernels
