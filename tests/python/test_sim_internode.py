"""GPU tests (simulated ranks on one GPU) of epx.Buffer across virtual nodes: get_dispatch_layout,
dispatch (bf16, fp8, host-synced and worst-case sized, async), cached dispatch and combine at
(world, node_size) splits, every output against a torch reference.

References: a receiver's rows are ordered by source rank, then token, as within one node
(docs/protocol.md, "Internode dispatch and combine"), so the intranode reference of dispatch
(epx_test_utils.ref_dispatch) applies bit for bit; the combine sums in two levels (each node's rows
of a token in fp32 by local index, a remote node's partial rounded once to bf16, the owner adding
the partials in node order, then the biases, one final rounding): epx_test_utils.ref_combine_internode. The
handle's slots epx computes are checked against the loop references of test_cpu_internode.py.

The Buffer allocates its outputs with torch.empty; before each operation the rank's stream's cached
memory is filled with a byte pattern (`poison`), so a row the kernels leave unwritten reads as the
pattern instead of as an earlier result.
"""
import pytest

from conftest import require_epx

torch, epx = require_epx()
from epx import _C  # noqa: E402
from epx_test_utils import (assert_equal, expect_error, fresh_seed, host, make_input, num_gpus,  # noqa: E402
                            ref_combine_internode, ref_dispatch, ref_layout, sim_max_world)
from test_cpu_internode import DEEPEP_INTERNODE_HANDLE, ref_channel_prefix, ref_send_rdma_head  # noqa: E402
from test_ht import HIDDEN, TOPK, all_inputs, combine_input, expected_x, make_x, num_experts  # noqa: E402

pytestmark = [pytest.mark.sim,
              pytest.mark.skipif(num_gpus() < 1, reason="sim: needs a GPU")]

SPLITS = [(4, 2), (8, 2), (8, 4), (16, 8)]
MAX_TOKENS = 96
NVL_BYTES = 64 << 20
POISON = 0x5A


def _need(world: int) -> None:
    if world > sim_max_world():
        pytest.skip(f"sim: GPU 0 holds at most {sim_max_world()} simulated ranks, this test needs {world}")


def rdma_bytes(world: int, node_size: int) -> int:
    """num_rdma_bytes for bf16 rows of HIDDEN on the rings of this rank's Buffer: its channels are the
    construction config's SMs (epx's default, at most the simulated rank's share), so the rings of
    the default's 20 channels hold them."""
    channels = max(20, epx.Buffer._default_config(world).num_sms)
    return _C.rdma_buffer_size_hint(num_ranks=world, node_size=node_size, num_channels=channels, chunk_tokens=6,
                                    ring_slots=252, hidden_bytes=HIDDEN * 2, num_topk=_C.MAX_TOPK)


def make_buffer(group, node_size: int) -> "epx.Buffer":
    return epx.Buffer(group, NVL_BYTES, rdma_bytes(group.size(), node_size), node_size=node_size)


def poison(device) -> None:
    """Fills cached blocks of the current stream's pools (small and large) with POISON and frees them."""
    blocks = [torch.full((1 << 20,), POISON, dtype=torch.uint8, device=device) for _ in range(8)]
    blocks.append(torch.full((48 << 20,), POISON, dtype=torch.uint8, device=device))
    del blocks


def _check_handle(buf, handle, itir, ref, me, node_size, rows):
    world = buf.group_size
    assert isinstance(handle, tuple) and len(handle) == len(DEEPEP_INTERNODE_HANDLE)
    got = dict(zip(DEEPEP_INTERNODE_HANDLE, handle))
    assert got["is_token_in_rank"] is itir
    T = itir.size(0)
    in_node = host(itir).view(T, world // node_size, node_size).any(2)
    C = buf._rdma_channels
    assert_equal(got["rdma_channel_prefix_matrix"], ref_channel_prefix(in_node, C), "rdma_channel_prefix_matrix")
    assert_equal(got["gbl_channel_prefix_matrix"], ref_channel_prefix(host(itir), C), "gbl_channel_prefix_matrix")
    assert_equal(got["send_rdma_head"], ref_send_rdma_head(in_node), "send_rdma_head")
    assert_equal(got["recv_gbl_rank_prefix_sum"], ref.rank_prefix_matrix[:, me].contiguous(),
                 "recv_gbl_rank_prefix_sum")
    n = ref.x.size(0)
    assert got["recv_src_meta"].size(0) == rows
    assert_equal(got["recv_src_meta"][:n], ref.src_idx, "recv_src_idx (recv_src_meta's slot)")
    if rows > n:
        assert bool(host(got["recv_src_meta"][n:] == -1).all()), "padding rows of recv_src_idx must be -1"
    assert isinstance(handle[-1], _C.DispatchHandle)


def _dispatch_combine(group, seed, node_size, fp8, worst, use_async):
    world, me = group.size(), group.rank()
    dev = torch.device("cuda", group.device)
    E = num_experts(world)
    buf = make_buffer(group, node_size)
    assert (buf.get_num_rdma_ranks(), buf.get_rdma_rank()) == (world // node_size, me // node_size)
    inputs = all_inputs(seed, world, lo=0, hi=MAX_TOKENS)
    mine = inputs[me]
    n_mine = mine.x.size(0)
    topk, weights = mine.topk_idx.to(dev), mine.topk_weights.to(dev)
    x = make_x(mine, fp8, False, dev)

    poison(dev)
    ntpr, ntprdma, ntpe, itir, _ = buf.get_dispatch_layout(topk, E)
    ref_l = ref_layout(mine.topk_idx, E, world)
    assert_equal(ntpr, ref_l[0], "num_tokens_per_rank")
    assert_equal(ntpe, ref_l[1], "num_tokens_per_expert")
    assert_equal(itir, ref_l[2], "is_token_in_rank")
    want_rdma = ref_l[2].view(n_mine, world // node_size, node_size).any(2).sum(0).to(torch.int32)
    assert_equal(ntprdma, want_rdma, "num_tokens_per_rdma_rank")

    xs, scales = expected_x(inputs, fp8)
    refs = [ref_dispatch(xs, scales, [i.topk_idx for i in inputs], [i.topk_weights for i in inputs], r, E)
            for r in range(world)]
    ref = refs[me]
    n = ref.x.size(0)
    num_worst = sum(i.x.size(0) for i in inputs) if worst else 0
    poison(dev)
    kwargs = dict(num_tokens_per_rank=ntpr, num_tokens_per_rdma_rank=ntprdma, is_token_in_rank=itir,
                  num_tokens_per_expert=ntpe, topk_idx=topk, topk_weights=weights, num_worst_tokens=num_worst)
    if use_async:
        kwargs.update(previous_event=buf.capture(), async_finish=True, allocate_on_comm_stream=True)
    recv_x, recv_idx, recv_w, counts, handle, event = buf.dispatch(x, **kwargs)
    if use_async:
        assert event.event is not None
        event.current_stream_wait()
    # The op reads its inputs and writes only its outputs.
    assert_equal(topk, mine.topk_idx, "topk_idx after the dispatch (an input)")
    assert_equal(weights, mine.topk_weights, "topk_weights after the dispatch (an input)")
    rows = num_worst if worst else n
    recv_payload, recv_scales = recv_x if fp8 else (recv_x, None)
    assert recv_payload.size(0) == rows
    assert_equal(recv_payload[:n], ref.x, "recv_x", rows=ref)
    if fp8:
        assert_equal(recv_scales[:n], ref.scales, "recv_x scales", rows=ref)
    assert_equal(recv_idx[:n], ref.topk_idx, "recv_topk_idx", rows=ref)
    assert_equal(recv_w[:n], ref.topk_weights, "recv_topk_weights", rows=ref)
    if worst:
        assert counts == []
        assert bool(host(recv_payload[n:].view(torch.uint8) == 0).all()), "padding rows of recv_x must be zero"
        assert bool(host(recv_idx[n:] == -1).all()), "padding rows of recv_topk_idx must be -1"
        assert bool(host(recv_w[n:] == 0).all()), "padding rows of recv_topk_weights must be 0"
    else:
        assert counts == ref.num_recv_tokens_per_expert, f"{counts} != {ref.num_recv_tokens_per_expert}"
    _check_handle(buf, handle, itir, ref, me, node_size, rows)

    # Cached dispatch: another payload on the same routing.
    other = [make_input(seed, r, inputs[r].x.size(0), HIDDEN, E, TOPK, salt=1) for r in range(world)]
    xs2, scales2 = expected_x(other, fp8)
    ref2 = ref_dispatch(xs2, scales2, [i.topk_idx for i in inputs], [i.topk_weights for i in inputs], me, E)
    poison(dev)
    recv_x2, i2, w2, c2, h2, _ = buf.dispatch(make_x(other[me], fp8, False, dev), handle=handle)
    assert (i2, w2, c2, h2) == (None, None, None, None)
    recv2, recv2_scales = recv_x2 if fp8 else (recv_x2, None)
    assert recv2.size(0) == rows
    assert_equal(recv2[:n], ref2.x, "cached recv_x", rows=ref2)
    if fp8:
        assert_equal(recv2_scales[:n], ref2.scales, "cached recv_x scales", rows=ref2)

    # Combine with weights and two biases, one bias, none.
    g = torch.Generator().manual_seed(seed + 101 * me)
    bias_0 = torch.randn((n_mine, HIDDEN), generator=g).to(torch.bfloat16)
    bias_1 = torch.randn((n_mine, HIDDEN), generator=g).to(torch.bfloat16)
    y = combine_input(me, recv_x)
    ys = [combine_input(r, (refs[r].x, refs[r].scales) if fp8 else refs[r].x) for r in range(world)]
    poison(dev)
    ckw = dict(previous_event=buf.capture(), async_finish=True, allocate_on_comm_stream=True) if use_async else {}
    combined_x, combined_w, event = buf.combine(y, handle, topk_weights=recv_w, bias=(bias_0.to(dev), bias_1.to(dev)),
                                                **ckw)
    if use_async:
        event.current_stream_wait()
    ref_x, ref_w = ref_combine_internode(refs, ys, me, n_mine, node_size, [r.topk_weights for r in refs],
                                         bias_0, bias_1)
    assert_equal(combined_x, ref_x, "combined_x")
    assert_equal(combined_w, ref_w, "combined_topk_weights")
    poison(dev)
    combined_x, combined_w, _ = buf.internode_combine(y, handle, bias=bias_0.to(dev))
    assert combined_w is None
    assert_equal(combined_x, ref_combine_internode(refs, ys, me, n_mine, node_size, None, bias_0)[0],
                 "combined_x (one bias)")
    poison(dev)
    combined_x, _, _ = buf.combine(y, handle)
    assert_equal(combined_x, ref_combine_internode(refs, ys, me, n_mine, node_size)[0], "combined_x (no bias)")
    buf.synchronize()
    return rows


MODES = {  # name: (fp8, worst-case sizing, async_finish + allocate_on_comm_stream + previous_event)
    "bf16": (False, False, False),
    "fp8": (True, False, False),
    "bf16-worst": (False, True, False),
    "fp8-worst": (True, True, False),
    "bf16-async": (False, False, True),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("world,node_size", SPLITS, ids=[f"ep{w}-node{u}" for w, u in SPLITS])
def test_internode_dispatch_combine_match_the_reference(world, node_size, mode):
    _need(world)
    seed = fresh_seed()
    print(f"[epx] EPX_TEST_SEED={seed} world {world} node_size {node_size} {mode}")
    fp8, worst, use_async = MODES[mode]
    rows = epx.launch_sim(world, _dispatch_combine, seed, node_size, fp8, worst, use_async)
    assert len(rows) == world


def _refusals(group):
    world, node_size = group.size(), 2
    with expect_error("InvalidArgument", "num_rdma_bytes", "virtual nodes of 2"):
        epx.Buffer(group, NVL_BYTES, 0, node_size=node_size)
    with expect_error("BufferTooSmall", "num_rdma_bytes"):
        epx.Buffer(group, NVL_BYTES, 4096, node_size=node_size)
    with expect_error("InvalidArgument", "num_rdma_bytes", "one node"):
        epx.Buffer(group, NVL_BYTES, rdma_bytes(world, node_size), node_size=world)
    buf = make_buffer(group, node_size)
    one = epx.Buffer(group, NVL_BYTES, node_size=world)
    with expect_error("Unsupported", "num_tokens_per_rdma_rank", "one node"):
        one.dispatch(torch.zeros((1, HIDDEN), dtype=torch.bfloat16, device=f"cuda:{group.device}"),
                     num_tokens_per_rdma_rank=torch.zeros(1, dtype=torch.int32, device=f"cuda:{group.device}"))
    return buf.get_num_rdma_ranks()


def test_internode_construction_refusals_name_num_rdma_bytes():
    _need(4)
    assert epx.launch_sim(4, _refusals) == [2] * 4
