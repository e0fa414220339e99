#include "report_json.hpp"

#include <cmath>
#include <cstdio>
#include <sstream>

namespace epx::bench {

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (const char ch : s) {
    const unsigned char c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out += ch;
        }
    }
  }
  return out + "\"";
}

std::string json_number(double v) {
  if (!std::isfinite(v)) return "null";
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.9g", v);
  return buf;
}

std::string report_json(const Options& o, const Report& report) {
  std::ostringstream f;
  auto str = [](const std::string& s) { return json_string(s); };
  auto num = [](double v) { return json_number(v); };
  auto boolean = [](bool b) { return b ? "true" : "false"; };
  f << "{\n  \"commit\": " << str(report.commit) << ", \"date\": " << str(report.date)
    << ", \"device\": " << str(report.device) << ", \"num_gpus\": " << report.num_gpus
    << ", \"world\": " << report.world << ", \"simulated\": " << boolean(report.simulated)
    << ", \"sms_per_rank\": " << report.num_sms_per_rank << ",\n  \"experts\": " << o.experts
    << ", \"topk\": " << o.topk << ", \"routing\": " << str(o.routing) << ", \"warmup\": " << o.warmup
    << ", \"iters\": " << o.iters << ", \"seed\": " << o.seed << ",\n  \"skipped\": [";
  for (size_t i = 0; i < report.skipped.size(); ++i) f << (i ? ", " : "") << str(report.skipped[i]);
  f << "],\n  \"rows\": [\n";
  const std::vector<Row>& rows = report.rows;
  for (size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    f << "    {\"workload\": " << str(r.workload) << ", \"op\": " << str(r.op) << ", \"sms\": " << r.num_sms
      << ", \"tokens\": " << r.tokens << ", \"hidden\": " << r.hidden << ", \"median_us\": " << num(r.median_us)
      << ", \"min_us\": " << num(r.min_us) << ", \"max_us\": " << num(r.max_us)
      << ", \"logical_gbps\": " << num(r.logical_gbps) << ", \"nvlink_gbps\": " << num(r.nvlink_gbps)
      << ", \"pct_ceiling\": " << num(r.pct_ceiling) << ", \"vs_nccl\": " << num(r.vs_nccl)
      << ", \"host_us\": " << num(r.host_us) << ", \"note\": " << str(r.note) << ", \"sim\": " << boolean(r.simulated);
    if (r.simulated) f << ", \"sim_rank\": " << r.rank;
    if (r.node_size > 0)
      f << ", \"node_size\": " << r.node_size << ", \"rdma_bytes\": " << num(r.rdma_bytes)
        << ", \"nvlink_bytes\": " << num(r.nvlink_bytes) << ", \"ib_model_us\": " << num(r.ib_model_us)
        << ", \"rdma_gbps_model\": " << num(r.rdma_gbps_model);
    f << "}" << (i + 1 < rows.size() ? "," : "") << "\n";
  }
  f << "  ]\n}\n";
  return f.str();
}

}  // namespace epx::bench
