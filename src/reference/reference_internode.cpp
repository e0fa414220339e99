#include "reference/reference_internode.hpp"

#include <string>

#include "epx/error.hpp"
#include "epx/limits.hpp"

namespace epx::ref {

namespace {

size_t at(int row, int cols, int col = 0) { return static_cast<size_t>(row) * cols + col; }

void check_shape(const InternodeShape& shape) {
  const int R = shape.base.num_ranks, U = shape.node_size;
  EPX_ARG_CHECK(U >= 1 && U <= kMaxRanks && R >= 1 && R % U == 0, "shape.node_size: expected a divisor of ", R,
                " ranks in [1, ", kMaxRanks, "], got ", U);
  EPX_ARG_CHECK(R / U <= kMaxNodes, "shape.base.num_ranks: ", R / U, " nodes of ", U, " ranks, at most ", kMaxNodes,
                " nodes");
  EPX_ARG_CHECK(shape.num_channels >= 1, "shape.num_channels: must be >= 1, got ", shape.num_channels);
}

// The channel of token t of a rank of num_tokens tokens (contiguous ranges of ceil(T / C) tokens).
int channel_of(int t, int num_tokens, int num_channels) {
  const int per_channel = (num_tokens + num_channels - 1) / num_channels;
  return t / per_channel;
}

// In place: each row of a [rows, cols] matrix becomes its inclusive prefix sum.
void prefix_rows(std::vector<int>& m, int rows, int cols) {
  for (int r = 0; r < rows; ++r)
    for (int c = 1; c < cols; ++c) m[at(r, cols, c)] += m[at(r, cols, c - 1)];
}

int exclusive(const std::vector<int>& inclusive_prefix, int i) { return i > 0 ? inclusive_prefix[i - 1] : 0; }

// Appends token t of source rank s (its input `in`) to what rank r receives: ref::dispatch's row.
void append_row(DispatchResult& out, const RankInput& in, int t, int s, int r, const DispatchShape& shape,
                bool has_weights) {
  const int K = shape.num_topk, experts_per_rank = shape.num_experts / shape.num_ranks;
  out.recv_x.insert(out.recv_x.end(), in.x.begin() + at(t, shape.row_bytes), in.x.begin() + at(t + 1, shape.row_bytes));
  out.recv_x_scales.insert(out.recv_x_scales.end(), in.x_scales.begin() + at(t, shape.num_scales),
                           in.x_scales.begin() + at(t + 1, shape.num_scales));
  for (int k = 0; k < K; ++k) {
    const int64_t e = in.topk_idx[at(t, K, k)];
    const int64_t local = (e >= 0 && e / experts_per_rank == r) ? e - static_cast<int64_t>(r) * experts_per_rank : -1;
    out.recv_topk_idx.push_back(local);
    if (has_weights) out.recv_topk_weights.push_back(local >= 0 ? in.topk_weights[at(t, K, k)] : 0.0f);
    if (local >= 0) ++out.num_recv_tokens_per_expert[local];
  }
  out.recv_src_idx.push_back(t);
  out.recv_src_rank.push_back(s);
  ++out.num_recv;
}

}  // namespace

std::vector<InternodeDispatchResult> internode_dispatch(const std::vector<RankInput>& inputs,
                                                        const InternodeShape& shape) {
  check_shape(shape);
  const DispatchShape& base = shape.base;
  const int R = base.num_ranks, U = shape.node_size, N = R / U, C = shape.num_channels;
  // ref::dispatch checks every input (sizes, ids, shape); its rank 0 result is discarded.
  (void)dispatch(inputs, 0, base);
  bool has_weights = false;
  for (const RankInput& in : inputs) has_weights |= !in.topk_weights.empty();

  std::vector<InternodeDispatchResult> out(R);
  // Sender side: the routing, per-channel counts and each token's position in its per-node stream.
  for (int s = 0; s < R; ++s) {
    const RankInput& in = inputs[s];
    InternodeHandle& h = out[s].handle;
    const int T = in.num_tokens;
    h.is_token_in_rank = get_dispatch_layout(in.topk_idx, T, base.num_topk, base.num_experts, R).is_token_in_rank;
    h.rdma_channel_prefix_matrix.assign(at(N, C), 0);
    h.gbl_channel_prefix_matrix.assign(at(R, C), 0);
    h.send_rdma_head.assign(at(T, N), -1);
    std::vector<int> sent_to_node(N, 0);
    for (int t = 0; t < T; ++t) {
      const int c = channel_of(t, T, C);
      for (int m = 0; m < N; ++m) {
        bool in_node = false;
        for (int u = 0; u < U; ++u) {
          const bool in_rank = h.is_token_in_rank[at(t, R, m * U + u)] != 0;
          h.gbl_channel_prefix_matrix[at(m * U + u, C, c)] += in_rank;
          in_node |= in_rank;
        }
        if (!in_node) continue;
        ++h.rdma_channel_prefix_matrix[at(m, C, c)];
        h.send_rdma_head[at(t, N, m)] = sent_to_node[m]++;
      }
    }
    prefix_rows(h.rdma_channel_prefix_matrix, N, C);
    prefix_rows(h.gbl_channel_prefix_matrix, R, C);
  }
  // Forwarder side: rank f = (m, l) receives from its rail peer (n, l) of every node n, by source
  // node then token.
  for (int f = 0; f < R; ++f) {
    const int m = f / U, l = f % U;
    InternodeDispatchResult& fwd = out[f];
    InternodeHandle& h = fwd.handle;
    h.recv_rdma_channel_prefix_matrix.assign(at(N, C), 0);
    h.recv_rdma_rank_prefix_sum.assign(N, 0);
    for (int n = 0; n < N; ++n) {
      const int s = n * U + l;
      const InternodeHandle& src = out[s].handle;
      for (int t = 0; t < inputs[s].num_tokens; ++t) {
        if (src.send_rdma_head[at(t, N, m)] < 0) continue;
        fwd.rdma_recv_src_rank.push_back(s);
        fwd.rdma_recv_src_idx.push_back(t);
        ++h.recv_rdma_channel_prefix_matrix[at(n, C, channel_of(t, inputs[s].num_tokens, C))];
      }
      h.recv_rdma_rank_prefix_sum[n] = static_cast<int>(fwd.rdma_recv_src_rank.size());
    }
    prefix_rows(h.recv_rdma_channel_prefix_matrix, N, C);
    fwd.num_rdma_recv = static_cast<int>(fwd.rdma_recv_src_rank.size());
    h.send_nvl_head.assign(at(fwd.num_rdma_recv, U), -1);
  }
  // Receiver side: rank r = (m, u) takes, for each source node n and local index l ascending, the
  // tokens of forwarder (m, l) from node n that hold one of r's experts.
  for (int r = 0; r < R; ++r) {
    const int m = r / U, u = r % U;
    DispatchResult& recv = out[r].recv;
    InternodeHandle& h = out[r].handle;
    recv.num_recv_tokens_per_expert.assign(base.num_experts / R, 0);
    recv.rank_prefix_matrix.assign(at(R, R), 0);
    h.recv_gbl_channel_prefix_matrix.assign(at(R, C), 0);
    h.recv_gbl_rank_prefix_sum.assign(R, 0);
    std::vector<int> rows_per_channel(at(R, C), 0);
    for (int n = 0; n < N; ++n) {
      for (int l = 0; l < U; ++l) {
        const int s = n * U + l, f = m * U + l;
        InternodeDispatchResult& fwd = out[f];
        const InternodeHandle& src = out[s].handle;
        for (int j = exclusive(fwd.handle.recv_rdma_rank_prefix_sum, n); j < fwd.handle.recv_rdma_rank_prefix_sum[n];
             ++j) {
          const int t = fwd.rdma_recv_src_idx[j];
          if (!src.is_token_in_rank[at(t, R, r)]) continue;
          fwd.handle.send_nvl_head[at(j, U, u)] = recv.num_recv;
          SourceMeta meta;
          meta.src_rdma_rank = n;
          for (int v = 0; v < U; ++v)
            meta.is_token_in_nvl_ranks |= static_cast<uint32_t>(src.is_token_in_rank[at(t, R, m * U + v)] != 0) << v;
          h.recv_src_meta.push_back(meta);
          ++rows_per_channel[at(s, C, channel_of(t, inputs[s].num_tokens, C))];
          append_row(recv, inputs[s], t, s, r, base, has_weights);
        }
        h.recv_gbl_rank_prefix_sum[s] = recv.num_recv;
      }
    }
    for (int s = 0; s < R; ++s) {
      int row = exclusive(h.recv_gbl_rank_prefix_sum, s);
      for (int c = 0; c < C; ++c) {
        h.recv_gbl_channel_prefix_matrix[at(s, C, c)] = row;
        row += rows_per_channel[at(s, C, c)];
      }
    }
    for (int& count : recv.num_recv_tokens_per_expert)
      count = (count + base.expert_alignment - 1) / base.expert_alignment * base.expert_alignment;
  }
  // rank_prefix_matrix (the intranode handle's [R, R]): [s][r] = rows ranks 0..s send to r.
  for (int r = 0; r < R; ++r)
    for (int s = 0; s < R; ++s)
      for (int r2 = 0; r2 < R; ++r2)
        out[r].recv.rank_prefix_matrix[at(s, R, r2)] =
            out[r2].handle.recv_gbl_rank_prefix_sum[s];
  return out;
}

CombineResult internode_combine(const std::vector<InternodeDispatchResult>& dispatched,
                                const std::vector<std::vector<uint16_t>>& x,
                                const std::vector<std::vector<float>>& topk_weights, int rank,
                                const InternodeShape& shape, int hidden,
                                const std::vector<uint16_t>& bias_0, const std::vector<uint16_t>& bias_1) {
  check_shape(shape);
  const int R = shape.base.num_ranks, U = shape.node_size, N = R / U, K = shape.base.num_topk, H = hidden;
  EPX_ARG_CHECK(dispatched.size() == static_cast<size_t>(R) && x.size() == static_cast<size_t>(R),
                "dispatched, x: expected ", R, " ranks, got ", dispatched.size(), " and ", x.size());
  EPX_ARG_CHECK(rank >= 0 && rank < R, "rank: ", rank, " outside [0, ", R, ")");
  EPX_ARG_CHECK(hidden >= 0, "hidden: must be >= 0, got ", hidden);
  bool has_weights = false;
  for (const auto& w : topk_weights) has_weights |= !w.empty();
  EPX_ARG_CHECK(!has_weights || topk_weights.size() == static_cast<size_t>(R), "topk_weights: expected ", R,
                " ranks, got ", topk_weights.size());
  for (int r = 0; r < R; ++r) {
    const int rows = dispatched[r].recv.num_recv;
    EPX_ARG_CHECK(x[r].size() == at(rows, H), "x[", r, "]: has ", x[r].size(), " elements, expected [", rows, ", ",
                  H, "]");
    if (has_weights)
      EPX_ARG_CHECK(topk_weights[r].size() == at(rows, K), "topk_weights[", r, "]: has ", topk_weights[r].size(),
                    " elements, expected [", rows, ", ", K, "]");
  }
  const InternodeHandle& own = dispatched[rank].handle;
  const int T = static_cast<int>(own.send_rdma_head.size()) / N;
  EPX_ARG_CHECK(bias_0.empty() || bias_0.size() == at(T, H), "bias_0: expected [", T, ", ", H, "] or empty");
  EPX_ARG_CHECK(bias_1.empty() || bias_1.size() == at(T, H), "bias_1: expected [", T, ", ", H, "] or empty");
  const int n = rank / U, l = rank % U;

  CombineResult out;
  out.combined_x.resize(at(T, H));
  if (has_weights) out.combined_topk_weights.assign(at(T, K), 0.0f);
  std::vector<float> acc(H), partial(H), weight_partial(K);
  for (int t = 0; t < T; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int m = 0; m < N; ++m) {
      const int slot = own.send_rdma_head[at(t, N, m)];
      if (slot < 0) continue;
      // The forwarder (m, l): its partial over its node's ranks, local index ascending.
      const InternodeDispatchResult& fwd = dispatched[m * U + l];
      const int j = exclusive(fwd.handle.recv_rdma_rank_prefix_sum, n) + slot;
      EPX_ARG_CHECK(j < fwd.num_rdma_recv && fwd.rdma_recv_src_rank[j] == rank && fwd.rdma_recv_src_idx[j] == t,
                    "dispatched[", m * U + l, "]: its RDMA-received token ", j, " is not token ", t, " of rank ", rank);
      std::fill(partial.begin(), partial.end(), 0.0f);
      std::fill(weight_partial.begin(), weight_partial.end(), 0.0f);
      for (int u = 0; u < U; ++u) {
        const int row = fwd.handle.send_nvl_head[at(j, U, u)];
        if (row < 0) continue;
        const uint16_t* xr = x[m * U + u].data() + at(row, H);
        for (int h = 0; h < H; ++h) partial[h] += bf16_to_float(xr[h]);
        if (has_weights)
          for (int k = 0; k < K; ++k) weight_partial[k] += topk_weights[m * U + u][at(row, K, k)];
      }
      // A remote partial crosses the network as bf16; the own node's stays fp32.
      for (int h = 0; h < H; ++h) acc[h] += m == n ? partial[h] : bf16_to_float(float_to_bf16(partial[h]));
      if (has_weights)
        for (int k = 0; k < K; ++k) out.combined_topk_weights[at(t, K, k)] += weight_partial[k];
    }
    if (!bias_0.empty())
      for (int h = 0; h < H; ++h) acc[h] += bf16_to_float(bias_0[at(t, H, h)]);
    if (!bias_1.empty())
      for (int h = 0; h < H; ++h) acc[h] += bf16_to_float(bias_1[at(t, H, h)]);
    for (int h = 0; h < H; ++h) out.combined_x[at(t, H, h)] = float_to_bf16(acc[h]);
  }
  return out;
}

}  // namespace epx::ref
