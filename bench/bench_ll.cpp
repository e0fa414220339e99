// The `ll` workload (benchmarks.md): low-latency dispatch (fp8 and bf16) and combine (bf16) in µs,
// hook-mode send and receive halves, host CPU time per call, and the NCCL all-to-all baseline of
// the same exchange, measured in this run on these GPUs. Simulated ranks (SimWorld) run the same
// on their SM share, without the NCCL baseline, every CUDA call ordered on the rank's stream.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <random>

#include "baselines.cuh"
#include "bench_common.hpp"
#include "host/checks.hpp"

namespace epx::bench {
std::vector<Row> run_ll(const Options& o, Communicator& comm) {
  const int R = comm.world(), me = comm.rank();
  const int T = o.ll_tokens, N = o.ll_tokens, H = o.hidden.front(), K = o.topk, E = o.experts, E_loc = E / R;
  const int64_t RT = static_cast<int64_t>(R) * T;
  std::vector<Row> rows;
  const Stream owned_stream;
  const cudaStream_t stream = owned_stream.stream;
  L2Flusher flusher(stream);
  auto barrier = [&] { comm.barrier(); };

  BufferOptions opts;
  opts.num_ll_bytes = Buffer::low_latency_size_hint(T, H, R, E, K);
  Buffer buffer(comm, Buffer::get_nvl_buffer_size_hint(static_cast<int64_t>(N) * R, H, DType::kBF16, K, R), opts);

  std::mt19937_64 rng(o.seed * 31 + me);
  std::vector<uint16_t> xh(static_cast<size_t>(N) * H);
  for (auto& v : xh) v = static_cast<uint16_t>(0x3C00 + (rng() & 0x3FF));
  std::vector<int64_t> topk = make_topk(o.seed, me, N, K, E, o.routing);
  std::vector<float> w(static_cast<size_t>(N) * K, 0.125f);
  DeviceArray dx(xh.size() * 2, stream), dtopk(topk.size() * 8, stream), dw(w.size() * 4, stream);
  EPX_CUDA_CHECK(cudaMemcpyAsync(dx.ptr, xh.data(), xh.size() * 2, cudaMemcpyHostToDevice, stream));
  EPX_CUDA_CHECK(cudaMemcpyAsync(dtopk.ptr, topk.data(), topk.size() * 8, cudaMemcpyHostToDevice, stream));
  EPX_CUDA_CHECK(cudaMemcpyAsync(dw.ptr, w.data(), w.size() * 4, cudaMemcpyHostToDevice, stream));
  EPX_CUDA_CHECK(cudaStreamSynchronize(stream));
  const int S = H / 128;
  DeviceArray rx(static_cast<size_t>(E_loc) * RT * H * 2, stream), rsc(static_cast<size_t>(E_loc) * RT * S * 4, stream),
      rcount(4 * E_loc, stream), src_info(4 * E_loc * RT, stream), range(8 * E_loc * R, stream),
      slot(4 * E_loc * RT, stream), out(static_cast<size_t>(N) * H * 2, stream);

  auto dispatch = [&](bool fp8, bool hook, cudaStream_t s) {
    LowLatencyDispatchArgs a;
    a.x = View::of(dx.ptr, DType::kBF16, {N, H});
    a.topk_idx = View::of(dtopk.ptr, DType::kI64, {N, K});
    a.num_max_dispatch_tokens_per_rank = T;
    a.num_experts = E;
    a.use_fp8 = fp8;
    a.return_recv_hook = hook;
    LowLatencyDispatchOutputs d;
    d.recv_x = View::of(rx.ptr, fp8 ? DType::kFP8E4M3 : DType::kBF16, {E_loc, RT, H});
    if (fp8) d.recv_scales = View::strided(rsc.ptr, DType::kF32, {E_loc, RT, S}, {RT * S, 1, RT});
    d.recv_count = View::of(rcount.ptr, DType::kI32, {E_loc});
    d.src_info = View::of(src_info.ptr, DType::kI32, {E_loc, RT});
    d.layout_range = View::of(range.ptr, DType::kI64, {E_loc, R});
    d.src_topk_slot = View::of(slot.ptr, DType::kI32, {E_loc, RT});
    return buffer.low_latency_dispatch(a, d, s);
  };
  LowLatencyHandle handle = dispatch(true, false, stream);
  auto combine = [&](bool hook, cudaStream_t s) {
    LowLatencyCombineArgs a;
    a.x = View::of(rx.ptr, DType::kBF16, {E_loc, RT, H});
    a.topk_idx = View::of(dtopk.ptr, DType::kI64, {N, K});
    a.topk_weights = View::of(dw.ptr, DType::kF32, {N, K});
    a.return_recv_hook = hook;
    buffer.low_latency_combine(a, handle, View::of(out.ptr, DType::kBF16, {N, H}), s);
  };
  buffer.synchronize(stream);

  // Bytes: every (token, expert) pair is one received row (DeepEP's convention); the wire carries
  // each token once per destination rank.
  const double fp8_row = H + 4.0 * S, bf16_row = 2.0 * H;
  std::vector<int> counts(E_loc);
  EPX_CUDA_CHECK(cudaMemcpyAsync(counts.data(), rcount.ptr, 4 * E_loc, cudaMemcpyDeviceToHost, stream));
  EPX_CUDA_CHECK(cudaStreamSynchronize(stream));
  int64_t recv_rows = 0;
  for (int c : counts) recv_rows += c;
  auto add = [&](const std::string& name, const Timing& t, double row_bytes, const Row* base, double host_us) {
    Row r{name, 0, N, H, t.median_us, t.min_us, t.max_us, recv_rows * row_bytes / t.median_us / 1e3, 0};
    r.nvlink_gbps = -1;
    if (base) r.vs_nccl = base->median_us / t.median_us;
    r.host_us = host_us;
    r.note = comm.simulated() ? "the rank's SM share while running" : "all SMs while running";
    rows.push_back(r);
  };

  // NCCL baseline of the same exchange (bf16 rows once per destination rank, then back); real
  // ranks only (a simulated rank has no NCCL communicator).
  const bool with_nccl = comm.nccl() != nullptr;
  Row nccl_d, nccl_c;
  if (with_nccl) {
    DeviceArray per_rank(4 * R, stream), per_expert(4 * E, stream), in_rank(static_cast<size_t>(N) * R, stream);
    buffer.get_dispatch_layout(View::of(dtopk.ptr, DType::kI64, {N, K}), E, View::of(per_rank.ptr, DType::kI32, {R}),
                               View::of(per_expert.ptr, DType::kI32, {E}), View::of(in_rank.ptr, DType::kBool, {N, R}),
                               stream);
    buffer.synchronize(stream);
    NcclAllToAll nccl(comm.nccl(), me, R, N, H, 2);
    const Timing nd = time_op([&](cudaStream_t s) { nccl.dispatch(dx.ptr, static_cast<const bool*>(in_rank.ptr), N, s); },
                              stream, o.warmup, o.iters, flusher, barrier);
    const Timing nc = time_op([&](cudaStream_t s) { nccl.combine(s); }, stream, o.warmup, o.iters, flusher, barrier);
    nccl_d = Row{"ll nccl a2a dispatch", 0, N, H, nd.median_us, nd.min_us, nd.max_us, 0, -1};
    nccl_c = Row{"ll nccl a2a combine", 0, N, H, nc.median_us, nc.min_us, nc.max_us, 0, -1};
    nccl_d.note = nccl_c.note = "baseline";
  }
  const Row* nccl_dispatch = with_nccl ? &nccl_d : nullptr;
  const Row* nccl_combine = with_nccl ? &nccl_c : nullptr;

  auto host_us = [&](const std::function<void(cudaStream_t)>& op) {
    return host_time_op(op, stream, 2, std::min(o.iters, 20), barrier).median_us;
  };
  std::function<void(cudaStream_t)> d_fp8 = [&](cudaStream_t s) { dispatch(true, false, s); };
  std::function<void(cudaStream_t)> d_bf16 = [&](cudaStream_t s) { dispatch(false, false, s); };
  std::function<void(cudaStream_t)> c_bf16 = [&](cudaStream_t s) { combine(false, s); };
  std::function<void(cudaStream_t)> both = [&](cudaStream_t s) { dispatch(true, false, s); combine(false, s); };
  add("ll dispatch fp8", time_op(d_fp8, stream, o.warmup, o.iters, flusher, barrier), fp8_row, nccl_dispatch, host_us(d_fp8));
  add("ll dispatch bf16", time_op(d_bf16, stream, o.warmup, o.iters, flusher, barrier), bf16_row, nccl_dispatch, host_us(d_bf16));
  dispatch(true, false, stream);
  add("ll combine bf16", time_op(c_bf16, stream, o.warmup, o.iters, flusher, barrier), bf16_row, nccl_combine, host_us(c_bf16));
  add("ll dispatch+combine", time_op(both, stream, o.warmup, o.iters, flusher, barrier), fp8_row + bf16_row, nullptr, -1);

  // Kernel time (DeepEP's "kernel time"): graph replay, launch overhead excluded.
  const int per_graph = 8, reps = std::max(5, o.iters / 4);
  auto add_graph = [&](const std::string& name, const std::function<void(cudaStream_t)>& op, double row_bytes,
                       const Row* base) {
    buffer.synchronize(stream);
    add(name, graph_time_op(op, stream, per_graph, reps, flusher, barrier), row_bytes, base, -1);
    rows.back().note = "kernels only: graph replay";
  };
  add_graph("ll dispatch fp8 kernel", d_fp8, fp8_row, nullptr);
  add_graph("ll dispatch bf16 kernel", d_bf16, bf16_row, nullptr);
  dispatch(true, false, stream);
  add_graph("ll combine bf16 kernel", c_bf16, bf16_row, nullptr);
  add_graph("ll dispatch+combine kernel", both, fp8_row + bf16_row, nullptr);
  buffer.synchronize(stream);

  // Hook mode: send and receive halves timed separately (nothing runs in between).
  for (int which = 0; which < 2; ++which) {
    int b = 0;
    const auto send = [&](cudaStream_t s) {
      b = buffer.next_low_latency_buffer();
      if (which == 0) dispatch(true, true, s); else combine(true, s);
    };
    const auto recv = [&](cudaStream_t s) { buffer.low_latency_receive(b, s); };
    const auto [ts, tr] = time_two_halves(send, recv, stream, o.warmup, o.iters, flusher, barrier);
    const std::string op = which == 0 ? "ll dispatch fp8" : "ll combine bf16";
    add(op + " hook send", ts, which == 0 ? fp8_row : bf16_row, nullptr, -1);
    rows.back().note = "no SM held after it";
    add(op + " hook recv", tr, which == 0 ? fp8_row : bf16_row, nullptr, -1);
    rows.back().note = "includes waiting for peers";
  }
  if (with_nccl) {
    rows.push_back(nccl_d);
    rows.push_back(nccl_c);
  }
  buffer.synchronize(stream);
  return rows;
}

}  // namespace epx::bench
