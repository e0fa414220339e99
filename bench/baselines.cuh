// Benchmark helpers: timing utilities, the NCCL all-to-all baseline, and the raw NVLink store
// ceiling. See docs/benchmarks.md (shared) for the metric definitions these serve.
#pragma once
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <cstddef>
#include <functional>
#include <utility>
#include <vector>

namespace epx::bench {

// ------------------------------------------------------------------------------------------------
// Timing
// ------------------------------------------------------------------------------------------------

struct Timing {
  double median_us = 0, min_us = 0, max_us = 0;
  int iters = 0;
};

// Median/min/max of a list of samples (microseconds). Empty input gives all zeros.
Timing summarize(std::vector<double> samples_us);

// Owns a device buffer of 2x the current device's L2 size, allocated and freed in the order of
// `stream` (which must outlive it); flush() overwrites it on the stream given.
class L2Flusher {
 public:
  explicit L2Flusher(cudaStream_t stream);  // uses the current device
  ~L2Flusher();
  L2Flusher(const L2Flusher&) = delete;
  L2Flusher& operator=(const L2Flusher&) = delete;
  void flush(cudaStream_t stream);
  size_t bytes() const { return bytes_; }

 private:
  void* buf_ = nullptr;
  size_t bytes_ = 0;
  cudaStream_t stream_ = nullptr;
};

// `warmup` calls of op(stream), then for each of `iters` timed iterations: between() (if given;
// e.g. a host barrier aligning ranks), flusher.flush(stream), start event, op(stream), stop
// event, synchronize the stop event. Returns event-time statistics in microseconds.
Timing time_op(const std::function<void(cudaStream_t)>& op, cudaStream_t stream, int warmup,
               int iters, L2Flusher& flusher, const std::function<void()>& between = {});

// Like time_op, for an op in two consecutive halves (a hook's send and receive): each iteration
// between(), flush, event, first(stream), event, second(stream), event. Returns the halves' times.
std::pair<Timing, Timing> time_two_halves(const std::function<void(cudaStream_t)>& first,
                                          const std::function<void(cudaStream_t)>& second, cudaStream_t stream,
                                          int warmup, int iters, L2Flusher& flusher,
                                          const std::function<void()>& between = {});

// Kernel time without launch overhead: op(stream) is captured `ops_per_graph` times into one CUDA
// graph, each preceded by an L2 flush; the graph is replayed `reps` times (after between()) and a
// graph of the flushes alone is timed the same way. Sample = (replay - median flush replay) /
// ops_per_graph. op must be capturable (no host sync); ops_per_graph even for ops that alternate
// buffers.
Timing graph_time_op(const std::function<void(cudaStream_t)>& op, cudaStream_t stream, int ops_per_graph,
                     int reps, L2Flusher& flusher, const std::function<void()>& between = {});

// Host CPU microseconds spent inside op(stream) (steady_clock around the call only). After
// each iteration the stream is synchronized outside the measured region. `between` as above.
Timing host_time_op(const std::function<void(cudaStream_t)>& op, cudaStream_t stream, int warmup,
                    int iters, const std::function<void()>& between = {});

// ------------------------------------------------------------------------------------------------
// NCCL all-to-all-v baseline (what a user would write instead of epx)
// ------------------------------------------------------------------------------------------------

class NcclAllToAll {
 public:
  static constexpr int kMaxWorld = 32;

  // Allocates staging buffers for up to max_tokens * world rows of hidden * elem_size bytes.
  // hidden * elem_size must be a multiple of 16. world <= kMaxWorld.
  NcclAllToAll(ncclComm_t comm, int rank, int world, int max_tokens, int hidden, size_t elem_size);
  ~NcclAllToAll();
  NcclAllToAll(const NcclAllToAll&) = delete;
  NcclAllToAll& operator=(const NcclAllToAll&) = delete;

  // x: [num_tokens, hidden] device rows (16-byte aligned); is_token_in_rank: [num_tokens, world]
  // device bools. Permutes rows by destination rank on the device, exchanges per-peer counts
  // (grouped ncclSend/ncclRecv, then copy to host and wait: the host needs the sizes), then
  // exchanges the rows (all-to-all-v). The received layout is (source rank, source token order),
  // like epx's; see recv_buffer(). Collective: every rank must call it.
  void dispatch(const void* x, const bool* is_token_in_rank, int num_tokens, cudaStream_t s);

  // Reverse of the last dispatch: sends every received row (recv_buffer() contents) back to its
  // source, then sums each token's returned rows in fp32 into bf16 combined_output()
  // [num_tokens, hidden]. elem_size == 2 (bf16) only. Collective.
  void combine(cudaStream_t s);

  // Rows received by the last dispatch (= rows sent back by combine).
  int num_recv() const { return static_cast<int>(recv_rows_total_); }
  long long recv_rows_total() const { return recv_rows_total_; }
  // Of those, rows that came from another rank (for NVLink GB/s).
  long long recv_rows_remote() const { return recv_rows_remote_; }
  size_t row_bytes() const { return row_bytes_; }

  // [num_recv(), hidden] received rows, grouped by source rank, in each source's token order.
  const void* recv_buffer() const { return recv_; }
  // [last num_tokens, hidden] bf16 result of combine().
  const void* combined_output() const { return out_; }
  // Per-peer row counts of the last dispatch (host copies).
  const std::vector<int>& send_counts() const { return send_counts_h_; }
  const std::vector<int>& recv_counts() const { return recv_counts_h_; }

 private:
  ncclComm_t comm_;
  int rank_, world_, max_tokens_, hidden_;
  size_t elem_size_, row_bytes_;
  int num_tokens_ = 0;
  bool have_dispatch_ = false;
  void* send_ = nullptr;    // [max_tokens * world] rows, grouped by destination (also combine recv)
  void* recv_ = nullptr;    // [max_tokens * world] rows, grouped by source
  void* out_ = nullptr;     // [max_tokens, hidden] bf16 (combine output), when elem_size == 2
  int* slot_ = nullptr;     // [max_tokens, world] position of token t in the block for rank r, or -1
  int* counts_d_ = nullptr; // [2 * world]: send counts, then recv counts
  int* counts_h_ = nullptr; // pinned host mirror of counts_d_
  cudaEvent_t counts_ready_ = nullptr;
  std::vector<int> send_counts_h_, recv_counts_h_;
  std::vector<size_t> send_off_h_, recv_off_h_;  // row offsets
  long long recv_rows_total_ = 0, recv_rows_remote_ = 0;
};

// ------------------------------------------------------------------------------------------------
// Raw NVLink all-to-all store ceiling
// ------------------------------------------------------------------------------------------------

constexpr int kCeilingMaxWorld = 8;

// A kernel of num_sms blocks x 512 threads streams large contiguous blocks (int4 stores, several
// in flight per thread) from a local source buffer to every peer (self excluded) at once, blocks
// spread evenly over peers. peer_ptrs_host[r] (host array of `world` device pointers, own entry
// included) must each point to >= bytes_per_peer bytes this rank may write (symmetric memory).
// bytes_per_peer % 16 == 0, 2 <= world <= 8. Timed with time_op (3 warm-up runs, `iters` timed,
// `between` before each). Returns GB/s out per GPU = (world-1) * bytes_per_peer / median time.
// Every CUDA call is ordered on `s` (its source buffer too), so it also runs in a SimWorld.
double raw_store_ceiling_gbps(void* const* peer_ptrs_host, int rank, int world,
                              size_t bytes_per_peer, int num_sms, cudaStream_t s,
                              L2Flusher& flusher, int iters,
                              const std::function<void()>& between);

}  // namespace epx::bench
