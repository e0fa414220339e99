"""GPU replays of the call sequences of DeepEP's four big clients on epx's `deep_ep`-compatible Buffer:
Megatron-core (megatron/core/transformer/moe/fused_a2a.py), SGLang (token_dispatcher/deepep.py), vLLM
(device_communicators/all2all.py, fused_moe/prepare_finalize/deepep_ht.py, deepep_ll.py) and LMDeploy
(backends/cuda/moe token dispatcher). Each rank function makes the client's calls in its order, with
its keywords and values (buffer sizing, constructor keywords, set_num_sms, events and streams,
handles reused for backward, hooks, micro-batches, cleanup), through `import deep_ep` with epx
aliased under DeepEP's module names. What the client computes between the calls (quantization,
experts, weighting) is replaced by toy steps whose results the references compute bit for bit.

Every output is compared bitwise with the pure-torch references of epx_test_utils: dispatches move
bytes; the high-throughput combine sums in fp32 in ascending rank order; the low-latency combine is
reproduced with its fp32 fma order (`ref_ll_combine`). Outputs a client hands in (`out=`, the
tensor it copies into) are pre-filled with NaN. Runs on the `ranks` fixture: simulated ranks on one
GPU (2, 3, 4, 8) and real ranks where the GPUs exist; everything skips without a GPU.

Where a client sets something from its environment or its model, the replay picks a value and says
so (VLLM_DEEPEP_BUFFER_SIZE_MB, DeepGEMM on or off, the Blackwell UE8M0 scales). Where a client
calls torch.accelerator.synchronize(), a simulated rank syncs its own stream instead (a device-wide
sync on a simulated rank waits for its peers' kernels, see python/README.md).
"""
import pytest

from conftest import require_epx

torch, epx = require_epx()
epx.alias_as_deep_ep()  # as a deployment that serves DeepEP's clients with epx does, before they import it
import deep_ep  # noqa: E402
from deep_ep import Buffer  # noqa: E402
from deep_ep.utils import EventHandle, EventOverlap  # noqa: E402

from epx_test_utils import (assert_equal, expert_scale, fp8_dequant, host, ll_quantize, make_input,  # noqa: E402
                            pack_ue8m0, per_token_cast_to_fp8, ref_combine, ref_dispatch, ref_ll_combine,
                            ref_ll_dispatch, ref_layout, token_counts)
from test_ll import expert_outputs  # noqa: E402

TOPK_HT = 4
TOPK_LL = 8
MAX_TOKENS_HT = 256
# Low-latency num_max_dispatch_tokens_per_rank: SGLang's and LMDeploy's default is 128.
T_LL = 128
# vLLM's DeepEP buffers take VLLM_DEEPEP_BUFFER_SIZE_MB (default 1024) MiB of num_nvl_bytes; the
# replay sets it to 64 (one GPU holds every simulated rank's buffers).
VLLM_DEEPEP_BUFFER_SIZE_MB = 64
# DeepEP's own default SM count, which Megatron-core (moe_deepep_num_sms), vLLM and LMDeploy
# (DEEPEP_BUFFER_NUM_SMS) pass to Buffer.set_num_sms by default.
CLIENT_NUM_SMS = 20


def num_experts(world: int) -> int:
    return 8 * world


def _sm_settings():
    return Buffer.num_sms, Buffer._num_sms_set


def _restore_sms(saved) -> None:
    Buffer.num_sms, Buffer._num_sms_set = saved


def _end_of_client(ctx, saved) -> None:
    """Puts set_num_sms back: on a real rank here (its own process); simulated ranks share the class,
    so the test function does it once they are all done (see _run)."""
    if not ctx.simulated:
        _restore_sms(saved)


def _run(ranks, fn, *args):
    saved = _sm_settings()
    try:
        ranks.run(fn, *args)
    finally:
        _restore_sms(saved)


def _inputs(seed, world, hidden, num_topk, lo=1, hi=MAX_TOKENS_HT, salt=0, drop=0.1, experts=None,
            empty_rank=None):
    """Every rank's tokens (any rank can make any rank's); `experts` limits the ids drawn (default all
    of them); `empty_rank` gets no tokens at all."""
    counts = token_counts(seed, world, lo, hi, salt)
    if empty_rank is not None:
        counts[empty_rank] = 0
    E = num_experts(world) if experts is None else experts
    return [make_input(seed, r, counts[r], hidden, E, num_topk, drop=drop, salt=salt) for r in range(world)]


def _sync_device(ctx) -> None:
    """torch.accelerator.synchronize() of the client: the device on a real rank, the rank's stream on a
    simulated one."""
    if ctx.simulated:
        ctx.synchronize()
    else:
        torch.accelerator.synchronize()


# ---- High-throughput checks --------------------------------------------------------------------------

def _ht_refs(xs, scales, inputs, E, expert_alignment=1):
    topk = [i.topk_idx for i in inputs]
    weights = [i.topk_weights for i in inputs]
    return [ref_dispatch(xs, scales, topk, weights, r, E, expert_alignment) for r in range(len(inputs))]


def _check_ht_dispatch(ref, recv_x, recv_topk_idx, recv_topk_weights, counts, handle, what):
    if isinstance(recv_x, tuple):
        assert ref.scales is not None, f"{what}: got (x, scales), expected one tensor"
        assert_equal(recv_x[0], ref.x, f"{what}: recv_x (fp8)", rows=ref)
        assert_equal(recv_x[1], ref.scales, f"{what}: recv_x scales", rows=ref)
    else:
        assert_equal(recv_x, ref.x, f"{what}: recv_x", rows=ref)
    if recv_topk_idx is not None:
        assert_equal(recv_topk_idx, ref.topk_idx, f"{what}: recv_topk_idx", rows=ref)
    if recv_topk_weights is not None:
        assert_equal(recv_topk_weights, ref.topk_weights, f"{what}: recv_topk_weights", rows=ref)
    if counts is not None:
        assert list(counts) == ref.num_recv_tokens_per_expert, f"{what}: {counts} != {ref.num_recv_tokens_per_expert}"
    if handle is not None:
        assert_equal(handle[0], ref.rank_prefix_matrix, f"{what}: handle[0] (rank_prefix_matrix)")
        assert_equal(handle[3], ref.src_idx, f"{what}: handle[3] (recv_src_idx)")


def _unpack_ue8m0(words: torch.Tensor, groups: int) -> torch.Tensor:
    """int32 [N, ceil(G/4)] packed UE8M0 exponents -> float32 scales [N, G] (exact powers of two)."""
    n = words.size(0)
    b = torch.stack([(words >> (8 * k)) & 0xFF for k in range(4)], dim=-1).reshape(n, -1)[:, :groups]
    return ((b.to(torch.int32)) << 23).view(torch.float32)  # biased exponent in place: 2^(b - 127)


def _expert_rows(rank: int, recv) -> torch.Tensor:
    """The toy experts of the high-throughput replays: each received row times 1 + rank / 4, in bf16
    (elementwise: the same bits on the GPU and in the reference). fp8 rows are dequantized first."""
    if isinstance(recv, tuple):
        q, scales = recv
        if scales.dtype == torch.int32:
            scales = _unpack_ue8m0(scales, q.size(1) // 128)
        rows = fp8_dequant(q, scales)
    else:
        rows = recv.float()
    factor = torch.tensor(1.0 + rank / 4.0, dtype=torch.float32, device=rows.device)
    return (rows * factor).to(torch.bfloat16)


def _ref_expert_rows(refs):
    return [_expert_rows(r, (ref.x, ref.scales) if ref.scales is not None else ref.x) for r, ref in enumerate(refs)]


def _quantize_ht(x: torch.Tensor, kind: str):
    """(the payload as the client hands it to dispatch, made on a device; the fp8 bytes; the scales as the
    reference moves them): 'bf16' -> x; 'fp8' -> per-128 float32 scales [N, H/128] (row-major);
    'ue8m0' -> packed UE8M0 int32 scales [N, ceil(H/512)] in DeepGEMM's column-major layout with the
    rows padded to a multiple of 4 (SGLang's column_major_scales + scale_tma_aligned + scale_ue8m0)."""
    if kind == "bf16":
        return (lambda dev: x.to(dev)), x, None
    if kind == "fp8":
        q, s = per_token_cast_to_fp8(x)
        return (lambda dev: (q.to(dev), s.to(dev))), q, s
    q, _, exponent = ll_quantize(x, round_scale=True)
    packed = pack_ue8m0(exponent)
    n, c = packed.shape
    storage = torch.zeros((c, (n + 3) // 4 * 4), dtype=torch.int32)
    storage[:, :n] = packed.t()
    return (lambda dev: (q.to(dev), storage.to(dev).t()[:n])), q, packed


# ---- Low-latency checks ------------------------------------------------------------------------------

_LL_MODES = {"bf16": (False, False, False), "fp8": (True, False, False), "ue8m0": (True, True, True)}


def _check_ll_dispatch(topks, xs, me, recv, recv_count, handle, T, E, mode, what):
    """recv_count, the handle's layout and every valid row (payload, scales, source token, top-k slot)
    bit for bit; rows past recv_count are not written (the contract) and not read."""
    use_fp8, round_scale, ue8m0 = _LL_MODES[mode]
    hidden = xs[0].size(1)
    ref = ref_ll_dispatch(topks, me, E)
    assert_equal(recv_count, ref.recv_count, f"{what}: recv_count")
    assert handle[2:5] == (T, hidden, E), f"{what}: handle[2:5] = {handle[2:5]}"
    assert_equal(handle[1], ref.layout_range, f"{what}: layout_range")
    quant = [ll_quantize(x, round_scale) for x in xs] if use_fp8 else None
    src_info, slot = host(handle[0]), host(handle[5])
    for j, rows in enumerate(ref.rows):
        n = len(rows)
        if n == 0:
            continue
        src = [s for s, _, _ in rows]
        tok = [t for _, t, _ in rows]
        assert_equal(src_info[j, :n], torch.tensor(tok, dtype=torch.int32), f"{what}: src_info[{j}]")
        assert_equal(slot[j, :n], torch.tensor([k for _, _, k in rows], dtype=torch.int32), f"{what}: topk slot[{j}]")
        if not use_fp8:
            assert_equal(recv[j, :n], torch.stack([xs[s][t] for s, t in zip(src, tok)]), f"{what}: recv_x[{j}]")
            continue
        assert_equal(recv[0][j, :n], torch.stack([quant[s][0][t] for s, t in zip(src, tok)]),
                     f"{what}: recv_x[{j}] (fp8)")
        if ue8m0:
            expected = torch.stack([pack_ue8m0(quant[s][2][t:t + 1])[0] for s, t in zip(src, tok)])
        else:
            expected = torch.stack([quant[s][1][t] for s, t in zip(src, tok)])
        assert_equal(recv[1][j, :n], expected, f"{what}: recv scales[{j}]")


def _ll_expert_outputs(rank: int, recv, recv_count, mode: str) -> torch.Tensor:
    """The toy experts: y[j][row] = bf16(dequant(row) * expert_scale(rank * E_loc + j)), 0 past
    recv_count[j] (test_ll's)."""
    return expert_outputs(rank, recv, recv_count, mode)


def _ref_ll_combined(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, mode: str) -> torch.Tensor:
    """What this rank's low-latency combine returns when every expert runs _ll_expert_outputs: the
    expert's row of token t is the token's own (quantized) row, so y(t, k) = bf16(dequant(x_t) *
    expert_scale(topk_idx[t, k])), then the kernel's fma order."""
    use_fp8, round_scale, _ = _LL_MODES[mode]
    if use_fp8:
        q, scale_inv, _ = ll_quantize(x, round_scale)
        rows = fp8_dequant(q, scale_inv)
    else:
        rows = x.float()
    n, hidden = rows.shape
    k_num = topk_idx.size(1)
    factors = torch.tensor([[expert_scale(int(e)) if e >= 0 else 0.0 for e in row] for row in topk_idx.tolist()],
                           dtype=torch.float32).view(n, k_num, 1)
    y = (rows.view(n, 1, hidden) * factors).to(torch.bfloat16)
    return ref_ll_combine(y, topk_idx, topk_weights)


def _check_ll_combine(combined, x_cpu, topk_cpu, weights_cpu, mode, what):
    assert combined.dtype == torch.bfloat16 and tuple(combined.shape) == tuple(x_cpu.shape), \
        f"{what}: {combined.dtype} {tuple(combined.shape)}"
    assert_equal(combined, _ref_ll_combined(x_cpu, topk_cpu, weights_cpu, mode), f"{what}: combined_x")


# ---- Megatron-core: fused_a2a (FusedDispatch / FusedCombine, forward and backward) --------------------

def _megatron_get_buffer(ctx, group, hidden_bytes: int):
    """fused_a2a.get_buffer: sized by both configs' hints, made once (module global `_buffer`)."""
    num_nvl_bytes, num_rdma_bytes = 0, 0
    for config in (Buffer.get_dispatch_config(group.size()), Buffer.get_combine_config(group.size())):
        num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, group.size()), num_nvl_bytes)
        num_rdma_bytes = max(config.get_rdma_buffer_size_hint(hidden_bytes, group.size()), num_rdma_bytes)
    key = ("megatron", "_buffer")
    buffer = ctx.buffers.get(key)
    if (buffer is None or buffer.group != group or buffer.num_nvl_bytes < num_nvl_bytes
            or buffer.num_rdma_bytes < num_rdma_bytes):
        if buffer is not None:  # replaced (as `_buffer = Buffer(...)` drops the old one)
            del ctx.buffers[key]
            del buffer
        ctx.buffers[key] = Buffer(group, num_nvl_bytes, num_rdma_bytes)
    return ctx.buffers[key]


def _megatron(ctx, seed, async_finish, allocate_on_comm_stream):
    world, me, dev, group = ctx.world, ctx.rank, ctx.device, ctx.group
    E, H = num_experts(world), 512
    saved = _sm_settings()
    Buffer.set_num_sms(CLIENT_NUM_SMS)  # set_deepep_num_sms(moe_deepep_num_sms)
    inputs = _inputs(seed, world, H, TOPK_HT)
    mine = inputs[me]
    x = mine.x.to(dev).contiguous()
    token_indices, token_probs = mine.topk_idx.to(dev), mine.topk_weights.to(dev)

    # FusedDispatch.forward
    previous_event = EventOverlap(EventHandle()) if async_finish else None
    buffer = _megatron_get_buffer(ctx, group, x.size(1) * max(x.element_size(), 2))  # get_hidden_bytes
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, event = \
        buffer.get_dispatch_layout(token_indices, E, previous_event=previous_event, async_finish=async_finish,
                                   allocate_on_comm_stream=allocate_on_comm_stream)
    recv_x, recv_token_indices, recv_token_probs, num_recv_tokens_per_expert_list, handle, after_event_overlap = \
        buffer.dispatch(x, topk_idx=token_indices, topk_weights=token_probs, num_tokens_per_rank=num_tokens_per_rank,
                        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
                        num_tokens_per_expert=num_tokens_per_expert, previous_event=event, async_finish=async_finish,
                        allocate_on_comm_stream=allocate_on_comm_stream)
    if async_finish:
        after_event_overlap.current_stream_wait()
    assert (event.event is not None) == async_finish and (after_event_overlap.event is not None) == async_finish
    tokens_per_expert = torch.tensor(num_recv_tokens_per_expert_list)

    ref_l = ref_layout(mine.topk_idx, E, world)
    assert_equal(num_tokens_per_rank, ref_l[0], "num_tokens_per_rank")
    assert num_tokens_per_rdma_rank is None
    assert_equal(num_tokens_per_expert, ref_l[1], "num_tokens_per_expert")
    assert_equal(is_token_in_rank, ref_l[2], "is_token_in_rank")
    refs = _ht_refs([i.x for i in inputs], None, inputs, E)
    _check_ht_dispatch(refs[me], recv_x, recv_token_indices, recv_token_probs, num_recv_tokens_per_expert_list,
                       handle, "FusedDispatch.forward")
    assert_equal(tokens_per_expert, torch.tensor(refs[me].num_recv_tokens_per_expert), "tokens_per_expert")

    # The experts, then FusedCombine.forward.
    y = _expert_rows(me, recv_x)
    previous_event = EventOverlap(EventHandle()) if async_finish else None
    buffer = _megatron_get_buffer(ctx, group, y.size(1) * max(y.element_size(), 2))
    combined_x, _, after_event = buffer.combine(y, handle=handle, async_finish=async_finish,
                                                previous_event=previous_event,
                                                allocate_on_comm_stream=allocate_on_comm_stream)
    if async_finish:
        after_event.current_stream_wait()
    n = mine.x.size(0)
    assert_equal(combined_x, ref_combine(refs, _ref_expert_rows(refs), me, n)[0], "FusedCombine.forward: combined_x")

    # FusedCombine.backward: the gradient goes out through a cached dispatch of the saved handle.
    grads = [make_input(seed, r, inputs[r].x.size(0), H, E, TOPK_HT, salt=1).x for r in range(world)]
    grad_output = grads[me].to(dev)
    previous_event = EventOverlap(EventHandle()) if async_finish else None
    buffer = _megatron_get_buffer(ctx, group, grad_output.size(1) * max(grad_output.element_size(), 2))
    grad_x, *rest, after_event = buffer.dispatch(grad_output.contiguous(), handle=handle, previous_event=previous_event,
                                                 async_finish=async_finish,
                                                 allocate_on_comm_stream=allocate_on_comm_stream)
    if async_finish:
        after_event.current_stream_wait()
    assert rest == [None] * 4
    grad_refs = _ht_refs(grads, None, inputs, E)
    _check_ht_dispatch(grad_refs[me], grad_x, None, None, None, None, "FusedCombine.backward (cached dispatch)")

    # FusedDispatch.backward: the gradients of recv_x and of the probs come back through a combine.
    grad_recv = _expert_rows(me, grad_x)
    grad_token_probs = recv_token_probs * 0.5
    previous_event = EventOverlap(EventHandle()) if async_finish else None
    buffer = _megatron_get_buffer(ctx, group, grad_recv.size(1) * max(grad_recv.element_size(), 2))
    grad_x_in, grad_probs_in, after_event = buffer.combine(
        grad_recv.contiguous(), handle, topk_weights=grad_token_probs.float(), previous_event=previous_event,
        async_finish=async_finish, allocate_on_comm_stream=allocate_on_comm_stream)
    if async_finish:
        after_event.current_stream_wait()
    ref_x, ref_w = ref_combine(grad_refs, _ref_expert_rows(grad_refs), me, n,
                               [r.topk_weights * 0.5 for r in refs])
    assert_equal(grad_x_in, ref_x, "FusedDispatch.backward: grad_x")
    assert_equal(grad_probs_in, ref_w, "FusedDispatch.backward: grad_token_probs")
    _end_of_client(ctx, saved)


# ---- SGLang: DeepEPBuffer (auto mode), the normal and the low-latency dispatchers ---------------------

def _sglang_buffer(ctx, group, hidden: int, param_bytes: int, num_max_dispatch_tokens_per_rank: int, E: int):
    """DeepEPBuffer.get_deepep_buffer in DeepEPMode.AUTO without --deepep-config (made once)."""
    key = ("sglang", hidden, param_bytes, num_max_dispatch_tokens_per_rank, E)
    if key in ctx.buffers:
        return ctx.buffers[key]
    num_nvl_bytes, num_rdma_bytes = 0, 0
    hidden_bytes = hidden * param_bytes
    # DeepEPConfig's normal_dispatch_config / normal_combine_config are None without --deepep-config.
    for config in (Buffer.get_dispatch_config(group.size()), Buffer.get_combine_config(group.size())):
        num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, group.size()), num_nvl_bytes)
        num_rdma_bytes = max(config.get_rdma_buffer_size_hint(hidden_bytes, group.size()), num_rdma_bytes)
    assert E % group.size() == 0
    num_rdma_bytes = max(Buffer.get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, group.size(),
                                                               E), num_rdma_bytes)
    num_qps_per_rank = max(Buffer.num_sms, E // group.size())  # DeepEPConfig.num_sms = Buffer.num_sms
    ctx.buffers[key] = Buffer(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode=True,
                              num_qps_per_rank=num_qps_per_rank, allow_mnnvl=True)
    return ctx.buffers[key]


def _sglang(ctx, seed, output_dtype, async_finish, return_recv_hook):
    """output_dtype: 'bf16', 'fp8' (DeepGEMM on Hopper: float32 scales) or 'ue8m0' (DeepGEMM on
    Blackwell: packed UE8M0 scales; low-latency round_scale=use_ue8m0=True)."""
    world, me, dev, group = ctx.world, ctx.rank, ctx.device, ctx.group
    E, H, T = num_experts(world), 1024, T_LL
    param_bytes = 2 if output_dtype == "bf16" else 1
    use_fp8 = output_dtype != "bf16"
    blackwell = output_dtype == "ue8m0"

    # ---- Normal mode (_DeepEPDispatcherImplNormal), DeepGEMM on: expert_alignment=128.
    buffer = _sglang_buffer(ctx, group, H, param_bytes, T, E)  # _get_buffer: set_dispatch_mode_as_normal()
    inputs = _inputs(seed, world, H, TOPK_HT)
    mine = inputs[me]
    payloads = [_quantize_ht(i.x, output_dtype) for i in inputs]
    hidden_states = payloads[me][0](dev)
    topk_ids = mine.topk_idx.to(dev).to(torch.int64)
    topk_weights = mine.topk_weights.to(dev)
    previous_event = Buffer.capture() if async_finish else None  # dispatch_a
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, previous_event = \
        buffer.get_dispatch_layout(topk_ids, E, previous_event=previous_event, async_finish=async_finish,
                                   allocate_on_comm_stream=previous_event is not None)
    recv_x, recv_topk_ids, recv_topk_weights, num_recv_tokens_per_expert, handle, event = buffer.dispatch(
        hidden_states, topk_idx=topk_ids, topk_weights=topk_weights, num_tokens_per_rank=num_tokens_per_rank,
        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert, previous_event=previous_event, async_finish=async_finish,
        allocate_on_comm_stream=(previous_event is not None) and async_finish, expert_alignment=128, config=None)
    event.current_stream_wait() if async_finish else ()
    refs = _ht_refs([p[1] for p in payloads], None if output_dtype == "bf16" else [p[2] for p in payloads],
                    inputs, E, expert_alignment=128)
    _check_ht_dispatch(refs[me], recv_x, recv_topk_ids, recv_topk_weights, num_recv_tokens_per_expert, handle,
                       f"SGLang normal dispatch ({output_dtype})")
    if isinstance(recv_x, tuple):
        hidden_states_out, hidden_states_scale = recv_x
        assert hidden_states_scale.dtype == (torch.int32 if blackwell else torch.float32)

    # combine_a / combine_b: the experts' (weighted, reduced) rows go back.
    output = _expert_rows(me, recv_x)
    previous_event = Buffer.capture() if async_finish else None
    combined_x, _, event = buffer.combine(output, handle, async_finish=async_finish, previous_event=previous_event,
                                          allocate_on_comm_stream=previous_event is not None, config=None)
    event.current_stream_wait() if async_finish else ()
    assert_equal(combined_x, ref_combine(refs, _ref_expert_rows(refs), me, mine.x.size(0))[0],
                 f"SGLang normal combine ({output_dtype})")

    # ---- Low-latency mode: set_dispatch_mode_as_low_latency() after normal mode cleans the buffer.
    buffer.clean_low_latency_buffer(T, H, E)
    fp8_opts = dict(round_scale=blackwell, use_ue8m0=blackwell) if use_fp8 else dict()
    mode = output_dtype
    # Two micro-batches (two-batch overlap) with hooks; one without.
    batches = [_inputs(seed, world, H, TOPK_LL, hi=T, salt=10 + b) for b in range(2 if return_recv_hook else 1)]
    states = []

    def dispatch_a(b):
        mine_b = batches[b][me]
        hs, ids = mine_b.x.to(dev), mine_b.topk_idx.to(dev).to(torch.int64)
        expected_m = (hs.shape[0] * buffer.group_size * ids.shape[1] + E) // E
        assert expected_m >= 0
        packed_recv_hidden, packed_recv_count, ll_handle, ev, hook = buffer.low_latency_dispatch(
            hs, ids, T, E, use_fp8=use_fp8, async_finish=not return_recv_hook, return_recv_hook=return_recv_hook,
            **fp8_opts)
        states.append([ids, mine_b.topk_weights.to(dev), packed_recv_hidden, packed_recv_count, ll_handle, ev, hook])

    def dispatch_b(b):
        ids, w, recv, count, ll_handle, ev, hook = states[b]
        hook() if return_recv_hook else ev.current_stream_wait()
        topks = [i.topk_idx for i in batches[b]]
        _check_ll_dispatch(topks, [i.x for i in batches[b]], me, recv, count, ll_handle, T, E, mode,
                           f"SGLang low-latency dispatch (micro-batch {b})")

    def combine_a(b):
        ids, w, recv, count, ll_handle, ev, hook = states[b]
        y = _ll_expert_outputs(me, recv, count, mode)
        combined, ev, hook = buffer.low_latency_combine(x=y, topk_idx=ids, topk_weights=w, handle=ll_handle,
                                                        async_finish=not return_recv_hook,
                                                        return_recv_hook=return_recv_hook)
        states[b] = [combined, ev, hook]

    def combine_b(b):
        combined, ev, hook = states[b]
        hook() if return_recv_hook else ev.current_stream_wait()
        mine_b = batches[b][me]
        _check_ll_combine(combined, mine_b.x, mine_b.topk_idx, mine_b.topk_weights, mode,
                          f"SGLang low-latency combine (micro-batch {b})")

    if return_recv_hook:  # two micro-batches interleaved; at most two results wait for their hook at once
        steps = [(dispatch_a, 0), (dispatch_a, 1), (dispatch_b, 0), (combine_a, 0), (dispatch_b, 1), (combine_a, 1),
                 (combine_b, 0), (combine_b, 1)]
    else:
        steps = [(dispatch_a, 0), (dispatch_b, 0), (combine_a, 0), (combine_b, 0)]
    for step, b in steps:
        step(b)


# ---- vLLM: DeepEPHTAll2AllManager + DeepEPHTPrepareAndFinalize ------------------------------------------

_VLLM_RANK_CONFIGS = [2, 4, 8, 16, 24, 32, 64, 128, 144, 160]  # DeepEPHTPrepareAndFinalize.available_rank_configs


def _vllm_group(ctx):
    """vLLM hands DeepEP its CPU (gloo) group; a simulated rank has its SimGroup."""
    if ctx.simulated:
        return ctx.group
    state = ctx.__dict__.setdefault("client_groups", {})
    if "gloo" not in state:
        import torch.distributed as dist
        state["gloo"] = dist.new_group(backend="gloo")
    return state["gloo"]


def _vllm_ht(ctx, seed, block_fp8, do_async):
    world, me, dev = ctx.world, ctx.rank, ctx.device
    E, H = num_experts(world), 512  # 512 bf16 = 1 KiB: maybe_roundup_layer_hidden_size keeps it
    e_loc = E // world
    saved = _sm_settings()
    kwargs = dict(group=_vllm_group(ctx), num_nvl_bytes=VLLM_DEEPEP_BUFFER_SIZE_MB * 1024 * 1024, num_rdma_bytes=0,
                  low_latency_mode=False, num_qps_per_rank=1, explicitly_destroy=True)
    buffer = deep_ep.Buffer(**kwargs)  # handle_cache.get_or_create(buffer_kwargs, deep_ep.Buffer)
    deep_ep.Buffer.set_num_sms(min(CLIENT_NUM_SMS, 20))  # DeepEPHTAll2AllManager.set_num_sms
    dispatch_config = deep_ep.Buffer.get_dispatch_config(world) if world in _VLLM_RANK_CONFIGS else None
    combine_config = deep_ep.Buffer.get_combine_config(world) if world in _VLLM_RANK_CONFIGS else None

    # Rank 1 has no tokens (a DP rank without requests); no token goes to the last rank's experts, so
    # it receives nothing (fused_expert_output with 0 tokens).
    inputs = _inputs(seed, world, H, TOPK_HT, lo=0, drop=0.0, experts=E - e_loc, empty_rank=1)
    mine = inputs[me]
    payloads = [_quantize_ht(i.x, "fp8" if block_fp8 else "bf16") for i in inputs]
    a1q = payloads[me][0](dev)
    topk_ids, topk_weights = mine.topk_idx.to(dev), mine.topk_weights.to(dev)
    previous_event = None  # dbo_get_previous_event(self.buffer.capture) without dual-batch overlap
    num_tokens_per_rank, num_tokens_per_rdma_rank, dispatch_expert_num_tokens, is_token_in_rank, event = \
        buffer.get_dispatch_layout(topk_idx=topk_ids, num_experts=E, previous_event=previous_event,
                                   async_finish=False, allocate_on_comm_stream=False)
    token_data, expert_topk_ids, expert_topk_weights, expert_num_tokens_per_expert_list, handle, event = \
        buffer.dispatch(x=a1q, handle=None, num_tokens_per_rank=num_tokens_per_rank,
                        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
                        num_tokens_per_expert=dispatch_expert_num_tokens, topk_idx=topk_ids,
                        topk_weights=topk_weights, expert_alignment=1, config=dispatch_config,
                        previous_event=previous_event, async_finish=True, allocate_on_comm_stream=False)
    # _receiver
    if event.event is not None:
        event.current_stream_wait()
    assert event.event is not None  # async_prepare without dual-batch overlap
    rank_expert_offset = me * e_loc
    remapped = torch.where(expert_topk_ids == -1, E - 1 if rank_expert_offset == 0 else 0,
                           expert_topk_ids + rank_expert_offset)
    refs = _ht_refs([p[1] for p in payloads], [p[2] for p in payloads] if block_fp8 else None, inputs, E)
    ref = refs[me]
    _check_ht_dispatch(ref, token_data, expert_topk_ids, expert_topk_weights, expert_num_tokens_per_expert_list,
                       handle, f"vLLM high-throughput dispatch ({'fp8' if block_fp8 else 'bf16'})")
    expected_ids = torch.where(ref.topk_idx == -1, E - 1 if rank_expert_offset == 0 else 0,
                               ref.topk_idx + rank_expert_offset)
    assert_equal(remapped, expected_ids, "expert_topk_ids in the global expert space")
    if me == world - 1:
        rows = token_data[0] if isinstance(token_data, tuple) else token_data
        assert rows.size(0) == 0, "the last rank's experts get no token"
    expert_num_tokens = torch.tensor(expert_num_tokens_per_expert_list, dtype=torch.int32, device=dev)
    assert expert_num_tokens.numel() == e_loc

    # finalize: the experts' weighted, reduced rows (bf16) go back; the client copies the result out.
    fused_expert_output = _expert_rows(me, token_data)
    output = torch.full((mine.x.size(0), H), float("nan"), dtype=torch.bfloat16, device=dev)
    combined_x, _, event = buffer.combine(x=fused_expert_output, handle=handle, topk_weights=None,
                                          config=combine_config, previous_event=previous_event,
                                          async_finish=do_async, allocate_on_comm_stream=False)
    if do_async:
        if event.event is not None:
            event.current_stream_wait()
        output.copy_(combined_x, non_blocking=True)
    else:
        output.copy_(combined_x, non_blocking=True)
    assert_equal(output, ref_combine(refs, _ref_expert_rows(refs), me, mine.x.size(0))[0],
                 "vLLM high-throughput finalize: output")
    buffer.destroy()  # DeepEPAll2AllManagerBase.destroy: handle.destroy()
    _end_of_client(ctx, saved)


# ---- vLLM: DeepEPLLAll2AllManager + DeepEPLLPrepareAndFinalize ------------------------------------------

def _vllm_ll_buffer(ctx, hidden, T, E, enable_shrink):
    """DeepEPLLAll2AllManager._make_all2all_kwargs (VLLM_DEEPEP_LOW_LATENCY_USE_MNNVL off) and get_handle."""
    world = ctx.world
    num_rdma_bytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(
        num_max_dispatch_tokens_per_rank=T, hidden=hidden, num_ranks=world, num_experts=E)
    kwargs = dict(group=_vllm_group(ctx), num_nvl_bytes=VLLM_DEEPEP_BUFFER_SIZE_MB * 1024 * 1024,
                  num_rdma_bytes=num_rdma_bytes, low_latency_mode=True, num_qps_per_rank=E // world,
                  allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False, explicitly_destroy=True,
                  enable_shrink=enable_shrink)
    return deep_ep.Buffer(**kwargs)


def _eplb_map(seed, world: int, E: int):
    """global_to_physical of an expert-parallel load balancer: E - world logical experts placed on E
    physical slots (one redundant slot per rank), an injective map; the inverse covers the rest."""
    g = torch.Generator().manual_seed(seed * 7 + 3)
    return torch.randperm(E, generator=g)[:E - world].to(torch.int64)


class _VllmLL:
    """DeepEPLLPrepareAndFinalize on one rank: handles per micro-batch, global -> physical ids."""

    def __init__(self, buffer, max_tokens_per_rank, use_fp8_dispatch, use_ue8m0_dispatch, global_to_physical):
        self.buffer = buffer
        self.max_tokens_per_rank = max_tokens_per_rank
        self.use_fp8_dispatch = use_fp8_dispatch
        self.use_ue8m0_dispatch = use_ue8m0_dispatch  # post_init_setup: experts take packed UE8M0 scales
        self.global_to_physical = global_to_physical
        self.handles = [None, None]

    def _map_global_to_physical_ids(self, topk_ids):
        return topk_ids if self.global_to_physical is None else self.global_to_physical[topk_ids]

    def prepare_async(self, a2a_idx, a1, topk_weights, topk_ids, num_experts):
        dispatch_topk_ids = self._map_global_to_physical_ids(topk_ids)
        expert_x, expert_num_tokens, handle, _, hook = self.buffer.low_latency_dispatch(
            a1, dispatch_topk_ids, self.max_tokens_per_rank, num_experts, use_fp8=self.use_fp8_dispatch,
            round_scale=self.use_ue8m0_dispatch, use_ue8m0=self.use_ue8m0_dispatch, async_finish=False,
            return_recv_hook=True)
        self.handles[a2a_idx] = handle
        # _receiver with block_k == 128: DeepEP's quantization is used as it is.
        return hook, lambda: (expert_x, expert_num_tokens)

    def finalize(self, a2a_idx, output, fused_expert_output, topk_weights, topk_ids, do_recv_hook):
        handle = self.handles[a2a_idx]
        assert handle is not None
        combine_topk_ids = self._map_global_to_physical_ids(topk_ids)
        _, _, recv_hook = self.buffer.low_latency_combine(fused_expert_output, combine_topk_ids, topk_weights, handle,
                                                          async_finish=False, zero_copy=False,
                                                          return_recv_hook=do_recv_hook, out=output)
        return recv_hook


def _vllm_ll_round(ctx, seed, pf, mode, E, hidden, T, dbo, g2p_cpu, salt):
    """One forward's MoE layer through the prepare/finalize (two micro-batches with dual-batch overlap,
    hooks throughout; otherwise prepare() then finalize() without a hook), checked bit for bit.
    Rank 1 has no tokens in the first micro-batch; topk_ids has no -1 (vLLM's router fills every slot)."""
    world, me, dev = ctx.world, ctx.rank, ctx.device
    num_batches = 2 if dbo else 1
    batches = [_inputs(seed, world, hidden, TOPK_LL, lo=0, hi=T, salt=salt + b, drop=0.0, experts=E - world,
                       empty_rank=1 if b == 0 else None) for b in range(num_batches)]
    g2p_dev = None if g2p_cpu is None else g2p_cpu.to(dev)
    pf.global_to_physical = g2p_dev
    physical = [[i.topk_idx if g2p_cpu is None else g2p_cpu[i.topk_idx] for i in batch] for batch in batches]
    state = {}

    def prepare(b):
        mine = batches[b][me]
        hook, receiver = pf.prepare_async(b, mine.x.to(dev), mine.topk_weights.to(dev), mine.topk_idx.to(dev), E)
        state[b] = (hook, receiver)

    def receive(b):
        hook, receiver = state[b]
        hook()
        expert_x, expert_num_tokens = receiver()
        _check_ll_dispatch(physical[b], [i.x for i in batches[b]], me, expert_x, expert_num_tokens,
                           pf.handles[b], T, E, mode, f"vLLM low-latency prepare (micro-batch {b})")
        state[b] = (expert_x, expert_num_tokens)

    def finalize(b):
        expert_x, expert_num_tokens = state[b]
        mine = batches[b][me]
        y = _ll_expert_outputs(me, expert_x, expert_num_tokens, mode)
        output = torch.full((mine.x.size(0), hidden), float("nan"), dtype=torch.bfloat16, device=dev)
        recv_hook = pf.finalize(b, output, y, mine.topk_weights.to(dev), mine.topk_idx.to(dev), do_recv_hook=dbo)
        assert (recv_hook is not None) == dbo
        state[b] = (output, recv_hook)

    def finish(b):
        output, recv_hook = state[b]
        if recv_hook is not None:
            recv_hook()
        mine = batches[b][me]
        _check_ll_combine(output, mine.x, physical[b][me], mine.topk_weights, mode,
                          f"vLLM low-latency finalize (micro-batch {b})")

    if dbo:
        steps = [(prepare, 0), (prepare, 1), (receive, 0), (finalize, 0), (receive, 1), (finalize, 1), (finish, 0),
                 (finish, 1)]
    else:  # prepare() = prepare_async + hook + receiver; finalize(do_async=False)
        steps = [(prepare, 0), (receive, 0), (finalize, 0), (finish, 0)]
    for step, b in steps:
        step(b)


def _vllm_ll(ctx, seed, mode, dbo, enable_shrink, remap):
    world = ctx.world
    E, H, T = num_experts(world), 2048, 64  # 2048: the smallest of vLLM's SUPPORTED_HIDDEN_SIZES
    use_fp8, _, ue8m0 = _LL_MODES[mode]
    buffer = _vllm_ll_buffer(ctx, H, T, E, enable_shrink)
    pf = _VllmLL(buffer, T, use_fp8, ue8m0, None)
    g2p = _eplb_map(seed, world, E) if remap else None
    _vllm_ll_round(ctx, seed, pf, mode, E, H, T, dbo, g2p, salt=20)
    if enable_shrink:  # query_active_mask / query_fault: nobody failed
        mask = torch.zeros(world, device="cuda", dtype=torch.int32).fill_(7)
        buffer.low_latency_query_mask_buffer(mask)
        assert_equal(mask, torch.zeros(world, dtype=torch.int32), "low_latency_query_mask_buffer")
    _vllm_ll_round(ctx, seed, pf, mode, E, H, T, dbo, g2p, salt=30)
    buffer.destroy()


def _vllm_clean_buffers(ctx, seed):
    """DeepEPLLAll2AllManager.clean_buffers (the fault-tolerance retry) between two forwards: it zeroes
    get_local_buffer_tensor(int8, use_rdma_buffer=True), which must leave epx's protocol flags alone;
    then the high-throughput part of the same buffer is zeroed the same way and used."""
    world, me, dev = ctx.world, ctx.rank, ctx.device
    E, H, T = num_experts(world), 2048, 64
    buffer = _vllm_ll_buffer(ctx, H, T, E, enable_shrink=True)
    pf = _VllmLL(buffer, T, True, False, None)
    _vllm_ll_round(ctx, seed, pf, "fp8", E, H, T, True, None, salt=40)

    # clean_buffers
    local = buffer.get_local_buffer_tensor(dtype=torch.int8, use_rdma_buffer=True)
    region = buffer.runtime.peer_pointer(me) + buffer.runtime.num_nvl_bytes
    assert local.data_ptr() == region + epx._C.LL_FLAG_BYTES and local.numel() == buffer.num_rdma_bytes - \
        epx._C.LL_FLAG_BYTES, "the tensor must be the low-latency region past its flags"
    local.zero_()
    _sync_device(ctx)
    buffer.low_latency_clean_mask_buffer()
    _sync_device(ctx)
    ctx.barrier()  # the retry regroups the ranks (collectively) before the next forward
    _vllm_ll_round(ctx, seed, pf, "fp8", E, H, T, True, None, salt=50)
    _vllm_ll_round(ctx, seed, pf, "fp8", E, H, T, False, None, salt=60)  # and without overlap
    mask = torch.zeros(world, device="cuda", dtype=torch.int32).fill_(7)
    buffer.low_latency_query_mask_buffer(mask)  # query_fault: nobody was masked by the zeroing
    assert_equal(mask, torch.zeros(world, dtype=torch.int32), "low_latency_query_mask_buffer after clean_buffers")

    # The high-throughput part, zeroed the same way, then a dispatch and combine on it.
    nvl = buffer.get_local_buffer_tensor(torch.int8)
    assert nvl.data_ptr() == buffer.runtime.peer_pointer(me) + epx._C.NVL_FLAG_BYTES
    ctx.synchronize()
    ctx.barrier()
    nvl.fill_(-1)  # not zero either: the next ops must overwrite every staging byte they read
    _sync_device(ctx)
    ctx.barrier()
    inputs = _inputs(seed, world, 512, TOPK_HT, salt=70)
    mine = inputs[me]
    topk = mine.topk_idx.to(dev)
    ntpr, _, ntpe, itir, _ = buffer.get_dispatch_layout(topk, E)
    recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
        mine.x.to(dev), num_tokens_per_rank=ntpr, is_token_in_rank=itir, num_tokens_per_expert=ntpe, topk_idx=topk,
        topk_weights=mine.topk_weights.to(dev))
    refs = _ht_refs([i.x for i in inputs], None, inputs, E)
    _check_ht_dispatch(refs[me], recv_x, recv_idx, recv_w, counts, handle, "dispatch after zeroing the NVL tensor")
    combined_x, _, _ = buffer.combine(_expert_rows(me, recv_x), handle)
    assert_equal(combined_x, ref_combine(refs, _ref_expert_rows(refs), me, mine.x.size(0))[0],
                 "combine after zeroing the NVL tensor")
    buffer.destroy()


# ---- LMDeploy: DeepEPBuffer (common buffer), the normal and low-latency token dispatchers, destroy -----

def _lmdeploy(ctx, seed, ht_fp8, return_recv_hook):
    world, me, dev, group = ctx.world, ctx.rank, ctx.device, ctx.group
    E, H, T = num_experts(world), 1024, T_LL
    saved = _sm_settings()
    deep_ep_buffer_num_sms = CLIENT_NUM_SMS
    Buffer.set_num_sms(deep_ep_buffer_num_sms)  # at import of the token dispatcher
    explicitly_destroy = True  # DeepEPBuffer.set_explicitly_destroy() before any buffer exists

    # DeepEPBuffer.get_buffer_common (params_dtype bfloat16: hidden_bytes = 2 * hidden)
    hidden_bytes = H * torch.bfloat16.itemsize
    num_nvl_bytes, num_rdma_bytes = 0, 0
    for config in (Buffer.get_dispatch_config(group.size()), Buffer.get_combine_config(group.size())):
        num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, group.size()), num_nvl_bytes)
        num_rdma_bytes = max(config.get_rdma_buffer_size_hint(hidden_bytes, group.size()), num_rdma_bytes)
    num_rdma_bytes = max(Buffer.get_low_latency_rdma_size_hint(T, H, group.size(), E), num_rdma_bytes)
    assert E % group.size() == 0
    buffer = Buffer(group, num_nvl_bytes=num_nvl_bytes, num_rdma_bytes=num_rdma_bytes, low_latency_mode=True,
                    num_qps_per_rank=max(E // group.size(), deep_ep_buffer_num_sms), allow_mnnvl=True,
                    explicitly_destroy=explicitly_destroy)
    buffer.set_num_sms(deep_ep_buffer_num_sms)

    # DeepEPTokenDispatcherNormal.dispatch -> dispatch_normal, then combine -> combine_normal.
    inputs = _inputs(seed, world, H, TOPK_HT)
    mine = inputs[me]
    payloads = [_quantize_ht(i.x, "fp8" if ht_fp8 else "bf16") for i in inputs]
    x = payloads[me][0](dev)
    topk_idx = mine.topk_idx.to(dev).to(torch.int64)
    topk_weights = mine.topk_weights.to(dev)
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, previous_event = \
        buffer.get_dispatch_layout(topk_idx, E, previous_event=None, async_finish=False, allocate_on_comm_stream=False)
    recv_x, recv_topk_idx, recv_topk_weights, recv_tokens_per_expert, handle, event = buffer.dispatch(
        x, topk_idx=topk_idx, topk_weights=topk_weights.to(torch.float32), num_tokens_per_rank=num_tokens_per_rank,
        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert, previous_event=previous_event, async_finish=False,
        allocate_on_comm_stream=False, expert_alignment=128)
    refs = _ht_refs([p[1] for p in payloads], [p[2] for p in payloads] if ht_fp8 else None, inputs, E,
                    expert_alignment=128)
    _check_ht_dispatch(refs[me], recv_x, recv_topk_idx, recv_topk_weights, recv_tokens_per_expert, handle,
                       "LMDeploy dispatch_normal")
    expected_combined = ref_combine(refs, _ref_expert_rows(refs), me, mine.x.size(0))[0]
    combined_x, _, event = buffer.combine(_expert_rows(me, recv_x), handle, async_finish=False, previous_event=None,
                                          allocate_on_comm_stream=False)
    assert_equal(combined_x, expected_combined, "LMDeploy combine_normal")

    # dispatch_normal_async / combine_normal_async (the micro-batch overlap path), with a captured event.
    previous_event = buffer.capture()
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, previous_event = \
        buffer.get_dispatch_layout(topk_idx, num_experts=E, previous_event=previous_event, async_finish=True,
                                   allocate_on_comm_stream=previous_event is not None and True)
    recv_x, recv_topk_idx, recv_topk_weights, recv_tokens_per_expert, handle, event = buffer.dispatch(
        x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_rank=num_tokens_per_rank,
        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert, previous_event=previous_event, async_finish=True,
        allocate_on_comm_stream=previous_event is not None and True, expert_alignment=128)
    event.current_stream_wait()
    _check_ht_dispatch(refs[me], recv_x, recv_topk_idx, recv_topk_weights, recv_tokens_per_expert, handle,
                       "LMDeploy dispatch_normal_async")
    previous_event = buffer.capture()
    combined_x, _, event = buffer.combine(_expert_rows(me, recv_x), handle, async_finish=True,
                                          previous_event=previous_event,
                                          allocate_on_comm_stream=previous_event is not None and True)
    event.current_stream_wait()
    assert_equal(combined_x, expected_combined, "LMDeploy combine_normal_async")

    # set_deepep_mode(LOW_LATENCY) after NORMAL in auto mode cleans the low-latency buffer.
    buffer.clean_low_latency_buffer(T, H, E)

    # DeepEPTokenDispatcherLowLatency.dispatch / combine (use_fp8=True).
    batch = _inputs(seed, world, H, TOPK_LL, hi=T, salt=80)
    m = batch[me]
    hidden_states, ids = m.x.to(dev), m.topk_idx.to(dev).to(torch.int64)
    expected_m = (hidden_states.shape[0] * buffer.group_size * ids.shape[1] + E) // E
    assert expected_m >= 0
    packed_recv_hidden, masked_m, ll_handle, event, hook = buffer.low_latency_dispatch(
        hidden_states, ids, T, E, use_fp8=True, async_finish=not return_recv_hook, return_recv_hook=return_recv_hook)
    hook() if return_recv_hook else event.current_stream_wait()
    packed_recv_hidden = [t for t in packed_recv_hidden]  # [DisposibleTensor(x) for x in packed_recv_hidden]
    assert len(packed_recv_hidden) == 2
    recv = tuple(packed_recv_hidden)
    _check_ll_dispatch([i.topk_idx for i in batch], [i.x for i in batch], me, recv, masked_m, ll_handle, T, E, "fp8",
                       "LMDeploy low-latency dispatch")
    y = _ll_expert_outputs(me, recv, masked_m, "fp8")
    combined_hidden_states, event, hook = buffer.low_latency_combine(
        y, ids, m.topk_weights.to(dev).to(torch.float32), ll_handle, async_finish=not return_recv_hook,
        return_recv_hook=return_recv_hook)
    hook() if return_recv_hook else event.current_stream_wait()
    _check_ll_combine(combined_hidden_states, m.x, m.topk_idx, m.topk_weights, "fp8", "LMDeploy low-latency combine")

    # dispatch_async / combine_async of two micro-batches (async_finish=False: hooks).
    batches = [_inputs(seed, world, H, TOPK_LL, hi=T, salt=90 + b) for b in range(2)]
    sent = []
    for b in range(2):
        mb = batches[b][me]
        sent.append(buffer.low_latency_dispatch(mb.x.to(dev), mb.topk_idx.to(dev), T, num_experts=E, use_fp8=True,
                                                async_finish=False, return_recv_hook=True))
    combines = []
    for b, (recv_hidden_states, recv_expert_count, h, ev, hk) in enumerate(sent):
        hk()
        recv = tuple(recv_hidden_states)
        _check_ll_dispatch([i.topk_idx for i in batches[b]], [i.x for i in batches[b]], me, recv, recv_expert_count, h,
                           T, E, "fp8", f"LMDeploy dispatch_async (micro-batch {b})")
        mb = batches[b][me]
        combines.append(buffer.low_latency_combine(_ll_expert_outputs(me, recv, recv_expert_count, "fp8"),
                                                   mb.topk_idx.to(dev), mb.topk_weights.to(dev), h,
                                                   async_finish=False, return_recv_hook=True))
    for b, (combined, ev, hk) in enumerate(combines):
        hk()
        mb = batches[b][me]
        _check_ll_combine(combined, mb.x, mb.topk_idx, mb.topk_weights, "fp8", f"LMDeploy combine_async (micro-batch {b})")

    # DeepEPBuffer.destroy()
    buffer.destroy()
    assert buffer.runtime is None
    _end_of_client(ctx, saved)


# ---- Tests --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("async_finish,allocate_on_comm_stream", [(False, False), (True, True), (True, False)],
                         ids=["sync", "async_comm_alloc", "async"])
def test_megatron_core_fused_a2a(ranks, seed, async_finish, allocate_on_comm_stream):
    _run(ranks, _megatron, seed, async_finish, allocate_on_comm_stream)


@pytest.mark.parametrize("output_dtype,async_finish,return_recv_hook", [
    ("bf16", False, False),
    ("fp8", True, True),
    ("ue8m0", True, True),
    ("fp8", False, False),
], ids=["bf16_sync", "fp8_async_hooks_tbo", "ue8m0_async_hooks_tbo", "fp8_sync"])
def test_sglang_deepep_dispatcher(ranks, seed, output_dtype, async_finish, return_recv_hook):
    _run(ranks, _sglang, seed, output_dtype, async_finish, return_recv_hook)


@pytest.mark.parametrize("block_fp8,do_async", [(False, True), (True, True), (True, False)],
                         ids=["bf16_async", "fp8_async", "fp8_sync"])
def test_vllm_high_throughput(ranks, seed, block_fp8, do_async):
    _run(ranks, _vllm_ht, seed, block_fp8, do_async)


@pytest.mark.parametrize("mode,dbo,enable_shrink,remap", [
    ("bf16", False, False, False),
    ("fp8", True, True, True),
    ("ue8m0", True, False, True),
    ("fp8", False, True, False),
], ids=["bf16", "fp8_dbo_shrink_eplb", "ue8m0_dbo_eplb", "fp8_shrink"])
def test_vllm_low_latency(ranks, seed, mode, dbo, enable_shrink, remap):
    _run(ranks, _vllm_ll, seed, mode, dbo, enable_shrink, remap)


def test_vllm_clean_buffers(ranks, seed):
    _run(ranks, _vllm_clean_buffers, seed)


@pytest.mark.parametrize("ht_fp8,return_recv_hook", [(False, False), (True, True)], ids=["bf16_no_hook", "fp8_hook"])
def test_lmdeploy_token_dispatchers(ranks, seed, ht_fp8, return_recv_hook):
    _run(ranks, _lmdeploy, seed, ht_fp8, return_recv_hook)
