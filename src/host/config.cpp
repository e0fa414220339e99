#include "epx/config.hpp"

#include <cstdlib>

#include "epx/error.hpp"
#include "epx/limits.hpp"
#include "host/env.hpp"
#include "host/validate.hpp"

namespace epx {

void Config::validate(int num_device_sms) const {
  EPX_ARG_CHECK(num_sms <= kMaxHtBlocks, "Config.num_sms: at most ", kMaxHtBlocks,
                " (each block of dispatch and combine has progress words of its own in every peer's window), got ",
                num_sms);
  validate::in_range(num_sms, "Config.num_sms", 1, num_device_sms > 0 ? num_device_sms : kMaxHtBlocks);
  validate::in_range(num_threads, "Config.num_threads", 64, kMaxHtThreads);
  EPX_ARG_CHECK(num_threads % 32 == 0, "Config.num_threads: must be a multiple of 32, got ", num_threads);
  validate::in_range(ring_slots, "Config.ring_slots", 64, 4096);
  EPX_ARG_CHECK(timeout_s >= 0 && timeout_s <= 86400, "Config.timeout_s: expected [0, 86400] seconds, got ",
                timeout_s);
}

// 20 SMs from 3 ranks: where dispatch and combine come within a few % of their plateau, so more
// SMs buy little (docs/performance.md, "SM defaults").
Config Config::defaults(int num_ranks, int num_device_sms) {
  Config c;
  c.num_sms = num_ranks <= 2 ? 16 : 20;
  if (num_device_sms > 0 && c.num_sms > num_device_sms) c.num_sms = num_device_sms;
  c.num_threads = 512;
  c.timeout_s = 0;
  return c;
}

double effective_timeout_s(const Config& c) {
  return c.timeout_s > 0 ? c.timeout_s : env::timeout_s();
}

}  // namespace epx
