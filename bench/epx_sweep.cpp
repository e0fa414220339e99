// epx_sweep: the developer tool that times the knobs still being measured. It is epx_bench (the
// same common options, workloads, harness, rows and JSON; bench/driver.cpp) plus the knob sweeps
// of the ht workload, each an extra row per --sms after the preset ones:
//   --dispatch-copy-warps K,..  dispatch bf16 fresh/cached and fp8 cached at K copy-out warps
//                               ("dispatch ... copy kK", 0: "copy auto"),
//   --combine-configs SPEC,..   combine at these ring settings ("combine SPEC"; see Options::Sweeps),
//   --ring-sweep                combine at R-1 and 2(R-1) sending warps x ring_chunk 0, 4, 8 (3 ranks up).
// Settings whose rings do not fit the buffer run the row region, and their row says so.
#include <string>

#include "bench_common.hpp"

int main(int argc, char** argv) {
  using namespace epx::bench;
  Driver driver;
  driver.program = "epx_sweep";
  driver.usage = {
      "[--combine-configs w3c8,w6c2,w3c8q256,..]   (also: combine at these ring settings:",
      " w ring_send_warps, c ring_chunk, q ring_slots)",
      "[--dispatch-copy-warps 4,6,..]   (also: dispatch with that many copy-out warps; 0 = the auto count)",
      "[--ring-sweep]   (also: R-1 and 2(R-1) sending warps x ring_chunk 0, 4, 8)",
  };
  driver.about =
      "The rows of epx_bench (same options, same harness), and with --mode ht or all the ht workload's\n"
      "rows at the swept knobs after the preset ones. A developer tool: the presets are epx_bench's.\n";
  driver.parse = [](const std::string& option, const std::function<const char*()>& value, Options& o) {
    Options::Sweeps& s = o.sweeps;
    if (option == "--ring-sweep") s.ring = true;
    else if (option == "--dispatch-copy-warps") s.dispatch_copy_warps = parse_int_list(value());
    else if (option == "--combine-configs") s.combine_configs = split_list(value());
    else return false;
    return true;
  };
  driver.check = [](const Options& o) {
    if (o.sweeps.any() && o.mode != "ht" && o.mode != "all")
      throw UsageError("the sweeps time the ht workload: --mode ht or all, got " + o.mode);
  };
  return run_driver(argc, argv, driver);
}
