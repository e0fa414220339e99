// CPU tests of the scale-out topology (host/topology.hpp, common/topology.hpp): ranks, nodes,
// local indices and rail peers for every split of worlds up to the limits; node-size overrides
// that do not divide the NVLink domain, and worlds or nodes beyond the limits, are errors naming
// the value; EPX_NODE_SIZE is read as the override when the option is 0.
#include <gtest/gtest.h>

#include <cstdlib>
#include <random>
#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "epx/error.hpp"
#include "epx/limits.hpp"
#include "host/env.hpp"
#include "common/scaleout_layout.hpp"
#include "host/topology.hpp"
#include "reference/reference_scaleout.hpp"

namespace epx {
namespace {

template <typename F>
void expect_error(F&& f, ErrorKind kind, const std::vector<std::string>& needles) {
  try {
    f();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), kind) << e.what();
    for (const std::string& needle : needles)
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << "message lacks '" << needle << "': " << e.what();
    return;
  }
  ADD_FAILURE() << "no epx::Error thrown (wanted one naming '" << needles.at(0) << "')";
}

// Every rank of every (world, domain, node size) split: the view and the host struct agree with
// rank = node * U + local, node ranks are the U ranks of this node, rail peers share the local
// index, one per node, and the node's own entry is the rank itself.
TEST(Topology, EverySplitMapsRanksNodesAndRailPeers) {
  int num_checked = 0;
  for (int world : {1, 2, 4, 6, 8, 16, 32, 64, 128, 160, 256}) {
    for (int domain = 1; domain <= world; ++domain) {
      if (world % domain != 0) continue;
      for (int node_size = 0; node_size <= domain; ++node_size) {
        if (node_size > 0 && domain % node_size != 0) continue;
        const int u = node_size > 0 ? node_size : domain;
        if (u > kMaxRanks || world / u > kMaxNodes) continue;  // the limits have their own test
        for (int rank = 0; rank < world; ++rank) {
          const Topology t = Topology::make(world, rank, domain, node_size);
          const TopologyView v = t.view();
          ASSERT_EQ(t.node_size, u);
          ASSERT_EQ(t.virtual_nodes, u < domain);
          ASSERT_EQ(t.num_nodes(), world / u);
          ASSERT_EQ(v.num_nodes(), world / u);
          ASSERT_EQ(t.node_idx() * u + t.local_idx(), rank);
          ASSERT_EQ(v.node_idx(), t.node_idx());
          ASSERT_EQ(v.local_idx(), t.local_idx());
          const std::vector<int> node = t.node_ranks();
          ASSERT_EQ(static_cast<int>(node.size()), u);
          for (int l = 0; l < u; ++l) {
            ASSERT_EQ(node[l], t.node_idx() * u + l);
            ASSERT_TRUE(v.same_node(node[l]));
            ASSERT_EQ(v.local_of(node[l]), l);
          }
          const std::vector<int> rails = t.rail_peers();
          ASSERT_EQ(static_cast<int>(rails.size()), world / u);
          for (int n = 0; n < t.num_nodes(); ++n) {
            ASSERT_EQ(v.node_of(rails[n]), n);
            ASSERT_EQ(v.local_of(rails[n]), t.local_idx());
            ASSERT_EQ(v.same_node(rails[n]), n == t.node_idx());
          }
          ASSERT_EQ(rails[t.node_idx()], rank);
          ++num_checked;
        }
      }
    }
  }
  std::printf("topology: %d (world, domain, node size, rank) cases checked\n", num_checked);
}

// DeepEP's internode sizes: 16..160 ranks in nodes of 8 (2..20 nodes).
TEST(Topology, DeepEpInternodeWorlds) {
  for (int world = 16; world <= 160; world += 8) {
    const Topology t = Topology::make(world, world - 1, 8);
    EXPECT_EQ(t.num_nodes(), world / 8);
    EXPECT_EQ(t.local_idx(), 7);
    EXPECT_EQ(t.rail_peers().front(), 7);
    EXPECT_FALSE(t.virtual_nodes);
  }
}

TEST(Topology, NodeSizeMustDivideTheNvlinkDomain) {
  expect_error([] { Topology::make(8, 0, 8, 3); }, ErrorKind::kInvalidArgument,
               {"node_size", "3", "does not divide the NVLink domain of 8"});
  expect_error([] { Topology::make(8, 0, 4, 8); }, ErrorKind::kInvalidArgument, {"node_size", "8", "domain of 4"});
  expect_error([] { Topology::make(6, 0, 6, 4, "EPX_NODE_SIZE"); }, ErrorKind::kInvalidArgument,
               {"EPX_NODE_SIZE", "4"});
  expect_error([] { Topology::make(8, 0, 8, -2); }, ErrorKind::kInvalidArgument, {"node_size", "-2"});
  expect_error([] { Topology::make(8, 0, 3); }, ErrorKind::kInvalidArgument, {"NVLink domain size", "3"});
  expect_error([] { Topology::make(8, 8, 8); }, ErrorKind::kInvalidArgument, {"rank", "got 8"});
}

TEST(Topology, LimitsOfNodesAndWorld) {
  // A node of more than kMaxRanks: an unsplit SimWorld of 16, or a large NVLink domain.
  expect_error([] { Topology::make(16, 0, 16); }, ErrorKind::kUnsupported,
               {"node of 16 ranks", std::to_string(kMaxRanks) + " ranks per node", "EPX_NODE_SIZE"});
  EXPECT_EQ(Topology::make(16, 0, 16, 8).num_nodes(), 2);
  expect_error([] { Topology::make(2 * kMaxWorldRanks, 0, 8); }, ErrorKind::kUnsupported,
               {std::to_string(2 * kMaxWorldRanks), std::to_string(kMaxWorldRanks) + " ranks"});
  expect_error([] { Topology::make(64, 0, 64, 1); }, ErrorKind::kUnsupported,
               {"64 nodes", std::to_string(kMaxNodes)});
  EXPECT_EQ(Topology::make(kMaxWorldRanks, 0, kMaxRanks).num_nodes(), kMaxNodes);
}

TEST(Topology, EnvNodeSizeIsTheDefaultOverride) {
  const char* source = nullptr;
  unsetenv("EPX_NODE_SIZE");
  EXPECT_EQ(requested_node_size(0, &source), 0);
  setenv("EPX_NODE_SIZE", "2", 1);
  EXPECT_EQ(requested_node_size(0, &source), 2);
  EXPECT_STREQ(source, "EPX_NODE_SIZE");
  EXPECT_EQ(requested_node_size(4, &source), 4);  // the option wins
  EXPECT_STREQ(source, "node_size");
  for (const char* bad : {"0", "abc", "2.5", "9"}) {
    setenv("EPX_NODE_SIZE", bad, 1);
    expect_error([] { env::node_size(); }, ErrorKind::kInvalidArgument, {"EPX_NODE_SIZE"});
  }
  unsetenv("EPX_NODE_SIZE");
}

// num_tokens_per_rdma_rank: a token counts once per node that holds any of its experts.
TEST(ReferenceScaleout, TokensPerRdmaRankCountOncePerNode) {
  // R = 4 in nodes of 2, E = 8 (2 per rank): token 0 -> rank 0 twice (node 0); token 1 -> ranks
  // 1, 2 (nodes 0, 1); token 2 -> nothing; token 3 -> rank 3 (node 1), twice.
  const std::vector<int64_t> topk_idx = {0, 1, 2, 4, -1, -1, 6, 7};
  const ref::Layout layout = ref::get_dispatch_layout(topk_idx, 4, 2, 8, 4);
  EXPECT_EQ(ref::num_tokens_per_rdma_rank(layout, 4, 4, 2), (std::vector<int>{2, 2}));
  EXPECT_EQ(ref::num_tokens_per_rdma_rank(layout, 4, 4, 4), (std::vector<int>{3}));
  EXPECT_EQ(ref::num_tokens_per_rdma_rank(layout, 4, 4, 1), layout.num_tokens_per_rank);
  expect_error([&] { ref::num_tokens_per_rdma_rank(layout, 4, 4, 3); }, ErrorKind::kInvalidArgument, {"node_size", "3"});
  expect_error([&] { ref::num_tokens_per_rdma_rank(layout, 5, 4, 2); }, ErrorKind::kInvalidArgument,
               {"is_token_in_rank"});
}

// Against a direct count from the expert ids, on random routings (seeded, printed).
TEST(ReferenceScaleout, TokensPerRdmaRankMatchesExpertIds) {
  const uint64_t seed = std::random_device{}();
  std::printf("ReferenceScaleout seed %llu\n", static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  for (const auto& [world, node_size] : std::vector<std::pair<int, int>>{{2, 1}, {4, 2}, {8, 2}, {8, 4}, {16, 8}, {64, 8}}) {
    const int num_tokens = 1 + static_cast<int>(rng() % 300), num_topk = 1 + static_cast<int>(rng() % 8);
    const int num_experts = world * (1 + static_cast<int>(rng() % 4));
    std::vector<int64_t> topk_idx(static_cast<size_t>(num_tokens) * num_topk);
    for (int64_t& e : topk_idx) e = rng() % 10 == 0 ? -1 : static_cast<int64_t>(rng() % num_experts);
    const ref::Layout layout = ref::get_dispatch_layout(topk_idx, num_tokens, num_topk, num_experts, world);
    const std::vector<int> got = ref::num_tokens_per_rdma_rank(layout, num_tokens, world, node_size);
    std::vector<int> want(world / node_size, 0);
    const int experts_per_node = num_experts / world * node_size;
    for (int t = 0; t < num_tokens; ++t) {
      std::vector<bool> seen(want.size(), false);
      for (int k = 0; k < num_topk; ++k) {
        const int64_t e = topk_idx[static_cast<size_t>(t) * num_topk + k];
        if (e >= 0 && !seen[e / experts_per_node]) {
          seen[e / experts_per_node] = true;
          ++want[e / experts_per_node];
        }
      }
    }
    EXPECT_EQ(got, want) << "world " << world << " node " << node_size << " seed " << seed;
  }
}

// The count exchange's layout: every region 16-byte aligned, inside [base, end), disjoint from the
// others; signal ids unique and below the node count (GinNet's ids) and kMaxNodes (EmuNet's words).
TEST(ScaleoutCountLayout, RegionsDisjointAlignedAndInBounds) {
  for (const auto& [world, node_size] :
       std::vector<std::pair<int, int>>{{2, 1}, {4, 2}, {8, 4}, {16, 8}, {160, 8}, {256, 8}, {32, 1}}) {
    ScaleoutCountLayout l;
    l.num_ranks = world;
    l.node_size = node_size;
    l.base = 4096;
    std::vector<std::pair<size_t, size_t>> regions = {{l.signals(), 8 * kMaxNodes}, {l.flags(), 8 * kMaxRanks}};
    for (int parity = 0; parity < 2; ++parity) {
      for (int local = 0; local < node_size; ++local) regions.push_back({l.node_row(parity, local), l.row_bytes()});
      for (int node = 0; node < l.num_nodes(); ++node) regions.push_back({l.block(parity, node), l.block_bytes()});
    }
    std::sort(regions.begin(), regions.end());
    for (size_t i = 0; i < regions.size(); ++i) {
      const auto [begin, size] = regions[i];
      EXPECT_EQ(begin % 16, 0u) << "world " << world << " node " << node_size << " region at " << begin;
      EXPECT_GE(begin, l.base);
      EXPECT_LE(begin + size, l.end());
      if (i + 1 < regions.size()) {
        EXPECT_LE(begin + size, regions[i + 1].first) << "world " << world << " overlap at " << begin;
      }
    }
    EXPECT_GE(l.row_bytes(), static_cast<size_t>(world) * 4);
    EXPECT_EQ(l.block_bytes() % 16, 0u);
    for (int node = 0; node < l.num_nodes(); ++node) {
      EXPECT_EQ(l.signal(node), node);
      EXPECT_LT(l.signal(node), kMaxNodes);
    }
    EXPECT_EQ(l.num_bytes(), l.end() - l.base);
  }
}

}  // namespace
}  // namespace epx
