// Pieces of the combine kernel (combine.cu): bf16 helpers, the prologue, and the reduction of one
// token over its contributions in rank order (the reference's order).
#pragma once
#include <cuda_bf16.h>

#include <atomic>

#include "device/copy.cuh"
#include "kernels/ht_params.hpp"

namespace epx::kernels {

using namespace epx::device;
constexpr int kSendUnroll = 8;  // row vectors per lane in flight while pushing rows

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

// recv_base[s]: first received row from source s (recv_base[R] = rows received);
// dst_base[s]: first slot of this rank's rows in source s's row region.
__device__ __forceinline__ void compute_recv_and_dst_base(const CombineParams& p, int* recv_base, int* dst_base) {
  if (threadIdx.x == 0) {
    const int R = p.ctx.num_ranks, me = p.ctx.rank;
    recv_base[0] = 0;
    for (int s = 0; s < R; ++s) {
      recv_base[s + 1] = recv_base[s] + p.count_matrix[s * R + me];
      int sum = 0;
      for (int r = 0; r < me; ++r) sum += p.count_matrix[s * R + r];
      dst_base[s] = sum;
    }
  }
  __syncthreads();
}

// Prologue of both combine kernels: this op's epoch `e`; false (after op_end) when the op is skipped
// on every rank alike (failed count exchange, or rows that do not fit); else the bases are filled
// and every peer is ready (false also when that wait failed).
__device__ __forceinline__ bool combine_begin(const CombineParams& p, uint64_t& e, int* recv_base, int* dst_base) {
  e = op_begin(p.ctx);
  if (*p.num_recv < 0 || !rows_fit(p.ctx, p.count_matrix, p.rows.capacity, /*by_receiver=*/false)) {
    op_end(p.ctx, e);
    return false;
  }
  compute_recv_and_dst_base(p, recv_base, dst_base);
  return wait_peers_ready(p.ctx, e);
}

// First slot of each rank's contributions in this rank's row region (rows it sent to that rank).
__device__ __forceinline__ void compute_send_base(const CombineParams& p, int* send_base) {
  if (threadIdx.x == 0) {
    const int R = p.ctx.num_ranks, me = p.ctx.rank;
    int sum = 0;
    for (int r = 0; r < R; ++r) { send_base[r] = sum; sum += p.count_matrix[me * R + r]; }
  }
  __syncthreads();
}

// Reduce variants by rank count (kernels are instantiated per bucket): kR >= num_ranks bounds the
// unrolled loops over contributions.
template <int R_>
struct RankBucket {
  static constexpr int kR = R_;
};
template <typename Launch>
void by_rank_bucket(int num_ranks, Launch&& launch) {
  if (num_ranks <= 2) launch(RankBucket<2>{});
  else if (num_ranks <= 4) launch(RankBucket<4>{});
  else launch(RankBucket<kMaxPeers>{});
}

// The reduce is latency-bound: each lane keeps kReduceSlots 16-byte loads in flight, staged in its
// own shared-memory slots by cp.async (no registers held while they fly). Dynamic shared memory of
// the combine kernels: kReduceSlots * 16 bytes per thread (one stage area per warp).
constexpr int kReduceSlots = 24;
constexpr int kMaxReduceStages = 12;  // cp_async_wait's range
constexpr size_t reduce_smem_bytes(int num_threads) { return static_cast<size_t>(num_threads) * kReduceSlots * 16; }

// This warp's stage area in the dynamic shared memory.
__device__ __forceinline__ int4* warp_reduce_stage(int4* smem) {
  return smem + static_cast<size_t>(threadIdx.x / kWarpSize) * kReduceSlots * kWarpSize;
}

// One warp: combined_x[t] = bf16(sum over ranks r ascending of row(r, t) + bias_0 + bias_1), and
// the top-k weight sums. contribution(r, weights) gives rank r's row of token t (or its top-k
// weights when `weights`), null where r has none. The n present sources of each vector go to n
// consecutive slots of a stage; min(12, 24 / n) stages cycle, so up to 24 vectors per lane are in
// flight. The order of the additions of each element is the rank order then the biases whatever
// the bucket, so results are bit-identical across variants and with the reference.
template <int kR, typename Contribution>
__device__ __forceinline__ void reduce_token_with(const CombineParams& p, int t, int lane, int4* stage,
                                                  const Contribution& contribution) {
  const int R = p.ctx.num_ranks;
  const int num_vec = p.hidden / 8;
  constexpr int kS = kR + 2;  // ranks, then the two biases
  const int4* src[kS];
  int slot[kS];
  int n = 0;
#pragma unroll
  for (int j = 0; j < kS; ++j) {
    const void* ptr = nullptr;
    if (j < kR) ptr = j < R ? contribution(j, false) : nullptr;
    else if (j == kR) ptr = p.bias_0 ? p.bias_0 + t * p.bias_0_stride : nullptr;
    else ptr = p.bias_1 ? p.bias_1 + t * p.bias_1_stride : nullptr;
    src[j] = static_cast<const int4*>(ptr);
    slot[j] = n;
    n += ptr != nullptr;
  }
  int4* out = reinterpret_cast<int4*>(p.combined_x + t * p.out_stride);
  const int stages = n == 0 ? 1 : min(kMaxReduceStages, kReduceSlots / n);
  auto issue = [&](int s, int v) {
    int4* dst = stage + s * n * kWarpSize + lane;
#pragma unroll
    for (int j = 0; j < kS; ++j)
      if (src[j] != nullptr) cp_async_16(dst + slot[j] * kWarpSize, src[j] + v);
  };
  for (int s = 0; s < stages; ++s) {
    const int v = lane + s * kWarpSize;
    if (v < num_vec) issue(s, v);
    cp_async_commit();
  }
  int s = 0;
  for (int v = lane; v < num_vec; v += kWarpSize) {
    cp_async_wait(stages - 1);  // this vector's group landed
    const int4* got = stage + s * n * kWarpSize + lane;
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll
    for (int j = 0; j < kS; ++j)
      if (src[j] != nullptr) add_bf16x8(acc, got[slot[j] * kWarpSize]);
    out[v] = pack_bf16x8(acc);
    const int next = v + stages * kWarpSize;
    if (next < num_vec) issue(s, next);  // same thread read the slots above: no hazard
    cp_async_commit();
    s = s + 1 == stages ? 0 : s + 1;
  }
  if (p.combined_topk_weights != nullptr) {
    for (int k = lane; k < p.num_topk; k += kWarpSize) {
      float acc = 0.f;
      for (int r = 0; r < R; ++r)
        if (const float* w = static_cast<const float*>(contribution(r, true))) acc += w[k];
      p.combined_topk_weights[t * p.out_weight_stride + k] = acc;
    }
  }
}

// Launch `kernel` (a combine kernel instance) with the reduce's dynamic shared memory; the first
// launch of each instance raises its limit to what 512 threads need. A failure is left as the
// thread's last CUDA error, which the caller's after_launch raises.
template <typename Kernel>
void launch_with_reduce_smem(Kernel kernel, int num_blocks, int num_threads, cudaStream_t stream, const CombineParams& p) {
  static std::atomic<bool> raised{false};
  if (!raised.load(std::memory_order_acquire)) {
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(reduce_smem_bytes(kMaxHtThreads))) != cudaSuccess)
      return;
    raised.store(true, std::memory_order_release);
  }
  kernel<<<num_blocks, num_threads, reduce_smem_bytes(num_threads), stream>>>(p);
}

// Rank me's own contribution of token t: its received row recv_base[me] + pos, read from x.
__device__ __forceinline__ const void* own_contribution(const CombineParams& p, int t, const int* recv_base, bool weights) {
  const int R = p.ctx.num_ranks, me = p.ctx.rank;
  const int pos = p.send_pos[static_cast<int64_t>(t) * R + me];
  if (pos < 0) return nullptr;
  const int64_t row = recv_base[me] + pos;
  if (weights) return p.topk_weights ? p.topk_weights + row * p.weight_stride : nullptr;
  return p.x + row * p.x_stride;
}

// The row-region combine's reduce: rank r's row of token t sits at slot send_base[r] + pos.
template <int kR>
__device__ __forceinline__ void reduce_token(const CombineParams& p, int t, const int* recv_base,
                                             const int* send_base, int lane, int4* stage) {
  const int R = p.ctx.num_ranks, me = p.ctx.rank;
  char* base = p.ctx.rows(me);
  reduce_token_with<kR>(p, t, lane, stage, [&](int r, bool weights) -> const void* {
    if (r == me) return own_contribution(p, t, recv_base, weights);
    const int pos = p.send_pos[static_cast<int64_t>(t) * R + r];
    if (pos < 0) return nullptr;
    if (weights) return p.rows.num_topk_weights ? p.rows.topk_weights(base, send_base[r] + pos) : nullptr;
    return p.rows.row(base, send_base[r] + pos);
  });
}

}  // namespace epx::kernels
