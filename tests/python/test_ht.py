"""GPU tests of the high-throughput path (get_dispatch_layout, dispatch, combine), real and simulated
(the `ranks` fixture of conftest.py).

Each rank regenerates every rank's inputs from per-rank seeds and compares its outputs with the
pure-torch references of epx_test_utils: bit-exact (dispatch moves bytes; combine sums in fp32 in
ascending rank order, then adds the biases, as the contract states).
"""
import pytest

from conftest import require_epx

torch, epx = require_epx()
from epx_test_utils import (assert_equal, host, make_input, per_token_cast_to_fp8, fp8_dequant, ref_combine,
                            ref_dispatch, ref_layout, token_counts)

HIDDEN = 512
TOPK = 4
MAX_TOKENS = 320


def num_experts(world: int) -> int:
    return 8 * world


def ht_buffer(ctx) -> epx.Buffer:
    """One buffer per world size, big enough for every test here."""
    rows = ctx.world * MAX_TOKENS
    return ctx.buffer(num_nvl_bytes=epx.Buffer.get_nvl_buffer_size_hint(rows, HIDDEN, ctx.world))


def all_inputs(seed, world, lo=1, hi=MAX_TOKENS, salt=0, hidden=HIDDEN):
    counts = token_counts(seed, world, lo, hi, salt)
    return [make_input(seed, r, counts[r], hidden, num_experts(world), TOPK, salt=salt) for r in range(world)]


def combine_input(rank: int, recv_x) -> torch.Tensor:
    """What rank `rank`'s 'experts' return for its received rows (bf16, elementwise, exact)."""
    factor = 1.0 + rank / 4.0
    if isinstance(recv_x, tuple):
        return (fp8_dequant(*recv_x) * factor).to(torch.bfloat16)
    return (recv_x.float() * factor).to(torch.bfloat16)


def make_x(inp, fp8: bool, strided: bool, device):
    """The rank's x as dispatch takes it (bf16, or (fp8, scales)); optionally with padded rows."""
    x = inp.x
    if fp8:
        q, s = per_token_cast_to_fp8(x)
        if strided:  # scales transposed in memory: any strides are allowed
            s = s.t().contiguous().t()
        payload = (q, s)
    else:
        payload = (x,)
    out = []
    for t in payload:
        t = t.to(device)
        if strided and t.dim() == 2 and t.dtype != torch.float32:
            wide = torch.zeros((t.size(0), t.size(1) + 64), dtype=t.dtype, device=device)
            wide[:, :t.size(1)] = t
            t = wide[:, :t.size(1)]
        out.append(t)
    return tuple(out) if fp8 else out[0]


def expected_x(inputs, fp8: bool):
    if fp8:
        pairs = [per_token_cast_to_fp8(i.x) for i in inputs]
        return [p[0] for p in pairs], [p[1] for p in pairs]
    return [i.x for i in inputs], None


# ---- Rank functions (run on every rank) ---------------------------------------------------------------

def _assert_cached_recv_x(recv_x2, other, inputs, fp8, me, E):
    """recv_x of a cached dispatch of `other`'s payloads over `inputs`' routing, against the reference."""
    xs2, scales2 = expected_x(other, fp8)
    ref2 = ref_dispatch(xs2, scales2, [i.topk_idx for i in inputs], [i.topk_weights for i in inputs], me, E)
    if fp8:
        assert_equal(recv_x2[0], ref2.x, "cached recv_x (fp8)", rows=ref2)
        assert_equal(recv_x2[1], ref2.scales, "cached recv_x scales", rows=ref2)
    else:
        assert_equal(recv_x2, ref2.x, "cached recv_x", rows=ref2)


def _layout(ctx, seed):
    buf = ht_buffer(ctx)
    inputs = all_inputs(seed, ctx.world)
    mine = inputs[ctx.rank]
    ntpr, ntprdma, ntpe, itir, event = buf.get_dispatch_layout(mine.topk_idx.to(ctx.device), num_experts(ctx.world))
    assert ntprdma is None and event.event is None
    ref = ref_layout(mine.topk_idx, num_experts(ctx.world), ctx.world)
    assert_equal(ntpr, ref[0], "num_tokens_per_rank")
    assert_equal(ntpe, ref[1], "num_tokens_per_expert")
    assert_equal(itir, ref[2], "is_token_in_rank")


def _dispatch_combine(ctx, seed, fp8, strided, with_weights, expert_alignment, zero_token_rank, buf=None):
    world, me, dev = ctx.world, ctx.rank, ctx.device
    E = num_experts(world)
    buf = ht_buffer(ctx) if buf is None else buf
    lo = 0 if zero_token_rank else 1
    inputs = all_inputs(seed, world, lo=lo)
    if zero_token_rank:  # rank 1 has no tokens at all
        inputs[1] = make_input(seed, 1, 0, HIDDEN, E, TOPK)
    mine = inputs[me]
    topk = mine.topk_idx.to(dev)
    weights = mine.topk_weights.to(dev) if with_weights else None
    x = make_x(mine, fp8, strided, dev)

    ntpr, _, ntpe, itir, _ = buf.get_dispatch_layout(topk, E)
    recv_x, recv_idx, recv_w, counts, handle, event = buf.dispatch(
        x, num_tokens_per_rank=ntpr, is_token_in_rank=itir, num_tokens_per_expert=ntpe, topk_idx=topk,
        topk_weights=weights, expert_alignment=expert_alignment)
    assert event.event is None

    xs, scales = expected_x(inputs, fp8)
    refs = [ref_dispatch(xs, scales, [i.topk_idx for i in inputs], [i.topk_weights for i in inputs], r, E,
                         expert_alignment) for r in range(world)]
    ref = refs[me]
    if fp8:
        assert isinstance(recv_x, tuple) and len(recv_x) == 2
        assert_equal(recv_x[0], ref.x, "recv_x (fp8)", rows=ref)
        assert_equal(recv_x[1], ref.scales, "recv_x scales", rows=ref)
    else:
        assert_equal(recv_x, ref.x, "recv_x", rows=ref)
    assert_equal(recv_idx, ref.topk_idx, "recv_topk_idx", rows=ref)
    if with_weights:
        assert_equal(recv_w, ref.topk_weights, "recv_topk_weights", rows=ref)
    else:
        assert recv_w is None
    assert counts == ref.num_recv_tokens_per_expert, f"{counts} != {ref.num_recv_tokens_per_expert}"
    assert isinstance(handle, tuple) and len(handle) == 6
    assert_equal(handle[0], ref.rank_prefix_matrix, "handle[0] (rank_prefix_matrix)")
    assert_equal(handle[3], ref.src_idx, "handle[3] (recv_src_idx)")
    assert handle[4] is itir

    # Cached dispatch: other payload, same routing.
    other = [make_input(seed, r, inputs[r].x.size(0), HIDDEN, E, TOPK, salt=1) for r in range(world)]
    x2 = make_x(other[me], fp8, strided, dev)
    recv_x2, i2, w2, c2, h2, _ = buf.dispatch(x2, handle=handle)
    assert (i2, w2, c2, h2) == (None, None, None, None)
    _assert_cached_recv_x(recv_x2, other, inputs, fp8, me, E)

    # Combine with weights and two biases.
    g = torch.Generator().manual_seed(seed + 101 * me)
    n = mine.x.size(0)
    bias_0 = torch.randn((n, HIDDEN), generator=g).to(torch.bfloat16)
    bias_1 = torch.randn((n, HIDDEN), generator=g).to(torch.bfloat16)
    y = combine_input(me, recv_x)
    combined_x, combined_w, event = buf.combine(y, handle, topk_weights=recv_w, bias=(bias_0.to(dev), bias_1.to(dev)))
    assert event.event is None
    ys = [combine_input(r, (refs[r].x, refs[r].scales) if fp8 else refs[r].x) for r in range(world)]
    ref_x, ref_w = ref_combine(refs, ys, me, n, [r.topk_weights for r in refs] if with_weights else None,
                               bias_0, bias_1)
    assert_equal(combined_x, ref_x, "combined_x")
    if with_weights:
        assert_equal(combined_w, ref_w, "combined_topk_weights")
    else:
        assert combined_w is None

    # Combine with one bias and none.
    combined_x, _, _ = buf.combine(y, handle, bias=bias_0.to(dev))
    assert_equal(combined_x, ref_combine(refs, ys, me, n, None, bias_0)[0], "combined_x (one bias)")
    combined_x, _, _ = buf.combine(y, handle)
    assert_equal(combined_x, ref_combine(refs, ys, me, n)[0], "combined_x (no bias)")


def _worst_tokens(ctx, seed):
    world, me, dev = ctx.world, ctx.rank, ctx.device
    E = num_experts(world)
    buf = ht_buffer(ctx)
    inputs = all_inputs(seed, world)
    mine = inputs[me]
    topk, weights = mine.topk_idx.to(dev), mine.topk_weights.to(dev)
    worst = sum(i.x.size(0) for i in inputs)  # no rank can receive more
    ntpr, _, ntpe, itir, _ = buf.get_dispatch_layout(topk, E)
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
        mine.x.to(dev), num_tokens_per_rank=ntpr, is_token_in_rank=itir, num_tokens_per_expert=ntpe, topk_idx=topk,
        topk_weights=weights, num_worst_tokens=worst)
    assert counts == [], "with num_worst_tokens the per-expert list is empty (as in DeepEP)"
    assert recv_x.size(0) == worst and recv_idx.size(0) == worst and handle[3].size(0) == worst
    refs = [ref_dispatch([i.x for i in inputs], None, [i.topk_idx for i in inputs], [i.topk_weights for i in inputs],
                         r, E) for r in range(world)]
    ref = refs[me]
    n = ref.x.size(0)
    assert_equal(recv_x[:n], ref.x, "recv_x", rows=ref)
    assert_equal(recv_idx[:n], ref.topk_idx, "recv_topk_idx", rows=ref)
    assert_equal(recv_w[:n], ref.topk_weights, "recv_topk_weights", rows=ref)
    assert_equal(handle[3][:n], ref.src_idx, "recv_src_idx")
    assert_equal(handle[0], ref.rank_prefix_matrix, "rank_prefix_matrix")
    assert bool(host(recv_x[n:] == 0).all()), "padding rows of recv_x must be zero"
    assert bool(host(recv_idx[n:] == -1).all()), "padding rows of recv_topk_idx must be -1"
    assert bool(host(recv_w[n:] == 0).all()), "padding rows of recv_topk_weights must be 0"
    assert bool(host(handle[3][n:] == -1).all()), "padding rows of recv_src_idx must be -1"

    # Cached dispatch keeps the worst-case row count.
    recv_x2, *_ = buf.dispatch(mine.x.to(dev), handle=handle)
    assert recv_x2.size(0) == worst
    assert_equal(recv_x2[:n], ref.x, "cached recv_x", rows=ref)

    # Combine ignores the padding rows (filled with a value that would show).
    y = combine_input(me, recv_x)
    y[n:] = 1234.0
    combined_x, combined_w, _ = buf.combine(y, handle, topk_weights=recv_w)
    ys = [combine_input(r, refs[r].x) for r in range(world)]
    ref_x, ref_w = ref_combine(refs, ys, me, mine.x.size(0), [r.topk_weights for r in refs])
    assert_equal(combined_x, ref_x, "combined_x")
    assert_equal(combined_w, ref_w, "combined_topk_weights")


def _async_and_previous_event(ctx, seed):
    """async_finish / previous_event / allocate_on_comm_stream give the same results, and the
    communication stream really waits for work queued on the current stream before the call."""
    world, me, dev = ctx.world, ctx.rank, ctx.device
    E = num_experts(world)
    buf = ht_buffer(ctx)
    inputs = all_inputs(seed, world)
    mine = inputs[me]
    refs = [ref_dispatch([i.x for i in inputs], None, [i.topk_idx for i in inputs], [i.topk_weights for i in inputs],
                         r, E) for r in range(world)]
    ys = [combine_input(r, refs[r].x) for r in range(world)]
    ref_x, ref_w = ref_combine(refs, ys, me, mine.x.size(0), [r.topk_weights for r in refs])

    def late(t_cpu):
        """A device tensor whose contents land only after ~20 ms of queued work on the current stream."""
        src = t_cpu.to(dev)
        out = torch.zeros_like(src)
        torch.cuda._sleep(20_000_000)
        out.copy_(src)
        return out

    for mode in ("sync", "previous_event", "async", "async_previous_comm_alloc"):
        prev = mode in ("previous_event", "async_previous_comm_alloc")
        asyn = mode.startswith("async")
        alloc = mode == "async_previous_comm_alloc"

        def kwargs():
            return dict(previous_event=buf.capture() if prev else None, async_finish=asyn,
                        allocate_on_comm_stream=alloc)

        topk = late(mine.topk_idx)
        ntpr, _, ntpe, itir, ev = buf.get_dispatch_layout(topk, E, **kwargs())
        if asyn:
            assert ev.event is not None
            ev.current_stream_wait()
        x, weights = late(mine.x), late(mine.topk_weights)
        recv_x, recv_idx, recv_w, counts, handle, ev = buf.dispatch(
            x, num_tokens_per_rank=ntpr, is_token_in_rank=itir, num_tokens_per_expert=ntpe, topk_idx=topk,
            topk_weights=weights, **kwargs())
        del x, weights  # the buffer must keep them alive (record_stream) until the copy is done
        if asyn:
            with ev:
                pass  # leaving the block makes the current stream wait
        assert_equal(recv_x, refs[me].x, f"recv_x ({mode})", rows=refs[me])
        assert_equal(recv_w, refs[me].topk_weights, f"recv_topk_weights ({mode})", rows=refs[me])
        assert counts == refs[me].num_recv_tokens_per_expert
        y = late(combine_input(me, host(recv_x)))
        combined_x, combined_w, ev = buf.combine(y, handle, topk_weights=recv_w, **kwargs())
        if asyn:
            assert ev.event is not None
            ev.current_stream_wait()
        else:
            assert ev.event is None
        assert_equal(combined_x, ref_x, f"combined_x ({mode})")
        assert_equal(combined_w, ref_w, f"combined_topk_weights ({mode})")
    assert buf.get_comm_stream() is buf.get_comm_stream()


def _whole_calls(ctx, seed):
    """The binding's whole cached dispatch and combine (binding.cpp) answer the calls in DeepEP's default
    stream order with the config the core has, and None, before anything runs, for every other call (which
    the package's general path then runs); what they answer is the reference's result."""
    world, me, dev = ctx.world, ctx.rank, ctx.device
    E = num_experts(world)
    buf = ht_buffer(ctx)
    rt = buf.runtime
    inputs = all_inputs(seed, world)
    mine = inputs[me]
    topk, weights = mine.topk_idx.to(dev), mine.topk_weights.to(dev)
    ntpr, _, ntpe, itir, _ = buf.get_dispatch_layout(topk, E)
    recv_x, _, recv_w, _, handle, _ = buf.dispatch(
        mine.x.to(dev), num_tokens_per_rank=ntpr, is_token_in_rank=itir, num_tokens_per_expert=ntpe, topk_idx=topk,
        topk_weights=weights)
    refs = [ref_dispatch([i.x for i in inputs], None, [i.topk_idx for i in inputs], [i.topk_weights for i in inputs],
                         r, E) for r in range(world)]
    other = [make_input(seed, r, inputs[r].x.size(0), HIDDEN, E, TOPK, salt=1) for r in range(world)]

    def cached(x, h=handle, **changes):  # the arguments as Buffer.dispatch passes them, positional
        a = dict(num_tokens_per_rank=None, num_tokens_per_rdma_rank=None, is_token_in_rank=None,
                 num_tokens_per_expert=None, topk_idx=None, topk_weights=None, expert_alignment=1, num_worst_tokens=0,
                 config=None, previous_event=None, async_finish=False, allocate_on_comm_stream=False)
        a.update(changes)
        return rt.cached_dispatch_call(x, h, *a.values())

    for fp8 in (False, True):
        x2 = make_x(other[me], fp8, fp8, dev)  # fp8: strided scales
        result = cached(x2)
        assert result is not None, f"cached dispatch ({'fp8' if fp8 else 'bf16'}) not taken whole"
        assert result[1:5] == (None,) * 4 and result[5].event is None
        _assert_cached_recv_x(result[0], other, inputs, fp8, me, E)
        general = buf.dispatch(x2, handle=handle, previous_event=buf.capture())  # the general path, same op
        _assert_cached_recv_x(general[0], other, inputs, fp8, me, E)
    x2 = other[me].x.to(dev)
    q, s = per_token_cast_to_fp8(other[me].x)
    declined = dict(async_finish=dict(async_finish=True), previous_event=dict(previous_event=buf.capture()),
                    config=dict(config=epx.Config(num_sms=2)), expert_alignment=dict(expert_alignment=0),
                    num_worst_tokens=dict(num_worst_tokens=5), topk_idx=dict(topk_idx=topk),
                    num_tokens_per_rank=dict(num_tokens_per_rank=ntpr))
    for what, changes in declined.items():
        assert cached(x2, **changes) is None, f"cached dispatch with {what} taken whole"
    for what, x in (("fp8 without scales", q.to(dev)), ("x on the CPU", other[me].x),
                    ("three-element x", (q.to(dev), s.to(dev), s.to(dev))), ("float32 x", x2.float())):
        assert cached(x) is None, f"cached dispatch of {what} taken whole"
    assert cached(x2, h=handle[:5]) is None and cached(x2, h=handle[:5] + (None,)) is None

    def combine(y, h=handle, **changes):  # as Buffer.combine passes them
        a = dict(topk_weights=recv_w, bias=None, config=None, previous_event=None, async_finish=False,
                 allocate_on_comm_stream=False)
        a.update(changes)
        return rt.combine_call(y, h, *a.values())

    g = torch.Generator().manual_seed(seed + 101 * me)
    n = mine.x.size(0)
    bias_0 = torch.randn((n, HIDDEN), generator=g).to(torch.bfloat16)
    bias_1 = torch.randn((n, HIDDEN), generator=g).to(torch.bfloat16)
    y = combine_input(me, recv_x)
    ys = [combine_input(r, refs[r].x) for r in range(world)]
    all_w = [r.topk_weights for r in refs]
    for what, bias, w, ref_bias in (("two biases", (bias_0.to(dev), bias_1.to(dev)), recv_w, (bias_0, bias_1)),
                                    ("one bias", bias_0.to(dev), None, (bias_0,)),
                                    ("bias[0] None", (None, bias_1.to(dev)), recv_w, (None, bias_1))):
        result = combine(y, bias=bias, topk_weights=w)
        assert result is not None, f"combine ({what}) not taken whole"
        ref_x, ref_w = ref_combine(refs, ys, me, n, all_w if w is not None else None, *ref_bias)
        assert_equal(result[0], ref_x, f"combined_x ({what})")
        if w is None:
            assert result[1] is None
        else:
            assert_equal(result[1], ref_w, f"combined_topk_weights ({what})")
        assert result[2].event is None
    declined = dict(async_finish=dict(async_finish=True), previous_event=dict(previous_event=buf.capture()),
                    config=dict(config=epx.Config(num_sms=2)), bias_list=dict(bias=[bias_0.to(dev)]),
                    bias_on_cpu=dict(bias=bias_0), three_biases=dict(bias=(bias_0.to(dev),) * 3),
                    int_weights=dict(topk_weights=topk))
    for what, changes in declined.items():
        assert combine(y, **changes) is None, f"combine with {what} taken whole"
    assert combine(y.float()) is None and combine(y, h=handle[:5]) is None

    # The config: an explicit one of the fields the core has is taken whole; another one runs the general
    # path, which sets it, and config=None then waits for the general path to mark the default again.
    default = epx.Buffer._default_config(world, buf._num_sms_share)
    assert combine(y, config=default) is not None
    smaller = epx.Config(num_sms=max(default.num_sms - 2, 2))
    assert combine(y, config=smaller) is None
    combined_x, _, _ = buf.combine(y, handle, topk_weights=recv_w, config=smaller)  # general path: sets it
    ref_x, ref_w = ref_combine(refs, ys, me, n, all_w)
    assert_equal(combined_x, ref_x, "combined_x (another config)")
    assert combine(y, config=smaller) is not None and combine(y) is None
    buf.combine(y, handle)  # config=None through the general path: the default again, marked
    result = combine(y)
    assert result is not None
    assert_equal(result[0], ref_x, "combined_x (the default again)")


def _bad_expert_id(ctx, seed):
    """An expert id out of range is recorded on the device and raised at the next check."""
    buf = ctx.buffer(num_nvl_bytes=epx.Buffer.get_nvl_buffer_size_hint(256, HIDDEN, ctx.world) + (2 << 20))
    E = num_experts(ctx.world)
    topk = make_input(seed, ctx.rank, 16, HIDDEN, E, TOPK).topk_idx
    topk[3, 1] = E  # out of range on every rank
    buf.get_dispatch_layout(topk.to(ctx.device), E)
    try:
        buf.synchronize()
    except epx.EpxError as e:
        assert e.kind == "InvalidArgument" and "topk_idx" in str(e), str(e)
    else:
        raise AssertionError("no EpxError for an expert id out of range")
    assert buf.failed
    try:
        buf.get_dispatch_layout(topk.to(ctx.device), E)
    except epx.EpxError as e:
        assert e.kind == "State", str(e)
    else:
        raise AssertionError("a failed buffer accepted work")
    buf.reset()
    assert not buf.failed
    topk[3, 1] = -1
    ntpr, _, ntpe, itir, _ = buf.get_dispatch_layout(topk.to(ctx.device), E)
    assert_equal(ntpe, ref_layout(topk, E, ctx.world)[1], "num_tokens_per_expert after reset")
    _checked_rounds(ctx, buf, seed, 100, "after a device error and reset()")


def _checked_rounds(ctx, buf, seed, rounds, what, max_tokens=32):
    """`rounds` fresh dispatch -> combine rounds (up to max_tokens tokens per rank), every output
    compared bit for bit with the reference: nothing an earlier failure left behind shows."""
    world, me, dev = ctx.world, ctx.rank, ctx.device
    E = num_experts(world)
    for k in range(rounds):
        tag = f"{what}, round {k}"
        inputs = all_inputs(seed, world, lo=1, hi=max_tokens, salt=1000 + k)
        mine = inputs[me]
        topk, weights = mine.topk_idx.to(dev), mine.topk_weights.to(dev)
        ntpr, _, ntpe, itir, _ = buf.get_dispatch_layout(topk, E)
        recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
            mine.x.to(dev), num_tokens_per_rank=ntpr, is_token_in_rank=itir, num_tokens_per_expert=ntpe,
            topk_idx=topk, topk_weights=weights)
        refs = [ref_dispatch([i.x for i in inputs], None, [i.topk_idx for i in inputs],
                             [i.topk_weights for i in inputs], r, E) for r in range(world)]
        ref = refs[me]
        assert_equal(recv_x, ref.x, f"{tag}: recv_x", rows=ref)
        assert_equal(recv_idx, ref.topk_idx, f"{tag}: recv_topk_idx", rows=ref)
        assert_equal(recv_w, ref.topk_weights, f"{tag}: recv_topk_weights", rows=ref)
        assert_equal(handle[3], ref.src_idx, f"{tag}: recv_src_idx")
        assert counts == ref.num_recv_tokens_per_expert, f"{tag}: {counts} != {ref.num_recv_tokens_per_expert}"
        combined_x, combined_w, _ = buf.combine(combine_input(me, recv_x), handle, topk_weights=recv_w)
        ys = [combine_input(r, refs[r].x) for r in range(world)]
        ref_x, ref_w = ref_combine(refs, ys, me, mine.x.size(0), [r.topk_weights for r in refs])
        assert_equal(combined_x, ref_x, f"{tag}: combined_x")
        assert_equal(combined_w, ref_w, f"{tag}: combined_topk_weights")


def _local_buffer_tensor(ctx, seed):
    buf = ht_buffer(ctx)
    t = buf.get_local_buffer_tensor(torch.bfloat16)
    # The protocol flags at the start of the buffer are left out.
    assert t.device == ctx.device and t.dtype == torch.bfloat16
    assert t.numel() == (buf.runtime.num_nvl_bytes - epx._C.NVL_FLAG_BYTES) // 2
    assert t.data_ptr() == buf.runtime.peer_pointer(ctx.rank) + epx._C.NVL_FLAG_BYTES
    part = buf.get_local_buffer_tensor(torch.float32, torch.Size((4, 8)), offset=1 << 20)
    assert part.shape == (4, 8) and part.data_ptr() == t.data_ptr() + (1 << 20)


BOUNDED_SMS = 4        # small rings, so a batch 4x the buffer's rows stays small
BOUNDED_TOKENS = 8192


def _batch_larger_than_the_buffer(ctx, seed, fp8):
    """2-4x the rows the buffer holds (the size hint rounds up to 2 MiB and holds the bf16 combine rows
    too): fresh and cached dispatch and the combine stream through the bounded rings, bit-exact
    against the references."""
    from epx import _C
    world, me, dev = ctx.world, ctx.rank, ctx.device
    E = num_experts(world)
    config = epx.Config(BOUNDED_SMS)
    inputs = [make_input(seed, r, BOUNDED_TOKENS, HIDDEN, E, TOPK, salt=7) for r in range(world)]
    per_rank = [ref_layout(i.topk_idx, E, world)[0] for i in inputs]
    max_recv = max(sum(int(p[r]) for p in per_rank) for r in range(world))
    # fp8 rows are about half the bytes of the bf16 combine rows the size also holds.
    rows = max(max_recv // (8 if fp8 else 6), world * BOUNDED_SMS * 64)  # at least the rings' minimum
    buf = ctx.buffer(num_nvl_bytes=epx.Buffer.get_nvl_buffer_size_hint(rows, HIDDEN, world))
    code = _C.DTYPE_FP8E4M3 if fp8 else _C.DTYPE_BF16
    capacity = buf.runtime.row_capacity(HIDDEN, code, TOPK)
    assert 2 * capacity <= max_recv, f"the buffer holds {capacity} rows of a batch of {max_recv}: not bounded"
    _C.bounded_ring_rows(num_sms=BOUNDED_SMS, num_threads=config.num_threads, num_nvl_bytes=buf.runtime.num_nvl_bytes,
                         hidden=HIDDEN, dtype=code, num_topk=TOPK, num_ranks=world)

    mine = inputs[me]
    topk, weights = mine.topk_idx.to(dev), mine.topk_weights.to(dev)
    x = make_x(mine, fp8, False, dev)
    ntpr, _, ntpe, itir, _ = buf.get_dispatch_layout(topk, E)
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
        x, num_tokens_per_rank=ntpr, is_token_in_rank=itir, num_tokens_per_expert=ntpe, topk_idx=topk,
        topk_weights=weights, config=config)
    xs, scales = expected_x(inputs, fp8)
    refs = [ref_dispatch(xs, scales, [i.topk_idx for i in inputs], [i.topk_weights for i in inputs], r, E)
            for r in range(world)]
    ref = refs[me]
    if fp8:
        assert_equal(recv_x[0], ref.x, "recv_x (fp8)", rows=ref)
        assert_equal(recv_x[1], ref.scales, "recv_x scales", rows=ref)
    else:
        assert_equal(recv_x, ref.x, "recv_x", rows=ref)
    assert_equal(recv_idx, ref.topk_idx, "recv_topk_idx", rows=ref)
    assert_equal(recv_w, ref.topk_weights, "recv_topk_weights", rows=ref)
    assert_equal(handle[3], ref.src_idx, "recv_src_idx")
    assert counts == ref.num_recv_tokens_per_expert

    # Cached: other payload, same routing.
    other = [make_input(seed, r, BOUNDED_TOKENS, HIDDEN, E, TOPK, salt=8) for r in range(world)]
    recv_x2, *_ = buf.dispatch(make_x(other[me], fp8, False, dev), handle=handle, config=config)
    _assert_cached_recv_x(recv_x2, other, inputs, fp8, me, E)

    # Combine of the first dispatch's rows (through the rings at every rank count, 2 included).
    y = combine_input(me, recv_x)
    combined_x, combined_w, _ = buf.combine(y, handle, topk_weights=recv_w, config=config)
    ys = [combine_input(r, (refs[r].x, refs[r].scales) if fp8 else refs[r].x) for r in range(world)]
    ref_x, ref_w = ref_combine(refs, ys, me, BOUNDED_TOKENS, [r.topk_weights for r in refs])
    assert_equal(combined_x, ref_x, "combined_x")
    assert_equal(combined_w, ref_w, "combined_topk_weights")


# ---- Tests --------------------------------------------------------------------------------------------

def test_get_dispatch_layout(ranks, seed):
    ranks.run(_layout, seed)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_dispatch_combine(ranks, seed, fp8, strided):
    ranks.run(_dispatch_combine, seed, fp8, strided, True, 1, False)


def test_dispatch_without_weights_aligned(ranks, seed):
    ranks.run(_dispatch_combine, seed, False, False, False, 8, False)


def test_dispatch_rank_without_tokens(ranks, seed):
    ranks.run(_dispatch_combine, seed, True, False, True, 4, True)


def test_num_worst_tokens(ranks, seed):
    ranks.run(_worst_tokens, seed)


def test_async_finish_and_previous_event(ranks, seed):
    ranks.run(_async_and_previous_event, seed)


def test_whole_calls_and_the_general_path(ranks, seed):
    ranks.run(_whole_calls, seed)


def test_bad_expert_id_raises_and_reset(ranks, seed):
    ranks.run(_bad_expert_id, seed)


def test_get_local_buffer_tensor(ranks, seed):
    ranks.run(_local_buffer_tensor, seed)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_batch_larger_than_the_buffer(ranks, seed, fp8):
    ranks.run(_batch_larger_than_the_buffer, seed, fp8)
