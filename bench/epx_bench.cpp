// epx_bench: the benchmark driver (README's main job). Runs the workloads of benchmarks.md on all
// local GPUs (one forked process per GPU) and prints time, logical and NVLink GB/s, % of the raw
// store ceiling and SMs, with the same-run NCCL baseline and ratios. Rank 0 prints and writes JSON.
// With --sim R the same workloads run on one GPU as R rank threads (SimWorld): every row and JSON
// record is labelled simulated, since those timings are not NVLink numbers.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>

#include "bench_common.hpp"
#include "epx/launcher.hpp"
#include "epx/sim_world.hpp"

namespace epx::bench {

std::vector<int64_t> make_topk(uint64_t seed, int rank, int num_tokens, int num_topk, int num_experts,
                               const std::string& routing) {
  std::mt19937_64 rng(seed * 1315423911ull + rank);
  std::vector<int64_t> idx(static_cast<size_t>(num_tokens) * num_topk);
  std::vector<int> pool(num_experts);
  for (int t = 0; t < num_tokens; ++t) {
    for (int e = 0; e < num_experts; ++e) pool[e] = e;
    for (int k = 0; k < num_topk; ++k) {
      // skewed: half the picks come from the first 8 experts (hot experts).
      const int lo = k, hi = routing == "skewed" && (rng() & 1) ? std::max(k + 1, 8) : num_experts;
      const int j = lo + static_cast<int>(rng() % static_cast<uint64_t>(hi - lo));
      std::swap(pool[k], pool[j]);
      idx[static_cast<size_t>(t) * num_topk + k] = pool[k];
    }
  }
  return idx;
}

std::string simulated_banner(int world) {
  return "SIMULATED: " + std::to_string(world) + " ranks as threads on one GPU; timings are not NVLink numbers";
}

// A simulated table starts every row with "sim rN": simulated, the numbers of rank N.
void print_rows(const std::vector<Row>& rows) {
  const bool simulated = std::any_of(rows.begin(), rows.end(), [](const Row& r) { return r.simulated; });
  if (simulated) std::printf("%-6s ", "sim");
  std::printf("%-24s %4s %6s %10s %10s %10s %9s %9s %8s %8s %8s  %s\n", "op", "SMs", "tokens", "median_us", "min_us",
              "max_us", "logical", "nvlink", "%ceil", "vs_nccl", "host_us", "note");
  if (simulated) std::printf("%-6s ", "(rank)");
  std::printf("%-24s %4s %6s %10s %10s %10s %9s %9s %8s %8s %8s\n", "", "", "", "", "", "", "GB/s", "GB/s", "", "x", "");
  for (const Row& r : rows) {
    auto opt = [](double v, const char* fmt) {
      static char buf[4][32];
      static int i = 0;
      char* b = buf[i++ % 4];
      if (v < 0) std::snprintf(b, 32, "-"); else std::snprintf(b, 32, fmt, v);
      return b;
    };
    if (simulated) std::printf("%-6s ", r.simulated ? ("sim r" + std::to_string(r.rank)).c_str() : "");
    std::printf("%-24s %4d %6d %10.1f %10.1f %10.1f %9.1f %9.1f %8s %8s %8s  %s\n", r.op.c_str(), r.num_sms, r.tokens,
                r.median_us, r.min_us, r.max_us, r.logical_gbps, r.nvlink_gbps, opt(r.pct_ceiling, "%.1f"),
                opt(r.vs_nccl, "%.2f"), opt(r.host_us, "%.1f"), r.note.c_str());
  }
  std::fflush(stdout);
}

void write_json(const std::string& path, const Options& o, const Report& report) {
  std::ofstream f(path);
  f << "{\n  \"world\": " << report.world << ", \"device\": \"" << report.device << "\", \"simulated\": "
    << (report.simulated ? "true" : "false") << ", \"sms_per_rank\": " << report.num_sms_per_rank
    << ", \"experts\": " << o.experts << ", \"topk\": " << o.topk << ", \"routing\": \"" << o.routing
    << "\", \"iters\": " << o.iters << ",\n  \"skipped\": [";
  for (size_t i = 0; i < report.skipped.size(); ++i) f << (i ? ", " : "") << "\"" << report.skipped[i] << "\"";
  f << "],\n  \"rows\": [\n";
  const std::vector<Row>& rows = report.rows;
  for (size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    f << "    {\"op\": \"" << r.op << "\", \"sms\": " << r.num_sms << ", \"tokens\": " << r.tokens << ", \"hidden\": "
      << r.hidden << ", \"median_us\": " << r.median_us << ", \"min_us\": " << r.min_us << ", \"max_us\": " << r.max_us
      << ", \"logical_gbps\": " << r.logical_gbps << ", \"nvlink_gbps\": " << r.nvlink_gbps << ", \"pct_ceiling\": "
      << r.pct_ceiling << ", \"vs_nccl\": " << r.vs_nccl << ", \"host_us\": " << r.host_us << ", \"note\": \"" << r.note
      << "\", \"sim\": " << (r.simulated ? "true" : "false");
    if (r.simulated) f << ", \"sim_rank\": " << r.rank;
    f << "}" << (i + 1 < rows.size() ? "," : "") << "\n";
  }
  f << "  ]\n}\n";
}

namespace {

// The numbers of a row, as one rank sends them in the all-gather.
struct RowNumbers {
  double median_us, min_us, max_us, logical_gbps, nvlink_gbps, pct_ceiling, vs_nccl, host_us;
};

// Simulated ranks share one GPU, so their timings differ: each row becomes the numbers of its
// slowest rank (largest median; for the ceiling row, which has no time, the lowest GB/s), as a
// collective ends when its slowest rank does. Collective: the Communicator's host all-gather.
std::vector<Row> slowest_rank_rows(std::vector<Row> rows, Communicator& comm) {
  const int world = comm.world();
  const int num_rows = static_cast<int>(rows.size());
  std::vector<int> all_num_rows(world);
  comm.all_gather(&num_rows, all_num_rows.data(), sizeof(int));
  for (int r = 0; r < world; ++r)
    EPX_CHECK(all_num_rows[r] == num_rows, ErrorKind::kState, "epx_bench: rank ", r, " measured ", all_num_rows[r],
              " rows, rank ", comm.rank(), " ", num_rows);
  if (num_rows == 0) return rows;
  std::vector<RowNumbers> mine(num_rows), all(static_cast<size_t>(num_rows) * world);
  for (int i = 0; i < num_rows; ++i) {
    const Row& r = rows[i];
    mine[i] = {r.median_us, r.min_us, r.max_us, r.logical_gbps, r.nvlink_gbps, r.pct_ceiling, r.vs_nccl, r.host_us};
  }
  comm.all_gather(mine.data(), all.data(), mine.size() * sizeof(RowNumbers));
  for (int i = 0; i < num_rows; ++i) {
    auto of = [&](int r) -> const RowNumbers& { return all[static_cast<size_t>(r) * num_rows + i]; };
    int slowest = 0;
    for (int r = 1; r < world; ++r) {
      const RowNumbers &a = of(r), &b = of(slowest);
      if (a.median_us > b.median_us || (a.median_us == b.median_us && a.nvlink_gbps < b.nvlink_gbps)) slowest = r;
    }
    const RowNumbers& n = of(slowest);
    Row& row = rows[i];
    row.median_us = n.median_us, row.min_us = n.min_us, row.max_us = n.max_us;
    row.logical_gbps = n.logical_gbps, row.nvlink_gbps = n.nvlink_gbps, row.pct_ceiling = n.pct_ceiling;
    row.vs_nccl = n.vs_nccl, row.host_us = n.host_us;
    row.simulated = true;
    row.rank = slowest;
  }
  return rows;
}

}  // namespace

}  // namespace epx::bench

namespace {

using epx::bench::Options;
using epx::bench::Report;
using epx::bench::Row;

std::vector<int> parse_list(const char* s) {
  std::vector<int> v;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) v.push_back(std::atoi(item.c_str()));
  return v;
}

void usage() {
  std::printf(
      "usage: epx_bench [--mode ht|ll|all] [--world N] [--tokens 4096[,..]] [--hidden 7168[,..]]\n"
      "                 [--experts 256] [--topk 8] [--sms 20[,..]] [--routing uniform|skewed]\n"
      "                 [--ll-tokens 128] [--warmup 5] [--iters 30] [--seed 1] [--json out.json]\n"
      "                 [--combine-configs w3c8,s1c0,w3c8q256,..]   (also: combine at these ring settings:\n"
      "                  s ring_senders (sender and receiver blocks), w ring_send_warps (split blocks),\n"
      "                  c ring_chunk, q ring_slots)\n"
      "                 [--dispatch-copy-warps 4,6,..]   (also: dispatch on split blocks with that many copy-out warps; 0 = the auto count)\n"
      "                 [--ring-sweep]   (also: sender and receiver blocks, ring_senders 1 and R-1 x ring_chunk 0, 2, 4;\n"
      "                  split blocks, R-1 and 2(R-1) sending warps x ring_chunk 0, 4, 8)\n"
      "                 [--sim R]   (SIMULATED: R ranks as threads on GPU 0, each on its share of the SMs\n"
      "                  (SMs / R); timings are not NVLink numbers; --sms at most the share, default\n"
      "                  min(20, share); no NCCL baseline)\n"
      "Defaults: the `ht` and `ll` workloads of benchmarks.md on every visible GPU (NVLink numbers need >= 2).\n");
}

// One rank's part of the run: the workloads asked for, in order.
std::vector<Row> run_workloads(const Options& o, epx::Communicator& comm) {
  std::vector<Row> rows;
  if (o.mode == "ht" || o.mode == "all") {
    auto r = epx::bench::run_ht(o, comm);
    rows.insert(rows.end(), r.begin(), r.end());
  }
  if (o.mode == "ll" || o.mode == "all") {
    auto r = epx::bench::run_ll(o, comm);
    rows.insert(rows.end(), r.begin(), r.end());
  }
  return rows;
}

std::string device_name(int device) {
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, device);
  return prop.name;
}

// --sim R: the workloads as R rank threads of this process on GPU 0 (SimWorld). `sms_given`: the
// user chose --sms (else the share decides the default).
int run_simulated(Options o, bool sms_given) {
  using namespace epx::bench;
  if (epx::count_local_gpus() == 0) {
    std::printf("epx_bench: this machine has no GPU; --sim needs one. Nothing was run.\n");
    return 0;
  }
  const int device = 0, world = o.sim;
  const int max_world = epx::SimWorld::max_world(device);
  if (world < 2 || world > max_world) {
    std::fprintf(stderr, "epx_bench: --sim %d: this GPU holds 2 to %d simulated ranks (at least %d SMs each)\n", world,
                 max_world, epx::SimWorld::kMinSmsPerRank);
    return 2;
  }
  int num_device_sms = 0;
  cudaDeviceGetAttribute(&num_device_sms, cudaDevAttrMultiProcessorCount, device);
  const int share = epx::SimWorld::sms_per_rank(world, device);
  if (!sms_given) o.sms = {std::min(o.sms.front(), share)};
  for (int sms : o.sms) {
    if (sms > share) {
      std::fprintf(stderr,
                   "epx_bench: --sms %d exceeds the SM share of a simulated rank: %d (%d SMs / %d ranks); give --sms "
                   "values <= %d\n", sms, share, num_device_sms, world, share);
      return 2;
    }
  }
  Report report;
  report.world = world;
  report.device = device_name(device);
  report.simulated = true;
  report.num_sms_per_rank = share;
  report.skipped = skipped_when_simulated(o);
  std::printf("epx_bench: %s\n", simulated_banner(world).c_str());
  std::printf("epx_bench: %s workload, %d simulated ranks on GPU %d (%s, %d of its %d SMs each), experts %d, top-%d, "
              "routing %s, median of %d iters (L2 flushed)\n", o.mode.c_str(), world, device, report.device.c_str(),
              share, num_device_sms, o.experts, o.topk, o.routing.c_str(), o.iters);
  for (const std::string& s : report.skipped) std::printf("epx_bench: skipped: %s\n", s.c_str());
  std::fflush(stdout);
  const int failed = epx::launch_sim(world, [&](int rank, int, epx::Communicator& comm) {
    // Every rank gathers (collective); rank 0 prints.
    std::vector<Row> rows = slowest_rank_rows(run_workloads(o, comm), comm);
    if (rank == 0) {
      report.rows = std::move(rows);
      std::printf("\n%s\n", simulated_banner(world).c_str());
      std::printf("%d ranks on one %s, %d SMs each; each row is its slowest rank's numbers (sim rN: rank N)\n", world,
                  report.device.c_str(), share);
      print_rows(report.rows);
      for (const std::string& s : report.skipped) std::printf("skipped: %s\n", s.c_str());
      if (!o.json.empty()) write_json(o.json, o, report);
    }
    return 0;
  }, device);
  return failed == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace epx::bench;
  Options o;
  bool sms_given = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) { std::fprintf(stderr, "epx_bench: %s needs a value\n", a.c_str()); std::exit(2); }
      return argv[++i];
    };
    if (a == "--mode") o.mode = next();
    else if (a == "--world") o.world = std::atoi(next());
    else if (a == "--sim") o.sim = std::atoi(next());
    else if (a == "--tokens") o.tokens = parse_list(next());
    else if (a == "--hidden") o.hidden = parse_list(next());
    else if (a == "--experts") o.experts = std::atoi(next());
    else if (a == "--topk") o.topk = std::atoi(next());
    else if (a == "--sms") o.sms = parse_list(next()), sms_given = true;
    else if (a == "--routing") o.routing = next();
    else if (a == "--ll-tokens") o.ll_tokens = std::atoi(next());
    else if (a == "--warmup") o.warmup = std::atoi(next());
    else if (a == "--iters") o.iters = std::atoi(next());
    else if (a == "--seed") o.seed = std::strtoull(next(), nullptr, 10);
    else if (a == "--json") o.json = next();
    else if (a == "--ring-sweep") o.ring_sweep = true;
    else if (a == "--dispatch-copy-warps") o.dispatch_copy_warps = parse_list(next());
    else if (a == "--combine-configs") {
      std::stringstream ss(next());
      for (std::string item; std::getline(ss, item, ',');) o.combine_configs.push_back(item);
    }
    else if (a == "-h" || a == "--help") { usage(); return 0; }
    else { std::fprintf(stderr, "epx_bench: unknown option %s\n", a.c_str()); usage(); return 2; }
  }
  if (o.sim != 0) {
    if (o.world != 0) {
      std::fprintf(stderr, "epx_bench: --sim R sets the rank count; drop --world %d\n", o.world);
      return 2;
    }
    return run_simulated(o, sms_given);
  }
  const int gpus = epx::count_local_gpus();
  if (gpus == 0) {
    std::printf("epx_bench: this machine has no GPU; expert-parallel benchmarks need at least 2. Nothing was run.\n");
    return 0;
  }
  if (gpus < 2) {
    std::printf(
        "epx_bench: this machine has 1 GPU; NVLink numbers need at least 2 GPUs. Nothing was run.\n"
        "epx_bench: --sim R runs the workloads SIMULATED on this GPU (R ranks as threads, each on SMs / R; timings\n"
        "           are not NVLink numbers), e.g. epx_bench --sim 4\n");
    return 0;
  }
  const int world = o.world > 0 ? o.world : gpus;
  std::printf("epx_bench: %s workload on %d GPUs, experts %d, top-%d, routing %s, median of %d iters (L2 flushed)\n",
              o.mode.c_str(), world, o.experts, o.topk, o.routing.c_str(), o.iters);
  std::fflush(stdout);
  const int failed = epx::launch_local(world, [&](int rank, int w, const ncclUniqueId& id) {
    epx::Communicator comm(id, rank, w, rank);
    std::vector<Row> rows = run_workloads(o, comm);
    if (rank == 0) {
      Report report;
      report.world = w;
      report.device = device_name(0);
      report.num_sms_per_rank = comm.num_device_sms();
      report.rows = std::move(rows);
      std::printf("\nrank 0 of %d, %s\n", w, report.device.c_str());
      print_rows(report.rows);
      if (!o.json.empty()) write_json(o.json, o, report);
    }
    return 0;
  });
  return failed == 0 ? 0 : 1;
}
