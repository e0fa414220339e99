// The `internode` workload (docs/benchmarks.md, "Internode rows"): the high-throughput dispatch
// (bf16, fp8, fresh) and combine across virtual nodes of o.node_size ranks inside this NVLink
// domain, the RDMA leg through the NVLink emulation (EmuNet). Each row carries the bytes this rank
// put across nodes and wrote over NVLink, and the IB time those RDMA bytes would take at
// kIbGbpsPerGpu (internode_model.hpp): the times are functional numbers at NVLink speed, the model
// says what the same bytes cost on a fabric. Simulated ranks run the same on their SM share.
#include <cuda_runtime_api.h>

#include <string>
#include <vector>

#include "bench_common.hpp"
#include "ht_case.hpp"
#include "host/plan.hpp"
#include "internode_model.hpp"

namespace epx::bench {

std::vector<Row> run_internode(const Options& o, Communicator& comm) {
  const int R = comm.world(), me = comm.rank(), U = o.node_size;
  EPX_ARG_CHECK(U >= 1 && R % U == 0 && R / U >= 2, "--node-size: expected a divisor of the ", R,
                " ranks that makes at least 2 nodes, got ", U);
  std::vector<Row> rows;
  Harness harness(o, comm);
  const cudaStream_t stream = harness.stream;
  auto gbps = [](double bytes, double us) { return us > 0 ? bytes / us / 1e3 : 0; };
  const std::string where = std::to_string(R / U) + " virtual nodes x " + std::to_string(U) +
                            ": RDMA leg over NVLink (functional); IB modelled at " +
                            std::to_string(static_cast<int>(kIbGbpsPerGpu)) + " GB/s";

  for (int N : o.tokens) {
    for (int H : o.hidden) {
      const int K = o.topk, E = o.experts;
      // Every rank's routing (make_topk is a function of the seed and the rank): a forwarder's
      // combine messages are its rail peers' tokens.
      std::vector<std::vector<int64_t>> routing(R);
      for (int r = 0; r < R; ++r) routing[r] = make_topk(o.seed, r, N, K, E, o.routing);
      const int64_t dispatch_messages = dispatch_rdma_messages(routing[me], K, E, R, U, me);
      const int64_t combine_messages = combine_rdma_messages(routing, K, E, U, me);
      const double row_bf16 = 2.0 * H, row_fp8 = H + 4.0 * ((H + 127) / 128);

      // The RDMA rings' channels are Config.num_sms at construction: one Buffer per SM count.
      for (int sms : o.sms) {
        BufferOptions options;
        options.config.num_sms = sms;
        options.node_size = U;
        options.num_rdma_bytes = plan::rdma_bytes_for(plan::RdmaShape{
            R, U, sms, options.rdma_chunk_tokens, options.rdma_ring_slots, static_cast<int64_t>(row_bf16), K});
        // Across nodes every row is in the row region: the dispatch's received rows (at most N x R),
        // and the combine's rows of the busiest rank, those it sent (at most N x R) and those its
        // rail peers sent its node (at most N x R): room for 2 N x R dispatch rows, which holds as
        // many (smaller) combine rows.
        Buffer buffer(comm, Buffer::get_nvl_buffer_size_hint(2 * static_cast<int64_t>(N) * R, H, DType::kBF16, K, R),
                      options);
        HtCase c(o, buffer, N, H, stream);
        c.learn_rows();
        const int64_t nvlink_rows = nvlink_rows_received(c.counts, R, U, me);

        auto measure = [&](const std::string& name, const Op& op, double row_bytes, int64_t messages,
                           size_t message_bytes) {
          Row r = harness.time(name, sms, N, H, op, buffer);
          r.logical_gbps = gbps(c.num_recv * row_bytes, r.median_us);
          r.nvlink_bytes = nvlink_rows * row_bytes;
          r.nvlink_gbps = gbps(r.nvlink_bytes, r.median_us);
          r.rdma_bytes = static_cast<double>(messages) * message_bytes;
          r.ib_model_us = ib_model_us(r.rdma_bytes);
          r.rdma_gbps_model = modelled_rdma_gbps(r.rdma_bytes, r.median_us);
          r.node_size = U;
          r.note = where;
          rows.push_back(r);
        };
        const size_t bf16_message = rdma_message_bytes(static_cast<int64_t>(row_bf16), K);
        measure("internode dispatch bf16 fresh", c.fresh(false), row_bf16, dispatch_messages, bf16_message);
        measure("internode dispatch fp8 fresh", c.fresh(true), row_fp8, dispatch_messages, rdma_message_bytes(H, K));
        // The combine returns the bf16 rows of a bf16 dispatch: one partial per (token, node) across.
        c.fresh(false)(stream);
        measure("internode combine bf16", c.combine(), row_bf16, combine_messages, bf16_message);
        buffer.synchronize(stream);
      }
    }
  }
  return rows;
}

}  // namespace epx::bench
