"""CPU tests of epx.Buffer across (virtual) nodes, on a recorded stand-in of the C++ buffer (the
`replay` fixture of test_cpu_api.py): what get_dispatch_layout, dispatch and combine hand the core,
and DeepEP's internode handle (its length, its order, the slots epx computes, checked against loop
references written from docs/protocol.md's definitions). The kernels themselves are tested in
test_sim_internode.py (GPU) and tests/gpu/test_internode.cpp.
"""
import re

import pytest

from conftest import require_epx

torch, epx = require_epx()
from epx import _C  # noqa: E402
from epx_test_utils import expect_error, make_input, ref_combine, ref_combine_internode, ref_dispatch  # noqa: E402
from test_cpu import fake_buffer  # noqa: E402,F401  (a fixture)
from test_cpu_api import _calls, _routing, replay  # noqa: E402,F401  (replay: a fixture)

# DeepEP's internode handle, in the order its internode_dispatch builds and unpacks it.
DEEPEP_INTERNODE_HANDLE = ("is_token_in_rank", "rdma_channel_prefix_matrix", "gbl_channel_prefix_matrix",
                           "recv_rdma_channel_prefix_matrix", "recv_rdma_rank_prefix_sum",
                           "recv_gbl_channel_prefix_matrix", "recv_gbl_rank_prefix_sum", "recv_src_meta",
                           "send_rdma_head", "send_nvl_head")


def _split(b, node_size, channels=4, rank=0):
    """Makes the replayed buffer one rank of `world / node_size` nodes with `channels` RDMA channels."""
    b._num_nodes, b._node_size, b._rdma_channels, b.rank = b.group_size // node_size, node_size, channels, rank
    return b


def ref_channel_prefix(mask: torch.Tensor, channels: int) -> torch.Tensor:
    """[T, M] bool -> [M, C] int32: inclusive prefix over channels; channel c = rows [c q, (c + 1) q)."""
    T, M = mask.shape
    q = -(-T // channels)
    out = torch.zeros((M, channels), dtype=torch.int32)
    running = torch.zeros(M, dtype=torch.int32)
    for c in range(channels):
        running = running + mask[c * q:min((c + 1) * q, T)].sum(0).to(torch.int32)
        out[:, c] = running
    return out


def ref_send_rdma_head(in_node: torch.Tensor) -> torch.Tensor:
    """[T, N] bool -> [T, N] int32: the token's position among this rank's tokens to node m, -1 if none."""
    T, N = in_node.shape
    out = torch.full((T, N), -1, dtype=torch.int32)
    for m in range(N):
        pos = 0
        for t in range(T):
            if in_node[t, m]:
                out[t, m] = pos
                pos += 1
    return out


def _layout(topk_idx, num_experts, world):
    epr = num_experts // world
    itir = torch.zeros((topk_idx.size(0), world), dtype=torch.bool)
    for r in range(world):
        itir[:, r] = ((topk_idx // epr) == r).any(1)
    return itir.sum(0).to(torch.int32), torch.zeros(num_experts, dtype=torch.int32), itir


@pytest.mark.parametrize("world,node_size", [(4, 2), (8, 2), (8, 4), (16, 8)])
def test_layout_returns_the_node_counts_across_nodes(replay, world, node_size):
    b = _split(replay(world=world, low_latency_mode=False), node_size)
    topk_idx, _ = _routing(10, 2 * world, 2)
    ntpr, ntprdma, ntpe, itir, _ = b.get_dispatch_layout(topk_idx, 2 * world)
    assert ntprdma is not None and ntprdma.dtype == torch.int32 and tuple(ntprdma.shape) == (world // node_size,)
    kwargs = _calls(b, "get_dispatch_layout")[-1]
    assert kwargs["num_tokens_per_rdma_rank"][0] == ntprdma.data_ptr()
    assert kwargs["num_tokens_per_rank"][0] == ntpr.data_ptr() and kwargs["is_token_in_rank"][0] == itir.data_ptr()


def test_layout_within_one_node_has_no_node_counts(replay):
    b = replay(low_latency_mode=False)
    topk_idx, _ = _routing(10, 8, 2)
    assert b.get_dispatch_layout(topk_idx, 8)[1] is None
    assert _calls(b, "get_dispatch_layout")[-1].get("num_tokens_per_rdma_rank") is None


@pytest.mark.parametrize("world,node_size,channels,num_tokens", [
    (4, 2, 4, 10), (8, 2, 3, 17), (8, 4, 8, 5), (16, 8, 6, 40), (8, 4, 4, 0)])
def test_dispatch_returns_deepeps_internode_handle(replay, world, node_size, channels, num_tokens):
    me = world - 1
    b = _split(replay(world=world, low_latency_mode=False, counts=(3,) * 2), node_size, channels, rank=me)
    E = 2 * world
    topk_idx, topk_weights = _routing(num_tokens, E, 3, seed=world + node_size)
    ntpr, ntpe, itir = _layout(topk_idx, E, world)
    ntprdma = torch.zeros(world // node_size, dtype=torch.int32)
    x = torch.zeros((num_tokens, 128), dtype=torch.bfloat16)
    recv_x, recv_idx, recv_w, counts, handle, _ = b.dispatch(
        x, num_tokens_per_rank=ntpr, num_tokens_per_rdma_rank=ntprdma, is_token_in_rank=itir,
        num_tokens_per_expert=ntpe, topk_idx=topk_idx, topk_weights=topk_weights)
    assert isinstance(handle, tuple) and len(handle) == len(DEEPEP_INTERNODE_HANDLE) == 10
    got = dict(zip(DEEPEP_INTERNODE_HANDLE, handle))
    assert got["is_token_in_rank"] is itir
    N = world // node_size
    in_node = itir.view(num_tokens, N, node_size).any(2)
    for name, want in (("rdma_channel_prefix_matrix", ref_channel_prefix(in_node, channels)),
                       ("gbl_channel_prefix_matrix", ref_channel_prefix(itir, channels)),
                       ("send_rdma_head", ref_send_rdma_head(in_node))):
        assert got[name].dtype == torch.int32 and torch.equal(got[name], want), f"{name}: {got[name]} != {want}"
    for name in ("recv_rdma_channel_prefix_matrix", "recv_rdma_rank_prefix_sum", "recv_gbl_channel_prefix_matrix"):
        assert got[name] is None, name
    h = handle[-1]
    assert isinstance(h, _C.DispatchHandle) and (h.rank, h.num_ranks, h.num_tokens) == (me, world, num_tokens)
    # recv_gbl_rank_prefix_sum (index -4, as DeepEP): column `me` of the core's rank_prefix_matrix.
    total, o_rpm, o_cm = _C.DispatchHandle.storage_layout(world, num_tokens)[:3]
    rpm = h.storage[o_rpm:o_cm].view(world, world)
    assert handle[-4] is got["recv_gbl_rank_prefix_sum"] and handle[-4].shape == (world,)
    assert handle[-4].data_ptr() == rpm[:, me].data_ptr() and torch.equal(handle[-4], rpm[:, me])
    # recv_src_meta's slot: one entry per received row (the rows the core was given).
    dispatched = _calls(b, "dispatch")[-1]
    assert got["recv_src_meta"].data_ptr() == dispatched["recv_src_idx"][0]
    assert got["recv_src_meta"].size(0) == recv_x.size(0) == b.runtime.num_recv
    assert counts == [3, 3] and recv_idx.shape == (b.runtime.num_recv, 3) and recv_w.shape == (b.runtime.num_recv, 3)

    # Cached dispatch and combine take the 10-tuple and hand the core its handle.
    b.dispatch(x, handle=handle)
    cached = [e for e in b.log if e[0] == "dispatch"][-1]
    assert cached[2][0] is h and cached[1].get("topk_idx") is None
    y = torch.zeros((b.runtime.num_recv, 128), dtype=torch.bfloat16)
    bias = torch.zeros((num_tokens, 128), dtype=torch.bfloat16)
    combined_x, combined_w, _ = b.combine(y, handle, topk_weights=recv_w, bias=bias)
    combined = [e for e in b.log if e[0] == "combine"][-1]
    assert combined[2][0] is h and combined[1]["bias_0"][0] == bias.data_ptr() and combined[1]["bias_1"] is None
    assert combined_x.shape == (num_tokens, 128) and combined_w.shape == (num_tokens, 3)
    # DeepEP's internode entry points are the same operations across nodes.
    b.internode_combine(y, handle)
    b.internode_dispatch(x, handle=handle)
    assert [e[0] for e in b.log if e[0] in ("dispatch", "combine")][-2:] == ["combine", "dispatch"]


def test_handles_of_the_other_kind_are_refused(replay):
    b = _split(replay(world=4, low_latency_mode=False), 2)
    storage = torch.zeros(_C.DispatchHandle.storage_layout(4, 2)[0], dtype=torch.int32)
    h = _C.DispatchHandle(storage_ptr=storage.data_ptr(), storage_numel=storage.numel(), num_ranks=4, rank=0,
                          num_tokens=2, storage=storage)
    y = torch.zeros((2, 128), dtype=torch.bfloat16)
    intranode = (None,) * 5 + (h,)
    with expect_error("InvalidArgument", "handle", "10 elements", "across 2 nodes", "a tuple of 6"):
        b.combine(y, intranode)
    with expect_error("InvalidArgument", "handle", "10 elements"):
        b.dispatch(y, handle=intranode)
    one_node = replay(world=4, low_latency_mode=False)
    with expect_error("InvalidArgument", "handle", "6 elements", "within one node", "a tuple of 10"):
        one_node.combine(y, (None,) * 9 + (h,))


def test_node_counts_are_checked_across_nodes(replay):
    b = _split(replay(world=4, low_latency_mode=False), 2)
    with expect_error("InvalidArgument", "num_tokens_per_rdma_rank", "int32"):
        b.dispatch(torch.zeros((2, 128), dtype=torch.bfloat16),
                   num_tokens_per_rdma_rank=torch.zeros(2, dtype=torch.int64))


def test_the_binding_takes_the_rdma_options():
    doc = _C.Buffer.__init__.__doc__.splitlines()[0]
    for name, default in (("num_rdma_bytes", 0), ("rdma_chunk_tokens", 6), ("rdma_ring_slots", 252), ("node_size", 0)):
        assert re.search(rf"\b{name}: [^,]* = {default}\b", doc), f"{name} = {default} not in {doc}"


def _dispatched(seed, world, num_tokens=40, hidden=64, topk=4):
    E = 4 * world
    inputs = [make_input(seed, r, num_tokens, hidden, E, topk) for r in range(world)]
    refs = [ref_dispatch([i.x for i in inputs], None, [i.topk_idx for i in inputs], [i.topk_weights for i in inputs],
                         r, E) for r in range(world)]
    ys = [(d.x.float() * (1.0 + r / 3.0)).to(torch.bfloat16) for r, d in enumerate(refs)]
    return refs, ys, [d.topk_weights for d in refs]


@pytest.mark.parametrize("world", [4, 8])
def test_two_level_reference_is_the_one_level_sum_where_nothing_rounds_across(world):
    # node_size 1: every partial is one bf16 row; node_size = world: the own node's partial, unrounded.
    refs, ys, w = _dispatched(11, world)
    g = torch.Generator().manual_seed(5)
    bias = torch.randn((40, 64), generator=g).to(torch.bfloat16)
    for me in range(world):
        want_x, want_w = ref_combine(refs, ys, me, 40, w, bias)
        for node_size in (1, world):
            got_x, got_w = ref_combine_internode(refs, ys, me, 40, node_size, w, bias)
            assert torch.equal(got_x.view(torch.int16), want_x.view(torch.int16)), (me, node_size)
            assert torch.allclose(got_w, want_w, rtol=0, atol=1e-5), (me, node_size)


def test_two_level_reference_rounds_each_remote_partial_once():
    world, node_size, me = 8, 4, 1
    refs, ys, _ = _dispatched(12, world)
    got, _ = ref_combine_internode(refs, ys, me, 40, node_size)
    one_level, _ = ref_combine(refs, ys, me, 40)
    # Independently: the remote node's partial, rounded, plus the own node's, in fp32.
    own = torch.zeros((40, 64))
    remote = torch.zeros((40, 64))
    for r, d in enumerate(refs):
        rows = (d.src_rank == me).nonzero().flatten()
        part = own if r // node_size == me // node_size else remote
        part[d.src_idx[rows].long()] += ys[r][rows].float()
    want = (own + remote.to(torch.bfloat16).float()).to(torch.bfloat16)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    # The split changes some bits (else the GPU test could not tell the two orders apart), by little.
    assert not torch.equal(got.view(torch.int16), one_level.view(torch.int16))
    assert torch.allclose(got.float(), one_level.float(), rtol=2 ** -6, atol=2 ** -6)
