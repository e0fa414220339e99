#include "host/env.hpp"

#include <cstdlib>
#include <string>

#include "epx/error.hpp"
#include "epx/limits.hpp"

namespace epx::env {

static double read_double(const char* name, double fallback, double lo, double hi) {
  const char* s = std::getenv(name);
  if (s == nullptr || *s == '\0') return fallback;
  char* end = nullptr;
  const double v = std::strtod(s, &end);
  EPX_ARG_CHECK(end != s && *end == '\0' && v >= lo && v <= hi, name, ": expected a number in [", lo, ", ", hi,
                "], got '", s, "'");
  return v;
}

double timeout_s() { return read_double("EPX_TIMEOUT_S", 100.0, 0.001, 86400.0); }
int node_size() {
  const double v = read_double("EPX_NODE_SIZE", 0, 1, kMaxRanks);
  EPX_ARG_CHECK(v == static_cast<int>(v), "EPX_NODE_SIZE: expected an integer in [1, ", kMaxRanks, "], got '",
                std::getenv("EPX_NODE_SIZE"), "'");
  return static_cast<int>(v);
}
// An on/off variable: unset or empty is off, 0 / 1 are off / on, anything else is an error.
static bool read_flag(const char* name) {
  const double v = read_double(name, 0, 0, 1);
  EPX_ARG_CHECK(v == 0 || v == 1, name, ": expected 0 or 1, got '", std::getenv(name), "'");
  return v != 0;
}

bool debug() { return read_flag("EPX_DEBUG"); }
bool sim_staged_copies() { return read_flag("EPX_SIM_STAGED_COPIES"); }

}  // namespace epx::env
