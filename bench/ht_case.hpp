// What the high-throughput workloads (`ht`, `internode`) share: one shape's inputs, outputs and
// ops on a Buffer, and the one timing harness that turns an op into a row.
#pragma once
#include <cuda_runtime_api.h>

#include <functional>
#include <string>
#include <vector>

#include "baselines.cuh"
#include "bench_common.hpp"

namespace epx::bench {

using Op = std::function<void(cudaStream_t)>;

// One rank's inputs of N tokens x hidden H (bf16 and fp8 rows, per-128 scales, top-k routing of
// make_topk, weights) with their layout, outputs sized for the worst case (N x R rows, as a
// framework's caching allocator would), and the ops of the workload on `buffer`. Holds views of
// its own members: not copyable, not movable.
class HtCase {
 public:
  HtCase(const Options& o, Buffer& buffer, int num_tokens, int hidden, cudaStream_t stream);
  HtCase(const HtCase&) = delete;
  HtCase& operator=(const HtCase&) = delete;

  Op fresh(bool fp8);   // dispatch_notify (host-synced) + dispatch, every output
  Op cached(bool fp8);  // dispatch through the handle of the last fresh one: x (and scales) only
  Op combine();         // combine of the bf16 rows received (after a fresh bf16 dispatch)
  // One fresh bf16 dispatch, host-synced: fills num_recv and counts (the routing is fixed).
  void learn_rows();

  const int N, H, K, E, S, R;
  const std::vector<int64_t> topk;  // [N, K] this rank's routing
  int64_t num_recv = 0;             // rows this rank receives
  std::vector<int> counts;          // [R, R] rows rank s sends to rank r
  const View& is_token_in_rank() const { return in_.is_token_in_rank; }
  const void* x_bf16() const { return dx_.ptr; }

 private:
  DispatchOutputs outputs(bool fp8, int64_t rows, bool meta);
  void set_x(bool fp8);

  Buffer& buffer_;
  cudaStream_t stream_;
  DeviceArray dx_, dx8_, dsc_, dtopk_, dw_, per_rank_, per_expert_, in_rank_, recv_per_expert_;
  DeviceArray rx_, rsc_, ridx_, rw_, rsrc_, cx_, cw_;
  DispatchInputs in_;
  DispatchHandle handle_;
};

// A simulated rank's grids must fit its SM share so that all ranks' grids are resident: every
// --sms is checked against it (Error naming the value and the share).
inline void require_sms_fit_share(const Options& o, const Communicator& comm) {
  for (int sms : o.sms)
    EPX_ARG_CHECK(!comm.simulated() || sms <= comm.num_device_sms(), "--sms ", sms,
                  " exceeds a simulated rank's share of ", comm.num_device_sms(), " SMs");
}

// The timing harness of the high-throughput workloads on one rank: its stream, the L2 flusher and
// the ranks' host barrier; time_op (events, L2 flushed, a host barrier before each iteration) and
// host_time_op of the same op. Checks every --sms against a simulated rank's share.
struct Harness {
  Harness(const Options& o, Communicator& comm);
  // A row named `op_name` with the op's times (median, min, max) and host µs per call; the buffer
  // synchronized after (an error of the op raises here).
  Row time(const std::string& op_name, int sms, int tokens, int hidden, const Op& op, Buffer& buffer);

  const Options& o;
  const Stream owned_stream;  // (declared before the members made from it)
  const cudaStream_t stream = owned_stream.stream;
  L2Flusher flusher{stream};
  const std::function<void()> barrier;
};

}  // namespace epx::bench
