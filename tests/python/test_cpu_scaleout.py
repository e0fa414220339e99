"""CPU tests of the scale-out options of the Python Buffer: node_size= (keyword-only) is validated
before the Buffer reaches its group, and reaches the core's BufferOptions.node_size."""
import inspect

import pytest

from conftest import require_epx

torch, epx = require_epx()
from epx_test_utils import expect_error  # noqa: E402
from test_cpu_api import _GroupReached, _StopAtGroup  # noqa: E402


def test_node_size_is_keyword_only_with_default_zero():
    p = inspect.signature(epx.Buffer.__init__).parameters["node_size"]
    assert p.kind == inspect.Parameter.KEYWORD_ONLY and p.default == 0


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True])
def test_node_size_must_be_a_non_negative_int(bad):
    with expect_error("InvalidArgument", "node_size"):
        epx.Buffer(_StopAtGroup(), num_nvl_bytes=1 << 20, node_size=bad)


@pytest.mark.parametrize("good", [0, 1, 2, 8])
def test_node_size_accepted_until_the_group(good):
    with pytest.raises(_GroupReached):
        epx.Buffer(_StopAtGroup(), num_nvl_bytes=1 << 20, node_size=good)


def test_core_buffer_takes_node_size():
    assert "node_size" in epx._C.Buffer.__init__.__doc__


# ---- DeepEP's internode surfaces that need no kernels ---------------------------------------------

def _align(x, a):
    return (x + a - 1) // a * a


def _rdma_bytes(config, hidden_bytes, num_ranks, node_size):
    """The RDMA region as docs/protocol.md ("RDMA region") lays it out, recomputed independently."""
    # One channel per SM of the Buffer's construction config (epx's default, or more SMs asked for).
    nodes, channels = num_ranks // node_size, max(config.num_sms, epx.Config.defaults(num_ranks).num_sms)
    slots = _C.RDMA_RING_SLOTS  # the Buffer's rings, whatever the config's chunk fields say
    meta = _align(4 * (1 + _C.MAX_RANKS), 16)  # source token, a position per local rank
    slot = (_align(hidden_bytes, 16) + _align(-(-hidden_bytes // 128) * 4, 16) + 2 * _align(4 * _C.MAX_TOPK, 16) + meta)
    streams = nodes * channels
    words = _align(16 * streams, 128)
    send = _align(words + 16 * streams, 128)
    recv = _align(send + streams * slots * slot, 128)
    return _align(recv + streams * slots * slot, 128)


_C = epx._C


@pytest.mark.parametrize("num_ranks", [16, 24, 32, 64, 128, 144, 160])
def test_rdma_hint_is_the_ring_layout_for_deepeps_internode_counts(num_ranks):
    for config in (epx.Buffer.get_dispatch_config(num_ranks), epx.Buffer.get_combine_config(num_ranks)):
        for hidden_bytes in (7168, 7168 * 2, 4096 + 1):
            hint = config.get_rdma_buffer_size_hint(hidden_bytes, num_ranks)
            assert hint == _rdma_bytes(config, hidden_bytes, num_ranks, 8), (config, hidden_bytes)
            assert hint % _C.RDMA_ALIGN == 0


def test_rdma_hint_one_node_is_zero_and_virtual_nodes_count():
    config = epx.Config()
    for num_ranks in range(1, _C.MAX_RANKS + 1):
        assert config.get_rdma_buffer_size_hint(7168 * 2, num_ranks) == 0  # one node, as DeepEP
    assert config.get_rdma_buffer_size_hint(7168 * 2, 4, node_size=4) == 0
    assert config.get_rdma_buffer_size_hint(7168 * 2, 4, node_size=2) == _rdma_bytes(config, 7168 * 2, 4, 2)
    assert config.get_rdma_buffer_size_hint(7168 * 2, 2, node_size=1) == _rdma_bytes(config, 7168 * 2, 2, 1)
    # More SMs (channels), more bytes; the chunk fields do not size the Buffer's fixed rings; the
    # batch is no argument at all.
    more_sms = epx.Config(24, 6, 256, 6, 128)
    assert more_sms.get_rdma_buffer_size_hint(7168, 16) > config.get_rdma_buffer_size_hint(7168, 16)
    other_chunks = epx.Config(config.num_sms, 6, 256, 6, 512)
    assert other_chunks.get_rdma_buffer_size_hint(7168, 16) == config.get_rdma_buffer_size_hint(7168, 16)


@pytest.mark.parametrize("num_ranks", [16, 32, 64, 160])
@pytest.mark.parametrize("sms", [None, 16, 24])
def test_rdma_hint_of_deepeps_configs_holds_the_rings_of_the_buffer_they_size(num_ranks, sms, monkeypatch):
    # DeepEP's sizing: num_rdma_bytes = max over the dispatch and combine configs' hints; the Buffer
    # then builds its rings with its construction config's SMs (set_num_sms, else the default).
    if sms is not None:
        monkeypatch.setattr(epx.Buffer, "num_sms", sms)
        monkeypatch.setattr(epx.Buffer, "_num_sms_set", True)
    for hidden_bytes in (7168, 7168 * 2):
        hint = max(epx.Buffer.get_dispatch_config(num_ranks).get_rdma_buffer_size_hint(hidden_bytes, num_ranks),
                   epx.Buffer.get_combine_config(num_ranks).get_rdma_buffer_size_hint(hidden_bytes, num_ranks))
        channels = epx.Buffer._default_config(num_ranks, 0).num_sms
        needed = _C.rdma_buffer_size_hint(num_ranks=num_ranks, node_size=8, num_channels=channels,
                                          chunk_tokens=_C.RDMA_CHUNK_TOKENS, ring_slots=_C.RDMA_RING_SLOTS,
                                          hidden_bytes=hidden_bytes, num_topk=_C.MAX_TOPK)
        assert hint >= needed, (num_ranks, sms, hidden_bytes, hint, needed)


@pytest.mark.parametrize("kwargs, names", [
    (dict(hidden_bytes=0, num_ranks=16), ("hidden_bytes",)),
    (dict(hidden_bytes=64, num_ranks=12), ("node_size", "12")),  # 12 ranks are not nodes of 8
    (dict(hidden_bytes=64, num_ranks=6, node_size=4), ("node_size", "6")),
    (dict(hidden_bytes=64, num_ranks=16, node_size=9), ("node_size",)),
    (dict(hidden_bytes=64, num_ranks=8 * 33), ("num_ranks", "33 nodes")),
])
def test_rdma_hint_errors_name_the_argument(kwargs, names):
    with expect_error("InvalidArgument", *names):
        epx.Config().get_rdma_buffer_size_hint(**kwargs)


def test_rdma_hint_node_size_is_keyword_only():
    p = inspect.signature(epx.Config.get_rdma_buffer_size_hint).parameters["node_size"]
    assert p.kind == inspect.Parameter.KEYWORD_ONLY and p.default == 0


class _FakeRuntime:
    """What the topology getters read of the core Buffer (a real one needs a GPU)."""

    def __init__(self, num_ranks, node_size):
        self.node_size, self.num_nodes = node_size, num_ranks // node_size


def _buffer_at(rank, num_ranks, node_size):
    b = object.__new__(epx.Buffer)
    b.rank, b.group_size, b.runtime = rank, num_ranks, _FakeRuntime(num_ranks, node_size)
    return b


@pytest.mark.parametrize("num_ranks, node_size", [(8, 8), (4, 2), (16, 8), (32, 8), (8, 1)])
def test_rdma_rank_getters_have_deepeps_meaning(num_ranks, node_size):
    for rank in range(num_ranks):
        b = _buffer_at(rank, num_ranks, node_size)
        assert b.get_num_rdma_ranks() == num_ranks // node_size
        assert b.get_rdma_rank() == rank // node_size
        # The rail's root: node 0's rank of the same local index.
        assert b.get_root_rdma_rank(True) == rank % node_size
        assert b.get_root_rdma_rank(global_=False) == 0
        assert (b.get_root_rdma_rank(True) - rank) % node_size == 0
