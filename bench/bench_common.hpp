// Shared pieces of the benchmark driver: options, workload inputs, result rows and the report.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "epx/buffer.hpp"

namespace epx::bench {

// Owning device allocation of the benchmark (at least 16 bytes, so empty shapes get a pointer).
struct DeviceArray {
  void* ptr = nullptr;
  explicit DeviceArray(size_t bytes);
  ~DeviceArray();
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
};

struct Options {
  std::string mode = "all";  // ht | ll | all
  int world = 0;            // 0 = every visible GPU
  std::vector<int> tokens = {4096};
  std::vector<int> hidden = {7168};
  int experts = 256;
  int topk = 8;
  std::vector<int> sms = {20};
  std::string routing = "uniform";  // uniform | skewed
  int warmup = 5;
  int iters = 30;
  std::string json;  // path of the JSON output (rank 0), empty = none
  uint64_t seed = 1;
  int ll_tokens = 128;
  bool ring_sweep = false;  // also time the ring combine over Config's ring_* knobs
  // Also time combine at these ring settings, each letters and numbers: s ring_senders (sender
  // and receiver blocks), w ring_send_warps (split blocks), c ring_chunk, q ring_slots (e.g.
  // "w3c8q256"); rejected when malformed.
  std::vector<std::string> combine_configs;
  // Also time dispatch on split blocks with these Config.dispatch_copy_warps (0 = the auto count).
  std::vector<int> dispatch_copy_warps;
};

// One measured line of the report.
struct Row {
  std::string op;
  int num_sms = 0;
  int tokens = 0, hidden = 0;
  double median_us = 0, min_us = 0, max_us = 0;
  double logical_gbps = 0, nvlink_gbps = 0;
  double pct_ceiling = -1;  // NVLink GB/s / ceiling, -1 = n/a
  double vs_nccl = -1;      // speed-up over the NCCL baseline of the same op, -1 = n/a
  double host_us = -1;      // CPU time per call, -1 = not measured
  std::string note;
};

// Routing and payloads of the benchmark: uniform (or skewed) distinct top-k experts per token.
std::vector<int64_t> make_topk(uint64_t seed, int rank, int num_tokens, int num_topk, int num_experts,
                               const std::string& routing);

void print_rows(const std::vector<Row>& rows);
void write_json(const std::string& path, const Options& o, int world, const std::string& device,
                const std::vector<Row>& rows);

// Runs the high-throughput workload on this rank; returns its rows (printed by rank 0).
std::vector<Row> run_ht(const Options& o, Communicator& comm);
// Runs the low-latency workload (o.ll_tokens tokens, first hidden size).
std::vector<Row> run_ll(const Options& o, Communicator& comm);

}  // namespace epx::bench
