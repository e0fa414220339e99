// Buffer: validation and launches of the low-latency ops (design.md 4.4-4.5).
#include "host/buffer_impl.hpp"
#include "host/staged_copy.hpp"
#include "host/validate.hpp"

namespace epx {

using validate::kAny;

int Buffer::next_low_latency_buffer() const { return impl_->ll_next; }

namespace {

kernels::LlCommon ll_common(const Buffer::Impl& m, OpCode op, const LlLayout& layout, int b) {
  kernels::LlCommon c;
  c.ctx = m.context(op);
  c.region_offset = m.ll_offset;
  c.layout = layout;
  c.ws = m.ll_ws;
  c.buffer_idx = b;
  c.shrink = m.shrink;
  return c;
}

// Two low-latency results may be alive at once (one per buffer); a third needs the first's hook.
void check_buffer_free(const Buffer::Impl& m, int b) {
  EPX_CHECK(m.pending[b].kind == Buffer::Impl::PendingReceive::Kind::kNone, ErrorKind::kState,
            "low-latency buffer ", b, " still has a send whose receive hook was not called: at most two "
            "low-latency results may be in flight; call the earlier hook first");
}

// The layout of this op's shape: with the zero-copy buffers as BufferOptions::ll_zero_copy says.
LlLayout op_layout(const Buffer::Impl& m, int T, int H, int K, int num_experts) {
  const int R = m.comm->world();
  return plan::ll_layout(m.ll_zero_copy, m.num_ll_bytes, R, T, H, K, num_experts / R);
}

// "N bytes = Buffer::low_latency_size_hint(T, H, R, E, K, zero_copy) (Python: ...)": what sizes `layout`.
std::string size_hint_call(const LlLayout& layout) {
  const int R = layout.num_ranks, T = layout.max_tokens, H = layout.hidden, K = layout.num_topk;
  const int E = layout.experts_per_rank * R;
  const char* zc = layout.has_zero_copy ? "true" : "false";
  const char* py_zc = layout.has_zero_copy ? "True" : "False";
  return detail::concat(plan::ll_bytes_for(layout), " bytes = Buffer::low_latency_size_hint(", T, ", ", H, ", ", R,
                        ", ", E, ", ", K, ", /*zero_copy=*/", zc, ") (Python: Buffer.get_low_latency_rdma_size_hint(",
                        T, ", ", H, ", ", R, ", ", E, ", num_topk=", K, ", zero_copy=", py_zc, "))");
}

void check_ll_fits(const Buffer::Impl& m, const LlLayout& layout) {
  EPX_CHECK(m.num_ll_bytes > 0, ErrorKind::kState, "low-latency op on a Buffer made without a low-latency region "
            "(BufferOptions::num_ll_bytes = 0)");
  EPX_CHECK(layout.num_bytes() <= m.num_ll_bytes, ErrorKind::kBufferTooSmall, "low-latency region too small",
            layout.has_zero_copy ? " for the zero-copy combine buffers (BufferOptions::ll_zero_copy = kOn)" : "",
            ": need num_ll_bytes >= ", size_hint_call(layout), ", have ", m.num_ll_bytes);
}

// The zero-copy combine buffer exists only when asked for (BufferOptions::ll_zero_copy).
void check_zero_copy(const Buffer::Impl& m, const LlLayout& layout, const char* what) {
  if (layout.has_zero_copy) return;
  const LlLayout with = plan::ll_layout(layout.num_ranks, layout.max_tokens, layout.hidden, layout.num_topk,
                                        layout.experts_per_rank, /*with_zero_copy=*/true);
  const bool off = m.ll_zero_copy == LlZeroCopy::kOff;
  EPX_FAIL(ErrorKind::kBufferTooSmall, what, ": the low-latency region has no zero-copy combine buffer (",
           off ? "BufferOptions::ll_zero_copy = kOff"
               : detail::concat("num_ll_bytes = ", m.num_ll_bytes, " does not hold it; ll_zero_copy = kIfRoom"),
           "): it needs num_ll_bytes (Python: num_rdma_bytes) >= ", size_hint_call(with),
           off ? ", and ll_zero_copy = kOn or kIfRoom" : "");
}

}  // namespace

LowLatencyHandle Buffer::low_latency_dispatch(const LowLatencyDispatchArgs& a, const LowLatencyDispatchOutputs& out,
                                              cudaStream_t stream) {
  Impl& m = *impl_;
  return m.collective(OpCode::kLlDispatch, [&]() -> LowLatencyHandle {
    m.check_usable();
    check_buffer_free(m, m.ll_next);
    const int R = num_ranks();
    const int T = a.num_max_dispatch_tokens_per_rank;
    validate::in_range(T, "num_max_dispatch_tokens_per_rank", 1, kMaxLlTokens);
    validate::tensor(a.x, "x", DType::kBF16, {kAny, kAny});
    validate::rows_16b_aligned(a.x, "x");
    const int64_t N = a.x.shape[0];
    const int H = static_cast<int>(a.x.shape[1]);
    EPX_ARG_CHECK(N <= T, "x: ", N, " tokens exceed num_max_dispatch_tokens_per_rank = ", T);
    EPX_ARG_CHECK(H % 128 == 0 && H <= kMaxLlHidden, "x: hidden must be a multiple of 128 and <= ", kMaxLlHidden,
                  ", got ", H);
    validate::tensor(a.topk_idx, "topk_idx", DType::kI64, {N, kAny});
    const int K = static_cast<int>(a.topk_idx.shape[1]);
    validate::in_range(K, "topk_idx.shape[1] (num_topk)", 1, kMaxLlTopk);
    EPX_ARG_CHECK(a.topk_idx.stride[1] == 1 || K == 1, "topk_idx: last dimension must be contiguous");
    const int E = a.num_experts;
    EPX_ARG_CHECK(E >= R && E % R == 0 && E / R <= kMaxLocalExperts, "num_experts: must be a multiple of ", R,
                  " with at most ", kMaxLocalExperts, " per rank, got ", E);
    const int E_loc = E / R;
    const int64_t RT = static_cast<int64_t>(R) * T;
    const bool ue8m0 = a.scale_format == LowLatencyScale::kUE8M0;
    EPX_ARG_CHECK(a.use_fp8 || !ue8m0, "scale_format: UE8M0 needs use_fp8");
    validate::tensor(out.recv_x, "recv_x", a.use_fp8 ? DType::kFP8E4M3 : DType::kBF16, {E_loc, RT, H});
    validate::contiguous(out.recv_x, "recv_x");
    if (a.use_fp8) {
      const int C = ue8m0 ? (H / 128 + 3) / 4 : H / 128;
      validate::tensor(out.recv_scales, "recv_scales", ue8m0 ? DType::kI32 : DType::kF32, {E_loc, RT, C});
      EPX_ARG_CHECK(out.recv_scales.stride[0] == RT * C && out.recv_scales.stride[1] == 1 &&
                        (out.recv_scales.stride[2] == RT || C == 1),
                    "recv_scales: must be column-major in the last two dims (strides (", RT * C, ", 1, ", RT,
                    ")), got ", validate::describe(out.recv_scales));
    } else {
      EPX_ARG_CHECK(!out.recv_scales.defined(), "recv_scales: only with use_fp8");
    }
    validate::tensor(out.recv_count, "recv_count", DType::kI32, {E_loc});
    validate::tensor(out.src_info, "src_info", DType::kI32, {E_loc, RT});
    validate::tensor(out.layout_range, "layout_range", DType::kI64, {E_loc, R});
    validate::tensor(out.src_topk_slot, "src_topk_slot", DType::kI32, {E_loc, RT});
    for (const View* v : {&out.recv_count, &out.src_info, &out.layout_range, &out.src_topk_slot})
      validate::contiguous(*v, "recv_count / src_info / layout_range / src_topk_slot");
    validate::optional(a.cumulative_local_expert_recv_stats, "cumulative_local_expert_recv_stats", DType::kI32, {E_loc});
    validate::optional(a.dispatch_wait_recv_cost_stats, "dispatch_wait_recv_cost_stats", DType::kI64, {R});
    const LlLayout layout = op_layout(m, T, H, K, E);
    check_ll_fits(m, layout);

    const int b = m.ll_next;
    kernels::LlDispatchParams p{};
    p.c = ll_common(m, OpCode::kLlDispatch, layout, b);
    p.num_tokens = static_cast<int>(N);
    p.x = a.x.ptr<uint16_t>();
    p.x_stride = a.x.stride[0];
    p.topk_idx = a.topk_idx.ptr<int64_t>();
    p.topk_stride = a.topk_idx.stride[0];
    p.use_fp8 = a.use_fp8;
    p.round_scale = a.round_scale || ue8m0;
    p.ue8m0 = ue8m0;
    p.recv_x = static_cast<uint8_t*>(out.recv_x.data);
    p.recv_scales = a.use_fp8 ? out.recv_scales.data : nullptr;
    p.recv_count = out.recv_count.ptr<int>();
    p.src_info = out.src_info.ptr<int>();
    p.src_topk_slot = out.src_topk_slot.ptr<int>();
    p.layout_range = out.layout_range.ptr<int64_t>();
    p.cumulative_stats = a.cumulative_local_expert_recv_stats.defined() ? a.cumulative_local_expert_recv_stats.ptr<int>() : nullptr;
    p.wait_stats = a.dispatch_wait_recv_cost_stats.defined() ? a.dispatch_wait_recv_cost_stats.ptr<int64_t>() : nullptr;
    const int sms = m.comm->num_device_sms();
    // Receive grid: every SM, several blocks per local expert when there are fewer experts than SMs.
    p.blocks_per_expert = std::max(1, sms / E_loc);
    const int recv_blocks = E_loc >= sms ? sms : E_loc * p.blocks_per_expert;
    if (a.return_recv_hook) {
      kernels::launch_ll_dispatch_send(p, std::max(1, std::min<int>(static_cast<int>(N), sms)), stream);
      m.after_launch("low_latency_dispatch (send)", stream);
      Impl::PendingReceive pr;
      pr.kind = Impl::PendingReceive::Kind::kDispatch;
      pr.dispatch = p;
      pr.num_blocks = recv_blocks;
      m.pending[b] = pr;
    } else {
      // One launch: the send half, then (same blocks) the receive half.
      kernels::launch_ll_dispatch_fused(p, recv_blocks, stream);
      m.after_launch("low_latency_dispatch", stream);
    }
    m.ll_next ^= 1;

    LowLatencyHandle h;
    h.num_max_dispatch_tokens_per_rank = T;
    h.hidden = H;
    h.num_experts = E;
    h.num_topk = K;
    h.buffer_idx = b;
    h.src_info = out.src_info;
    h.layout_range = out.layout_range;
    h.src_topk_slot = out.src_topk_slot;
    return h;
  });
}

void Buffer::low_latency_receive(int b, cudaStream_t stream) {
  Impl& m = *impl_;
  return m.collective(OpCode::kLlDispatch, [&]() {
    m.check_usable();
    validate::in_range(b, "buffer_idx", 0, 1);
    Impl::PendingReceive& pr = m.pending[b];
    EPX_CHECK(pr.kind != Impl::PendingReceive::Kind::kNone, ErrorKind::kState,
              "low_latency_receive: nothing pending on low-latency buffer ", b, " (the hook was already called?)");
    if (pr.kind == Impl::PendingReceive::Kind::kDispatch) {
      kernels::launch_ll_dispatch_recv(pr.dispatch, pr.num_blocks, stream);
      m.after_launch("low_latency_dispatch (receive)", stream);
    } else {
      kernels::launch_ll_combine_recv(pr.combine, pr.num_blocks, stream);
      m.after_launch("low_latency_combine (receive)", stream);
    }
    pr.kind = Impl::PendingReceive::Kind::kNone;
  });
}

int Buffer::low_latency_combine(const LowLatencyCombineArgs& a, const LowLatencyHandle& h, const View& out,
                                 cudaStream_t stream) {
  Impl& m = *impl_;
  return m.collective(OpCode::kLlCombine, [&]() {
    m.check_usable();
    check_buffer_free(m, m.ll_next);
    const int R = num_ranks();
    const int T = h.num_max_dispatch_tokens_per_rank, H = h.hidden, K = h.num_topk;
    EPX_ARG_CHECK(T > 0 && h.src_info.defined(), "handle: not from low_latency_dispatch");
    const int E_loc = h.num_experts / R;
    const int64_t RT = static_cast<int64_t>(R) * T;
    if (!a.zero_copy || a.x.defined()) validate::tensor(a.x, "x", DType::kBF16, {E_loc, RT, H});
    if (!a.zero_copy) validate::contiguous(a.x, "x");
    validate::tensor(a.topk_idx, "topk_idx", DType::kI64, {kAny, K});
    const int64_t N = a.topk_idx.shape[0];
    EPX_ARG_CHECK(N <= T, "topk_idx: ", N, " tokens exceed num_max_dispatch_tokens_per_rank = ", T);
    validate::tensor(a.topk_weights, "topk_weights", DType::kF32, {N, K});
    EPX_ARG_CHECK(a.topk_idx.stride[1] == 1 && a.topk_weights.stride[1] == 1,
                  "topk_idx / topk_weights: last dimension must be contiguous");
    validate::tensor(out, "out", DType::kBF16, {N, H});
    validate::rows_16b_aligned(out, "out");
    const LlLayout layout = op_layout(m, T, H, K, h.num_experts);
    check_ll_fits(m, layout);
    // Checked here, inside the collective op, so that peers see the failure (abort word).
    if (a.zero_copy) check_zero_copy(m, layout, "low_latency_combine (zero_copy)");

    const int b = m.ll_next;
    kernels::LlCombineParams p{};
    p.c = ll_common(m, OpCode::kLlCombine, layout, b);
    p.x = a.zero_copy ? layout.zero_copy(m.symmetric + m.ll_offset, b) : a.x.ptr<uint16_t>();
    p.src_info = h.src_info.ptr<int>();
    p.src_topk_slot = h.src_topk_slot.ptr<int>();
    p.layout_range = h.layout_range.ptr<int64_t>();
    p.num_tokens = static_cast<int>(N);
    p.topk_idx = a.topk_idx.ptr<int64_t>();
    p.topk_stride = a.topk_idx.stride[0];
    p.topk_weights = a.topk_weights.ptr<float>();
    p.weight_stride = a.topk_weights.stride[0];
    p.out = out.ptr<uint16_t>();
    p.out_stride = out.stride[0];
    const int sms = m.comm->num_device_sms();
    if (a.return_recv_hook) {
      kernels::launch_ll_combine_send(p, sms, stream);
      m.after_launch("low_latency_combine (send)", stream);
      Impl::PendingReceive pr;
      pr.kind = Impl::PendingReceive::Kind::kCombine;
      pr.combine = p;
      pr.num_blocks = std::max(1, std::min<int>(static_cast<int>(N), sms));
      m.pending[b] = pr;
    } else {
      // One launch: the send half over every SM, then (same blocks) the receive half.
      kernels::launch_ll_combine_fused(p, sms, stream);
      m.after_launch("low_latency_combine", stream);
    }
    m.ll_next ^= 1;
    return b;
  });
}

View Buffer::next_combine_buffer(const LowLatencyHandle& h) const {
  const Impl& m = *impl_;
  const int R = num_ranks();
  EPX_ARG_CHECK(h.num_max_dispatch_tokens_per_rank > 0, "handle: not from low_latency_dispatch");
  const LlLayout layout = op_layout(m, h.num_max_dispatch_tokens_per_rank, h.hidden, h.num_topk, h.num_experts);
  check_ll_fits(m, layout);
  check_zero_copy(m, layout, "next_combine_buffer (Python: get_next_low_latency_combine_buffer)");
  char* region = m.symmetric + m.ll_offset;
  return View::of(layout.zero_copy(region, m.ll_next), DType::kBF16,
                  {h.num_experts / R, static_cast<int64_t>(R) * h.num_max_dispatch_tokens_per_rank, h.hidden});
}

void Buffer::clean_low_latency_buffer() {
  Impl& m = *impl_;
  EPX_CHECK(m.num_ll_bytes > 0, ErrorKind::kState, "clean_low_latency_buffer: no low-latency region");
  m.quiesce("clean_low_latency_buffer");
  m.comm->barrier(m.timeout_s());
  m.zero_ll_state(/*keep_masks=*/true);
  m.ll_next = 0;
  m.pending[0] = m.pending[1] = Impl::PendingReceive{};
  host_wait_stream(m.arena->stream(), m.timeout_s() + 10, "clean_low_latency_buffer", m.comm->rank());
  m.comm->barrier(m.timeout_s());
}

}  // namespace epx

namespace epx {

namespace {
void check_shrink(const Buffer::Impl& m, const char* what) {
  EPX_CHECK(m.shrink && m.ll_ws != nullptr, ErrorKind::kState, what,
            ": needs a Buffer made with BufferOptions::enable_shrink (and a low-latency region)");
}
}  // namespace

void Buffer::low_latency_update_mask_buffer(int rank_to_mask, bool mask) {
  Impl& m = *impl_;
  check_shrink(m, "low_latency_update_mask_buffer");
  validate::in_range(rank_to_mask, "rank_to_mask", 0, num_ranks() - 1);
  const int value = mask ? 1 : 0;
  detail::copy_to_device(&m.ll_ws->mask[rank_to_mask], &value, sizeof(int), m.arena->stream(), m.timeout_s() + 10,
                         "low_latency_update_mask_buffer", rank());
}

void Buffer::low_latency_query_mask_buffer(const View& mask_status, cudaStream_t stream) {
  Impl& m = *impl_;
  check_shrink(m, "low_latency_query_mask_buffer");
  validate::tensor(mask_status, "mask_status", DType::kI32, {num_ranks()});
  validate::contiguous(mask_status, "mask_status");
  EPX_CUDA_CHECK(cudaMemcpyAsync(mask_status.data, m.ll_ws->mask, sizeof(int) * num_ranks(), cudaMemcpyDeviceToDevice,
                                 stream));
}

void Buffer::low_latency_clean_mask_buffer() {
  Impl& m = *impl_;
  check_shrink(m, "low_latency_clean_mask_buffer");
  EPX_CUDA_CHECK(cudaMemsetAsync(m.ll_ws->mask, 0, sizeof(m.ll_ws->mask), m.arena->stream()));
  host_wait_stream(m.arena->stream(), m.timeout_s() + 10, "low_latency_clean_mask_buffer", rank());
}

}  // namespace epx
