// The internode workload's byte counts and IB model (bench/internode_model.hpp): by hand on a small
// routing, and on random routings against the CPU reference of the internode dispatch (the tokens
// each rank sends to each node, the tokens each forwarder receives, the rows and their sources).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "common/rdma_layout.hpp"
#include "internode_model.hpp"
#include "reference/reference_internode.hpp"

namespace epx::bench {
namespace {

unsigned test_seed() {
  const char* env = std::getenv("EPX_TEST_SEED");  // reproduces a failing run
  const unsigned seed = env ? static_cast<unsigned>(std::strtoul(env, nullptr, 10)) : std::random_device{}();
  std::printf("EPX_TEST_SEED=%u\n", seed);
  return seed;
}

TEST(BenchInternode, MessageBytesAreTheRingSlot) {
  // DeepEP's internode shape: hidden 7168, top-8. bf16: 14336 payload + 448 scales (the slot keeps
  // them for every row shape) + 32 ids + 32 weights + the source meta.
  const size_t meta = RdmaLayout::kMetaBytes;
  EXPECT_EQ(meta, align_up(4 * (1 + kMaxRanks), 16));
  EXPECT_EQ(rdma_message_bytes(2 * 7168, 8), 14336 + 448 + 32 + 32 + meta);
  EXPECT_EQ(rdma_message_bytes(7168, 8), 7168 + 224 + 32 + 32 + meta);  // fp8
  EXPECT_EQ(rdma_message_bytes(16, 0), 16 + 16 + 0 + 0 + meta);
  RdmaLayout l;
  l.hidden_bytes = 2 * 4096;
  l.num_topk = 6;
  EXPECT_EQ(rdma_message_bytes(2 * 4096, 6), l.slot_bytes());
}

TEST(BenchInternode, CountsByHand) {
  // 4 ranks in 2 nodes of 2, 8 experts (2 per rank, 4 per node).
  const int K = 2, E = 8, R = 4, U = 2;
  const std::vector<int64_t> topk = {0, 1,    // node 0 only
                                     0, 5,    // both nodes
                                     -1, 6,   // node 1 only
                                     -1, -1,  // nowhere
                                     7, 4};   // node 1 only
  EXPECT_EQ(tokens_to_node(topk, K, E, R, U, 0), 2);
  EXPECT_EQ(tokens_to_node(topk, K, E, R, U, 1), 3);
  EXPECT_EQ(dispatch_rdma_messages(topk, K, E, R, U, 0), 3);  // node 0's rank: tokens to node 1
  EXPECT_EQ(dispatch_rdma_messages(topk, K, E, R, U, 3), 2);  // node 1's rank: tokens to node 0
  EXPECT_EQ(dispatch_rdma_messages(topk, K, E, R, 4, 0), 0);  // one node: nothing across
  // Combine: rank 1 = (0, 1) forwards for its rail peer rank 3 = (1, 1) the tokens with an expert on node 0.
  const std::vector<std::vector<int64_t>> routing = {{}, {}, {}, topk};
  EXPECT_EQ(combine_rdma_messages(routing, K, E, U, 1), 2);
  EXPECT_EQ(combine_rdma_messages(routing, K, E, U, 0), 0);  // its rail peer (rank 2) has no tokens
  // Rows to rank 1 = (0, 1): from rank 0 (same node, NVLink), rank 2 (other node, forwarded by
  // rank 0 over NVLink), rank 3 (other node, forwarded by rank 1 itself), rank 1 (itself).
  std::vector<int> counts(R * R, 0);
  counts[0 * R + 1] = 5, counts[2 * R + 1] = 7, counts[3 * R + 1] = 11, counts[1 * R + 1] = 13;
  EXPECT_EQ(nvlink_rows_received(counts, R, U, 1), 12);
  EXPECT_EQ(nvlink_rows_received(counts, R, 1, 1), 0);  // nodes of one rank: every row arrives by RDMA or locally
}

TEST(BenchInternode, IbModel) {
  EXPECT_DOUBLE_EQ(ib_model_us(50e6), 1000.0);  // 50 MB at 50 GB/s
  EXPECT_DOUBLE_EQ(ib_model_us(25e6, 25), 1000.0);
  EXPECT_DOUBLE_EQ(modelled_rdma_gbps(50e6, 400), 50.0);   // faster than the fabric: the line rate
  EXPECT_DOUBLE_EQ(modelled_rdma_gbps(50e6, 2000), 25.0);  // slower: the op's own rate
  EXPECT_DOUBLE_EQ(modelled_rdma_gbps(0, 100), 0.0);
  EXPECT_DOUBLE_EQ(modelled_rdma_gbps(1e6, 0), 50.0);  // no measured time: the fabric's
}

// Random routings at several splits against ref::internode_dispatch's handle.
TEST(BenchInternode, CountsMatchTheInternodeReference) {
  std::mt19937 rng(test_seed());
  const std::vector<std::pair<int, int>> splits = {{2, 1}, {4, 2}, {8, 4}, {8, 2}, {16, 8}, {16, 4}};
  for (const auto& [R, U] : splits) {
    const int K = std::uniform_int_distribution<int>(1, 8)(rng), E = R * 4, C = 3, N = R / U;
    ref::InternodeShape shape;
    shape.node_size = U;
    shape.num_channels = C;
    shape.base.num_ranks = R;
    shape.base.num_experts = E;
    shape.base.num_topk = K;
    shape.base.row_bytes = 16;
    std::vector<ref::RankInput> inputs(R);
    std::vector<std::vector<int64_t>> routing(R);
    for (int r = 0; r < R; ++r) {
      ref::RankInput& in = inputs[r];
      in.num_tokens = std::uniform_int_distribution<int>(0, 50)(rng);
      for (int t = 0; t < in.num_tokens; ++t) {
        std::vector<int> pool(E);
        for (int e = 0; e < E; ++e) pool[e] = e;
        std::shuffle(pool.begin(), pool.end(), rng);
        for (int k = 0; k < K; ++k) in.topk_idx.push_back(rng() % 5 == 0 ? -1 : pool[k]);
      }
      in.x.assign(static_cast<size_t>(in.num_tokens) * 16, 0);
      routing[r] = in.topk_idx;
    }
    const std::vector<ref::InternodeDispatchResult> out = ref::internode_dispatch(inputs, shape);
    for (int me = 0; me < R; ++me) {
      const ref::InternodeDispatchResult& d = out[me];
      const int n = me / U;
      int64_t sent = 0;  // tokens to the other nodes: the last channel's prefix of each node
      for (int m = 0; m < N; ++m)
        if (m != n) sent += d.handle.rdma_channel_prefix_matrix[static_cast<size_t>(m) * C + C - 1];
      EXPECT_EQ(dispatch_rdma_messages(routing[me], K, E, R, U, me), sent) << "R " << R << " U " << U << " rank " << me;
      int64_t forwarded = 0;  // tokens this rank received as forwarder from the other nodes
      for (int s : d.rdma_recv_src_rank) forwarded += s / U != n;
      EXPECT_EQ(combine_rdma_messages(routing, K, E, U, me), forwarded) << "R " << R << " U " << U << " rank " << me;
      std::vector<int> counts(R * R);
      for (int s = 0; s < R; ++s)
        for (int r = 0; r < R; ++r) {
          const auto& p = out[r].recv.rank_prefix_matrix;
          counts[s * R + r] = p[s * R + r] - (s ? p[(s - 1) * R + r] : 0);
        }
      int64_t nvlink = 0;  // rows whose source's local index differs: written by another GPU of the node
      for (int s : d.recv.recv_src_rank) nvlink += s % U != me % U;
      EXPECT_EQ(nvlink_rows_received(counts, R, U, me), nvlink) << "R " << R << " U " << U << " rank " << me;
    }
  }
}

}  // namespace
}  // namespace epx::bench
