// The benchmark's JSON report (`epx_bench --json`): what tools/perf_tables.py turns into the tables
// of docs/performance.md. Strings are escaped (RFC 8259), numbers that are not finite are null.
#pragma once
#include <string>

#include "bench_common.hpp"

namespace epx::bench {

// `s` as a JSON string literal, quotes included: `"` and `\` escaped, control characters as \n,
// \t, ... or \u00XX; other bytes (UTF-8) as they are.
std::string json_string(const std::string& s);
// `v` as a JSON number (up to 9 significant digits), or null when it is NaN or infinite.
std::string json_number(double v);

// The whole report: the run's fields, then one record per row (field meanings: bench_common.hpp's
// Report and Row; `-1` marks a number a row does not have; internode rows, node_size > 0, add
// node_size, rdma_bytes, nvlink_bytes, ib_model_us and rdma_gbps_model).
std::string report_json(const Options& o, const Report& report);

}  // namespace epx::bench
