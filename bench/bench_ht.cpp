// The `ht` workload (benchmarks.md): fresh and cached dispatch (bf16, fp8), combine, the NCCL
// all-to-all baseline and the raw NVLink store ceiling, all measured in this run on these GPUs.
// Simulated ranks (SimWorld) run the same on their SM share, without the NCCL baseline; every CUDA
// call here is ordered on the rank's stream (sim_world.hpp's rules).
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>
#include <random>

#include "baselines.cuh"
#include "bench_common.hpp"
#include "common/layout.hpp"
#include "host/checks.hpp"
#include "host/plan.hpp"
#include "host/tuning.hpp"

namespace epx::bench {

Stream::Stream() { EPX_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking)); }
Stream::~Stream() { cudaStreamDestroy(stream); }

DeviceArray::DeviceArray(size_t bytes, cudaStream_t s) : stream(s) {
  EPX_CUDA_CHECK(cudaMallocAsync(&ptr, bytes > 0 ? bytes : 16, stream));
}
DeviceArray::~DeviceArray() { cudaFreeAsync(ptr, stream); }

std::vector<std::string> skipped_when_simulated(const Options& o) {
  std::vector<std::string> skipped;
  if (o.mode == "ht" || o.mode == "all")
    skipped.push_back("nccl a2a dispatch/combine bf16 (ht): a simulated rank has no NCCL communicator");
  if (o.mode == "ll" || o.mode == "all")
    skipped.push_back("ll nccl a2a dispatch/combine: a simulated rank has no NCCL communicator");
  return skipped;
}

namespace {

// Host to device on the rank's stream; returns when `v` may be released.
template <typename T>
void upload(DeviceArray& d, const std::vector<T>& v) {
  EPX_CUDA_CHECK(cudaMemcpyAsync(d.ptr, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice, d.stream));
  EPX_CUDA_CHECK(cudaStreamSynchronize(d.stream));
}

// A Config and a Tuning set together (each is validated against the other).
struct Settings {
  Config config;
  Tuning tuning;
};
void apply(Buffer& buffer, const Settings& s) {
  set_tuning(buffer, Tuning{});  // holds for any Config
  buffer.set_config(s.config);
  set_tuning(buffer, s.tuning);
}

// `s` with the ring settings of `spec` ("w6c2q256": letter, number, ...; see Options).
Settings with_ring_settings(Settings s, const std::string& spec) {
  Config& c = s.config;
  Tuning& t = s.tuning;
  size_t i = 0;
  while (i < spec.size()) {
    const char key = spec[i++];
    size_t used = 0;
    int value = 0;
    try {
      value = std::stoi(spec.substr(i), &used);
    } catch (const std::exception&) {
      used = 0;
    }
    EPX_ARG_CHECK(used > 0, "--combine-configs: expected a number after '", key, "' in '", spec, "'");
    i += used;
    switch (key) {
      case 'w': t.ring_send_warps = value; break;
      case 'c': t.ring_chunk = value; break;
      case 'q': c.ring_slots = value; break;
      default: EPX_ARG_CHECK(false, "--combine-configs: unknown setting '", key, "' in '", spec, "' (w, c, q)");
    }
  }
  t.ring_combine = true;
  return s;
}

}  // namespace

std::vector<Row> run_ht(const Options& o, Communicator& comm) {
  const int R = comm.world(), me = comm.rank();
  std::vector<Row> rows;
  const Stream owned_stream;
  const cudaStream_t stream = owned_stream.stream;
  L2Flusher flusher(stream);
  auto barrier = [&] { comm.barrier(); };
  for (int sms : o.sms)  // a simulated rank's grids must fit its share so that all ranks' are resident
    EPX_ARG_CHECK(!comm.simulated() || sms <= comm.num_device_sms(), "--sms ", sms,
                  " exceeds a simulated rank's share of ", comm.num_device_sms(), " SMs");

  for (int N : o.tokens) {
    for (int H : o.hidden) {
      const int K = o.topk, E = o.experts, S = (H + 127) / 128;
      // --buffer-fraction F: room for 1/F of the rows (and at least the bounded paths' rings at
      // every --sms), so that larger batches stream through the rings.
      const int64_t all_rows = static_cast<int64_t>(N) * R;
      size_t nvl_bytes = Buffer::get_nvl_buffer_size_hint(all_rows / o.buffer_fraction, H, DType::kBF16, K, R);
      if (o.buffer_fraction > 1) {
        for (int sms : o.sms) {
          Config c;
          c.num_sms = sms;
          const Tuning t;  // the Buffer's own
          for (DType dt : {DType::kBF16, DType::kFP8E4M3})
            nvl_bytes = std::max(nvl_bytes, plan::dispatch_ring_min_bytes(c, t, R, H, dt, K));
          nvl_bytes = std::max(nvl_bytes, plan::combine_ring_min_bytes(c, t, R, H, K));
        }
      }
      Buffer buffer(comm, nvl_bytes);
      const int64_t buffer_rows = plan::dispatch_rows(nvl_bytes, H, DType::kBF16, K).capacity;
      std::string buffer_note;
      if (o.buffer_fraction > 1) {
        buffer_note = "buffer 1/" + std::to_string(o.buffer_fraction) + ": " + std::to_string(buffer_rows) + " of " +
                      std::to_string(all_rows) + " bf16 rows";
        if (me == 0)
          std::printf("epx_bench: N %d H %d: the buffer (%zu bytes) holds %lld bf16 dispatch rows of the %lld (N x R) a "
                      "rank may receive (1/%d)\n",
                      N, H, nvl_bytes, static_cast<long long>(buffer_rows), static_cast<long long>(all_rows),
                      o.buffer_fraction);
      }

      // Inputs.
      std::mt19937_64 rng(o.seed * 977 + me);
      std::vector<uint16_t> xh(static_cast<size_t>(N) * H);
      for (auto& v : xh) v = static_cast<uint16_t>(0x3C00 + (rng() & 0x3FF));  // finite bf16
      std::vector<uint8_t> x8(static_cast<size_t>(N) * H);
      for (auto& v : x8) v = static_cast<uint8_t>(rng() & 0x77);  // finite e4m3
      std::vector<float> sc(static_cast<size_t>(N) * S, 1.f);
      std::vector<int64_t> topk = make_topk(o.seed, me, N, K, E, o.routing);
      std::vector<float> w(static_cast<size_t>(N) * K, 0.125f);
      DeviceArray dx(xh.size() * 2, stream), dx8(x8.size(), stream), dsc(sc.size() * 4, stream),
          dtopk(topk.size() * 8, stream), dw(w.size() * 4, stream);
      upload(dx, xh);
      upload(dx8, x8);
      upload(dsc, sc);
      upload(dtopk, topk);
      upload(dw, w);
      DeviceArray per_rank(4 * R, stream), per_expert(4 * E, stream), in_rank(static_cast<size_t>(N) * R, stream),
          recv_per_expert(4 * (E / R), stream);
      const View topk_v = View::of(dtopk.ptr, DType::kI64, {N, K});
      buffer.get_dispatch_layout(topk_v, E, View::of(per_rank.ptr, DType::kI32, {R}),
                                 View::of(per_expert.ptr, DType::kI32, {E}),
                                 View::of(in_rank.ptr, DType::kBool, {N, R}), stream);

      DispatchInputs in;
      in.topk_idx = topk_v;
      in.topk_weights = View::of(dw.ptr, DType::kF32, {N, K});
      in.num_tokens_per_rank = View::of(per_rank.ptr, DType::kI32, {R});
      in.num_tokens_per_expert = View::of(per_expert.ptr, DType::kI32, {E});
      in.is_token_in_rank = View::of(in_rank.ptr, DType::kBool, {N, R});
      const View recv_per_expert_v = View::of(recv_per_expert.ptr, DType::kI32, {E / R});

      // Outputs sized for the worst case once (a framework's caching allocator does the same).
      const int64_t cap = static_cast<int64_t>(N) * R;
      DeviceArray rx(cap * H * 2, stream), rsc(cap * S * 4, stream), ridx(cap * K * 8, stream), rw(cap * K * 4, stream),
          rsrc(cap * 4, stream);
      DeviceArray cx(static_cast<size_t>(N) * H * 2, stream), cw(static_cast<size_t>(N) * K * 4, stream);
      DispatchHandle handle = buffer.make_handle(N);

      auto dispatch_outputs = [&](bool fp8, int64_t nr, bool meta) {
        DispatchOutputs out;
        out.recv_x = View::of(rx.ptr, fp8 ? DType::kFP8E4M3 : DType::kBF16, {nr, H});
        if (fp8) out.recv_x_scales = View::of(rsc.ptr, DType::kF32, {nr, S});
        if (meta) {
          out.recv_topk_idx = View::of(ridx.ptr, DType::kI64, {nr, K});
          out.recv_topk_weights = View::of(rw.ptr, DType::kF32, {nr, K});
          out.recv_src_idx = View::of(rsrc.ptr, DType::kI32, {nr});
        }
        return out;
      };
      auto set_x = [&](bool fp8) {
        in.x = fp8 ? View::of(dx8.ptr, DType::kFP8E4M3, {N, H}) : View::of(dx.ptr, DType::kBF16, {N, H});
        in.x_scales = fp8 ? View::of(dsc.ptr, DType::kF32, {N, S}) : View{};
      };
      auto fresh = [&](bool fp8) {
        return [&, fp8](cudaStream_t s) {
          set_x(fp8);
          const int nr = buffer.dispatch_notify(in, handle, recv_per_expert_v, s);
          buffer.dispatch(in, handle, dispatch_outputs(fp8, nr, true), s);
        };
      };
      auto cached = [&](bool fp8) {
        return [&, fp8](cudaStream_t s) {
          set_x(fp8);
          DispatchInputs c;
          c.x = in.x;
          c.x_scales = in.x_scales;
          buffer.dispatch(c, handle, dispatch_outputs(fp8, handle.num_recv_tokens, false), s);
        };
      };
      // Routing is fixed: learn the row counts once (host-synced).
      fresh(false)(stream);
      buffer.synchronize(stream);
      const int64_t nr = handle.num_recv_tokens;
      std::vector<int> counts(R * R);
      EPX_CUDA_CHECK(cudaMemcpyAsync(counts.data(), handle.count_matrix, 4 * R * R, cudaMemcpyDeviceToHost, stream));
      EPX_CUDA_CHECK(cudaStreamSynchronize(stream));
      const int64_t local_rows = counts[me * R + me];
      const int64_t remote_rows = nr - local_rows;

      auto combine_op = [&](cudaStream_t s) {
        CombineInputs ci;
        ci.x = View::of(rx.ptr, DType::kBF16, {nr, H});
        ci.topk_weights = View::of(rw.ptr, DType::kF32, {nr, K});
        CombineOutputs co;
        co.combined_x = View::of(cx.ptr, DType::kBF16, {N, H});
        co.combined_topk_weights = View::of(cw.ptr, DType::kF32, {N, K});
        buffer.combine(ci, handle, co, s);
      };

      // Same-run baselines: NCCL all-to-all (bf16; real ranks only) and the raw store ceiling.
      const double row_bf16 = 2.0 * H, row_fp8 = H + 4.0 * S;
      auto gbps = [](double bytes, double us) { return us > 0 ? bytes / us / 1e3 : 0; };
      const bool with_nccl = comm.nccl() != nullptr;
      Row nd, nc;
      if (with_nccl) {
        NcclAllToAll nccl(comm.nccl(), me, R, N, H, 2);
        const Timing nccl_d = time_op([&](cudaStream_t s) { nccl.dispatch(dx.ptr, static_cast<const bool*>(in_rank.ptr), N, s); },
                                      stream, o.warmup, o.iters, flusher, barrier);
        const Timing nccl_c = time_op([&](cudaStream_t s) { nccl.combine(s); }, stream, o.warmup, o.iters, flusher, barrier);
        nd = Row{"nccl a2a dispatch bf16", 0, N, H, nccl_d.median_us, nccl_d.min_us, nccl_d.max_us,
                 gbps(nr * row_bf16, nccl_d.median_us), gbps(remote_rows * row_bf16, nccl_d.median_us)};
        nc = Row{"nccl a2a combine bf16", 0, N, H, nccl_c.median_us, nccl_c.min_us, nccl_c.max_us,
                 gbps(nr * row_bf16, nccl_c.median_us), gbps(remote_rows * row_bf16, nccl_c.median_us)};
        nd.note = nc.note = "baseline (all SMs NCCL wants)";
      }
      const Row* nccl_dispatch = with_nccl ? &nd : nullptr;
      const Row* nccl_combine = with_nccl ? &nc : nullptr;

      for (int sms : o.sms) {
        Config cfg = buffer.config();
        cfg.num_sms = sms;
        buffer.set_config(cfg);
        std::vector<void*> peers(R);
        for (int p = 0; p < R; ++p) peers[p] = static_cast<char*>(buffer.peer_pointer(p)) + SymmetricLayout::kRowsOffset;
        const size_t per_peer = align_up(static_cast<size_t>(remote_rows * row_bf16 / std::max(1, R - 1)), 16);
        barrier();
        const double ceiling = raw_store_ceiling_gbps(peers.data(), me, R, per_peer, sms, stream, flusher, o.iters, barrier);
        barrier();
        Row ceil_row{"raw store ceiling", sms, N, H, 0, 0, 0, 0, ceiling, 100.0};
        ceil_row.note = comm.simulated() ? "stores to the peers' slices, same SMs" : "peer stores, same SMs";
        rows.push_back(ceil_row);

        auto measure = [&](const std::string& name, const std::function<void(cudaStream_t)>& op, double row_bytes,
                           int64_t all_rows, int64_t remote, const Row* base) {
          const Timing t = time_op(op, stream, o.warmup, o.iters, flusher, barrier);
          Row r{name, sms, N, H, t.median_us, t.min_us, t.max_us, gbps(all_rows * row_bytes, t.median_us),
                gbps(remote * row_bytes, t.median_us)};
          r.pct_ceiling = ceiling > 0 ? 100.0 * r.nvlink_gbps / ceiling : -1;
          if (base) r.vs_nccl = base->median_us / t.median_us;
          r.host_us = host_time_op(op, stream, 2, std::min(o.iters, 20), barrier).median_us;
          buffer.synchronize(stream);
          r.note = buffer_note;
          rows.push_back(r);
        };
        measure("dispatch bf16 fresh", fresh(false), row_bf16, nr, remote_rows, nccl_dispatch);
        measure("dispatch bf16 cached", cached(false), row_bf16, nr, remote_rows, nccl_dispatch);
        measure("dispatch fp8 fresh", fresh(true), row_fp8, nr, remote_rows, nullptr);
        measure("dispatch fp8 cached", cached(true), row_fp8, nr, remote_rows, nullptr);
        const Tuning base_tuning = tuning(buffer);  // the Buffer's own: the measured winners
        for (int k : o.dispatch_copy_warps) {  // other copy-out warp counts
          Tuning copy = base_tuning;
          copy.dispatch_copy_warps = k;  // 0: the auto count
          set_tuning(buffer, copy);
          const std::string tag = k > 0 ? " copy k" + std::to_string(k) : " copy auto";
          measure("dispatch bf16 fresh" + tag, fresh(false), row_bf16, nr, remote_rows, nccl_dispatch);
          measure("dispatch bf16 cached" + tag, cached(false), row_bf16, nr, remote_rows, nccl_dispatch);
          measure("dispatch fp8 cached" + tag, cached(true), row_fp8, nr, remote_rows, nullptr);
          set_tuning(buffer, base_tuning);
        }
        fresh(false)(stream);  // recv buffer holds bf16 rows again for combine
        measure("combine bf16", combine_op, row_bf16, nr, remote_rows, nccl_combine);
        {
          Tuning row_region = base_tuning;
          row_region.ring_combine = false;
          set_tuning(buffer, row_region);
          measure("combine bf16 row region", combine_op, row_bf16, nr, remote_rows, nccl_combine);
        }
        set_tuning(buffer, base_tuning);
        // Ring settings to time: the ones asked for, and with --ring-sweep (3 ranks up; 2 ranks always
        // take the row region) a warp or two per peer sending x chunk 0, 4, 8.
        std::vector<std::string> specs = o.combine_configs;
        if (o.ring_sweep && R >= 3) {
          for (int send_warps : {R - 1, 2 * (R - 1)})
            for (int chunk : {0, 4, 8})
              if (send_warps < cfg.num_threads / 32) specs.push_back("w" + std::to_string(send_warps) + "c" + std::to_string(chunk));
        }
        for (const std::string& spec : specs) {
          const Settings v = with_ring_settings(Settings{cfg, base_tuning}, spec);
          apply(buffer, v);
          measure("combine " + spec, combine_op, row_bf16, nr, remote_rows, nccl_combine);
          // Settings whose rings do not fit this buffer (or this rank count) run the row region.
          if (plan::ring_plan(v.config, v.tuning, R, plan::combine_rows(nvl_bytes, H, K).capacity).channels == 0)
            rows.back().note = "row region: these rings do not fit";
        }
        apply(buffer, Settings{cfg, base_tuning});
      }
      if (with_nccl) {
        rows.push_back(nd);
        rows.push_back(nc);
      }
      buffer.synchronize(stream);
    }
  }
  return rows;
}

}  // namespace epx::bench
