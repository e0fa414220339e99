// Low-latency dispatch. Send (one block per token): cast the row to fp8 once (per-128-channel
// scales) and write it once per destination rank into slot (this rank, token) of that rank's
// staging, with the token's top-k as that rank's local expert ids; then publish data = n.
// Receive (blocks per local expert): after every source's data flag, pack the rows of each
// expert in (source, token) order into the fixed per-expert slots, with src_info, the top-k slot,
// layout_range and the column-major scales; then tell every source its staging is consumed.
#include <cub/block/block_scan.cuh>

#include "device/copy.cuh"
#include "device/fp8.cuh"
#include "kernels/launch.cuh"
#include "kernels/ll_common.cuh"

namespace epx::kernels {
namespace {

using namespace epx::device;
constexpr int kThreads = 512;

// A warp casts 128-channel blocks c = warp, warp + warps, ...: 4 channels per lane. All of a
// lane's loads are issued before the first cast (the row is read once, latency-bound otherwise).
constexpr int kCastIters = kMaxLlHidden / 128 / (kThreads / kWarpSize);
__device__ void cast_row_fp8(const LlDispatchParams& p, const uint16_t* row, uint8_t* q, float* scales) {
  const int H = p.c.layout.hidden, num_blocks = H / 128;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  constexpr int warps = kThreads / kWarpSize;
  uint2 raw[kCastIters];
#pragma unroll
  for (int i = 0; i < kCastIters; ++i)
    if (warp + i * warps < num_blocks) raw[i] = reinterpret_cast<const uint2*>(row + (warp + i * warps) * 128)[lane];
#pragma unroll
  for (int i = 0; i < kCastIters; ++i) {
    const int c = warp + i * warps;
    if (c >= num_blocks) continue;
    float v[4] = {__uint_as_float(raw[i].x << 16), __uint_as_float(raw[i].x & 0xffff0000u),
                  __uint_as_float(raw[i].y << 16), __uint_as_float(raw[i].y & 0xffff0000u)};
    float amax = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    const Fp8Scale s = fp8_scale(amax, p.round_scale);
    const uint32_t packed = to_e4m3(v[0] * s.scale) | (to_e4m3(v[1] * s.scale) << 8) |
                            (to_e4m3(v[2] * s.scale) << 16) | (static_cast<uint32_t>(to_e4m3(v[3] * s.scale)) << 24);
    reinterpret_cast<uint32_t*>(q + c * 128)[lane] = packed;
    if (lane == 0) scales[c] = s.scale_inv;
  }
}

// Send half of op n; false (nothing sent) when the wait for the peers' consumption failed. Not
// inlined: inlined into ll_dispatch_fused beside the receive half, ptxas spills.
__device__ __noinline__ bool dispatch_send(const LlDispatchParams& p, uint64_t n) {
  __shared__ __align__(16) uint8_t row_smem[kMaxLlHidden + kMaxLlHidden / 128 * 4];
  __shared__ int local_ids[kMaxPeers][kMaxLlTopk];
  __shared__ int has_rank[kMaxPeers];
  __shared__ int skip_rank[kMaxPeers];  // shrink mode: masked destinations get nothing
  const LlCommon& c = p.c;
  const int R = c.ctx.num_ranks, me = c.ctx.rank, K = c.layout.num_topk, E_loc = c.layout.experts_per_rank;
  const int H = c.layout.hidden;
  if (!ll::wait_consumed(c, c.ws->last_op[c.buffer_idx])) return false;
  if (threadIdx.x < R) skip_rank[threadIdx.x] = c.masked(threadIdx.x);
  __syncthreads();

  const size_t payload_bytes = p.use_fp8 ? H + H / 128 * 4 : static_cast<size_t>(H) * 2;
  for (int t = blockIdx.x; t < p.num_tokens; t += gridDim.x) {
    if (threadIdx.x < R) has_rank[threadIdx.x] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < R * K; i += blockDim.x) {
      const int r = i / K, k = i % K;
      const int64_t e = p.topk_idx[t * p.topk_stride + k];
      if (r == 0 && (e < -1 || e >= static_cast<int64_t>(R) * E_loc))
        record_error(c.ctx, DeviceErrorKind::kInvalidArgument, Phase::kInputCheck, -1, t,
                     static_cast<unsigned long long>(e), static_cast<unsigned long long>(R) * E_loc);
      const bool here = e >= static_cast<int64_t>(r) * E_loc && e < static_cast<int64_t>(r + 1) * E_loc;
      local_ids[r][k] = here ? static_cast<int>(e - static_cast<int64_t>(r) * E_loc) : -1;
      if (here) has_rank[r] = 1;
    }
    const uint16_t* row = p.x + t * p.x_stride;
    if (p.use_fp8) cast_row_fp8(p, row, row_smem, reinterpret_cast<float*>(row_smem + H));
    __syncthreads();
    const void* src = p.use_fp8 ? static_cast<const void*>(row_smem) : static_cast<const void*>(row);
    // Peers first, in an order rotated by the block, so at every moment the grid's writes spread
    // over every rank's ingress (all blocks starting at rank 0 made it an incast), then this rank.
    for (int i = 0; i < R; ++i) {
      const int r = i + 1 < R ? (me + 1 + (blockIdx.x + i) % (R - 1)) % R : me;
      if (skip_rank[r]) continue;
      char* region = c.region(r);
      int* meta = c.layout.dispatch_meta(region, c.buffer_idx, me, t);
      for (int k = threadIdx.x; k < K; k += blockDim.x) meta[k] = local_ids[r][k];
      if (has_rank[r])
        coop_copy(c.layout.dispatch_row(region, c.buffer_idx, me, t), src, payload_bytes, threadIdx.x, blockDim.x);
    }
    __syncthreads();
  }
  ll::finish_send(c, n, p.num_tokens);
  return true;
}

using BlockScan = cub::BlockScan<int, kThreads>;

// Copies staging row (s, t) into packed row `row` of local expert j.
__device__ void copy_row(const LlDispatchParams& p, int j, int s, int t, int k, int row, int lane, int lanes) {
  const LlCommon& c = p.c;
  const LlLayout& L = c.layout;
  const int H = L.hidden, RT = L.num_ranks * L.max_tokens;
  const char* src = c.layout.dispatch_row(c.region(c.ctx.rank), c.buffer_idx, s, t);
  const size_t slot = static_cast<size_t>(j) * RT + row;
  const size_t row_bytes = p.use_fp8 ? H : 2 * static_cast<size_t>(H);
  coop_copy<16>(p.recv_x + slot * row_bytes, src, row_bytes, lane, lanes);
  if (p.use_fp8) {
    const float* scales = reinterpret_cast<const float*>(src + H);
    const int S = H / 128;
    if (p.ue8m0) {
      const int S4 = (S + 3) / 4;
      int* out = static_cast<int*>(p.recv_scales) + static_cast<size_t>(j) * RT * S4;
      for (int i = lane; i < S4; i += lanes) {
        uint32_t packed = 0;
        for (int b = 0; b < 4 && 4 * i + b < S; ++b) packed |= ue8m0_byte(scales[4 * i + b]) << (8 * b);
        out[static_cast<size_t>(i) * RT + row] = static_cast<int>(packed);
      }
    } else {
      float* out = static_cast<float*>(p.recv_scales) + static_cast<size_t>(j) * RT * S;
      for (int i = lane; i < S; i += lanes) out[static_cast<size_t>(i) * RT + row] = scales[i];
    }
  }
  if (lane == 0) {
    p.src_info[slot] = t;
    p.src_topk_slot[slot] = k;
  }
}

// Thread s < R waits for source s's data flag of op n (all sources at once); true for the other
// threads. Not inlined: inlined into ll_dispatch_fused, ptxas spills.
__device__ __noinline__ bool wait_source(const LlDispatchParams& p, uint64_t n) {
  const LlCommon& c = p.c;
  const int s = threadIdx.x;
  if (s >= c.ctx.num_ranks || c.masked(s)) return true;
  const long long t0 = clock64();
  const bool ok = wait_geq(c.ctx, &c.sync(c.ctx.rank)->data[c.buffer_idx][s], n, Phase::kReceive, s, c.mask_of(s)).ok;
  if (ok && p.wait_stats != nullptr && blockIdx.x == 0)
    atomicAdd(reinterpret_cast<unsigned long long*>(&p.wait_stats[s]), clock64() - t0);
  return ok;
}

// Blocks [j * bpe, (j + 1) * bpe) serve local expert j (bpe = blocks_per_expert; the grid loops
// over experts when it has fewer blocks). After every source's data flag, each block scans all
// received tokens in (source, token) order, a pass of blockDim.x tokens at a time, and copies its
// share of each pass's matches: rows of all sources are copied at once, by every warp.
__device__ __forceinline__ void dispatch_recv(const LlDispatchParams& p, uint64_t n) {
  __shared__ BlockScan::TempStorage scan;
  __shared__ int match_t[kThreads], match_k[kThreads], match_s[kThreads];
  __shared__ int token_begin[kMaxPeers + 1];  // first flat index of each source's tokens
  __shared__ int row_begin[kMaxPeers + 1];    // first packed row of each source (of expert j)
  __shared__ int source_masked[kMaxPeers];   // shrink mode: a masked source sent nothing
  const LlCommon& c = p.c;
  const int R = c.ctx.num_ranks, K = c.layout.num_topk, E_loc = c.layout.experts_per_rank;
  LlSync* sync = c.sync(c.ctx.rank);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize, warps = blockDim.x / kWarpSize;
  const int bpe = p.blocks_per_expert, sub = blockIdx.x % bpe, num_groups = gridDim.x / bpe;

  // Thread s waits for source s (all sources at once).
  if (!__syncthreads_and(wait_source(p, n))) return;
  // NOTE: read after every wait of this block: a source masked by a timeout in any block is
  // skipped here too (a block that saw its data just before another block masked it is the one
  // window where two blocks could disagree).
  if (threadIdx.x < R) source_masked[threadIdx.x] = c.masked(threadIdx.x);
  __syncthreads();
  if (threadIdx.x == 0) {
    token_begin[0] = 0;
    for (int s = 0; s < R; ++s)
      token_begin[s + 1] = token_begin[s] + (source_masked[s] ? 0 : sync->num_tokens[c.buffer_idx][s]);
  }
  __syncthreads();
  const int num_flat = token_begin[R];
  char* region = c.region(c.ctx.rank);

  for (int j = blockIdx.x / bpe; j < E_loc; j += num_groups) {
    int running = 0;
    for (int base = 0; base < num_flat; base += blockDim.x) {
      const int f = base + threadIdx.x;
      int k_hit = -1, s = 0, t = 0;
      if (f < num_flat) {
        while (f >= token_begin[s + 1]) ++s;
        t = f - token_begin[s];
        const int* meta = c.layout.dispatch_meta(region, c.buffer_idx, s, t);
        for (int k = 0; k < K; ++k)
          if (meta[k] == j) k_hit = k;
      }
      int pos, total;
      BlockScan(scan).ExclusiveSum(k_hit >= 0 ? 1 : 0, pos, total);
      if (f < num_flat && t == 0) row_begin[s] = running + pos;  // source s starts here
      if (k_hit >= 0) {
        match_t[pos] = t;
        match_k[pos] = k_hit;
        match_s[pos] = s;
      }
      __syncthreads();
      for (int i = sub * warps + warp; i < total; i += warps * bpe)
        copy_row(p, j, match_s[i], match_t[i], match_k[i], running + i, lane, kWarpSize);
      running += total;
      __syncthreads();
    }
    if (sub == 0 && threadIdx.x == 0) {
      row_begin[R] = running;
      for (int s = R - 1; s >= 0; --s)
        if (token_begin[s + 1] == token_begin[s]) row_begin[s] = row_begin[s + 1];  // no tokens from s
      for (int s = 0; s < R; ++s)
        p.layout_range[static_cast<size_t>(j) * R + s] =
            (static_cast<int64_t>(row_begin[s]) << 32) | (row_begin[s + 1] - row_begin[s]);
      p.recv_count[j] = running;
      if (p.cumulative_stats != nullptr) atomicAdd(&p.cumulative_stats[j], running);
    }
    __syncthreads();
  }
  ll::finish_recv(c, n);
}

// Op number n: every block reads the counter before it arrives at the end of the send half, and
// only the last block to arrive advances it, so all blocks see the same n.
__global__ void __launch_bounds__(kThreads, 1) ll_dispatch_send(const __grid_constant__ LlDispatchParams p) {
  dispatch_send(p, p.c.ws->counter + 1);
}
__global__ void __launch_bounds__(kThreads, 1) ll_dispatch_recv(const __grid_constant__ LlDispatchParams p) {
  dispatch_recv(p, p.c.ws->pending[p.c.buffer_idx]);
}
// Non-hook mode: both halves in one launch. Blocks wait in the receive half for the sends of all
// blocks, so the launch is cooperative (all blocks resident at once).
__global__ void __launch_bounds__(kThreads, 1) ll_dispatch_fused(const __grid_constant__ LlDispatchParams p) {
  const uint64_t n = p.c.ws->counter + 1;
  if (dispatch_send(p, n)) dispatch_recv(p, n);
}

}  // namespace

void launch_ll_dispatch_send(const LlDispatchParams& p, int num_blocks, cudaStream_t stream) {
  ll_dispatch_send<<<num_blocks, kThreads, 0, stream>>>(p);
}
void launch_ll_dispatch_recv(const LlDispatchParams& p, int num_blocks, cudaStream_t stream) {
  ll_dispatch_recv<<<num_blocks, kThreads, 0, stream>>>(p);
}
// Cooperative launch: the blocks wait for each other's send halves, so the driver must place them
// all at once (an error, not a hang, when it cannot).
void launch_ll_dispatch_fused(const LlDispatchParams& p, int num_blocks, cudaStream_t stream) {
  launch_cooperative(ll_dispatch_fused, num_blocks, kThreads, stream, p);
}

void load_ll_dispatch_kernels() {
  load_kernel(ll_dispatch_send, "ll_dispatch_send");
  load_kernel(ll_dispatch_recv, "ll_dispatch_recv");
  load_kernel(ll_dispatch_fused, "ll_dispatch_fused");
}

}  // namespace epx::kernels
