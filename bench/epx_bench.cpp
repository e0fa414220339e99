// epx_bench: the benchmark driver (README's main job). Runs the workloads of benchmarks.md
// (--mode ht|ll|all|internode) through the one timing harness and prints and writes (--json) their
// rows (bench/driver.cpp), plus the knob sweeps of the ht workload asked for.
#include <sstream>

#include "bench_common.hpp"

int main(int argc, char** argv) {
  using namespace epx::bench;
  Driver driver;
  driver.program = "epx_bench";
  driver.usage = {
      "[--combine-configs w3c8,w6c2,w3c8q256,..]   (also: combine at these ring settings:",
      " w ring_send_warps, c ring_chunk, q ring_slots)",
      "[--dispatch-copy-warps 4,6,..]   (also: dispatch with that many copy-out warps; 0 = the auto count)",
      "[--ring-sweep]   (also: R-1 and 2(R-1) sending warps x ring_chunk 0, 4, 8)",
  };
  driver.about =
      "Defaults: the `ht` and `ll` workloads of benchmarks.md on every visible GPU (NVLink numbers need >= 2).\n"
      "--mode internode: DeepEP's internode shape across virtual nodes, e.g. --sim 8 --node-size 4 on one GPU.\n";
  driver.parse = [](const std::string& option, const std::function<const char*()>& value, Options& o) {
    Options::Sweeps& s = o.sweeps;
    if (option == "--ring-sweep") s.ring = true;
    else if (option == "--dispatch-copy-warps") s.dispatch_copy_warps = parse_int_list(value());
    else if (option == "--combine-configs") {
      std::stringstream ss(value());
      for (std::string item; std::getline(ss, item, ',');) s.combine_configs.push_back(item);
    }
    else return false;
    return true;
  };
  return run_driver(argc, argv, driver);
}
