// epx_bench: the benchmark driver (README's main job). Runs the preset workloads of benchmarks.md
// (--mode ht|ll|all|internode) through the one timing harness and prints and writes (--json) their
// rows (bench/driver.cpp). The developer knob sweeps are epx_sweep's: epx_bench refuses them by
// name, so that a preset run is always the same set of rows.
#include <string>

#include "bench_common.hpp"

int main(int argc, char** argv) {
  using namespace epx::bench;
  Driver driver;
  driver.program = "epx_bench";
  driver.about =
      "Defaults: the `ht` and `ll` workloads of benchmarks.md on every visible GPU (NVLink numbers need >= 2).\n"
      "--mode internode: DeepEP's internode shape across virtual nodes, e.g. --sim 8 --node-size 4 on one GPU.\n"
      "The developer knob sweeps are epx_sweep's (epx_sweep --help).\n";
  driver.parse = [](const std::string& option, const std::function<const char*()>&, Options&) {
    for (const char* sweep : kSweepOptions) {
      if (option == sweep)
        throw UsageError(option + " is a knob sweep: epx_sweep has it (epx_sweep --help); epx_bench times the presets");
    }
    return false;
  };
  return run_driver(argc, argv, driver);
}
