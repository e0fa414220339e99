"""GPU tests of the low-latency path (low_latency_dispatch / low_latency_combine), real and simulated:
bf16, fp8 with float scales, power-of-two scales and packed UE8M0 scales; receive hooks, async
events, zero-copy combine, `out=`, two results in flight, CUDA-graph capture and replay.

Dispatch outputs are compared bit for bit with the pure-torch reference (same fp8 cast as the
core's reference model); combine (a weighted fp32 sum) within a stated tolerance of an fp64 sum.
"""
import pytest

from conftest import require_epx

torch, epx = require_epx()
from epx_test_utils import (assert_equal, expect_error, host, expert_scale, fp8_dequant, ll_quantize, make_input,
                            pack_ue8m0, pow2, ref_ll_dispatch, token_counts)
from test_ht import HIDDEN as HT_HIDDEN, _dispatch_combine

T = 64          # num_max_dispatch_tokens_per_rank
HIDDEN = 640    # 5 scale groups: UE8M0 packs them into 2 words (the last one partial)
TOPK = 4
MODES = {  # name -> (use_fp8, round_scale, use_ue8m0)
    "bf16": (False, False, False),
    "fp8": (True, False, False),
    "fp8_round": (True, True, False),
    "ue8m0": (True, True, True),
}


def num_experts(world: int) -> int:
    return 8 * world


def ll_buffer(ctx, with_nvl: bool = False, zero_copy: bool = False) -> epx.Buffer:
    """A low-latency buffer; with `zero_copy` sized for the zero-copy combine buffers."""
    rdma = epx.Buffer.get_low_latency_rdma_size_hint(T, HIDDEN, ctx.world, num_experts(ctx.world), num_topk=TOPK,
                                                     zero_copy=zero_copy)
    nvl = epx.Buffer.get_nvl_buffer_size_hint(ctx.world * 320, HT_HIDDEN, ctx.world) if with_nvl else 0
    return ctx.buffer(num_nvl_bytes=nvl, num_rdma_bytes=rdma, low_latency_mode=True)


def all_inputs(seed, world, salt=0, lo=1):
    counts = token_counts(seed, world, lo, T, salt)
    return [make_input(seed, r, counts[r], HIDDEN, num_experts(world), TOPK, salt=salt) for r in range(world)]


def dequant_ll(recv, mode: str, check: bool = True) -> torch.Tensor:
    """recv_x of low_latency_dispatch -> f32 [E_loc, R*T, H] (elementwise, exact)."""
    if mode == "bf16":
        return recv.float()
    q, scales = recv
    e_loc, rows, hidden = q.shape
    groups = hidden // 128
    if mode == "ue8m0":
        words = torch.stack([(scales >> (8 * k)) & 0xFF for k in range(4)], dim=-1)
        exponent = words.reshape(e_loc, rows, -1)[..., :groups] - 127
        scales = pow2(exponent) if check else ((exponent.to(torch.int32) + 127) << 23).view(torch.float32)
    return (q.float().view(e_loc, rows, groups, 128) * scales.unsqueeze(-1)).view(e_loc, rows, hidden)


def expert_factors(rank: int, num_local_experts: int, device) -> torch.Tensor:
    return torch.tensor([expert_scale(rank * num_local_experts + j) for j in range(num_local_experts)],
                        dtype=torch.float32, device=device).view(num_local_experts, 1, 1)


def expert_outputs(rank: int, recv, recv_count: torch.Tensor, mode: str, factors=None) -> torch.Tensor:
    """The toy experts: y[j][row] = bf16(dequant(row) * expert_scale(global id)), 0 past recv_count[j].
    GPU-only work (no host sync) when `factors` is given: usable inside CUDA-graph capture."""
    dq = dequant_ll(recv, mode, check=False)
    e_loc, rows, _ = dq.shape
    if factors is None:
        factors = expert_factors(rank, e_loc, dq.device)
    y = (dq * factors).to(torch.bfloat16)
    valid = torch.arange(rows, device=dq.device).view(1, rows) < recv_count.view(e_loc, 1)
    return torch.where(valid.unsqueeze(-1), y, torch.zeros_like(y))


def check_dispatch(inputs, me, recv, recv_count, handle, mode, what=""):
    world = len(inputs)
    E = num_experts(world)
    use_fp8, round_scale, ue8m0 = MODES[mode]
    ref = ref_ll_dispatch([i.topk_idx for i in inputs], me, E)
    assert_equal(recv_count, ref.recv_count, f"recv_count{what}")
    src_info, layout_range = handle[0], handle[1]
    assert handle[2:5] == (T, HIDDEN, E)
    assert_equal(layout_range, ref.layout_range, f"layout_range{what}")
    quant = [ll_quantize(i.x, round_scale) for i in inputs] if use_fp8 else None
    src_info_cpu, slot_cpu = host(src_info), host(handle[5])
    for j, rows in enumerate(ref.rows):
        n = len(rows)
        if n == 0:
            continue
        src = torch.tensor([s for s, _, _ in rows])
        tok = torch.tensor([t for _, t, _ in rows])
        assert_equal(src_info_cpu[j, :n], tok.to(torch.int32), f"src_info[{j}]{what}")
        assert_equal(slot_cpu[j, :n], torch.tensor([k for _, _, k in rows], dtype=torch.int32),
                     f"src_topk_slot[{j}]{what}")
        if not use_fp8:
            expected = torch.stack([inputs[s].x[t] for s, t in zip(src.tolist(), tok.tolist())])
            assert_equal(recv[j, :n], expected, f"recv_x[{j}]{what}")
            continue
        q = torch.stack([quant[s][0][t] for s, t in zip(src.tolist(), tok.tolist())])
        assert_equal(recv[0][j, :n], q, f"recv_x[{j}] (fp8){what}")
        if ue8m0:
            packed = [pack_ue8m0(quant[s][2][t:t + 1])[0] for s, t in zip(src.tolist(), tok.tolist())]
            assert_equal(recv[1][j, :n], torch.stack(packed), f"recv scales[{j}] (UE8M0){what}")
        else:
            scales = torch.stack([quant[s][1][t] for s, t in zip(src.tolist(), tok.tolist())])
            assert_equal(recv[1][j, :n], scales, f"recv scales[{j}]{what}")


def reference_combine(inp, mode: str) -> torch.Tensor:
    """fp64 sum over k of w[t, k] * y(t, expert k) with y as the toy experts compute it."""
    use_fp8, round_scale, _ = MODES[mode]
    if use_fp8:
        q, scale_inv, _ = ll_quantize(inp.x, round_scale)
        dq = fp8_dequant(q, scale_inv)
    else:
        dq = inp.x.float()
    out = torch.zeros(dq.shape, dtype=torch.float64)
    for k in range(inp.topk_idx.size(1)):
        e = inp.topk_idx[:, k]
        factor = torch.tensor([expert_scale(int(v)) for v in e], dtype=torch.float32).view(-1, 1)
        y = (dq * factor).to(torch.bfloat16).double()
        out += torch.where((e >= 0).view(-1, 1), inp.topk_weights[:, k].double().view(-1, 1) * y, 0.0)
    return out


def check_combine(combined: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """bf16 output of an fp32 weighted sum: within 2^-7 relative (rounding) of the fp64 sum."""
    got = host(combined).double()
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got - expected).abs()
    bound = expected.abs() * 2.0 ** -7 + 1e-4 * expected.abs().amax().clamp_min(1e-6)
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} values off; worst |diff| "
                           f"{err.max().item():.4g} at {(err - bound).argmax().item()}")


# ---- Rank functions -----------------------------------------------------------------------------------

def _roundtrip(ctx, seed, mode, hook, zero_copy, use_out):
    world, me, dev = ctx.world, ctx.rank, ctx.device
    E = num_experts(world)
    use_fp8, round_scale, ue8m0 = MODES[mode]
    buf = ll_buffer(ctx, zero_copy=zero_copy)
    inputs = all_inputs(seed, world)
    mine = inputs[me]
    x, topk, weights = mine.x.to(dev), mine.topk_idx.to(dev), mine.topk_weights.to(dev)
    stats = torch.zeros((E // world,), dtype=torch.int32, device=dev)
    recv, count, handle, event, recv_hook = buf.low_latency_dispatch(
        x, topk, T, E, cumulative_local_expert_recv_stats=stats, use_fp8=use_fp8, round_scale=round_scale,
        use_ue8m0=ue8m0, async_finish=not hook, return_recv_hook=hook)
    if hook:
        assert callable(recv_hook) and event.event is None
        # Overlapped work (no random draw: the device's generator is shared by simulated ranks).
        work = torch.full((1024, 1024), 0.5, device=dev)
        work @ work
        recv_hook()
    else:
        assert recv_hook is None and event.event is not None and event.extra_tensors
        event.current_stream_wait()
    if use_fp8:
        q, scales = recv
        groups = HIDDEN // 128
        columns = (groups + 3) // 4 if ue8m0 else groups
        assert q.dtype == torch.float8_e4m3fn and q.shape == (E // world, world * T, HIDDEN)
        assert scales.dtype == (torch.int32 if ue8m0 else torch.float32)
        assert scales.shape == (E // world, world * T, columns)
        assert scales.stride() == (world * T * columns, 1, world * T), "scales must be column-major (TMA layout)"
    else:
        assert recv.dtype == torch.bfloat16 and recv.shape == (E // world, world * T, HIDDEN)
    check_dispatch(inputs, me, recv, count, handle, mode)
    assert_equal(stats, count, "cumulative_local_expert_recv_stats")

    y = expert_outputs(me, recv, count, mode)
    if zero_copy:
        buf.get_next_low_latency_combine_buffer(handle)[:, :, :] = y
    out = torch.full((x.size(0), HIDDEN), float("nan"), dtype=torch.bfloat16, device=dev) if use_out else None
    combined, event, recv_hook = buf.low_latency_combine(y, topk, weights, handle, zero_copy=zero_copy,
                                                         async_finish=not hook, return_recv_hook=hook, out=out)
    if hook:
        recv_hook()
    else:
        event.current_stream_wait()
    if use_out:
        assert combined is out
    check_combine(combined, reference_combine(mine, mode), f"combined_x ({mode})")


def _two_in_flight(ctx, seed):
    """Two hook-mode dispatches (then combines) outstanding at once, received in order."""
    world, me, dev = ctx.world, ctx.rank, ctx.device
    E = num_experts(world)
    buf = ll_buffer(ctx)
    batches = [all_inputs(seed, world, salt=s) for s in (0, 1)]
    results = []
    for inputs in batches:
        mine = inputs[me]
        results.append(buf.low_latency_dispatch(mine.x.to(dev), mine.topk_idx.to(dev), T, E, use_fp8=True,
                                                return_recv_hook=True))
    for _, _, _, _, hook in results:
        hook()
    pending = []
    for b, (inputs, (recv, count, handle, _, _)) in enumerate(zip(batches, results)):
        check_dispatch(inputs, me, recv, count, handle, "fp8", f" (batch {b})")
        mine = inputs[me]
        y = expert_outputs(me, recv, count, "fp8")
        pending.append(buf.low_latency_combine(y, mine.topk_idx.to(dev), mine.topk_weights.to(dev), handle,
                                               return_recv_hook=True))
    for _, _, hook in pending:
        hook()
    for b, (inputs, (combined, _, _)) in enumerate(zip(batches, pending)):
        check_combine(combined, reference_combine(inputs[me], "fp8"), f"combined_x (batch {b})")


def _cuda_graph(ctx, seed, hook):
    """Dispatch -> experts -> combine captured once, replayed with new inputs."""
    world, me, dev = ctx.world, ctx.rank, ctx.device
    E = num_experts(world)
    buf = ll_buffer(ctx)
    n = T - 3
    static_x = torch.zeros((n, HIDDEN), dtype=torch.bfloat16, device=dev)
    static_topk = torch.full((n, TOPK), -1, dtype=torch.int64, device=dev)
    static_w = torch.zeros((n, TOPK), dtype=torch.float32, device=dev)
    factors = expert_factors(me, E // world, dev)

    def step():
        recv, count, handle, _, recv_hook = buf.low_latency_dispatch(static_x, static_topk, T, E, use_fp8=True,
                                                                     return_recv_hook=hook)
        if hook:
            recv_hook()
        y = expert_outputs(me, recv, count, "fp8", factors)
        combined, _, recv_hook = buf.low_latency_combine(y, static_topk, static_w, handle, return_recv_hook=hook)
        if hook:
            recv_hook()
        return count, combined

    def load(salt):
        inputs = [make_input(seed, r, n, HIDDEN, E, TOPK, salt=salt) for r in range(world)]
        static_x.copy_(inputs[me].x)
        static_topk.copy_(inputs[me].topk_idx)
        static_w.copy_(inputs[me].topk_weights)
        return inputs

    load(100)
    step()  # warm-up outside the graph
    ctx.synchronize()
    graph = torch.cuda.CUDAGraph()
    with ctx.graph(graph):
        count, combined = step()
    # No rank replays before every rank has captured (a replay waits for the peers' replays).
    ctx.barrier()
    for replay in range(3):
        inputs = load(replay)
        graph.replay()
        ctx.synchronize()
        ref = ref_ll_dispatch([i.topk_idx for i in inputs], me, E)
        assert_equal(count, ref.recv_count, f"recv_count (replay {replay})")
        check_combine(combined, reference_combine(inputs[me], "fp8"), f"combined_x (replay {replay})")
    # Eager operations still work after the replays.
    inputs = load(7)
    count, combined = step()
    check_combine(combined, reference_combine(inputs[me], "fp8"), "combined_x (eager after graph)")


def _clean_and_stats(ctx, seed):
    world, me, dev = ctx.world, ctx.rank, ctx.device
    E = num_experts(world)
    buf = ll_buffer(ctx)
    buf.clean_low_latency_buffer(T, HIDDEN, E)
    stats = torch.zeros((E // world,), dtype=torch.int32, device=dev)
    wait = torch.zeros((world,), dtype=torch.int64, device=dev)
    total = torch.zeros_like(stats)
    for salt in (0, 1):
        inputs = all_inputs(seed, world, salt=salt)
        mine = inputs[me]
        recv, count, handle, _, _ = buf.low_latency_dispatch(
            mine.x.to(dev), mine.topk_idx.to(dev), T, E, cumulative_local_expert_recv_stats=stats,
            dispatch_wait_recv_cost_stats=wait, use_fp8=False)
        check_dispatch(inputs, me, recv, count, handle, "bf16", f" (salt {salt})")
        total += count
    assert_equal(stats, total, "cumulative_local_expert_recv_stats over two dispatches")
    assert bool(host(wait >= 0).all()), "dispatch_wait_recv_cost_stats must not go negative"


def _mixed_modes(ctx, seed):
    """High-throughput and low-latency operations on one buffer, interleaved."""
    buf = ll_buffer(ctx, with_nvl=True)
    _ht_on(ctx, buf, seed)
    _roundtrip(ctx, seed + 1, "fp8", False, False, False)  # uses the LL-only buffer; then this one:
    world, me, dev = ctx.world, ctx.rank, ctx.device
    inputs = all_inputs(seed + 2, world)
    mine = inputs[me]
    recv, count, handle, event, _ = buf.low_latency_dispatch(mine.x.to(dev), mine.topk_idx.to(dev), T,
                                                             num_experts(world), use_fp8=True)
    check_dispatch(inputs, me, recv, count, handle, "fp8", " (mixed buffer)")
    y = expert_outputs(me, recv, count, "fp8")
    combined, _, _ = buf.low_latency_combine(y, mine.topk_idx.to(dev), mine.topk_weights.to(dev), handle)
    check_combine(combined, reference_combine(mine, "fp8"), "combined_x (mixed buffer)")
    _ht_on(ctx, buf, seed + 3)


def _behind_a_long_kernel(t):
    """A copy of `t` written on the current stream after a ~25 ms kernel (NaN until then)."""
    late = torch.full_like(t, float("nan"))
    torch.cuda._sleep(50_000_000)
    late.copy_(t)
    return late


def _default_mode_and_refusals(ctx, seed):
    """The binding's whole calls with neither async_finish nor the hook (no event, no hook: ordered on
    the current stream after its earlier work and before its later work), the outputs' storage, and what they refuse (worded by the
    package, before anything is launched: the operations after the refusals still run on every rank)."""
    world, me, dev = ctx.world, ctx.rank, ctx.device
    E = num_experts(world)
    buf = ll_buffer(ctx)
    inputs = all_inputs(seed, world)
    mine = inputs[me]
    x, topk, weights = mine.x.to(dev), mine.topk_idx.to(dev), mine.topk_weights.to(dev)
    refused = [
        (lambda: buf.low_latency_dispatch(x.float(), topk, T, E), "InvalidArgument", ("x", "bfloat16")),
        (lambda: buf.low_latency_dispatch(x.cpu(), topk, T, E), "InvalidArgument", ("x", "cpu")),
        (lambda: buf.low_latency_dispatch(x, topk.int(), T, E), "InvalidArgument", ("topk_idx", "int64")),
        (lambda: buf.low_latency_dispatch(x, topk[0], T, E), "InvalidArgument", ("topk_idx", "2 dimensions")),
        (lambda: buf.low_latency_dispatch(x, topk, True, E), "InvalidArgument", ("num_max_dispatch_tokens_per_rank",)),
        (lambda: buf.low_latency_dispatch(x, topk, T, 0), "InvalidArgument", ("num_experts",)),
        (lambda: buf.low_latency_dispatch(x, topk, T, E, async_finish=True, return_recv_hook=True), "InvalidArgument",
         ("async_finish", "return_recv_hook")),
        (lambda: buf.low_latency_dispatch(x, topk, T, E, use_ue8m0=True), "InvalidArgument", ("use_ue8m0",)),
        (lambda: buf.low_latency_dispatch(x, topk, T, E, use_fp8=False, round_scale=True), "InvalidArgument",
         ("round_scale",)),
        (lambda: buf.low_latency_dispatch(x, topk, T, E, cumulative_local_expert_recv_stats=torch.zeros(
            8, dtype=torch.int64, device=dev)), "InvalidArgument", ("cumulative_local_expert_recv_stats", "int32")),
    ]
    for call, kind, words in refused:
        with expect_error(kind, *words):
            call()
    # Ordered after the current stream's work: x and y are written there behind a long kernel.
    recv, count, handle, event, hook = buf.low_latency_dispatch(_behind_a_long_kernel(x), topk, T, E, use_fp8=True)
    assert hook is None and event.event is None and event.extra_tensors is None
    small = [recv[1], count, handle[0], handle[1], handle[5]]
    assert len({t.untyped_storage().data_ptr() for t in small}) == 1, "the small outputs share one allocation"
    assert recv[0].untyped_storage().data_ptr() != small[0].untyped_storage().data_ptr()
    assert all(t.device == dev for t in [recv[0]] + small)
    check_dispatch(inputs, me, recv, count, handle, "fp8", " (default mode)")

    y = expert_outputs(me, recv, count, "fp8")
    refused = [
        (lambda: buf.low_latency_combine(y, topk, weights.double(), handle), "InvalidArgument", ("topk_weights",)),
        (lambda: buf.low_latency_combine(y[0], topk, weights, handle), "InvalidArgument", ("x", "3 dimensions")),
        (lambda: buf.low_latency_combine(y, topk, weights, handle[:5]), "InvalidArgument", ("handle",)),
        (lambda: buf.low_latency_combine(y, topk, weights, handle, out=torch.empty_like(x, dtype=torch.float32)),
         "InvalidArgument", ("out", "bfloat16")),
        (lambda: buf.low_latency_combine(y, topk, weights, handle, async_finish=True, return_recv_hook=True),
         "InvalidArgument", ("async_finish",)),
    ]
    for call, kind, words in refused:
        with expect_error(kind, *words):
            call()
    combined, event, hook = buf.low_latency_combine(_behind_a_long_kernel(y), topk, weights, handle)
    assert hook is None and event.event is None and event.extra_tensors is None
    assert combined.dtype == torch.bfloat16 and combined.device == dev
    check_combine(combined, reference_combine(mine, "fp8"), "combined_x (default mode)")


def _zero_copy_needs_the_region(ctx, seed):
    """A region sized without zero_copy has no zero-copy combine buffer: asking for it raises
    BufferTooSmall naming the size-hint call with zero_copy=True and its bytes, inside the combine's
    collective step (a rank alone in asking aborts its peers' combine instead of leaving them
    waiting); plain combines stay right, and a region sized with zero_copy=True serves zero-copy."""
    world, me, dev = ctx.world, ctx.rank, ctx.device
    E = num_experts(world)
    buf = ll_buffer(ctx)
    need = epx.Buffer.get_low_latency_rdma_size_hint(T, HIDDEN, world, E, num_topk=TOPK, zero_copy=True)
    assert need > buf.num_rdma_bytes
    names_the_hint = (f"{need} bytes", f"get_low_latency_rdma_size_hint({T}, {HIDDEN}, {world}, {E}, "
                                       f"num_topk={TOPK}, zero_copy=True)")

    def dispatch(salt):
        inputs = all_inputs(seed, world, salt=salt)
        mine = inputs[me]
        topk, weights = mine.topk_idx.to(dev), mine.topk_weights.to(dev)
        recv, count, handle, _, _ = buf.low_latency_dispatch(mine.x.to(dev), topk, T, E, use_fp8=False)
        check_dispatch(inputs, me, recv, count, handle, "bf16", f" (salt {salt})")
        return mine, topk, weights, handle, expert_outputs(me, recv, count, "bf16")

    mine, topk, weights, handle, y = dispatch(0)
    with expect_error("BufferTooSmall", *names_the_hint):
        buf.get_next_low_latency_combine_buffer(handle)
    assert not buf.failed, "get_next_low_latency_combine_buffer is local: it must not fail the buffer"
    combined, _, _ = buf.low_latency_combine(y, topk, weights, handle)
    check_combine(combined, reference_combine(mine, "bf16"), "combined_x (no zero-copy region, plain)")

    # Every rank asks for a zero-copy combine: every rank raises.
    mine, topk, weights, handle, y = dispatch(1)
    with expect_error("BufferTooSmall", *names_the_hint):
        buf.low_latency_combine(y, topk, weights, handle, zero_copy=True)
    assert buf.failed, "a collective operation that raised must fail the buffer"
    buf.reset()

    # Only rank 0 asks: it raises, and its abort word ends the others' combines naming it.
    mine, topk, weights, handle, y = dispatch(2)
    if me == 0:
        with expect_error("BufferTooSmall", *names_the_hint):
            buf.low_latency_combine(y, topk, weights, handle, zero_copy=True)
    else:
        with expect_error("Aborted", "rank 0 failed (its low_latency_combine raised an error on the host"):
            buf.low_latency_combine(y, topk, weights, handle)
            buf.synchronize()
    buf.reset()
    mine, topk, weights, handle, y = dispatch(3)
    combined, _, _ = buf.low_latency_combine(y, topk, weights, handle)
    check_combine(combined, reference_combine(mine, "bf16"), "combined_x (after reset)")

    # Sized with zero_copy=True: the zero-copy combine (hook and not).
    _roundtrip(ctx, seed + 4, "bf16", False, True, False)
    _roundtrip(ctx, seed + 5, "fp8", True, True, True)


def _ht_on(ctx, buf, seed):
    """The high-throughput checks of test_ht on `buf`."""
    _dispatch_combine(ctx, seed, False, False, True, 1, False, buf)


# ---- Tests --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,hook,zero_copy,use_out", [
    ("bf16", False, False, True),
    ("fp8", False, False, False),
    ("fp8_round", True, True, False),
    ("ue8m0", True, False, True),
    ("fp8", True, True, True),
    ("bf16", True, True, False),
    ("ue8m0", False, True, False),
])
def test_low_latency_roundtrip(ranks, seed, mode, hook, zero_copy, use_out):
    ranks.run(_roundtrip, seed, mode, hook, zero_copy, use_out)


def test_low_latency_default_mode_and_refusals(ranks, seed):
    ranks.run(_default_mode_and_refusals, seed)


def test_low_latency_zero_copy_needs_the_region(ranks, seed):
    ranks.run(_zero_copy_needs_the_region, seed)


def test_low_latency_two_in_flight(ranks, seed):
    ranks.run(_two_in_flight, seed)


@pytest.mark.parametrize("hook", [False, True], ids=["no_hook", "hook"])
def test_low_latency_cuda_graph(ranks, seed, hook):
    ranks.run(_cuda_graph, seed, hook)


def test_low_latency_clean_and_stats(ranks, seed):
    ranks.run(_clean_and_stats, seed)


def test_mixed_high_throughput_and_low_latency(ranks, seed):
    ranks.run(_mixed_modes, seed)
