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
#include "ht_case.hpp"
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

HtCase::HtCase(const Options& o, Buffer& buffer, int num_tokens, int hidden, cudaStream_t stream)
    : N(num_tokens), H(hidden), K(o.topk), E(o.experts), S((hidden + 127) / 128), R(buffer.num_ranks()),
      topk(make_topk(o.seed, buffer.rank(), num_tokens, o.topk, o.experts, o.routing)),
      buffer_(buffer), stream_(stream),
      dx_(static_cast<size_t>(N) * H * 2, stream), dx8_(static_cast<size_t>(N) * H, stream),
      dsc_(static_cast<size_t>(N) * S * 4, stream), dtopk_(topk.size() * 8, stream),
      dw_(static_cast<size_t>(N) * K * 4, stream), per_rank_(4 * R, stream), per_expert_(4 * E, stream),
      in_rank_(static_cast<size_t>(N) * R, stream), recv_per_expert_(4 * (E / R), stream),
      rx_(static_cast<size_t>(N) * R * H * 2, stream), rsc_(static_cast<size_t>(N) * R * S * 4, stream),
      ridx_(static_cast<size_t>(N) * R * K * 8, stream), rw_(static_cast<size_t>(N) * R * K * 4, stream),
      rsrc_(static_cast<size_t>(N) * R * 4, stream), cx_(static_cast<size_t>(N) * H * 2, stream),
      cw_(static_cast<size_t>(N) * K * 4, stream), handle_(buffer.make_handle(num_tokens)) {
  std::mt19937_64 rng(o.seed * 977 + buffer.rank());
  std::vector<uint16_t> xh(static_cast<size_t>(N) * H);
  for (auto& v : xh) v = static_cast<uint16_t>(0x3C00 + (rng() & 0x3FF));  // finite bf16
  std::vector<uint8_t> x8(static_cast<size_t>(N) * H);
  for (auto& v : x8) v = static_cast<uint8_t>(rng() & 0x77);  // finite e4m3
  upload(dx_, xh);
  upload(dx8_, x8);
  upload(dsc_, std::vector<float>(static_cast<size_t>(N) * S, 1.f));
  upload(dtopk_, topk);
  upload(dw_, std::vector<float>(static_cast<size_t>(N) * K, 0.125f));
  const View topk_v = View::of(dtopk_.ptr, DType::kI64, {N, K});
  in_.topk_idx = topk_v;
  in_.topk_weights = View::of(dw_.ptr, DType::kF32, {N, K});
  in_.num_tokens_per_rank = View::of(per_rank_.ptr, DType::kI32, {R});
  in_.num_tokens_per_expert = View::of(per_expert_.ptr, DType::kI32, {E});
  in_.is_token_in_rank = View::of(in_rank_.ptr, DType::kBool, {N, R});
  buffer.get_dispatch_layout(topk_v, E, in_.num_tokens_per_rank, in_.num_tokens_per_expert, in_.is_token_in_rank,
                             stream);
}

DispatchOutputs HtCase::outputs(bool fp8, int64_t rows, bool meta) {
  DispatchOutputs out;
  out.recv_x = View::of(rx_.ptr, fp8 ? DType::kFP8E4M3 : DType::kBF16, {rows, H});
  if (fp8) out.recv_x_scales = View::of(rsc_.ptr, DType::kF32, {rows, S});
  if (meta) {
    out.recv_topk_idx = View::of(ridx_.ptr, DType::kI64, {rows, K});
    out.recv_topk_weights = View::of(rw_.ptr, DType::kF32, {rows, K});
    out.recv_src_idx = View::of(rsrc_.ptr, DType::kI32, {rows});
  }
  return out;
}

void HtCase::set_x(bool fp8) {
  in_.x = fp8 ? View::of(dx8_.ptr, DType::kFP8E4M3, {N, H}) : View::of(dx_.ptr, DType::kBF16, {N, H});
  in_.x_scales = fp8 ? View::of(dsc_.ptr, DType::kF32, {N, S}) : View{};
}

Op HtCase::fresh(bool fp8) {
  return [this, fp8](cudaStream_t s) {
    set_x(fp8);
    const int nr = buffer_.dispatch_notify(in_, handle_, View::of(recv_per_expert_.ptr, DType::kI32, {E / R}), s);
    buffer_.dispatch(in_, handle_, outputs(fp8, nr, true), s);
  };
}

Op HtCase::cached(bool fp8) {
  return [this, fp8](cudaStream_t s) {
    set_x(fp8);
    DispatchInputs c;
    c.x = in_.x;
    c.x_scales = in_.x_scales;
    buffer_.dispatch(c, handle_, outputs(fp8, handle_.num_recv_tokens, false), s);
  };
}

Op HtCase::combine() {
  return [this](cudaStream_t s) {
    const int64_t nr = handle_.num_recv_tokens;
    CombineInputs ci;
    ci.x = View::of(rx_.ptr, DType::kBF16, {nr, H});
    ci.topk_weights = View::of(rw_.ptr, DType::kF32, {nr, K});
    CombineOutputs co;
    co.combined_x = View::of(cx_.ptr, DType::kBF16, {N, H});
    co.combined_topk_weights = View::of(cw_.ptr, DType::kF32, {N, K});
    buffer_.combine(ci, handle_, co, s);
  };
}

void HtCase::learn_rows() {
  fresh(false)(stream_);
  buffer_.synchronize(stream_);
  num_recv = handle_.num_recv_tokens;
  counts.assign(static_cast<size_t>(R) * R, 0);
  EPX_CUDA_CHECK(cudaMemcpyAsync(counts.data(), handle_.count_matrix, 4 * R * R, cudaMemcpyDeviceToHost, stream_));
  EPX_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

Harness::Harness(const Options& options, Communicator& comm)
    : o(options), barrier([&comm] { comm.barrier(); }) {
  require_sms_fit_share(o, comm);
}

Row Harness::time(const std::string& op_name, int sms, int tokens, int hidden, const Op& op, Buffer& buffer) {
  const Timing t = time_op(op, stream, o.warmup, o.iters, flusher, barrier);
  Row r;
  r.op = op_name;
  r.num_sms = sms;
  r.tokens = tokens;
  r.hidden = hidden;
  r.median_us = t.median_us, r.min_us = t.min_us, r.max_us = t.max_us;
  r.host_us = host_time_op(op, stream, 2, std::min(o.iters, 20), barrier).median_us;
  buffer.synchronize(stream);
  return r;
}

std::vector<Row> run_ht(const Options& o, Communicator& comm) {
  const int R = comm.world(), me = comm.rank();
  std::vector<Row> rows;
  Harness harness(o, comm);
  const cudaStream_t stream = harness.stream;
  L2Flusher& flusher = harness.flusher;
  const auto& barrier = harness.barrier;

  for (int N : o.tokens) {
    for (int H : o.hidden) {
      const int K = o.topk;
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
          std::printf("%s: N %d H %d: the buffer (%zu bytes) holds %lld bf16 dispatch rows of the %lld (N x R) a "
                      "rank may receive (1/%d)\n",
                      o.program.c_str(), N, H, nvl_bytes, static_cast<long long>(buffer_rows),
                      static_cast<long long>(all_rows), o.buffer_fraction);
      }

      HtCase c(o, buffer, N, H, stream);
      c.learn_rows();
      const int64_t nr = c.num_recv;
      const int64_t local_rows = c.counts[me * R + me];
      const int64_t remote_rows = nr - local_rows;
      const int S = c.S;

      // Same-run baselines: NCCL all-to-all (bf16; real ranks only) and the raw store ceiling.
      const double row_bf16 = 2.0 * H, row_fp8 = H + 4.0 * S;
      auto gbps = [](double bytes, double us) { return us > 0 ? bytes / us / 1e3 : 0; };
      const bool with_nccl = comm.nccl() != nullptr;
      Row nd, nc;
      if (with_nccl) {
        NcclAllToAll nccl(comm.nccl(), me, R, N, H, 2);
        const Timing nccl_d = time_op([&](cudaStream_t s) { nccl.dispatch(c.x_bf16(), static_cast<const bool*>(c.is_token_in_rank().data), N, s); },
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

        auto measure = [&](const std::string& name, const Op& op, double row_bytes,
                           int64_t all_rows, int64_t remote, const Row* base) {
          Row r = harness.time(name, sms, N, H, op, buffer);
          r.logical_gbps = gbps(all_rows * row_bytes, r.median_us);
          r.nvlink_gbps = gbps(remote * row_bytes, r.median_us);
          r.pct_ceiling = ceiling > 0 ? 100.0 * r.nvlink_gbps / ceiling : -1;
          if (base) r.vs_nccl = base->median_us / r.median_us;
          r.note = buffer_note;
          rows.push_back(r);
        };
        measure("dispatch bf16 fresh", c.fresh(false), row_bf16, nr, remote_rows, nccl_dispatch);
        measure("dispatch bf16 cached", c.cached(false), row_bf16, nr, remote_rows, nccl_dispatch);
        measure("dispatch fp8 fresh", c.fresh(true), row_fp8, nr, remote_rows, nullptr);
        measure("dispatch fp8 cached", c.cached(true), row_fp8, nr, remote_rows, nullptr);
        const Tuning base_tuning = tuning(buffer);  // the Buffer's own: the measured winners
        for (int k : o.sweeps.dispatch_copy_warps) {  // other copy-out warp counts
          Tuning copy = base_tuning;
          copy.dispatch_copy_warps = k;  // 0: the auto count
          set_tuning(buffer, copy);
          const std::string tag = k > 0 ? " copy k" + std::to_string(k) : " copy auto";
          measure("dispatch bf16 fresh" + tag, c.fresh(false), row_bf16, nr, remote_rows, nccl_dispatch);
          measure("dispatch bf16 cached" + tag, c.cached(false), row_bf16, nr, remote_rows, nccl_dispatch);
          measure("dispatch fp8 cached" + tag, c.cached(true), row_fp8, nr, remote_rows, nullptr);
          set_tuning(buffer, base_tuning);
        }
        c.fresh(false)(stream);  // recv buffer holds bf16 rows again for combine
        measure("combine bf16", c.combine(), row_bf16, nr, remote_rows, nccl_combine);
        {
          Tuning row_region = base_tuning;
          row_region.ring_combine = false;
          set_tuning(buffer, row_region);
          measure("combine bf16 row region", c.combine(), row_bf16, nr, remote_rows, nccl_combine);
        }
        set_tuning(buffer, base_tuning);
        // Ring settings to time: the ones asked for, and with --ring-sweep (3 ranks up; 2 ranks always
        // take the row region) a warp or two per peer sending x chunk 0, 4, 8.
        std::vector<std::string> specs = o.sweeps.combine_configs;
        if (o.sweeps.ring && R >= 3) {
          for (int send_warps : {R - 1, 2 * (R - 1)})
            for (int chunk : {0, 4, 8})
              if (send_warps < cfg.num_threads / 32) specs.push_back("w" + std::to_string(send_warps) + "c" + std::to_string(chunk));
        }
        for (const std::string& spec : specs) {
          const Settings v = with_ring_settings(Settings{cfg, base_tuning}, spec);
          apply(buffer, v);
          measure("combine " + spec, c.combine(), row_bf16, nr, remote_rows, nccl_combine);
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
