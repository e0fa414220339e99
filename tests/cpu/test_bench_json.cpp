// The benchmark's JSON report (bench/report_json.hpp), which tools/perf_tables.py reads: strings
// escaped, non-finite numbers null, the whole text well formed whatever the notes and op names hold.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>

#include "report_json.hpp"

namespace epx::bench {
namespace {

// Where `text` stops being well-formed JSON at the level the report needs: strings closed (a
// backslash escapes the next character), no raw control character inside one, a closed string
// followed by one of : , } ], brackets balanced outside strings. Returns the offset of the first
// fault, or -1.
long first_fault(const std::string& text) {
  std::string open;  // the brackets still open
  bool in_string = false, after_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (static_cast<unsigned char>(c) < 0x20) return static_cast<long>(i);
      if (c == '\\') ++i;
      else if (c == '"') in_string = false, after_string = true;
      continue;
    }
    if (c == ' ' || c == '\n') continue;
    if (after_string && c != ':' && c != ',' && c != '}' && c != ']') return static_cast<long>(i);
    after_string = false;
    if (c == '"') {
      in_string = true;
    } else if (c == '{' || c == '[') {
      open += c;
    } else if (c == '}' || c == ']') {
      if (open.empty() || open.back() != (c == '}' ? '{' : '[')) return static_cast<long>(i);
      open.pop_back();
    }
  }
  return in_string || !open.empty() ? static_cast<long>(text.size()) : -1;
}

TEST(BenchJson, StringEscapesQuotesBackslashesAndControlCharacters) {
  EXPECT_EQ(json_string("plain"), "\"plain\"");
  EXPECT_EQ(json_string("say \"hi\""), "\"say \\\"hi\\\"\"");
  EXPECT_EQ(json_string("C:\\dir\\"), "\"C:\\\\dir\\\\\"");
  EXPECT_EQ(json_string("a\nb\tc\rd"), "\"a\\nb\\tc\\rd\"");
  EXPECT_EQ(json_string(std::string("\x01\x1f", 2)), "\"\\u0001\\u001f\"");
  EXPECT_EQ(json_string("4\xC3\x97H200, 5 \xC2\xB5s"), "\"4\xC3\x97H200, 5 \xC2\xB5s\"");  // UTF-8 as it is
  EXPECT_EQ(json_string(""), "\"\"");
}

TEST(BenchJson, NumbersAreFiniteOrNull) {
  EXPECT_EQ(json_number(584.1), "584.1");
  EXPECT_EQ(json_number(-1), "-1");
  EXPECT_EQ(json_number(0), "0");
  EXPECT_EQ(json_number(1234.56789012), "1234.56789");  // 9 significant digits
  EXPECT_EQ(json_number(std::numeric_limits<double>::quiet_NaN()), "null");
  EXPECT_EQ(json_number(std::numeric_limits<double>::infinity()), "null");
  EXPECT_EQ(json_number(-std::numeric_limits<double>::infinity()), "null");
}

TEST(BenchJson, ReportStaysWellFormedWhateverTheNotesHold) {
  Options o;
  Report report;
  report.commit = "ee0b767-dirty";
  report.date = "2026-11-28T07:00:00Z";
  report.device = "NVIDIA H200";
  report.num_gpus = 4;
  report.world = 4;
  report.num_sms_per_rank = 132;
  report.skipped = {"nccl \"a2a\": none"};
  Row row{"combine \"w3c8\"", 24, 4096, 7168, 584.1, 580.0, 590.5, 365.2, 273.7, 89.8};
  row.vs_nccl = std::numeric_limits<double>::quiet_NaN();
  row.note = "row region \\ \"these rings\" do not fit\n";
  row.workload = "ht";
  report.rows = {row, row};
  const std::string text = report_json(o, report);
  EXPECT_EQ(first_fault(text), -1) << text;
  EXPECT_NE(text.find("\"op\": \"combine \\\"w3c8\\\"\""), std::string::npos) << text;
  EXPECT_NE(text.find("\"note\": \"row region \\\\ \\\"these rings\\\" do not fit\\n\""), std::string::npos) << text;
  EXPECT_NE(text.find("\"vs_nccl\": null"), std::string::npos) << text;
  EXPECT_NE(text.find("\"skipped\": [\"nccl \\\"a2a\\\": none\"]"), std::string::npos) << text;
  EXPECT_NE(text.find("\"commit\": \"ee0b767-dirty\", \"date\": \"2026-11-28T07:00:00Z\""), std::string::npos) << text;
  EXPECT_NE(text.find("\"workload\": \"ht\""), std::string::npos) << text;
  EXPECT_EQ(text.find("\"sim_rank\""), std::string::npos) << "a real run has no sim_rank: " << text;
  EXPECT_EQ(text.find("\"rdma_bytes\""), std::string::npos) << "an ht row has no internode fields: " << text;
}

TEST(BenchJson, InternodeRowsCarryTheirBytesAndTheModel) {
  Options o;
  Report report;
  report.world = 8;
  report.simulated = true;
  Row row{"internode dispatch bf16 fresh", 16, 4096, 7168, 1500.5, 1400, 1600, 120, 60};
  row.workload = "internode";
  row.simulated = true;
  row.rank = 5;
  row.node_size = 4;
  row.rdma_bytes = 39812345;
  row.nvlink_bytes = 210000000;
  row.ib_model_us = 796.2469;
  row.rdma_gbps_model = 26.5327;
  row.note = "2 virtual nodes x 4: RDMA leg over NVLink (functional)";
  Row unmeasured;
  unmeasured.op = "internode combine bf16";
  unmeasured.workload = "internode";
  unmeasured.node_size = 4;
  unmeasured.note = "no numbers: \"none\"";
  report.rows = {row, unmeasured};
  const std::string text = report_json(o, report);
  EXPECT_EQ(first_fault(text), -1) << text;
  EXPECT_NE(text.find("\"workload\": \"internode\""), std::string::npos) << text;
  EXPECT_NE(text.find("\"sim\": true, \"sim_rank\": 5, \"node_size\": 4, \"rdma_bytes\": 39812345, "
                      "\"nvlink_bytes\": 210000000, \"ib_model_us\": 796.2469, \"rdma_gbps_model\": 26.5327}"),
            std::string::npos) << text;
  EXPECT_NE(text.find("\"node_size\": 4, \"rdma_bytes\": -1, \"nvlink_bytes\": -1, \"ib_model_us\": -1, "
                      "\"rdma_gbps_model\": -1}"),
            std::string::npos) << "an unmeasured row: -1 for each number: " << text;
}

TEST(BenchJson, FaultFinderSeesABrokenReport) {
  // The check above can fail: an unescaped quote or newline inside a string is caught.
  EXPECT_NE(first_fault("{\"note\": \"say \"hi\"\"}"), -1);
  EXPECT_NE(first_fault("{\"note\": \"a\nb\"}"), -1);
  EXPECT_NE(first_fault("{\"rows\": [}"), -1);
  EXPECT_EQ(first_fault("{\"rows\": [{\"note\": \"say \\\"hi\\\"\"}]}"), -1);
}

}  // namespace
}  // namespace epx::bench
