#include "host/env.hpp"

#include <cstdlib>
#include <string>

#include "epx/error.hpp"

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
bool debug() { return read_double("EPX_DEBUG", 0, 0, 1) != 0; }

}  // namespace epx::env
