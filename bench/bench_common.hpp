// Shared pieces of the benchmark drivers (epx_bench: the presets; epx_sweep: the presets and the
// knob sweeps): options, workload inputs, result rows, the report and the run path (driver.cpp).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "epx/buffer.hpp"

namespace epx::bench {

// The rank's own non-blocking stream, destroyed last (declare it before what allocates on it).
struct Stream {
  cudaStream_t stream = nullptr;
  Stream();
  ~Stream();
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
};

// Owning device allocation of the benchmark (at least 16 bytes, so empty shapes get a pointer),
// allocated and freed in the order of `stream`: no device-wide sync, which in a SimWorld would wait
// for every rank's kernels (sim_world.hpp). `stream` must outlive the array.
// NOTE: destroy it only after the stream's work is done: the memory pool may make another stream
// (another simulated rank's) wait for this free before it reuses the memory, and that wait must
// not be behind a kernel that waits for that rank.
struct DeviceArray {
  void* ptr = nullptr;
  cudaStream_t stream = nullptr;
  DeviceArray(size_t bytes, cudaStream_t stream);
  ~DeviceArray();
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
};

struct Options {
  std::string mode = "all";  // ht | ll | all | internode
  int world = 0;            // 0 = every visible GPU
  int sim = 0;              // > 0: that many simulated ranks as threads on GPU 0 (SimWorld)
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
  // The knob sweeps, epx_sweep's options (empty in epx_bench, which times the presets): the ht
  // workload also times its dispatch and combine at these settings.
  struct Sweeps {
    // --ring-sweep: the ring combine over Tuning's ring knobs (src/host/tuning.hpp).
    bool ring = false;
    // --combine-configs: combine at these ring settings, each letters and numbers: w
    // Tuning.ring_send_warps, c Tuning.ring_chunk, q Config.ring_slots (e.g. "w3c8q256");
    // rejected when malformed.
    std::vector<std::string> combine_configs;
    // --dispatch-copy-warps: dispatch with these Tuning.dispatch_copy_warps (0 = the auto count).
    std::vector<int> dispatch_copy_warps;
    bool any() const { return ring || !combine_configs.empty() || !dispatch_copy_warps.empty(); }
  } sweeps;
  // The high-throughput buffer holds 1/F of the N x R rows a rank may receive (at least the rings'
  // minimum): F > 1 times the bounded dispatch and combine on a batch larger than the buffer.
  int buffer_fraction = 1;
  // The internode workload: ranks per virtual node (it divides the world into nodes inside the one
  // NVLink domain, BufferOptions::node_size).
  int node_size = 4;
  std::string program = "epx_bench";  // the driver that runs: the name its messages start with
};

// The command-line options of Options::Sweeps: epx_sweep's, refused by epx_bench by name.
inline constexpr const char* kSweepOptions[] = {"--combine-configs", "--dispatch-copy-warps", "--ring-sweep"};

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
  // Simulated run (SimWorld): the numbers are those of rank `rank`, the slowest for this row.
  bool simulated = false;
  int rank = 0;
  std::string workload;  // "ht", "ll" or "internode": the workload of benchmarks.md the row belongs to
  // Internode rows (-1 elsewhere, bench/internode_model.hpp): ranks per virtual node; the bytes this
  // rank put across nodes (the RDMA leg's messages) and wrote into other GPUs over NVLink; the IB
  // time of those RDMA bytes at kIbGbpsPerGpu, and the RDMA GB/s were the leg that IB.
  int node_size = 0;
  double rdma_bytes = -1, nvlink_bytes = -1, ib_model_us = -1, rdma_gbps_model = -1;
};

// What a run measured and under which conditions (rank 0 prints and writes it).
struct Report {
  std::string commit;  // the source commit of this build (`git describe --always --dirty`), or "unknown"
  std::string date;    // when the run ended, UTC, ISO 8601
  int num_gpus = 0;    // GPUs visible on the machine (the ranks may use fewer; simulated: all on GPU 0)
  int world = 0;
  std::string device;
  bool simulated = false;
  int num_sms_per_rank = 0;           // simulated: each rank's SM share of the one GPU
  std::vector<std::string> skipped;   // measurements this run cannot make, each with its reason
  std::vector<Row> rows;
};

// Routing and payloads of the benchmark: uniform (or skewed) distinct top-k experts per token.
std::vector<int64_t> make_topk(uint64_t seed, int rank, int num_tokens, int num_topk, int num_experts,
                               const std::string& routing);

// The first line of a simulated run's output, repeated above its table.
std::string simulated_banner(int world);

void print_rows(const std::vector<Row>& rows);
// Fills report.commit and report.date, then writes report_json (report_json.hpp) to `path`;
// false (with a message on stderr) when the file cannot be written.
bool write_json(const std::string& path, const Options& o, Report& report);

// Runs the high-throughput workload on this rank; returns its rows (printed by rank 0). Simulated
// (comm.simulated()): no NCCL all-to-all baseline (no NCCL communicator), every o.sms <= the
// rank's share (comm.num_device_sms()).
std::vector<Row> run_ht(const Options& o, Communicator& comm);
// Runs the internode workload (o.node_size ranks per virtual node; the RDMA leg over NVLink through
// the emulation): the high-throughput ops across nodes, with the bytes and the IB model per row.
std::vector<Row> run_internode(const Options& o, Communicator& comm);
// Runs the low-latency workload (o.ll_tokens tokens, first hidden size); simulated as run_ht.
std::vector<Row> run_ll(const Options& o, Communicator& comm);

// A benchmark driver on the common run path (driver.cpp): the common options (--mode, --sim,
// --sms, --tokens, --json, ...), their checks, the workloads and the report, plus its own options.
// A bad command line: run_driver prints "<program>: <what>" and returns 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Driver {
  std::string program;             // the name in its usage and at the start of its messages
  std::vector<std::string> usage;  // the usage lines of its own options, after the common ones
  std::string about;               // the usage's closing lines: what it runs
  // One of its own options into `o`; `value()` takes the option's argument (throws UsageError
  // when there is none). False: not one of its options ("unknown option", the usage, status 2).
  // A UsageError thrown here ends the run with its message and status 2.
  std::function<bool(const std::string& option, const std::function<const char*()>& value, Options& o)> parse;
  // The options once all are parsed: a UsageError thrown here ends the run as one from `parse`.
  std::function<void(const Options& o)> check;
};
// Parses argv with `driver` and runs the workloads asked for (on the local GPUs, or simulated with
// --sim R); the process's exit status: 0 (also when this machine cannot run them: the output says
// "Nothing was run"), 1 when a rank failed or the JSON could not be written, 2 for a bad command line.
int run_driver(int argc, char** argv, const Driver& driver);
// "a,b,c" as {"a", "b", "c"}; "4,6,8" as {4, 6, 8}.
std::vector<std::string> split_list(const char* s);
std::vector<int> parse_int_list(const char* s);

// Measurements that a simulated run skips, each with its reason (printed and in the JSON).
std::vector<std::string> skipped_when_simulated(const Options& o);

}  // namespace epx::bench
