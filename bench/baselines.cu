// Benchmark helpers: timing, the NCCL all-to-all-v baseline, the raw NVLink store ceiling.
#include "baselines.cuh"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>

#include "epx/error.hpp"

#define BENCH_CUDA(call)                                                                      \
  do {                                                                                        \
    cudaError_t bench_err_ = (call);                                                          \
    if (bench_err_ != cudaSuccess)                                                            \
      EPX_FAIL(::epx::ErrorKind::kCuda, #call, ": ", cudaGetErrorString(bench_err_));         \
  } while (0)

#define BENCH_NCCL(call)                                                                      \
  do {                                                                                        \
    ncclResult_t bench_res_ = (call);                                                         \
    if (bench_res_ != ncclSuccess)                                                            \
      EPX_FAIL(::epx::ErrorKind::kNccl, #call, ": ", ncclGetErrorString(bench_res_));         \
  } while (0)

namespace epx::bench {

// ================================================================================================
// Timing
// ================================================================================================

Timing summarize(std::vector<double> v) {
  Timing t;
  t.iters = static_cast<int>(v.size());
  if (v.empty()) return t;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  t.median_us = (n % 2) ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
  t.min_us = v.front();
  t.max_us = v.back();
  return t;
}

L2Flusher::L2Flusher(cudaStream_t stream) : stream_(stream) {
  int dev = 0, l2 = 0;
  BENCH_CUDA(cudaGetDevice(&dev));
  BENCH_CUDA(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));
  bytes_ = 2 * static_cast<size_t>(std::max(l2, 1 << 20));
  BENCH_CUDA(cudaMallocAsync(&buf_, bytes_, stream_));
}

L2Flusher::~L2Flusher() {
  if (buf_) cudaFreeAsync(buf_, stream_);
}

void L2Flusher::flush(cudaStream_t stream) {
  BENCH_CUDA(cudaMemsetAsync(buf_, 0, bytes_, stream));
}

namespace {
struct EventPair {
  cudaEvent_t start = nullptr, stop = nullptr;
  EventPair() {
    BENCH_CUDA(cudaEventCreate(&start));
    BENCH_CUDA(cudaEventCreate(&stop));
  }
  ~EventPair() {
    if (start) cudaEventDestroy(start);
    if (stop) cudaEventDestroy(stop);
  }
  EventPair(const EventPair&) = delete;
  EventPair& operator=(const EventPair&) = delete;
};
}  // namespace

Timing time_op(const std::function<void(cudaStream_t)>& op, cudaStream_t stream, int warmup,
               int iters, L2Flusher& flusher, const std::function<void()>& between) {
  EPX_ARG_CHECK(iters > 0, "time_op: iters must be > 0, got ", iters);
  EPX_ARG_CHECK(warmup >= 0, "time_op: warmup must be >= 0, got ", warmup);
  for (int i = 0; i < warmup; ++i) op(stream);
  BENCH_CUDA(cudaStreamSynchronize(stream));

  EventPair ev;
  std::vector<double> samples;
  samples.reserve(iters);
  for (int i = 0; i < iters; ++i) {
    if (between) between();
    flusher.flush(stream);
    BENCH_CUDA(cudaEventRecord(ev.start, stream));
    op(stream);
    BENCH_CUDA(cudaEventRecord(ev.stop, stream));
    BENCH_CUDA(cudaEventSynchronize(ev.stop));
    float ms = 0.f;
    BENCH_CUDA(cudaEventElapsedTime(&ms, ev.start, ev.stop));
    samples.push_back(1000.0 * ms);
  }
  return summarize(std::move(samples));
}

std::pair<Timing, Timing> time_two_halves(const std::function<void(cudaStream_t)>& first,
                                          const std::function<void(cudaStream_t)>& second, cudaStream_t stream,
                                          int warmup, int iters, L2Flusher& flusher,
                                          const std::function<void()>& between) {
  EPX_ARG_CHECK(iters > 0, "time_two_halves: iters must be > 0, got ", iters);
  EPX_ARG_CHECK(warmup >= 0, "time_two_halves: warmup must be >= 0, got ", warmup);
  for (int i = 0; i < warmup; ++i) {
    first(stream);
    second(stream);
  }
  BENCH_CUDA(cudaStreamSynchronize(stream));
  EventPair a, b;  // a.start | first | a.stop | second | b.stop
  std::vector<double> first_us, second_us;
  for (int i = 0; i < iters; ++i) {
    if (between) between();
    flusher.flush(stream);
    BENCH_CUDA(cudaEventRecord(a.start, stream));
    first(stream);
    BENCH_CUDA(cudaEventRecord(a.stop, stream));
    second(stream);
    BENCH_CUDA(cudaEventRecord(b.stop, stream));
    BENCH_CUDA(cudaEventSynchronize(b.stop));
    float ms1 = 0.f, ms2 = 0.f;
    BENCH_CUDA(cudaEventElapsedTime(&ms1, a.start, a.stop));
    BENCH_CUDA(cudaEventElapsedTime(&ms2, a.stop, b.stop));
    first_us.push_back(1000.0 * ms1);
    second_us.push_back(1000.0 * ms2);
  }
  return {summarize(std::move(first_us)), summarize(std::move(second_us))};
}

Timing graph_time_op(const std::function<void(cudaStream_t)>& op, cudaStream_t stream, int ops_per_graph,
                     int reps, L2Flusher& flusher, const std::function<void()>& between) {
  EPX_ARG_CHECK(ops_per_graph > 0 && reps > 0, "graph_time_op: ops_per_graph and reps must be > 0");
  auto build = [&](bool with_op) {
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    BENCH_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    for (int i = 0; i < ops_per_graph; ++i) {
      flusher.flush(stream);
      if (with_op) op(stream);
    }
    BENCH_CUDA(cudaStreamEndCapture(stream, &graph));
    BENCH_CUDA(cudaGraphInstantiate(&exec, graph, 0));
    BENCH_CUDA(cudaGraphDestroy(graph));
    return exec;
  };
  EventPair ev;
  auto replay = [&](cudaGraphExec_t exec) {
    std::vector<double> us;
    for (int i = 0; i <= reps; ++i) {  // the first replay warms up
      if (between) between();
      BENCH_CUDA(cudaEventRecord(ev.start, stream));
      BENCH_CUDA(cudaGraphLaunch(exec, stream));
      BENCH_CUDA(cudaEventRecord(ev.stop, stream));
      BENCH_CUDA(cudaEventSynchronize(ev.stop));
      float ms = 0.f;
      BENCH_CUDA(cudaEventElapsedTime(&ms, ev.start, ev.stop));
      if (i > 0) us.push_back(1000.0 * ms);
    }
    return us;
  };
  cudaGraphExec_t with = build(true), flush_only = build(false);
  const std::vector<double> op_us = replay(with);
  const double flush_us = summarize(replay(flush_only)).median_us;
  BENCH_CUDA(cudaGraphExecDestroy(with));
  BENCH_CUDA(cudaGraphExecDestroy(flush_only));
  std::vector<double> samples;
  for (double t : op_us) samples.push_back((t - flush_us) / ops_per_graph);
  return summarize(std::move(samples));
}

Timing host_time_op(const std::function<void(cudaStream_t)>& op, cudaStream_t stream, int warmup,
                    int iters, const std::function<void()>& between) {
  EPX_ARG_CHECK(iters > 0, "host_time_op: iters must be > 0, got ", iters);
  EPX_ARG_CHECK(warmup >= 0, "host_time_op: warmup must be >= 0, got ", warmup);
  for (int i = 0; i < warmup; ++i) op(stream);
  BENCH_CUDA(cudaStreamSynchronize(stream));

  std::vector<double> samples;
  samples.reserve(iters);
  for (int i = 0; i < iters; ++i) {
    if (between) between();
    const auto t0 = std::chrono::steady_clock::now();
    op(stream);
    const auto t1 = std::chrono::steady_clock::now();
    samples.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    BENCH_CUDA(cudaStreamSynchronize(stream));
  }
  return summarize(std::move(samples));
}

// ================================================================================================
// NCCL all-to-all-v baseline: kernels
// ================================================================================================

namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kCountThreads = 1024;
constexpr int kPermThreads = 256;  // 8 warps per block, one warp per token
constexpr int kUnroll = 4;         // int4 loads in flight per lane

struct CountParams {
  const bool* in_rank;  // [N, R]
  int* slot;            // [N, R] out: position in rank r's block, or -1
  int* send_counts;     // [R] out
  int num_tokens;
  int world;
};

// One block per destination rank r: an ordered (token-order) compaction of the tokens bound
// for r, giving each its row position inside r's block of the send buffer.
__global__ void __launch_bounds__(kCountThreads)
count_kernel(const __grid_constant__ CountParams p) {
  __shared__ int warp_sums[kCountThreads / 32];
  __shared__ int warp_excl[kCountThreads / 32];
  __shared__ int tile_total;
  const int r = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned lt_mask = (1u << lane) - 1u;
  int running = 0;  // identical in every thread
  for (int base = 0; base < p.num_tokens; base += kCountThreads) {
    const int t = base + threadIdx.x;
    const bool flag = t < p.num_tokens && p.in_rank[static_cast<size_t>(t) * p.world + r];
    const unsigned ballot = __ballot_sync(kFullMask, flag);
    if (lane == 0) warp_sums[warp] = __popc(ballot);
    __syncthreads();
    if (warp == 0) {
      const int v = warp_sums[lane];
      int incl = v;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int u = __shfl_up_sync(kFullMask, incl, o);
        if (lane >= o) incl += u;
      }
      warp_excl[lane] = incl - v;
      if (lane == 31) tile_total = incl;
    }
    __syncthreads();
    if (t < p.num_tokens) {
      p.slot[static_cast<size_t>(t) * p.world + r] =
          flag ? running + warp_excl[warp] + __popc(ballot & lt_mask) : -1;
    }
    running += tile_total;
    __syncthreads();  // before warp_sums / warp_excl / tile_total are rewritten
  }
  if (threadIdx.x == 0) p.send_counts[r] = running;
}

// Lane r (< world) gets the exclusive prefix of send_counts at r (row offset of r's block).
__device__ __forceinline__ int warp_send_offset(const int* send_counts, int world, int lane) {
  const int c = lane < world ? send_counts[lane] : 0;
  int incl = c;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int u = __shfl_up_sync(kFullMask, incl, o);
    if (lane >= o) incl += u;
  }
  return incl - c;
}

struct PermuteParams {
  const int4* x;           // [N, row16]
  int4* send;              // [rows, row16] grouped by destination
  const int* slot;         // [N, R]
  const int* send_counts;  // [R]
  int num_tokens;
  int world;
  int row16;  // int4 per row
};

// One warp per token: each 16-byte chunk of the row is loaded once and stored to every
// destination rank's block.
__global__ void __launch_bounds__(kPermThreads)
permute_kernel(const __grid_constant__ PermuteParams p) {
  const int lane = threadIdx.x & 31;
  const int warp_id = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int num_warps = (gridDim.x * blockDim.x) >> 5;
  const int send_off = warp_send_offset(p.send_counts, p.world, lane);
  for (int t = warp_id; t < p.num_tokens; t += num_warps) {
    const int s = lane < p.world ? p.slot[static_cast<size_t>(t) * p.world + lane] : -1;
    const int dst_row = s >= 0 ? send_off + s : -1;
    const unsigned dst_mask = __ballot_sync(kFullMask, dst_row >= 0);
    const int4* src = p.x + static_cast<size_t>(t) * p.row16;
    for (int base = 0; base < p.row16; base += 32 * kUnroll) {
      int4 v[kUnroll];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const int idx = base + k * 32 + lane;
        if (idx < p.row16) v[k] = __ldg(src + idx);
      }
      for (unsigned m = dst_mask; m; m &= m - 1) {
        const int r = __ffs(m) - 1;
        const int row = __shfl_sync(kFullMask, dst_row, r);
        int4* dst = p.send + static_cast<size_t>(row) * p.row16;
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
          const int idx = base + k * 32 + lane;
          if (idx < p.row16) dst[idx] = v[k];
        }
      }
    }
  }
}

struct UnpermuteParams {
  const int4* ret;         // [rows, row16] bf16 rows returned by combine, grouped by rank
  int4* out;               // [N, row16] bf16
  const int* slot;         // [N, R]
  const int* send_counts;  // [R]
  int num_tokens;
  int world;
  int row16;
};

__device__ __forceinline__ void add_bf16x8(float (&acc)[8], const int4& v) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = __bfloat1622float2(h[j]);
    acc[2 * j] += f.x;
    acc[2 * j + 1] += f.y;
  }
}

// One warp per token: sum (fp32, in rank order) the rows each rank returned for it.
__global__ void __launch_bounds__(kPermThreads)
unpermute_kernel(const __grid_constant__ UnpermuteParams p) {
  const int lane = threadIdx.x & 31;
  const int warp_id = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int num_warps = (gridDim.x * blockDim.x) >> 5;
  const int send_off = warp_send_offset(p.send_counts, p.world, lane);
  for (int t = warp_id; t < p.num_tokens; t += num_warps) {
    const int s = lane < p.world ? p.slot[static_cast<size_t>(t) * p.world + lane] : -1;
    const int src_row = s >= 0 ? send_off + s : -1;
    const unsigned src_mask = __ballot_sync(kFullMask, src_row >= 0);
    int4* out = p.out + static_cast<size_t>(t) * p.row16;
    for (int base = 0; base < p.row16; base += 32 * kUnroll) {
      float acc[kUnroll][8];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[k][j] = 0.f;
      for (unsigned m = src_mask; m; m &= m - 1) {
        const int r = __ffs(m) - 1;
        const int row = __shfl_sync(kFullMask, src_row, r);
        const int4* src = p.ret + static_cast<size_t>(row) * p.row16;
        int4 v[kUnroll];
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
          const int idx = base + k * 32 + lane;
          if (idx < p.row16) v[k] = __ldg(src + idx);
        }
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
          const int idx = base + k * 32 + lane;
          if (idx < p.row16) add_bf16x8(acc[k], v[k]);
        }
      }
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const int idx = base + k * 32 + lane;
        if (idx < p.row16) {
          int4 o;
          __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&o);
#pragma unroll
          for (int j = 0; j < 4; ++j) h[j] = __floats2bfloat162_rn(acc[k][2 * j], acc[k][2 * j + 1]);
          out[idx] = o;
        }
      }
    }
  }
}

int warp_grid(int num_tokens) {
  const int warps_per_block = kPermThreads / 32;
  return (num_tokens + warps_per_block - 1) / warps_per_block;
}

}  // namespace

// ================================================================================================
// NCCL all-to-all-v baseline: host
// ================================================================================================

NcclAllToAll::NcclAllToAll(ncclComm_t comm, int rank, int world, int max_tokens, int hidden,
                           size_t elem_size)
    : comm_(comm), rank_(rank), world_(world), max_tokens_(max_tokens), hidden_(hidden),
      elem_size_(elem_size), row_bytes_(static_cast<size_t>(hidden) * elem_size) {
  EPX_ARG_CHECK(comm != nullptr, "NcclAllToAll: null communicator");
  EPX_ARG_CHECK(world >= 1 && world <= kMaxWorld, "NcclAllToAll: world must be in [1, ", kMaxWorld,
                "], got ", world);
  EPX_ARG_CHECK(rank >= 0 && rank < world, "NcclAllToAll: rank ", rank, " out of [0, ", world, ")");
  EPX_ARG_CHECK(max_tokens >= 0 && hidden > 0 && elem_size > 0,
                "NcclAllToAll: bad shape max_tokens=", max_tokens, " hidden=", hidden,
                " elem_size=", elem_size);
  EPX_ARG_CHECK(row_bytes_ % 16 == 0, "NcclAllToAll: hidden*elem_size (", row_bytes_,
                ") must be a multiple of 16");
  const size_t rows = static_cast<size_t>(std::max(max_tokens, 1)) * world;
  BENCH_CUDA(cudaMalloc(&send_, rows * row_bytes_));
  BENCH_CUDA(cudaMalloc(&recv_, rows * row_bytes_));
  if (elem_size == 2) {
    BENCH_CUDA(cudaMalloc(&out_, static_cast<size_t>(std::max(max_tokens, 1)) * hidden * 2));
  }
  BENCH_CUDA(cudaMalloc(&slot_, static_cast<size_t>(std::max(max_tokens, 1)) * world * sizeof(int)));
  BENCH_CUDA(cudaMalloc(&counts_d_, 2 * world * sizeof(int)));
  BENCH_CUDA(cudaMallocHost(&counts_h_, 2 * world * sizeof(int)));
  BENCH_CUDA(cudaEventCreateWithFlags(&counts_ready_, cudaEventDisableTiming));
  send_counts_h_.assign(world, 0);
  recv_counts_h_.assign(world, 0);
  send_off_h_.assign(world, 0);
  recv_off_h_.assign(world, 0);
}

NcclAllToAll::~NcclAllToAll() {
  if (counts_ready_) cudaEventDestroy(counts_ready_);
  if (counts_h_) cudaFreeHost(counts_h_);
  if (counts_d_) cudaFree(counts_d_);
  if (slot_) cudaFree(slot_);
  if (out_) cudaFree(out_);
  if (recv_) cudaFree(recv_);
  if (send_) cudaFree(send_);
}

void NcclAllToAll::dispatch(const void* x, const bool* is_token_in_rank, int num_tokens,
                            cudaStream_t s) {
  EPX_ARG_CHECK(num_tokens >= 0 && num_tokens <= max_tokens_, "NcclAllToAll::dispatch: num_tokens ",
                num_tokens, " out of [0, ", max_tokens_, "]");
  EPX_ARG_CHECK(num_tokens == 0 || (x != nullptr && is_token_in_rank != nullptr),
                "NcclAllToAll::dispatch: null input");
  EPX_ARG_CHECK(reinterpret_cast<uintptr_t>(x) % 16 == 0,
                "NcclAllToAll::dispatch: x must be 16-byte aligned");
  const int R = world_;
  const int row16 = static_cast<int>(row_bytes_ / 16);

  // (a) per-destination slots and counts on the device.
  CountParams cp{is_token_in_rank, slot_, counts_d_, num_tokens, R};
  count_kernel<<<R, kCountThreads, 0, s>>>(cp);
  BENCH_CUDA(cudaGetLastError());

  // (b) exchange counts (one int per peer), copy both directions to the host.
  BENCH_NCCL(ncclGroupStart());
  for (int r = 0; r < R; ++r) {
    BENCH_NCCL(ncclSend(counts_d_ + r, 1, ncclInt32, r, comm_, s));
    BENCH_NCCL(ncclRecv(counts_d_ + R + r, 1, ncclInt32, r, comm_, s));
  }
  BENCH_NCCL(ncclGroupEnd());
  BENCH_CUDA(cudaMemcpyAsync(counts_h_, counts_d_, 2 * R * sizeof(int), cudaMemcpyDeviceToHost, s));
  BENCH_CUDA(cudaEventRecord(counts_ready_, s));

  // Permute rows by destination; runs on the GPU while the host waits for the counts.
  if (num_tokens > 0) {
    PermuteParams pp{static_cast<const int4*>(x), static_cast<int4*>(send_), slot_, counts_d_,
                     num_tokens, R, row16};
    permute_kernel<<<warp_grid(num_tokens), kPermThreads, 0, s>>>(pp);
    BENCH_CUDA(cudaGetLastError());
  }
  BENCH_CUDA(cudaEventSynchronize(counts_ready_));

  size_t so = 0, ro = 0;
  for (int r = 0; r < R; ++r) {
    send_counts_h_[r] = counts_h_[r];
    recv_counts_h_[r] = counts_h_[R + r];
    send_off_h_[r] = so;
    recv_off_h_[r] = ro;
    so += static_cast<size_t>(send_counts_h_[r]);
    ro += static_cast<size_t>(recv_counts_h_[r]);
  }
  EPX_CHECK(ro <= static_cast<size_t>(max_tokens_) * R, ErrorKind::kBufferTooSmall,
            "NcclAllToAll::dispatch: received ", ro, " rows, capacity ",
            static_cast<size_t>(max_tokens_) * R);
  recv_rows_total_ = static_cast<long long>(ro);
  recv_rows_remote_ = recv_rows_total_ - recv_counts_h_[rank_];

  // (c) all-to-all-v of the rows.
  char* sendb = static_cast<char*>(send_);
  char* recvb = static_cast<char*>(recv_);
  BENCH_NCCL(ncclGroupStart());
  for (int r = 0; r < R; ++r) {
    BENCH_NCCL(ncclSend(sendb + send_off_h_[r] * row_bytes_, send_counts_h_[r] * row_bytes_,
                        ncclUint8, r, comm_, s));
    BENCH_NCCL(ncclRecv(recvb + recv_off_h_[r] * row_bytes_, recv_counts_h_[r] * row_bytes_,
                        ncclUint8, r, comm_, s));
  }
  BENCH_NCCL(ncclGroupEnd());
  num_tokens_ = num_tokens;
  have_dispatch_ = true;
}

void NcclAllToAll::combine(cudaStream_t s) {
  EPX_CHECK(elem_size_ == 2, ErrorKind::kUnsupported,
            "NcclAllToAll::combine: bf16 rows only (elem_size 2), got elem_size ", elem_size_);
  EPX_CHECK(have_dispatch_, ErrorKind::kState, "NcclAllToAll::combine: no dispatch before combine");
  const int R = world_;
  const int row16 = static_cast<int>(row_bytes_ / 16);

  // Return every received row to its source; land them in the send layout of the dispatch.
  char* sendb = static_cast<char*>(send_);
  char* recvb = static_cast<char*>(recv_);
  BENCH_NCCL(ncclGroupStart());
  for (int r = 0; r < R; ++r) {
    BENCH_NCCL(ncclSend(recvb + recv_off_h_[r] * row_bytes_, recv_counts_h_[r] * row_bytes_,
                        ncclUint8, r, comm_, s));
    BENCH_NCCL(ncclRecv(sendb + send_off_h_[r] * row_bytes_, send_counts_h_[r] * row_bytes_,
                        ncclUint8, r, comm_, s));
  }
  BENCH_NCCL(ncclGroupEnd());

  if (num_tokens_ > 0) {
    UnpermuteParams up{static_cast<const int4*>(send_), static_cast<int4*>(out_), slot_, counts_d_,
                       num_tokens_, R, row16};
    unpermute_kernel<<<warp_grid(num_tokens_), kPermThreads, 0, s>>>(up);
    BENCH_CUDA(cudaGetLastError());
  }
}

// ================================================================================================
// Raw NVLink all-to-all store ceiling
// ================================================================================================

namespace {

constexpr int kStoreThreads = 512;
constexpr int kStoreUnroll = 8;

struct StoreParams {
  int4* peer[kCeilingMaxWorld];
  const int4* src;
  unsigned long long n16;  // int4 per peer
  int rank;
  int world;
};

// The flat space [0, (world-1) * n16) is split into one contiguous slice per block; slice j of
// the flat space maps to peer (rank + 1 + j) % world, so every peer is written at once and
// different ranks start on different peers.
__global__ void __launch_bounds__(kStoreThreads)
peer_store_kernel(const __grid_constant__ StoreParams p) {
  const unsigned long long total = static_cast<unsigned long long>(p.world - 1) * p.n16;
  const unsigned long long per = (total + gridDim.x - 1) / gridDim.x;
  unsigned long long cur = per * blockIdx.x;
  const unsigned long long end = min(total, cur + per);
  while (cur < end) {
    const unsigned long long j = cur / p.n16;
    const unsigned long long off = cur - j * p.n16;
    const unsigned long long seg_end = min(end, (j + 1) * p.n16);
    const unsigned long long len = seg_end - cur;
    int peer = p.rank + 1 + static_cast<int>(j);
    if (peer >= p.world) peer -= p.world;
    int4* dst = p.peer[peer] + off;
    const int4* src = p.src + off;
    for (unsigned long long base = threadIdx.x; base < len;
         base += static_cast<unsigned long long>(kStoreThreads) * kStoreUnroll) {
      int4 v[kStoreUnroll];
#pragma unroll
      for (int k = 0; k < kStoreUnroll; ++k) {
        const unsigned long long idx = base + static_cast<unsigned long long>(k) * kStoreThreads;
        if (idx < len) v[k] = __ldg(src + idx);
      }
#pragma unroll
      for (int k = 0; k < kStoreUnroll; ++k) {
        const unsigned long long idx = base + static_cast<unsigned long long>(k) * kStoreThreads;
        if (idx < len) dst[idx] = v[k];
      }
    }
    cur = seg_end;
  }
}

}  // namespace

double raw_store_ceiling_gbps(void* const* peer_ptrs_host, int rank, int world,
                              size_t bytes_per_peer, int num_sms, cudaStream_t s,
                              L2Flusher& flusher, int iters,
                              const std::function<void()>& between) {
  EPX_ARG_CHECK(peer_ptrs_host != nullptr, "raw_store_ceiling_gbps: null peer pointer array");
  EPX_ARG_CHECK(world >= 2 && world <= kCeilingMaxWorld, "raw_store_ceiling_gbps: world must be in [2, ",
                kCeilingMaxWorld, "], got ", world);
  EPX_ARG_CHECK(rank >= 0 && rank < world, "raw_store_ceiling_gbps: rank ", rank, " out of range");
  EPX_ARG_CHECK(bytes_per_peer > 0 && bytes_per_peer % 16 == 0,
                "raw_store_ceiling_gbps: bytes_per_peer must be a positive multiple of 16, got ",
                bytes_per_peer);
  EPX_ARG_CHECK(num_sms > 0, "raw_store_ceiling_gbps: num_sms must be > 0, got ", num_sms);
  EPX_ARG_CHECK(iters > 0, "raw_store_ceiling_gbps: iters must be > 0, got ", iters);

  StoreParams p{};
  for (int r = 0; r < world; ++r) {
    EPX_ARG_CHECK(r == rank || peer_ptrs_host[r] != nullptr, "raw_store_ceiling_gbps: null pointer for peer ", r);
    EPX_ARG_CHECK(reinterpret_cast<uintptr_t>(peer_ptrs_host[r]) % 16 == 0,
                  "raw_store_ceiling_gbps: pointer for peer ", r, " not 16-byte aligned");
    p.peer[r] = static_cast<int4*>(peer_ptrs_host[r]);
  }
  p.n16 = bytes_per_peer / 16;
  p.rank = rank;
  p.world = world;

  void* src = nullptr;
  BENCH_CUDA(cudaMallocAsync(&src, bytes_per_peer, s));
  struct SrcGuard {
    void* ptr;
    cudaStream_t stream;
    ~SrcGuard() { cudaFreeAsync(ptr, stream); }
  } guard{src, s};
  BENCH_CUDA(cudaMemsetAsync(src, 0x5a, bytes_per_peer, s));
  p.src = static_cast<const int4*>(src);

  auto op = [&](cudaStream_t st) {
    peer_store_kernel<<<num_sms, kStoreThreads, 0, st>>>(p);
    BENCH_CUDA(cudaGetLastError());
  };
  const Timing t = time_op(op, s, /*warmup=*/3, iters, flusher, between);
  BENCH_CUDA(cudaStreamSynchronize(s));
  if (t.median_us <= 0) return 0.0;
  return static_cast<double>(world - 1) * static_cast<double>(bytes_per_peer) / (t.median_us * 1e3);
}

}  // namespace epx::bench
