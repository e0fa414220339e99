// epx_bench: the benchmark driver (README's main job). Runs the workloads of benchmarks.md on all
// local GPUs (one forked process per GPU) and prints time, logical and NVLink GB/s, % of the raw
// store ceiling and SMs, with the same-run NCCL baseline and ratios. Rank 0 prints and writes JSON.
#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>

#include "bench_common.hpp"
#include "epx/launcher.hpp"

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

void print_rows(const std::vector<Row>& rows) {
  std::printf("%-24s %4s %6s %10s %10s %10s %9s %9s %8s %8s %8s  %s\n", "op", "SMs", "tokens", "median_us", "min_us",
              "max_us", "logical", "nvlink", "%ceil", "vs_nccl", "host_us", "note");
  std::printf("%-24s %4s %6s %10s %10s %10s %9s %9s %8s %8s %8s\n", "", "", "", "", "", "", "GB/s", "GB/s", "", "x", "");
  for (const Row& r : rows) {
    auto opt = [](double v, const char* fmt) {
      static char buf[4][32];
      static int i = 0;
      char* b = buf[i++ % 4];
      if (v < 0) std::snprintf(b, 32, "-"); else std::snprintf(b, 32, fmt, v);
      return b;
    };
    std::printf("%-24s %4d %6d %10.1f %10.1f %10.1f %9.1f %9.1f %8s %8s %8s  %s\n", r.op.c_str(), r.num_sms, r.tokens,
                r.median_us, r.min_us, r.max_us, r.logical_gbps, r.nvlink_gbps, opt(r.pct_ceiling, "%.1f"),
                opt(r.vs_nccl, "%.2f"), opt(r.host_us, "%.1f"), r.note.c_str());
  }
  std::fflush(stdout);
}

void write_json(const std::string& path, const Options& o, int world, const std::string& device,
                const std::vector<Row>& rows) {
  std::ofstream f(path);
  f << "{\n  \"world\": " << world << ", \"device\": \"" << device << "\", \"experts\": " << o.experts
    << ", \"topk\": " << o.topk << ", \"routing\": \"" << o.routing << "\", \"iters\": " << o.iters << ",\n  \"rows\": [\n";
  for (size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    f << "    {\"op\": \"" << r.op << "\", \"sms\": " << r.num_sms << ", \"tokens\": " << r.tokens << ", \"hidden\": "
      << r.hidden << ", \"median_us\": " << r.median_us << ", \"min_us\": " << r.min_us << ", \"max_us\": " << r.max_us
      << ", \"logical_gbps\": " << r.logical_gbps << ", \"nvlink_gbps\": " << r.nvlink_gbps << ", \"pct_ceiling\": "
      << r.pct_ceiling << ", \"vs_nccl\": " << r.vs_nccl << ", \"host_us\": " << r.host_us << ", \"note\": \"" << r.note
      << "\"}" << (i + 1 < rows.size() ? "," : "") << "\n";
  }
  f << "  ]\n}\n";
}

}  // namespace epx::bench

namespace {

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
      "Defaults: the `ht` and `ll` workloads of benchmarks.md on every visible GPU.\n");
}

}  // namespace

int main(int argc, char** argv) {
  using namespace epx::bench;
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) { std::fprintf(stderr, "epx_bench: %s needs a value\n", a.c_str()); std::exit(2); }
      return argv[++i];
    };
    if (a == "--mode") o.mode = next();
    else if (a == "--world") o.world = std::atoi(next());
    else if (a == "--tokens") o.tokens = parse_list(next());
    else if (a == "--hidden") o.hidden = parse_list(next());
    else if (a == "--experts") o.experts = std::atoi(next());
    else if (a == "--topk") o.topk = std::atoi(next());
    else if (a == "--sms") o.sms = parse_list(next());
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
  const int gpus = epx::count_local_gpus();
  if (gpus < 2) {
    std::printf("epx_bench: this machine has %d GPU(s); expert-parallel benchmarks need at least 2. Nothing was run.\n", gpus);
    return 0;
  }
  const int world = o.world > 0 ? o.world : gpus;
  std::printf("epx_bench: %s workload on %d GPUs, experts %d, top-%d, routing %s, median of %d iters (L2 flushed)\n",
              o.mode.c_str(), world, o.experts, o.topk, o.routing.c_str(), o.iters);
  std::fflush(stdout);
  const int failed = epx::launch_local(world, [&](int rank, int w, const ncclUniqueId& id) {
    epx::Communicator comm(id, rank, w, rank);
    std::vector<Row> rows;
    if (o.mode == "ht" || o.mode == "all") {
      auto r = run_ht(o, comm);
      rows.insert(rows.end(), r.begin(), r.end());
    }
    if (o.mode == "ll" || o.mode == "all") {
      auto r = run_ll(o, comm);
      rows.insert(rows.end(), r.begin(), r.end());
    }
    if (rank == 0) {
      cudaDeviceProp prop;
      cudaGetDeviceProperties(&prop, 0);
      std::printf("\nrank 0 of %d, %s\n", w, prop.name);
      print_rows(rows);
      if (!o.json.empty()) write_json(o.json, o, w, prop.name, rows);
    }
    return 0;
  });
  return failed == 0 ? 0 : 1;
}
