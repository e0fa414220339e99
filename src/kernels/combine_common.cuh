// Pieces of the combine kernel (combine.cu): bf16 helpers, the prologue, and the reduction of one
// token over its contributions in rank order (the reference's order).
#pragma once
#include <cuda_bf16.h>

#include "device/copy.cuh"
#include "device/sync.cuh"
#include "kernels/ht_params.hpp"

namespace epx::kernels {

using namespace epx::device;
constexpr int kSendUnroll = 8;  // row vectors per lane in flight while the row-region combine pushes rows

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
  check_skip_is_recorded(p.ctx, *p.num_recv);
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

// Reduce variants by rank count (kernels are instantiated per bucket, so each gets its registers):
// kR >= num_ranks bounds the rank loop; kU vectors per lane are loaded from every rank before any
// is added, so kR * kU 16-byte loads are in flight per lane (the reduce is latency-bound otherwise).
template <int R_, int U_>
struct RankBucket {
  static constexpr int kR = R_, kU = U_;
};
// The buckets, smallest first: f(RankBucket) for each (loading every instantiation).
template <typename F>
void for_each_rank_bucket(F&& f) {
  f(RankBucket<2, 8>{});
  f(RankBucket<4, 3>{});
  f(RankBucket<kMaxPeers, 1>{});
}
// Launches with the smallest bucket whose kR holds num_ranks.
template <typename Launch>
void by_rank_bucket(int num_ranks, Launch&& launch) {
  bool launched = false;
  for_each_rank_bucket([&](auto b) {
    if (!launched && num_ranks <= decltype(b)::kR) {
      launched = true;
      launch(b);
    }
  });
}

// One warp: combined_x[t] = bf16(sum over ranks r ascending of row(r, t) + bias_0 + bias_1), and
// the top-k weight sums. contribution(r, weights) gives rank r's row of token t (or its top-k
// weights when `weights`), null where r has none; own rows (r == me) are read with .nc loads (the
// caller's x), the others with plain loads (written by peers). The order of the additions of each
// element is the rank order whatever the bucket, so results are bit-identical across variants.
template <int kR, int kU, typename Contribution>
__device__ __forceinline__ void reduce_token_with(const CombineParams& p, int t, int lane, const Contribution& contribution) {
  const int R = p.ctx.num_ranks, me = p.ctx.rank;
  const int num_vec = p.hidden / 8;
  const int4* src[kR];
#pragma unroll
  for (int r = 0; r < kR; ++r) src[r] = r < R ? static_cast<const int4*>(contribution(r, false)) : nullptr;
  const int4* bias0 = p.bias_0 ? reinterpret_cast<const int4*>(p.bias_0 + t * p.bias_0_stride) : nullptr;
  const int4* bias1 = p.bias_1 ? reinterpret_cast<const int4*>(p.bias_1 + t * p.bias_1_stride) : nullptr;
  int4* out = reinterpret_cast<int4*>(p.combined_x + t * p.out_stride);
  for (int v0 = lane; v0 < num_vec; v0 += kU * kWarpSize) {
    int4 val[kU][kR];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int v = v0 + u * kWarpSize;
#pragma unroll
      for (int r = 0; r < kR; ++r)
        if (src[r] != nullptr && v < num_vec) val[u][r] = r == me ? ld_nc_na_v4(src[r] + v) : src[r][v];
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int v = v0 + u * kWarpSize;
      if (v >= num_vec) continue;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll
      for (int r = 0; r < kR; ++r)
        if (src[r] != nullptr) add_bf16x8(acc, val[u][r]);
      if (bias0) add_bf16x8(acc, ld_nc_na_v4(bias0 + v));
      if (bias1) add_bf16x8(acc, ld_nc_na_v4(bias1 + v));
      out[v] = pack_bf16x8(acc);
    }
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
template <int kR, int kU>
__device__ __forceinline__ void reduce_token(const CombineParams& p, int t, const int* recv_base,
                                             const int* send_base, int lane) {
  const int R = p.ctx.num_ranks, me = p.ctx.rank;
  char* base = p.ctx.rows(me);
  reduce_token_with<kR, kU>(p, t, lane, [&](int r, bool weights) -> const void* {
    if (r == me) return own_contribution(p, t, recv_base, weights);
    const int pos = p.send_pos[static_cast<int64_t>(t) * R + r];
    if (pos < 0) return nullptr;
    if (weights) return p.rows.num_topk_weights ? p.rows.topk_weights(base, send_base[r] + pos) : nullptr;
    return p.rows.row(base, send_base[r] + pos);
  });
}

}  // namespace epx::kernels
