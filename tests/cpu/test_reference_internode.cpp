// CPU tests of the internode reference (src/reference/reference_internode.*): dispatch with
// forwarding gives exactly the intranode reference's receiver outputs, its handle is consistent,
// and the two-level combine is within its documented rounding of the exact sum, repeatable, and
// models the bf16 rounding of a remote partial (hand-worked case).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "epx/error.hpp"
#include "reference/reference.hpp"
#include "reference/reference_internode.hpp"
#include "reference/reference_scaleout.hpp"

namespace {

using epx::ref::bf16_to_float;
using epx::ref::float_to_bf16;
using epx::ref::InternodeDispatchResult;
using epx::ref::InternodeShape;
using epx::ref::RankInput;

unsigned test_seed() {
  const char* env = std::getenv("EPX_TEST_SEED");  // reproduces a failing run
  return env ? static_cast<unsigned>(std::strtoul(env, nullptr, 10)) : std::random_device{}();
}

int uniform(std::mt19937& rng, int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); }

size_t at(int row, int cols, int col = 0) { return static_cast<size_t>(row) * cols + col; }

struct Case {
  InternodeShape shape;
  int hidden = 0;
  int empty_node = -1;  // a node none of whose experts is chosen (-1: none)
  std::vector<RankInput> inputs;
};

// Random routing over R ranks in nodes of U: some ranks have no tokens, and (with 2+ nodes) one
// node receives nothing. x rows are bf16 values (for combine), scales and weights random.
Case random_case(std::mt19937& rng, int R, int U, int K, bool weights) {
  Case c;
  const int experts_per_rank = 8, E = R * experts_per_rank;
  c.hidden = 8;
  c.shape.node_size = U;
  c.shape.num_channels = uniform(rng, 1, 5);
  c.shape.base.num_ranks = R;
  c.shape.base.num_experts = E;
  c.shape.base.num_topk = K;
  c.shape.base.row_bytes = 2 * c.hidden;
  c.shape.base.num_scales = uniform(rng, 0, 2);
  c.shape.base.expert_alignment = uniform(rng, 0, 1) ? 1 : 4;
  if (R / U >= 2) c.empty_node = uniform(rng, 0, R / U - 1);
  std::vector<int> allowed;
  for (int e = 0; e < E; ++e)
    if (e / experts_per_rank / U != c.empty_node) allowed.push_back(e);
  c.inputs.resize(R);
  const int idle_rank = uniform(rng, 0, R - 1);  // always one rank without tokens
  for (int s = 0; s < R; ++s) {
    RankInput& in = c.inputs[s];
    in.num_tokens = s == idle_rank || uniform(rng, 0, 3) == 0 ? 0 : uniform(rng, 1, 40);
    for (int t = 0; t < in.num_tokens; ++t) {
      std::vector<int> pool = allowed;
      for (int k = 0; k < K; ++k) {
        const int i = uniform(rng, 0, static_cast<int>(pool.size()) - 1);
        in.topk_idx.push_back(uniform(rng, 0, 7) == 0 ? -1 : pool[i]);
        pool.erase(pool.begin() + i);
      }
      for (int h = 0; h < c.hidden; ++h) {
        const uint16_t v = float_to_bf16(std::uniform_real_distribution<float>(-4.0f, 4.0f)(rng));
        in.x.push_back(static_cast<uint8_t>(v & 0xff));
        in.x.push_back(static_cast<uint8_t>(v >> 8));
      }
      for (int j = 0; j < c.shape.base.num_scales; ++j) in.x_scales.push_back(static_cast<float>(uniform(rng, 1, 99)));
      if (weights)
        for (int k = 0; k < K; ++k) in.topk_weights.push_back(std::uniform_real_distribution<float>(0.0f, 1.0f)(rng));
    }
  }
  return c;
}

// The received rows of rank r as bf16 [num_recv, H] (its x rows, as an expert output).
std::vector<uint16_t> rows_as_bf16(const InternodeDispatchResult& d) {
  std::vector<uint16_t> out(d.recv.recv_x.size() / 2);
  for (size_t i = 0; i < out.size(); ++i)
    out[i] = static_cast<uint16_t>(d.recv.recv_x[2 * i] | (d.recv.recv_x[2 * i + 1] << 8));
  return out;
}

// Every handle entry against its definition (reference_internode.hpp), from the inputs.
void check_handle(const Case& c, const std::vector<InternodeDispatchResult>& out) {
  const int R = c.shape.base.num_ranks, U = c.shape.node_size, N = R / U, C = c.shape.num_channels;
  for (int s = 0; s < R; ++s) {
    SCOPED_TRACE("rank " + std::to_string(s));
    const RankInput& in = c.inputs[s];
    const auto& h = out[s].handle;
    const epx::ref::Layout layout =
        epx::ref::get_dispatch_layout(in.topk_idx, in.num_tokens, c.shape.base.num_topk, c.shape.base.num_experts, R);
    EXPECT_EQ(h.is_token_in_rank, layout.is_token_in_rank);
    const std::vector<int> per_node = epx::ref::num_tokens_per_rdma_rank(layout, in.num_tokens, R, U);
    for (int m = 0; m < N; ++m) EXPECT_EQ(h.rdma_channel_prefix_matrix[at(m, C, C - 1)], per_node[m]);
    for (int r = 0; r < R; ++r) EXPECT_EQ(h.gbl_channel_prefix_matrix[at(r, C, C - 1)], layout.num_tokens_per_rank[r]);
    // Forwarder: what it receives from node n is what its rail peer there sends to its node.
    const int m = s / U, l = s % U;
    for (int n = 0; n < N; ++n) {
      const int sent = out[n * U + l].handle.rdma_channel_prefix_matrix[at(m, C, C - 1)];
      const int got = h.recv_rdma_rank_prefix_sum[n] - (n ? h.recv_rdma_rank_prefix_sum[n - 1] : 0);
      EXPECT_EQ(got, sent) << "from node " << n;
      EXPECT_EQ(h.recv_rdma_channel_prefix_matrix[at(n, C, C - 1)], sent);
    }
    // Receiver: metadata and channel starts of every row.
    const auto& recv = out[s].recv;
    ASSERT_EQ(h.recv_src_meta.size(), static_cast<size_t>(recv.num_recv));
    EXPECT_EQ(h.recv_gbl_rank_prefix_sum[R - 1], recv.num_recv);
    for (int i = 0; i < recv.num_recv; ++i) {
      const int src = recv.recv_src_rank[i], t = recv.recv_src_idx[i];
      EXPECT_EQ(h.recv_src_meta[i].src_rdma_rank, src / U);
      const auto& sh = out[src].handle;
      for (int v = 0; v < U; ++v)
        EXPECT_EQ((h.recv_src_meta[i].is_token_in_nvl_ranks >> v) & 1u, sh.is_token_in_rank[at(t, R, m * U + v)]);
      const int q = (c.inputs[src].num_tokens + C - 1) / C, ch = t / q;
      EXPECT_GE(i, h.recv_gbl_channel_prefix_matrix[at(src, C, ch)]);
      const int next =
          ch + 1 < C ? h.recv_gbl_channel_prefix_matrix[at(src, C, ch + 1)] : h.recv_gbl_rank_prefix_sum[src];
      EXPECT_LT(i, next);
    }
  }
  // send_nvl_head: each received row is named exactly once, by the forwarder of its rail.
  std::vector<std::vector<int>> named(R);
  for (int r = 0; r < R; ++r) named[r].assign(out[r].recv.num_recv, 0);
  for (int f = 0; f < R; ++f) {
    const auto& fwd = out[f];
    for (int j = 0; j < fwd.num_rdma_recv; ++j)
      for (int u = 0; u < U; ++u) {
        const int row = fwd.handle.send_nvl_head[at(j, U, u)];
        if (row < 0) continue;
        const int r = (f / U) * U + u;
        ASSERT_LT(row, out[r].recv.num_recv);
        ++named[r][row];
        EXPECT_EQ(out[r].recv.recv_src_rank[row], fwd.rdma_recv_src_rank[j]);
        EXPECT_EQ(out[r].recv.recv_src_idx[row], fwd.rdma_recv_src_idx[j]);
        EXPECT_EQ(fwd.rdma_recv_src_rank[j] % U, f % U) << "forwarded off the rail";
      }
  }
  for (int r = 0; r < R; ++r)
    for (int row = 0; row < out[r].recv.num_recv; ++row) EXPECT_EQ(named[r][row], 1) << "rank " << r << " row " << row;
}

struct Grid {
  int R, U;
};
const Grid kGrids[] = {{2, 1}, {4, 1}, {4, 2}, {8, 2}, {8, 4}, {16, 8}, {32, 8}};

TEST(ReferenceInternode, DispatchEqualsIntranodeAndCombineIsTheTwoLevelSum) {
  const unsigned seed = test_seed();
  std::cout << "[ seed     ] EPX_TEST_SEED=" << seed << std::endl;
  SCOPED_TRACE("EPX_TEST_SEED=" + std::to_string(seed));
  std::mt19937 rng(seed);
  for (const Grid g : kGrids) {
    for (const int K : {1, 6, 8}) {
      for (const bool weights : {false, true}) {
        SCOPED_TRACE("R=" + std::to_string(g.R) + " U=" + std::to_string(g.U) + " K=" + std::to_string(K) +
                     " weights=" + std::to_string(weights));
        const Case c = random_case(rng, g.R, g.U, K, weights);
        const int R = g.R, U = g.U, H = c.hidden;
        const auto out = epx::ref::internode_dispatch(c.inputs, c.shape);
        ASSERT_EQ(out.size(), static_cast<size_t>(R));
        for (int r = 0; r < R; ++r) {
          SCOPED_TRACE("receiver " + std::to_string(r));
          const epx::ref::DispatchResult want = epx::ref::dispatch(c.inputs, r, c.shape.base);
          const epx::ref::DispatchResult& got = out[r].recv;
          EXPECT_EQ(got.num_recv, want.num_recv);
          EXPECT_EQ(got.recv_x, want.recv_x);
          EXPECT_EQ(got.recv_x_scales, want.recv_x_scales);
          EXPECT_EQ(got.recv_topk_idx, want.recv_topk_idx);
          EXPECT_EQ(got.recv_topk_weights, want.recv_topk_weights);
          EXPECT_EQ(got.recv_src_idx, want.recv_src_idx);
          EXPECT_EQ(got.recv_src_rank, want.recv_src_rank);
          EXPECT_EQ(got.num_recv_tokens_per_expert, want.num_recv_tokens_per_expert);
          EXPECT_EQ(got.rank_prefix_matrix, want.rank_prefix_matrix);
          if (c.empty_node >= 0 && r / U == c.empty_node) {
            EXPECT_EQ(got.num_recv, 0);
            EXPECT_EQ(out[r].num_rdma_recv, 0);
          }
        }
        check_handle(c, out);

        // Combine: expert outputs = the received rows; per-rank weights = the received weights.
        std::vector<std::vector<uint16_t>> x(R);
        std::vector<std::vector<float>> w(R);
        for (int r = 0; r < R; ++r) {
          x[r] = rows_as_bf16(out[r]);
          w[r] = out[r].recv.recv_topk_weights;
        }
        for (int o = 0; o < R; ++o) {
          SCOPED_TRACE("owner " + std::to_string(o));
          const int T = c.inputs[o].num_tokens;
          std::vector<uint16_t> bias;
          if (o % 2)
            for (int i = 0; i < T * H; ++i) bias.push_back(float_to_bf16(static_cast<float>(uniform(rng, -8, 8)) / 4));
          const auto res = epx::ref::internode_combine(out, x, w, o, c.shape, H, bias, {});
          const auto again = epx::ref::internode_combine(out, x, w, o, c.shape, H, bias, {});
          EXPECT_EQ(res.combined_x, again.combined_x) << "not bitwise repeatable";
          EXPECT_EQ(res.combined_topk_weights, again.combined_topk_weights);
          ASSERT_EQ(res.combined_x.size(), at(T, H));
          const auto& layout = out[o].handle.is_token_in_rank;
          for (int t = 0; t < T; ++t) {
            // The owner's row (every receiver returns it unchanged), bf16 bits.
            const uint16_t* xt = reinterpret_cast<const uint16_t*>(&c.inputs[o].x[at(t, 2 * H)]);
            for (int h = 0; h < H; ++h) {
              // Exact sum in fp64 and the bound: half an ulp of bf16 (2^-9 relative, taken as 2^-8)
              // for each remote partial and for the result, plus fp32 accumulation.
              double exact = bias.empty() ? 0.0 : bf16_to_float(bias[at(t, H, h)]);
              double partial_bound = 0.0, magnitude = std::fabs(exact);
              for (int m = 0; m < R / U; ++m) {
                double partial = 0.0;
                for (int u = 0; u < U; ++u)
                  if (layout[at(t, R, m * U + u)]) partial += bf16_to_float(xt[h]);
                exact += partial;
                magnitude += std::fabs(partial);
                if (m != o / U) partial_bound += std::ldexp(std::fabs(partial), -8);
              }
              const double got = bf16_to_float(res.combined_x[at(t, H, h)]);
              const double tol = partial_bound + std::ldexp(std::fabs(exact) + partial_bound, -8) +
                                 std::ldexp(magnitude * (R + 2), -23);
              EXPECT_LE(std::fabs(got - exact), tol) << "token " << t << " channel " << h;
            }
            if (weights) {
              for (int k = 0; k < K; ++k) {
                const int64_t e = c.inputs[o].topk_idx[at(t, K, k)];
                const double want = e >= 0 ? c.inputs[o].topk_weights[at(t, K, k)] : 0.0;
                EXPECT_NEAR(res.combined_topk_weights[at(t, K, k)], want, 1e-6) << "token " << t << " slot " << k;
              }
            }
          }
          if (U == 1) {  // one rank per node: every partial is one bf16 row, the flat order
            std::vector<epx::ref::CombineRankInput> flat(R);
            for (int r = 0; r < R; ++r) flat[r] = {&out[r].recv, x[r], w[r]};
            const auto want = epx::ref::combine(flat, o, T, H, K, bias, {});
            EXPECT_EQ(res.combined_x, want.combined_x);
            EXPECT_EQ(res.combined_topk_weights, want.combined_topk_weights);
          }
        }
      }
    }
  }
}

// R = 4 in 2 nodes of 2; rank 0's one token goes to ranks 1, 2 and 3 (one expert each). Rank 1
// returns 2^-8, ranks 2 and 3 return 1 and 2^-8. The flat sum is 1 + 2^-7 (exact in bf16); the
// two-level order rounds node 1's partial 1 + 2^-8 to bf16 (a tie, to even: 1), then
// 2^-8 + 1 rounds to 1 again.
TEST(ReferenceInternode, RemotePartialIsRoundedToBf16) {
  InternodeShape shape;
  shape.node_size = 2;
  shape.base.num_ranks = 4;
  shape.base.num_experts = 4;
  shape.base.num_topk = 3;
  shape.base.row_bytes = 2;
  std::vector<RankInput> inputs(4);
  inputs[0].num_tokens = 1;
  inputs[0].x = {0, 0};
  inputs[0].topk_idx = {1, 2, 3};
  const auto out = epx::ref::internode_dispatch(inputs, shape);
  const float half_ulp = std::ldexp(1.0f, -8);
  std::vector<std::vector<uint16_t>> x = {
      {}, {float_to_bf16(half_ulp)}, {float_to_bf16(1.0f)}, {float_to_bf16(half_ulp)}};
  const auto res = epx::ref::internode_combine(out, x, {}, 0, shape, 1, {}, {});
  ASSERT_EQ(res.combined_x.size(), 1u);
  EXPECT_EQ(bf16_to_float(res.combined_x[0]), 1.0f);
  std::vector<epx::ref::CombineRankInput> flat(4);
  for (int r = 0; r < 4; ++r) flat[r] = {&out[r].recv, x[r], {}};
  EXPECT_EQ(bf16_to_float(epx::ref::combine(flat, 0, 1, 1, 3, {}, {}).combined_x[0]), 1.0f + 2 * half_ulp);  // 1 + 2^-7
  // The handle of this case, written out: rank 0 sends its token to node 0 (itself) and node 1
  // (rank 2, its rail peer), which forwards it to ranks 2 and 3.
  EXPECT_EQ(out[0].handle.send_rdma_head, (std::vector<int>{0, 0}));
  EXPECT_EQ(out[2].num_rdma_recv, 1);
  EXPECT_EQ(out[2].handle.send_nvl_head, (std::vector<int>{0, 0}));
  EXPECT_EQ(out[0].handle.send_nvl_head, (std::vector<int>{-1, 0}));
  EXPECT_EQ(out[3].recv.recv_src_idx, (std::vector<int>{0}));
  EXPECT_EQ(out[3].handle.recv_src_meta[0].src_rdma_rank, 0);
  EXPECT_EQ(out[3].handle.recv_src_meta[0].is_token_in_nvl_ranks, 3u);
  EXPECT_EQ(out[1].num_rdma_recv, 0);
}

TEST(ReferenceInternode, RejectsBadNodeSize) {
  InternodeShape shape;
  shape.node_size = 3;
  shape.base.num_ranks = 4;
  shape.base.num_experts = 4;
  shape.base.num_topk = 1;
  try {
    (void)epx::ref::internode_dispatch(std::vector<RankInput>(4), shape);
    ADD_FAILURE() << "no error";
  } catch (const epx::Error& e) {
    EXPECT_EQ(e.kind(), epx::ErrorKind::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("node_size"), std::string::npos) << e.what();
  }
}

}  // namespace
