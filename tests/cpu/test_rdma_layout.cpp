// CPU tests of the RDMA region's layout (common/rdma_layout.hpp, plan::rdma_layout): regions
// disjoint, aligned and in bounds, signal ids unique and in range, and the minimum size works while
// a byte (or an alignment step) less fails naming the bytes.
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "common/rdma_layout.hpp"
#include "common/scaleout_layout.hpp"
#include "epx/error.hpp"
#include "host/plan.hpp"

namespace {

using epx::plan::RdmaShape;

RdmaShape shape_of(int R, int U, int C, int Q, int S, int64_t hidden_bytes, int K) {
  return RdmaShape{R, U, C, Q, S, hidden_bytes, K};
}

void expect_error(const std::function<void()>& fn, epx::ErrorKind kind, const std::string& text) {
  try {
    fn();
  } catch (const epx::Error& e) {
    EXPECT_EQ(e.kind(), kind) << e.what();
    EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << "no '" << text << "' in: " << e.what();
    return;
  }
  ADD_FAILURE() << "no epx::Error; expected one with " << text;
}

TEST(RdmaLayout, RegionsDisjointAlignedInBounds) {
  for (const auto& s : {shape_of(4, 2, 10, 6, 132, 7168 * 2, 8), shape_of(16, 8, 12, 16, 288, 7168, 8),
                        shape_of(256, 8, 1, 1, 2, 1, 0), shape_of(8, 1, 3, 4, 12, 4096, 32)}) {
    SCOPED_TRACE("R=" + std::to_string(s.num_ranks) + " U=" + std::to_string(s.node_size));
    const size_t bytes = epx::plan::rdma_bytes_for(s);
    const epx::RdmaLayout l = epx::plan::rdma_layout(bytes, s);
    const int N = s.num_ranks / s.node_size;
    EXPECT_EQ(l.num_nodes, N);
    EXPECT_EQ(bytes % epx::kRdmaAlign, 0u);
    EXPECT_EQ(l.num_bytes(), bytes);
    // Message parts inside a slot, ordered, 16-byte aligned, big enough.
    EXPECT_EQ(l.slot_bytes() % 16, 0u);
    EXPECT_GE(l.payload_bytes(), static_cast<size_t>(s.hidden_bytes));
    EXPECT_GE(l.topk_idx_offset() - l.scales_offset(), static_cast<size_t>((s.hidden_bytes + 127) / 128 * 4));
    EXPECT_GE(l.topk_weights_offset() - l.topk_idx_offset(), static_cast<size_t>(4 * s.num_topk));
    EXPECT_GE(l.meta_offset() - l.topk_weights_offset(), static_cast<size_t>(4 * s.num_topk));
    for (size_t off : {l.scales_offset(), l.topk_idx_offset(), l.topk_weights_offset(), l.meta_offset()})
      EXPECT_EQ(off % 16, 0u);
    // Every word and slot as [begin, end): disjoint, in [0, bytes), aligned.
    std::vector<std::pair<size_t, size_t>> spans;
    std::set<int> ids;
    for (int m = 0; m < N; ++m)
      for (int c = 0; c < s.num_channels; ++c) {
        for (int id : {l.tail_signal(m, c), l.head_signal(m, c)}) {
          EXPECT_TRUE(ids.insert(id).second) << "signal id " << id << " twice";
          EXPECT_GE(id, 0);
          EXPECT_LT(id, l.num_signals());
          spans.push_back({l.signal_word(id), l.signal_word(id) + 8});
        }
        spans.push_back({l.sent_word(m, c), l.sent_word(m, c) + 8});
        spans.push_back({l.consumed_word(m, c), l.consumed_word(m, c) + 8});
        for (int i = 0; i < s.ring_slots; ++i) {
          spans.push_back({l.send_slot(m, c, i), l.send_slot(m, c, i) + l.slot_bytes()});
          spans.push_back({l.recv_slot(m, c, i), l.recv_slot(m, c, i) + l.slot_bytes()});
          EXPECT_EQ(l.send_slot(m, c, i + s.ring_slots), l.send_slot(m, c, i)) << "a ring wraps onto itself";
          EXPECT_EQ(l.recv_slot(m, c, i) % 16, 0u);
        }
      }
    EXPECT_EQ(static_cast<int>(ids.size()), l.num_signals());
    for (size_t region : {l.signals(), l.words(), l.send_rings(), l.recv_rings()})
      EXPECT_EQ(region % epx::kRdmaAlign, 0u);
    std::sort(spans.begin(), spans.end());
    for (size_t i = 0; i < spans.size(); ++i) {
      EXPECT_EQ(spans[i].first % 8, 0u);
      EXPECT_LE(spans[i].second, bytes);
      if (i) {
        ASSERT_LE(spans[i - 1].second, spans[i].first) << "overlap at " << spans[i].first;
      }
    }
  }
}

TEST(RdmaLayout, MinimumSizeWorksOneByteOrOneAlignmentStepLessFails) {
  const RdmaShape s = shape_of(16, 8, 10, 6, 126, 14336, 8);
  const size_t bytes = epx::plan::rdma_bytes_for(s);
  EXPECT_NO_THROW(epx::plan::rdma_layout(bytes, s));
  for (size_t less : {bytes - 1, bytes - epx::kRdmaAlign})
    expect_error([&] { epx::plan::rdma_layout(less, s); }, epx::ErrorKind::kBufferTooSmall,
                 "num_rdma_bytes: " + std::to_string(less) + " bytes, the RDMA rings need >= " + std::to_string(bytes));
}

TEST(RdmaLayout, SizeGrowsWithRingsNotBatch) {
  // The region is a function of (nodes, channels, ring, row), nothing else: twice the slots, about
  // twice the bytes; one node has none.
  const size_t one = epx::plan::rdma_bytes_for(shape_of(16, 8, 10, 6, 126, 14336, 8));
  const size_t two = epx::plan::rdma_bytes_for(shape_of(16, 8, 10, 6, 252, 14336, 8));
  EXPECT_GT(two, one);
  EXPECT_LE(two, 2 * one);
  EXPECT_EQ(epx::plan::rdma_bytes_for(shape_of(8, 8, 10, 6, 126, 14336, 8)), 0u);
}

TEST(RdmaLayout, RejectsBadShapes) {
  using K = epx::ErrorKind;
  expect_error([] { epx::plan::rdma_bytes_for(shape_of(12, 5, 1, 1, 2, 16, 1)); }, K::kInvalidArgument, "node_size");
  expect_error([] { epx::plan::rdma_bytes_for(shape_of(16, 16, 1, 1, 2, 16, 1)); }, K::kInvalidArgument, "node_size");
  expect_error([] { epx::plan::rdma_bytes_for(shape_of(264, 8, 1, 1, 2, 16, 1)); }, K::kInvalidArgument, "num_ranks");
  expect_error([] { epx::plan::rdma_bytes_for(shape_of(16, 8, 0, 1, 2, 16, 1)); }, K::kInvalidArgument, "num_channels");
  expect_error([] { epx::plan::rdma_bytes_for(shape_of(16, 8, 1, 6, 6, 16, 1)); }, K::kInvalidArgument,
               "num_max_rdma_chunked_recv_tokens");
  expect_error([] { epx::plan::rdma_bytes_for(shape_of(16, 8, 1, 6, 128, 16, 1)); }, K::kInvalidArgument,
               "num_max_rdma_chunked_recv_tokens");
  expect_error([] { epx::plan::rdma_bytes_for(shape_of(16, 8, 1, 1, 2, 0, 1)); }, K::kInvalidArgument, "hidden_bytes");
  expect_error([] { epx::plan::rdma_bytes_for(shape_of(16, 8, 1, 1, 2, 16, 33)); }, K::kInvalidArgument, "num_topk");
  expect_error([] { epx::plan::rdma_layout(1 << 30, shape_of(8, 8, 1, 1, 2, 16, 1)); }, K::kInvalidArgument,
               "no RDMA region");
}

}  // namespace

// The internode count exchange's region (common/scaleout_layout.hpp, InternodeCountLayout): flags
// after the signals, node rows, send and receive blocks in order, disjoint, 16-byte aligned (puts
// move multiples of 16 bytes), a row holding R counts and R * kMaxLocalExperts expert counts, a
// block the node's count rows and its expert sums for every local rank of the receiving node.
namespace {
TEST(InternodeCountLayout, RegionsDisjointAlignedAndLargeEnough) {
  for (const auto& [R, U] : std::vector<std::pair<int, int>>{{2, 1}, {4, 2}, {16, 8}, {256, 8}, {32, 1}}) {
    SCOPED_TRACE("R=" + std::to_string(R) + " U=" + std::to_string(U));
    epx::InternodeCountLayout l;
    l.num_ranks = R;
    l.node_size = U;
    l.base = 2 << 20;
    const int N = R / U;
    EXPECT_GE(l.flags(), l.signals() + 8 * N);
    EXPECT_GE(l.node_row(0, 0), l.flags() + 8 * U);
    EXPECT_GE(l.row_ints(), static_cast<size_t>(R) + static_cast<size_t>(R) * epx::kMaxLocalExperts);
    EXPECT_GE(l.block_ints(), static_cast<size_t>(U) * (R + epx::kMaxLocalExperts));
    std::vector<std::pair<size_t, size_t>> spans;
    for (int parity = 0; parity < 2; ++parity) {
      for (int u = 0; u < U; ++u) spans.push_back({l.node_row(parity, u), l.node_row(parity, u) + 4 * l.row_ints()});
      for (int m = 0; m < N; ++m) {
        spans.push_back({l.send_block(parity, m), l.send_block(parity, m) + l.block_bytes()});
        spans.push_back({l.recv_block(parity, m), l.recv_block(parity, m) + l.block_bytes()});
      }
    }
    std::sort(spans.begin(), spans.end());
    for (size_t i = 0; i < spans.size(); ++i) {
      EXPECT_EQ(spans[i].first % 16, 0u) << i;
      EXPECT_GE(spans[i].first, l.node_row(0, 0)) << i;
      EXPECT_LE(spans[i].second, l.end()) << i;
      if (i > 0) {
        EXPECT_LE(spans[i - 1].second, spans[i].first) << i;
      }
    }
    EXPECT_EQ(l.block_bytes() % 16, 0u);
    EXPECT_EQ(l.num_bytes(), l.end() - l.base);
  }
}
}  // namespace
