"""CPU-only tests that epx is DeepEP V1's API (its last pure-V1 release, 1.2.1) and that the calls
Megatron-core, SGLang, vLLM and LMDeploy make reach the core the way they should.

DeepEP's signatures are written down below (names, order, defaults, static methods); epx may add
keyword-only arguments with defaults, listed as extensions. The client replays make each client's
calls, with its keywords and values, on a Buffer whose C++ runtime records what it is asked to do
(no GPU): the GPU replays compare results with the pure-torch reference.
"""
import ast
import importlib
import inspect
import sys
import types
from pathlib import Path

import pytest

from conftest import require_epx

torch, epx = require_epx()
from epx import _C, _aten  # noqa: E402
from test_cpu import _COMM, _COMPUTE, expect_error, fake_buffer  # noqa: E402,F401  (fake_buffer: a fixture)
from epx_test_utils import check_binding_call, log_ordered_call  # noqa: E402

REQUIRED = inspect.Parameter.empty

# DeepEP V1 (deep_ep 1.2.1): every public callable as (parameters after self, in order, with defaults).
DEEPEP_V1 = {
    "Buffer.__init__": [("group", REQUIRED), ("num_nvl_bytes", 0), ("num_rdma_bytes", 0), ("low_latency_mode", False),
                        ("num_qps_per_rank", 24), ("allow_nvlink_for_low_latency_mode", True), ("allow_mnnvl", False),
                        ("use_fabric", False), ("explicitly_destroy", False), ("enable_shrink", False),
                        ("comm", None)],
    "Buffer.destroy": [],
    "Buffer.is_sm90_compiled": [],
    "Buffer.set_num_sms": [("new_num_sms", REQUIRED)],
    "Buffer.capture": [],
    "Buffer.get_low_latency_rdma_size_hint": [("num_max_dispatch_tokens_per_rank", REQUIRED), ("hidden", REQUIRED),
                                              ("num_ranks", REQUIRED), ("num_experts", REQUIRED)],
    "Buffer.get_comm_stream": [],
    "Buffer.get_local_buffer_tensor": [("dtype", REQUIRED), ("size", None), ("offset", 0), ("use_rdma_buffer", False)],
    "Buffer.get_dispatch_config": [("num_ranks", REQUIRED)],
    "Buffer.get_combine_config": [("num_ranks", REQUIRED)],
    "Buffer.get_dispatch_layout": [("topk_idx", REQUIRED), ("num_experts", REQUIRED), ("previous_event", None),
                                   ("async_finish", False), ("allocate_on_comm_stream", False)],
    "Buffer.dispatch": [("x", REQUIRED), ("handle", None), ("num_tokens_per_rank", None),
                        ("num_tokens_per_rdma_rank", None), ("is_token_in_rank", None), ("num_tokens_per_expert", None),
                        ("topk_idx", None), ("topk_weights", None), ("expert_alignment", 1), ("num_worst_tokens", 0),
                        ("config", None), ("previous_event", None), ("async_finish", False),
                        ("allocate_on_comm_stream", False)],
    "Buffer.combine": [("x", REQUIRED), ("handle", REQUIRED), ("topk_weights", None), ("bias", None), ("config", None),
                       ("previous_event", None), ("async_finish", False), ("allocate_on_comm_stream", False)],
    "Buffer.clean_low_latency_buffer": [("num_max_dispatch_tokens_per_rank", REQUIRED), ("hidden", REQUIRED),
                                        ("num_experts", REQUIRED)],
    "Buffer.low_latency_dispatch": [("x", REQUIRED), ("topk_idx", REQUIRED),
                                    ("num_max_dispatch_tokens_per_rank", REQUIRED), ("num_experts", REQUIRED),
                                    ("cumulative_local_expert_recv_stats", None),
                                    ("dispatch_wait_recv_cost_stats", None), ("use_fp8", True),
                                    ("round_scale", False), ("use_ue8m0", False), ("async_finish", False),
                                    ("return_recv_hook", False)],
    "Buffer.low_latency_combine": [("x", REQUIRED), ("topk_idx", REQUIRED), ("topk_weights", REQUIRED),
                                   ("handle", REQUIRED), ("use_logfmt", False), ("zero_copy", False),
                                   ("async_finish", False), ("return_recv_hook", False), ("out", None),
                                   ("combine_wait_recv_cost_stats", None)],
    "Buffer.low_latency_update_mask_buffer": [("rank_to_mask", REQUIRED), ("mask", False)],
    "Buffer.low_latency_query_mask_buffer": [("mask_status", REQUIRED)],
    "Buffer.low_latency_clean_mask_buffer": [],
    "Buffer.get_next_low_latency_combine_buffer": [("handle", REQUIRED)],
    "Config.__init__": [("num_sms", 20), ("num_max_nvl_chunked_send_tokens", 6),
                        ("num_max_nvl_chunked_recv_tokens", 256), ("num_max_rdma_chunked_send_tokens", 6),
                        ("num_max_rdma_chunked_recv_tokens", 256)],
    "Config.get_nvl_buffer_size_hint": [("hidden_bytes", REQUIRED), ("num_ranks", REQUIRED)],
    "Config.get_rdma_buffer_size_hint": [("hidden_bytes", REQUIRED), ("num_ranks", REQUIRED)],
    "EventOverlap.__init__": [("event", None), ("extra_tensors", None)],
    "EventOverlap.current_stream_wait": [],
    "EventHandle.__init__": [],
    "EventHandle.current_stream_wait": [],
}
# DeepEP's internode entry points share dispatch's and combine's parameters.
DEEPEP_V1["Buffer.internode_dispatch"] = DEEPEP_V1["Buffer.dispatch"]
DEEPEP_V1["Buffer.internode_combine"] = DEEPEP_V1["Buffer.combine"]
DEEPEP_V1_STATIC = {"Buffer.is_sm90_compiled", "Buffer.set_num_sms", "Buffer.capture",
                    "Buffer.get_low_latency_rdma_size_hint", "Buffer.get_dispatch_config", "Buffer.get_combine_config"}
# epx's additions: keyword-only, with a default, so no DeepEP call changes meaning.
EPX_EXTENSIONS = {"Buffer.__init__": {"node_size"},
                  "Buffer.get_low_latency_rdma_size_hint": {"num_topk", "zero_copy"},
                  "Config.__init__": {"num_threads", "timeout_s"},
                  "Config.get_rdma_buffer_size_hint": {"node_size"}}
# DeepEP's Config tables for one NVLink domain: num_ranks -> the four chunk sizes after Config's rounding
# of the RDMA receive chunk (128 -> 132 for a send chunk of 6).
# Internode (16..160 ranks, nodes of 8) as in DeepEP's buffer.py; 128 stays 128 for send chunks
# dividing it.
DEEPEP_DISPATCH_CHUNKS = {2: (24, 256, 6, 132), 4: (6, 256, 6, 132), 8: (6, 256, 6, 132),
                          16: (16, 288, 20, 140), 24: (8, 288, 32, 128), 32: (8, 288, 32, 128),
                          64: (20, 288, 28, 140), 128: (20, 560, 32, 128), 144: (32, 720, 12, 132),
                          160: (28, 720, 12, 132)}
DEEPEP_COMBINE_CHUNKS = {2: (10, 256, 6, 132), 4: (9, 256, 6, 132), 8: (4, 256, 6, 132),
                         16: (2, 288, 28, 140), 24: (1, 288, 20, 140), 32: (1, 288, 20, 140),
                         64: (1, 288, 20, 140), 128: (1, 560, 12, 132), 144: (2, 720, 8, 128),
                         160: (2, 720, 8, 128)}
CHUNK_FIELDS = ("num_max_nvl_chunked_send_tokens", "num_max_nvl_chunked_recv_tokens",
                "num_max_rdma_chunked_send_tokens", "num_max_rdma_chunked_recv_tokens")


# ---- Names, module paths, signatures ------------------------------------------------------------------

def test_deepep_names_and_module_paths():
    for name in ("Buffer", "Config", "EventOverlap", "topk_idx_t"):  # deep_ep.__all__
        assert name in epx.__all__, name
    assert epx.topk_idx_t is torch.int64
    assert epx.buffer.Buffer is epx.Buffer and epx.utils.EventOverlap is epx.EventOverlap
    assert epx.utils.EventHandle is epx.EventHandle and epx.buffer.EventHandle is epx.EventHandle
    assert epx.buffer.Config is epx.Config and epx.utils.Config is epx.Config
    assert callable(epx.utils.check_nvlink_connections)
    assert epx.Buffer.num_sms == 20
    assert epx.Buffer.is_sm90_compiled() is True


@pytest.mark.parametrize("qualname", sorted(DEEPEP_V1))
def test_signature_is_deepeps(qualname):
    owner, name = qualname.split(".")
    cls = getattr(epx, owner)
    assert name in vars(cls), f"{qualname}: not defined by epx"
    assert isinstance(inspect.getattr_static(cls, name), staticmethod) == (qualname in DEEPEP_V1_STATIC), \
        f"{qualname}: static in DeepEP" if qualname in DEEPEP_V1_STATIC else f"{qualname}: not static in DeepEP"
    params = list(inspect.signature(getattr(cls, name)).parameters.values())
    if params and params[0].name == "self":
        params = params[1:]
    expected = DEEPEP_V1[qualname]
    got = [(p.name, p.default) for p in params[:len(expected)]]
    assert got == expected, f"{qualname}: {got} != DeepEP's {expected}"
    for p in params[:len(expected)]:
        assert p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD, f"{qualname}({p.name}): {p.kind}"
    extras = params[len(expected):]
    assert {p.name for p in extras} <= EPX_EXTENSIONS.get(qualname, set()), f"{qualname}: extra {extras}"
    for p in extras:
        assert p.kind == inspect.Parameter.KEYWORD_ONLY and p.default is not REQUIRED, f"{qualname}({p.name})"


def test_event_handle_is_a_cuda_event():
    assert issubclass(epx.EventHandle, torch.cuda.Event)
    assert callable(epx.EventHandle.current_stream_wait)
    with expect_error("State", "async_finish"):
        epx.EventOverlap(None).current_stream_wait()


# ---- DeepEP module aliases (how code written for DeepEP imports epx) -----------------------------------

@pytest.fixture
def no_deep_ep(monkeypatch):
    """sys.modules without any deep_ep module (restored afterwards)."""
    for name in [n for n in sys.modules if n == "deep_ep" or n.startswith("deep_ep.")]:
        monkeypatch.delitem(sys.modules, name)
    return monkeypatch


def _megatron_style_import():
    """Megatron-core's fused_a2a import block: its DeepEP path is on only if both imports succeed."""
    namespace = {}
    exec("try:\n"
         "    from deep_ep import Buffer\n"
         "    from deep_ep.utils import EventHandle, EventOverlap\n"
         "    HAVE_DEEP_EP = True\n"
         "except ImportError:\n"
         "    HAVE_DEEP_EP = False\n", namespace)
    return namespace


def test_megatron_import_with_sys_modules_alias(no_deep_ep):
    for name, module in (("deep_ep", epx), ("deep_ep.buffer", epx.buffer), ("deep_ep.utils", epx.utils)):
        no_deep_ep.setitem(sys.modules, name, module)
    ns = _megatron_style_import()
    assert ns["HAVE_DEEP_EP"] is True
    assert ns["Buffer"] is epx.Buffer and ns["EventHandle"] is epx.EventHandle
    assert ns["EventOverlap"] is epx.EventOverlap


def test_alias_as_deep_ep(no_deep_ep):
    epx.alias_as_deep_ep()
    epx.alias_as_deep_ep()  # twice is harmless
    assert importlib.import_module("deep_ep") is epx
    assert importlib.import_module("deep_ep.utils") is epx.utils
    assert importlib.import_module("deep_ep.buffer") is epx.buffer
    ns = _megatron_style_import()
    assert ns["HAVE_DEEP_EP"] is True and ns["EventHandle"] is epx.EventHandle
    ns = {}
    exec("from deep_ep import Buffer, Config", ns)  # SGLang's import
    assert ns["Buffer"] is epx.Buffer and ns["Config"] is epx.Config


def test_alias_as_deep_ep_refuses_another_deep_ep(no_deep_ep):
    other = types.ModuleType("deep_ep")
    other.__file__ = "/opt/deepep/deep_ep/__init__.py"
    no_deep_ep.setitem(sys.modules, "deep_ep", other)
    with expect_error("State", "deep_ep", "/opt/deepep/deep_ep/__init__.py"):
        epx.alias_as_deep_ep()
    assert sys.modules["deep_ep"] is other and "deep_ep.utils" not in sys.modules


# ---- Config tables and size hints ---------------------------------------------------------------------

@pytest.fixture
def restore_num_sms():
    saved = (epx.Buffer.num_sms, epx.Buffer._num_sms_set)
    yield
    epx.Buffer.num_sms, epx.Buffer._num_sms_set = saved


def _chunks(config):
    return tuple(getattr(config, f) for f in CHUNK_FIELDS)


def test_config_tables_are_deepeps(restore_num_sms):
    for table, get in ((DEEPEP_DISPATCH_CHUNKS, epx.Buffer.get_dispatch_config),
                       (DEEPEP_COMBINE_CHUNKS, epx.Buffer.get_combine_config)):
        for num_ranks, chunks in table.items():
            config = get(num_ranks)
            assert (config.num_sms, _chunks(config)) == (20, chunks), (get.__name__, num_ranks)
        # Rank counts DeepEP does not list take the next listed one.
        assert _chunks(get(1)) == table[2] and _chunks(get(3)) == table[4] and _chunks(get(6)) == table[8]
        assert _chunks(get(9)) == table[16] and _chunks(get(40)) == table[64] and _chunks(get(150)) == table[160]
        assert "untuned" in get.__doc__ or "untuned" in epx.Buffer.get_dispatch_config.__doc__
        with expect_error("Unsupported", "num_ranks", "161"):
            get(161)
    epx.Buffer.set_num_sms(24)
    assert epx.Buffer.num_sms == 24
    assert epx.Buffer.get_dispatch_config(8).num_sms == 24 and epx.Buffer.get_combine_config(2).num_sms == 24
    with expect_error("InvalidArgument", "new_num_sms"):
        epx.Buffer.set_num_sms(0)


def test_config_chunk_rules_are_deepeps():
    assert epx.Config(20, 6, 256, 6, 128).num_max_rdma_chunked_recv_tokens == 132  # rounded up to a multiple of 6
    assert epx.Config(20, 6, 256, 8, 128).num_max_rdma_chunked_recv_tokens == 128
    with expect_error("InvalidArgument", "Config.num_max_nvl_chunked_send_tokens", "256"):
        epx.Config(20, 256, 256)
    with expect_error("InvalidArgument", "Config.num_max_rdma_chunked_send_tokens"):
        epx.Config(20, 6, 256, 300, 256)
    # SGLang builds configs from JSON with DeepEP's keyword names.
    config = epx.Config(**{"num_sms": 24, "num_max_nvl_chunked_send_tokens": 8, "num_max_nvl_chunked_recv_tokens": 512,
                           "num_max_rdma_chunked_send_tokens": 16, "num_max_rdma_chunked_recv_tokens": 128})
    assert (config.num_sms, _chunks(config)) == (24, (8, 512, 16, 128))


def _deepep_nvl_hint(config, hidden_bytes, num_ranks):
    """DeepEP V1's Config::get_nvl_buffer_size_hint within one NVLink domain (NVSHMEM build): channel
    flags, then per ring slot the row, its source metadata (8 B), 128 top-k ids and weights and 128 scales."""
    channels = config.num_sms // 2
    num_bytes = channels * num_ranks * (2 * 1 + 3) * 4
    num_bytes += channels * num_ranks * config.num_max_nvl_chunked_recv_tokens * (hidden_bytes + 8 + 128 * 12 + 128 * 4)
    return (num_bytes + 127) // 128 * 128


def test_nvl_size_hint_is_a_function_of_config_hidden_bytes_and_ranks():
    config = epx.Buffer.get_dispatch_config(8)
    hint = config.get_nvl_buffer_size_hint(7168 * 2, 8)
    assert hint == epx.Config(20, 6, 256, 6, 128).get_nvl_buffer_size_hint(7168 * 2, 8)  # same inputs, same size
    assert hint % (1 << 21) == 0
    assert config.get_nvl_buffer_size_hint(4096 * 2, 8) < hint < config.get_nvl_buffer_size_hint(8192 * 2, 8)
    assert config.get_nvl_buffer_size_hint(7168 * 2, 4) < hint
    assert epx.Config(20, 6, 512).get_nvl_buffer_size_hint(7168 * 2, 8) > hint  # more ring slots, more rows
    assert epx.Config(40, 6, 256).get_nvl_buffer_size_hint(7168 * 2, 8) > hint  # more channels, more rows
    # epx extensions do not change the size.
    assert epx.Config(20, 6, 256, num_threads=256, timeout_s=5.0).get_nvl_buffer_size_hint(7168 * 2, 8) == hint


@pytest.mark.parametrize("num_ranks", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("hidden", [1024, 2048, 4096, 7168])
def test_nvl_size_hint_holds_the_rows_it_promises(num_ranks, hidden):
    for config in (epx.Buffer.get_dispatch_config(num_ranks), epx.Buffer.get_combine_config(num_ranks)):
        hint = config.get_nvl_buffer_size_hint(hidden * 2, num_ranks)
        # Every rank sends up to (num_sms // 2) * recv_chunk tokens; one rank may receive all of them.
        rows = (config.num_sms // 2) * config.num_max_nvl_chunked_recv_tokens * num_ranks
        for dtype in (_C.DTYPE_BF16, _C.DTYPE_FP8E4M3):
            assert _C.nvl_buffer_size_hint(max_rows=rows, hidden=hidden, dtype=dtype, num_topk=_C.MAX_TOPK,
                                            num_ranks=num_ranks) <= hint
        assert _C.nvl_buffer_size_hint(max_rows=rows + 4096, hidden=hidden, dtype=_C.DTYPE_BF16, num_topk=8,
                                        num_ranks=num_ranks) > hint  # not oversized
        # Never more memory than DeepEP asks for with the same config.
        assert hint <= _deepep_nvl_hint(config, hidden * 2, num_ranks), (hint, _deepep_nvl_hint(config, hidden * 2,
                                                                                                num_ranks))


@pytest.mark.parametrize("num_ranks", [2, 3, 4, 8])
@pytest.mark.parametrize("hidden", [1024, 4096, 7168])
def test_nvl_size_hint_holds_the_rings(num_ranks, hidden):
    """The hint serves any batch: a dispatch or combine whose rows do not fit streams through
    num_ranks x num_sms rings, and the hinted buffer gives each at least the rows it promises (and
    every ring's minimum), for bf16 and fp8 rows with epx's largest top-k."""
    for config in (epx.Buffer.get_dispatch_config(num_ranks), epx.Buffer.get_combine_config(num_ranks),
                   epx.Config(24, 6, 512), epx.Config(8, 6, 64, num_threads=256)):
        hint = config.get_nvl_buffer_size_hint(hidden * 2, num_ranks)
        per_ring = -(-max(config.num_sms // 2, 1) * config.num_max_nvl_chunked_recv_tokens // config.num_sms)
        for dtype in (_C.DTYPE_BF16, _C.DTYPE_FP8E4M3):
            dispatch_slots, combine_slots = _C.bounded_ring_rows(
                num_sms=config.num_sms, num_threads=config.num_threads, num_nvl_bytes=hint, hidden=hidden, dtype=dtype,
                num_topk=_C.MAX_TOPK, num_ranks=num_ranks)
            assert dispatch_slots >= min(per_ring, 4096), (config, dispatch_slots, per_ring)
            assert combine_slots >= 64, (config, combine_slots)
    # DeepEP's default configs: 128 rows per ring (10 x 256 rows spread over 20 blocks).
    config = epx.Buffer.get_dispatch_config(8)
    assert config._rows_per_ring() == 128
    # A buffer too small for the rings: the error names the minimum size.
    with expect_error("BufferTooSmall", "need num_nvl_bytes >="):
        _C.bounded_ring_rows(num_sms=20, num_threads=512, num_nvl_bytes=4 << 20, hidden=7168, dtype=_C.DTYPE_BF16,
                             num_topk=8, num_ranks=8)


def test_size_hint_errors_and_rdma_hint():
    config = epx.Config()
    for num_ranks in range(1, _C.MAX_RANKS + 1):
        assert config.get_rdma_buffer_size_hint(7168 * 2, num_ranks) == 0  # as DeepEP within one NVLink domain
    assert config.get_rdma_buffer_size_hint(7168 * 2, 16) > 0  # two nodes of 8 (test_cpu_scaleout.py)
    with expect_error("Unsupported", "num_ranks", "16"):
        config.get_nvl_buffer_size_hint(7168 * 2, 16)
    with expect_error("InvalidArgument", "hidden_bytes"):
        config.get_nvl_buffer_size_hint(0, 8)
    with expect_error("InvalidArgument", "num_ranks"):
        config.get_nvl_buffer_size_hint(7168 * 2, 0)
    # The low-latency hint with DeepEP's keywords (vLLM passes them by name).
    assert epx.Buffer.get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank=128, hidden=7168, num_ranks=8,
                                                     num_experts=256) == \
        epx.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256)
    with pytest.raises(TypeError):
        epx.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256, 8)  # num_topk is keyword-only
    with pytest.raises(TypeError):
        epx.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256, None, True)  # zero_copy too


# ---- Buffer(...) options ------------------------------------------------------------------------------

class _GroupReached(Exception):
    pass


class _StopAtGroup:
    """A process group: the Buffer accepted every option once it asks for the rank."""

    def rank(self):
        raise _GroupReached

    def size(self):
        raise _GroupReached


def _accepted(*args, **kwargs):
    with pytest.raises(_GroupReached):
        epx.Buffer(_StopAtGroup(), *args, **kwargs)


def test_buffer_accepts_deepep_options():
    _accepted(1 << 20, 0)  # Megatron-core: positional sizes
    _accepted(1 << 20, 1 << 24, low_latency_mode=True, num_qps_per_rank=32, allow_mnnvl=True)  # SGLang
    # DeepEP's order, positionally: explicitly_destroy=True sits between use_fabric and enable_shrink.
    _accepted(1 << 20, 1 << 24, True, 24, True, True, False, True, False, None)
    _accepted(num_nvl_bytes=1 << 30, num_rdma_bytes=1 << 24, low_latency_mode=True, num_qps_per_rank=32,
              allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False, explicitly_destroy=True,
              enable_shrink=False)  # vLLM low latency
    _accepted(use_fabric=False, num_rdma_bytes=1 << 24, low_latency_mode=True)
    # Internode high-throughput (DeepEP's test_internode.py): the RDMA region without low_latency_mode
    # (the core checks it against the node split, naming num_rdma_bytes).
    _accepted(1 << 30, 1 << 30)
    _accepted(num_nvl_bytes=1 << 30, num_rdma_bytes=1 << 30, node_size=2)


@pytest.mark.parametrize("kwargs,names", [
    (dict(num_nvl_bytes=1 << 20, use_fabric=True), ("use_fabric=True", "ncclMemAlloc")),
])
def test_buffer_refuses_what_epx_cannot_honour(kwargs, names):
    with expect_error("Unsupported", *names):
        epx.Buffer(_StopAtGroup(), **kwargs)


def test_shrink_mode_needs_low_latency_mode():
    with expect_error("InvalidArgument", "enable_shrink=True", "low_latency_mode"):
        epx.Buffer(_StopAtGroup(), num_nvl_bytes=1 << 20, enable_shrink=True)
    with pytest.raises(_GroupReached):  # accepted: the Buffer goes on to the group
        epx.Buffer(_StopAtGroup(), num_rdma_bytes=1 << 24, low_latency_mode=True, enable_shrink=True)


# ---- Events and streams -------------------------------------------------------------------------------

class _FakeEvent(torch.cuda.Event):
    """A CUDA event that records what waits on it instead of touching a GPU."""

    def __new__(cls, log):
        return super().__new__(cls)

    def __init__(self, log):
        self.log = log

    def wait(self, stream=None):
        self.log.append(("event_wait", stream))


class _Runtime:
    """Stands in for the C++ buffer: records each call (name, keyword args, positional args); dispatch_notify
    reports `num_recv` rows. The operations take keywords only, as the binding's do."""

    def __init__(self, log, world, num_recv=7):
        self.log, self.world, self.num_recv, self.num_nvl_bytes = log, world, num_recv, 1 << 24

    def __getattr__(self, name):
        if name in ("set_config", "clean_low_latency_buffer"):
            return lambda *args: self.log.append((name, args))
        if name == "mark_default_config":
            return lambda: None
        if name in ("cached_dispatch_call", "combine_call"):  # may answer None: the package's general path runs
            return lambda *args: None
        if name in ("get_dispatch_layout", "dispatch", "combine", "low_latency_receive"):
            def record(*args, **kwargs):
                check_binding_call(getattr(_C.Buffer, name), args, kwargs)
                log_ordered_call(self.log, (name, kwargs, args), kwargs)
            return record
        raise AssertionError(f"unexpected runtime call {name}")

    def dispatch_notify(self, handle, **kwargs):
        check_binding_call(_C.Buffer.dispatch_notify, (handle,), kwargs)
        log_ordered_call(self.log, ("dispatch_notify", kwargs, (handle,)), kwargs)
        return self.num_recv

    # The low-latency operations run whole in the binding (binding.cpp, tested on the GPU): these return
    # what its calls return, by their contract, with CPU tensors; events and hooks come from the package.
    def low_latency_dispatch_call(self, x, topk_idx, T, E, cumulative_stats, wait_stats, use_fp8, round_scale,
                                  use_ue8m0, async_finish, return_recv_hook):
        self.log.append(("low_latency_dispatch_call", dict(T=T, E=E, use_fp8=use_fp8, async_finish=async_finish,
                                                           return_recv_hook=return_recv_hook)))
        assert not (async_finish and return_recv_hook)
        hidden, num_topk = x.shape[1], topk_idx.shape[1]
        outs, _ = _aten.empty_plan(x, epx._ll._ll_plan(self.world, E, T, hidden, use_fp8, use_ue8m0))
        recv_x, scales = outs[0], outs[1] if use_fp8 else None
        count, src_info, layout_range, src_topk_slot = outs[-4:]
        core = _C.LowLatencyHandle(num_max_dispatch_tokens_per_rank=T, hidden=hidden, num_experts=E,
                                   num_topk=num_topk, buffer_idx=0, src_info=None, layout_range=None,
                                   src_topk_slot=None)
        handle = (src_info, layout_range, T, hidden, E, src_topk_slot, num_topk, 0, core)
        keep = (x, topk_idx, recv_x, scales, count, src_info, layout_range, src_topk_slot, cumulative_stats,
                wait_stats)
        event, hook = self._finish(async_finish, return_recv_hook, 0, keep)
        return (recv_x, scales) if use_fp8 else recv_x, count, handle, event, hook

    def low_latency_combine_call(self, x, topk_idx, topk_weights, handle, zero_copy, async_finish,
                                 return_recv_hook, out):
        self.log.append(("low_latency_combine_call", dict(zero_copy=zero_copy, async_finish=async_finish,
                                                          return_recv_hook=return_recv_hook)))
        if out is None:
            out = torch.empty((topk_idx.shape[0], handle[3]), dtype=torch.bfloat16)
        event, hook = self._finish(async_finish, return_recv_hook, 1, (x, topk_idx, topk_weights, out))
        return out, event, hook

    def _finish(self, async_finish, return_recv_hook, buffer_idx, keep):
        event, hook = epx._streams._ll_finish(_COMM, self, _COMPUTE, async_finish, return_recv_hook, buffer_idx,
                                              keep) if async_finish or return_recv_hook else (None, None)
        return epx.EventOverlap(event, keep if async_finish else None), hook

    def peer_pointer(self, peer):
        return 0x7000_0000 + peer


@pytest.fixture
def replay(fake_buffer, monkeypatch):
    """A Buffer on the CPU (tensors stand for device tensors) whose runtime, stream waits and events are
    recorded into `b.log`; its host count buffer already holds `counts` (what dispatch_notify reports)."""
    monkeypatch.setattr(epx._streams, "_current_raw_stream", lambda device: _COMPUTE)
    monkeypatch.setattr(_C, "memset_async", lambda *args: None)

    class _Events:
        @staticmethod
        def _recorded_on(stream):
            b.log.append(("record", stream))
            return _FakeEvent(b.log)

    monkeypatch.setattr(epx._streams, "EventHandle", _Events)
    b = None

    def make(world=4, low_latency_mode=True, counts=(3, 4)):
        nonlocal b
        b = fake_buffer(world=world, low_latency_mode=low_latency_mode)
        b._device = torch.device("cpu")
        b.log = []
        b.runtime = _Runtime(b.log, world)
        b._stream_wait = lambda dst, src: b.log.append(("wait", dst, src))
        b._counts_host = torch.zeros((_C.MAX_LOCAL_EXPERTS,), dtype=torch.int32)
        b._counts_host[:len(counts)] = torch.tensor(counts, dtype=torch.int32)
        b._counts_device_ptr = 0x1000
        return b
    return make


def _calls(b, name):
    """The arguments of each runtime call `name`, in order (the keyword arguments of an operation)."""
    return [entry[1] for entry in b.log if entry[0] == name]


def _routing(num_tokens, num_experts, num_topk, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand((num_tokens, num_experts), generator=g)
    topk_idx = scores.topk(num_topk, dim=1).indices
    topk_weights = torch.rand((num_tokens, num_topk), generator=g)
    return topk_idx, topk_weights


def test_previous_event_without_event_is_no_event(replay):
    b = replay()
    topk_idx, _ = _routing(10, 8, 2)
    for previous_event in (None, epx.EventOverlap(), epx.EventOverlap(None)):
        b.log.clear()
        *_, event = b.get_dispatch_layout(topk_idx, 8, previous_event=previous_event, async_finish=False)
        assert event.event is None
        assert b.log[0] == ("wait", _COMM, _COMPUTE) and b.log[-1] == ("wait", _COMPUTE, _COMM)
    with expect_error("InvalidArgument", "allocate_on_comm_stream", "previous_event"):
        b.get_dispatch_layout(topk_idx, 8, previous_event=epx.EventOverlap(None), async_finish=True,
                              allocate_on_comm_stream=True)
    with expect_error("InvalidArgument", "previous_event", "EventOverlap", "Event"):
        b.get_dispatch_layout(topk_idx, 8, previous_event=torch.cuda.Event())
    with expect_error("InvalidArgument", "previous_event", "CUDA event"):
        b.get_dispatch_layout(topk_idx, 8, previous_event=epx.EventOverlap("not an event"))


def test_previous_event_with_event_orders_the_comm_stream(replay):
    b = replay()
    topk_idx, _ = _routing(10, 8, 2)
    b._comm_stream = "comm-stream"
    *_, event = b.get_dispatch_layout(topk_idx, 8, previous_event=epx.EventOverlap(_FakeEvent(b.log)))
    # The comm stream waits for the given event, not for the current stream.
    assert b.log == [("event_wait", "comm-stream"), b.log[1], ("wait", _COMPUTE, _COMM)], b.log
    assert b.log[1][0] == "get_dispatch_layout" and event.event is None


def test_host_buffers_ignore_the_default_device(fake_buffer, monkeypatch):
    """torch.set_default_device("cuda") (DeepEP's tests set it) must not move the pinned count buffer."""
    made = {}

    class _Torch:
        """epx._ht's torch, with zeros() recording its arguments (and not pinning: no GPU here)."""

        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def zeros(*args, **kwargs):
            made.update(kwargs)
            kwargs.pop("pin_memory", None)
            return torch.zeros(*args, **kwargs)

    monkeypatch.setattr(epx._ht, "torch", _Torch())
    monkeypatch.setattr(_C, "host_device_pointer", lambda ptr: 0x1000)
    b = fake_buffer()
    with torch.device("meta"):  # the default device, as torch.set_default_device sets it
        assert torch.zeros(1).device.type == "meta"
        desc = b._recv_counts(4)
    assert made.get("pin_memory") is True and b._counts_host.device.type == "cpu", made
    assert desc == (0x1000, _C.DTYPE_I32, (4,), (1,))


def test_every_tensor_factory_names_its_device():
    """Source check of python/epx: a tensor made without device= would follow torch.set_default_device."""
    factories = {"zeros", "ones", "empty", "full", "tensor", "arange", "empty_strided", "rand", "randn"}
    package = Path(epx.__file__).resolve().parent
    missing = []
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in factories \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch" \
                    and "device" not in {k.arg for k in node.keywords}:
                missing.append(f"{path.name}:{node.lineno}")
    assert not missing, f"tensor factories without device=: {missing}"


# ---- Mask APIs, internode entry points, raw buffers ----------------------------------------------------

def test_mask_apis_need_shrink_mode(fake_buffer):
    b = fake_buffer()
    with expect_error("State", "low_latency_query_mask_buffer", "enable_shrink=True"):
        b.low_latency_query_mask_buffer(torch.zeros(4, dtype=torch.int32))
    with expect_error("State", "low_latency_update_mask_buffer", "enable_shrink=True"):
        b.low_latency_update_mask_buffer(1, mask=True)
    with expect_error("State", "low_latency_clean_mask_buffer", "enable_shrink=True"):
        b.low_latency_clean_mask_buffer()


def test_internode_entry_points_are_refused_within_one_node(fake_buffer):
    b = fake_buffer()
    with expect_error("Unsupported", "internode_dispatch", "one node", "dispatch"):
        b.internode_dispatch(torch.zeros(4, 128))
    with expect_error("Unsupported", "internode_combine", "one node", "combine"):
        b.internode_combine(torch.zeros(4, 128), handle=())


def test_local_buffer_tensors(replay, monkeypatch):
    b = replay()
    wrapped = []
    monkeypatch.setattr(b, "_wrap", lambda ptr, num_bytes, dtype, shape, strides:
                        wrapped.append((ptr, num_bytes, dtype, shape)) or torch.zeros(shape, dtype=dtype))
    base, nvl = b.runtime.peer_pointer(0), b.runtime.num_nvl_bytes
    nvl_flags, ll_flags = _C.NVL_FLAG_BYTES, _C.LL_FLAG_BYTES
    assert nvl_flags > 0 and ll_flags > 0 and nvl_flags % 4096 == 0 and ll_flags % 4096 == 0
    # vLLM's cleanup zeroes the low-latency region as int8 (it follows the high-throughput part): the
    # tensor leaves out the protocol flags at its start.
    t = b.get_local_buffer_tensor(dtype=torch.int8, use_rdma_buffer=True)
    rdma = b.num_rdma_bytes - ll_flags
    assert wrapped[-1] == (base + nvl + ll_flags, rdma, torch.int8, (rdma,))
    assert t.numel() == rdma
    b.get_local_buffer_tensor(torch.bfloat16, offset=64)  # offset in bytes (as in DeepEP), past the flags
    assert wrapped[-1] == (base + nvl_flags + 64, nvl - nvl_flags - 64, torch.bfloat16, ((nvl - nvl_flags - 64) // 2,))
    t = b.get_local_buffer_tensor(torch.float32, torch.Size((4, 8)), 16, True)
    assert wrapped[-1][0] == base + nvl + ll_flags + 16 and t.shape == (4, 8)
    with expect_error("InvalidArgument", "offset"):
        b.get_local_buffer_tensor(torch.int8, offset=nvl - nvl_flags + 1)
    with expect_error("InvalidArgument", "offset", "element size"):
        b.get_local_buffer_tensor(torch.float32, offset=2)
    with expect_error("InvalidArgument", "dtype"):
        b.get_local_buffer_tensor("int8")
    b.low_latency_mode = False
    assert b.get_local_buffer_tensor(torch.int8, use_rdma_buffer=True).numel() == 0  # no low-latency region


# ---- Client replays: the calls each client makes, with its keywords and values -------------------------

def _dispatch_inputs(b, num_tokens=10, hidden=128, num_experts=8, num_topk=2):
    topk_idx, topk_weights = _routing(num_tokens, num_experts, num_topk)
    x = torch.randn((num_tokens, hidden)).to(torch.bfloat16)
    return x, topk_idx, topk_weights


def test_megatron_core_replay(replay):
    """fused_a2a: get_buffer's sizing, FusedDispatch / FusedCombine forward and backward (async_finish=False)."""
    world, hidden = 4, 128
    x, token_indices, token_probs = _dispatch_inputs(replay(), hidden=hidden)
    hidden_bytes = x.size(1) * max(x.element_size(), 2)  # get_hidden_bytes
    num_nvl_bytes = num_rdma_bytes = 0
    for config in (epx.Buffer.get_dispatch_config(world), epx.Buffer.get_combine_config(world)):
        num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, world), num_nvl_bytes)
        num_rdma_bytes = max(config.get_rdma_buffer_size_hint(hidden_bytes, world), num_rdma_bytes)
    assert num_nvl_bytes > 0 and num_rdma_bytes == 0
    _accepted(num_nvl_bytes, num_rdma_bytes)  # Buffer(group, num_nvl_bytes, num_rdma_bytes)

    b = replay(world=world, low_latency_mode=False)
    # FusedDispatch.forward: previous_event is None without async_finish.
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, event = \
        b.get_dispatch_layout(token_indices, 8, previous_event=None, async_finish=False, allocate_on_comm_stream=False)
    recv_x, recv_token_indices, recv_token_probs, num_recv_tokens_per_expert_list, handle, after_event = b.dispatch(
        x, topk_idx=token_indices, topk_weights=token_probs, num_tokens_per_rank=num_tokens_per_rank,
        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert, previous_event=event, async_finish=False,
        allocate_on_comm_stream=False)
    assert num_tokens_per_rdma_rank is None and event.event is None and after_event.event is None
    assert recv_x.shape == (7, hidden) and recv_token_indices.shape == (7, 2) and recv_token_probs.shape == (7, 2)
    assert torch.tensor(num_recv_tokens_per_expert_list).tolist() == [3, 4]
    assert len(_calls(b, "dispatch_notify")) == 1 and len(_calls(b, "dispatch")) == 1
    # FusedDispatch.backward: combine the gradient with the probs' gradient.
    grad_x, grad_token_probs, after_event = b.combine(recv_x.contiguous(), handle,
                                                      topk_weights=recv_token_probs.float(), previous_event=None,
                                                      async_finish=False, allocate_on_comm_stream=False)
    assert grad_x.shape == x.shape and grad_token_probs.shape == token_probs.shape and after_event.event is None
    # FusedCombine.forward and .backward (a cached re-dispatch of the gradient).
    combined_x, _, after_event = b.combine(recv_x, handle=handle, async_finish=False, previous_event=None,
                                           allocate_on_comm_stream=False)
    grad_x, *rest, after_event = b.dispatch(combined_x.contiguous(), handle=handle, previous_event=None,
                                            async_finish=False, allocate_on_comm_stream=False)
    assert combined_x.shape == x.shape and rest == [None] * 4 and after_event.event is None
    # Every call joined the current stream again before returning.
    assert [c for c in b.log if c[0] == "wait"] == [("wait", _COMM, _COMPUTE), ("wait", _COMPUTE, _COMM)] * 5


def test_sglang_replay(replay, restore_num_sms):
    """DeepEPBuffer sizing (auto mode), DeepEPConfig, the normal path (async_finish=False) and the low-latency
    path with return_recv_hook=True."""
    world, hidden, num_experts, T = 4, 128, 8, 16
    num_nvl_bytes = num_rdma_bytes = 0
    hidden_bytes = hidden * 2
    for config in (epx.Buffer.get_dispatch_config(world), epx.Buffer.get_combine_config(world)):
        num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, world), num_nvl_bytes)
        num_rdma_bytes = max(config.get_rdma_buffer_size_hint(hidden_bytes, world), num_rdma_bytes)
    num_rdma_bytes = max(epx.Buffer.get_low_latency_rdma_size_hint(T, hidden, world, num_experts), num_rdma_bytes)
    num_qps_per_rank = max(epx.Buffer.num_sms, num_experts // world)
    _accepted(num_nvl_bytes, num_rdma_bytes, low_latency_mode=True, num_qps_per_rank=num_qps_per_rank,
              allow_mnnvl=True)

    b = replay(world=world)
    x, topk_ids, topk_weights = _dispatch_inputs(b, hidden=hidden, num_experts=num_experts)
    previous_event = None  # Buffer.capture() if async_finish else None
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, previous_event = \
        b.get_dispatch_layout(topk_ids, num_experts, previous_event=previous_event, async_finish=False,
                              allocate_on_comm_stream=previous_event is not None)
    config = epx.Config(**{"num_sms": 24, "num_max_nvl_chunked_send_tokens": 8, "num_max_nvl_chunked_recv_tokens": 256,
                           "num_max_rdma_chunked_send_tokens": 6, "num_max_rdma_chunked_recv_tokens": 128})
    recv_x, recv_topk_ids, recv_topk_weights, num_recv_tokens_per_expert, handle, event = b.dispatch(
        x, topk_idx=topk_ids, topk_weights=topk_weights, num_tokens_per_rank=num_tokens_per_rank,
        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert, previous_event=previous_event, async_finish=False,
        allocate_on_comm_stream=(previous_event is not None) and False, expert_alignment=128, config=config)
    assert isinstance(previous_event, epx.EventOverlap) and previous_event.event is None
    assert _calls(b, "set_config") == [config._key()]
    assert _calls(b, "dispatch_notify")[0]["expert_alignment"] == 128  # expert_alignment reaches the core
    assert recv_x.shape == (7, hidden) and num_recv_tokens_per_expert == [3, 4]
    combined_x, _, event = b.combine(recv_x, handle, async_finish=False, previous_event=None,
                                     allocate_on_comm_stream=False, config=None)
    assert combined_x.shape == x.shape and event.event is None
    assert _calls(b, "set_config")[-1] == epx.Buffer._default_config(world)._key()  # config=None: the default

    # Low latency: async_finish = not return_recv_hook.
    expected_m = (x.shape[0] * b.group_size * topk_ids.shape[1] + num_experts) // num_experts
    (recv, scales), packed_recv_count, ll_handle, event, hook = b.low_latency_dispatch(
        x, topk_ids, T, num_experts, use_fp8=True, async_finish=False, return_recv_hook=True)
    assert expected_m > 0 and event.event is None and callable(hook)
    hook()
    assert recv.shape == (num_experts // world, world * T, hidden) and recv.dtype == torch.float8_e4m3fn
    combined, event, hook = b.low_latency_combine(x=torch.zeros(recv.shape, dtype=torch.bfloat16), topk_idx=topk_ids,
                                                  topk_weights=topk_weights, handle=ll_handle, async_finish=False,
                                                  return_recv_hook=True)
    hook()
    assert combined.shape == x.shape and len(_calls(b, "low_latency_receive")) == 2


def test_vllm_replay(replay):
    """The all2all managers' Buffer kwargs, the high-throughput prepare/finalize and the low-latency ones."""
    world, hidden, num_experts, T = 4, 128, 8, 16
    with pytest.raises(_GroupReached):
        epx.Buffer(group=_StopAtGroup(), num_nvl_bytes=1024 << 20, num_rdma_bytes=0, low_latency_mode=False,
                   num_qps_per_rank=1, explicitly_destroy=True)
    num_rdma_bytes = epx.Buffer.get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank=T, hidden=hidden,
                                                               num_ranks=world, num_experts=num_experts)
    with pytest.raises(_GroupReached):
        epx.Buffer(group=_StopAtGroup(), num_nvl_bytes=1024 << 20, num_rdma_bytes=num_rdma_bytes, low_latency_mode=True,
                   num_qps_per_rank=num_experts // world, allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False,
                   explicitly_destroy=True, enable_shrink=False)
    with pytest.raises(_GroupReached):  # enable_fault_tolerance: shrink mode accepted
        epx.Buffer(group=_StopAtGroup(), num_nvl_bytes=1024 << 20, num_rdma_bytes=num_rdma_bytes, low_latency_mode=True,
                   num_qps_per_rank=num_experts // world, allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False,
                   explicitly_destroy=True, enable_shrink=True)

    b = replay(world=world)
    x, topk_ids, topk_weights = _dispatch_inputs(b, hidden=hidden, num_experts=num_experts)
    num_tokens_per_rank, num_tokens_per_rdma_rank, expert_num_tokens, is_token_in_rank, event = b.get_dispatch_layout(
        topk_idx=topk_ids, num_experts=num_experts, previous_event=None, async_finish=False,
        allocate_on_comm_stream=False)
    token_data, expert_topk_ids, expert_topk_weights, expert_num_tokens_per_expert_list, handle, event = b.dispatch(
        x=x, handle=None, num_tokens_per_rank=num_tokens_per_rank, num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
        is_token_in_rank=is_token_in_rank, num_tokens_per_expert=expert_num_tokens, topk_idx=topk_ids,
        topk_weights=topk_weights, expert_alignment=1, config=epx.Buffer.get_dispatch_config(world),
        previous_event=None, async_finish=False, allocate_on_comm_stream=False)
    assert token_data.shape == (7, hidden) and expert_topk_ids.dtype == torch.int64
    combined_x, _, event = b.combine(x=token_data, handle=handle, topk_weights=None,
                                     config=epx.Buffer.get_combine_config(world), previous_event=None,
                                     async_finish=False, allocate_on_comm_stream=False)
    assert combined_x.shape == x.shape and event.event is None

    expert_x, expert_num_tokens, ll_handle, event, hook = b.low_latency_dispatch(
        x, topk_ids, T, num_experts, use_fp8=False, async_finish=False, return_recv_hook=False)
    assert expert_x.dtype == torch.bfloat16 and hook is None and event.event is None
    output = torch.empty_like(x)
    out, event, hook = b.low_latency_combine(expert_x, topk_ids, topk_weights, ll_handle, async_finish=False,
                                             zero_copy=False, return_recv_hook=False, out=output)
    assert out is output
    # Fault-tolerance queries need a Buffer made with enable_shrink=True.
    with expect_error("State", "enable_shrink=True"):
        b.low_latency_query_mask_buffer(torch.zeros(world, dtype=torch.int32))


def test_lmdeploy_replay(replay):
    """get_buffer_common / get_buffer_low_latency sizing and Buffer kwargs, dispatch_normal / combine_normal and
    the low-latency dispatch with async_finish=not return_recv_hook."""
    world, hidden, num_experts, T = 4, 128, 8, 128
    num_nvl_bytes = num_rdma_bytes = 0
    for config in (epx.Buffer.get_dispatch_config(world), epx.Buffer.get_combine_config(world)):
        num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden * torch.bfloat16.itemsize, world), num_nvl_bytes)
        num_rdma_bytes = max(config.get_rdma_buffer_size_hint(hidden * torch.bfloat16.itemsize, world), num_rdma_bytes)
    num_rdma_bytes = max(epx.Buffer.get_low_latency_rdma_size_hint(T, hidden, world, num_experts), num_rdma_bytes)
    _accepted(num_nvl_bytes=num_nvl_bytes, num_rdma_bytes=num_rdma_bytes, low_latency_mode=True,
              num_qps_per_rank=num_experts // world)
    _accepted(num_rdma_bytes=num_rdma_bytes, low_latency_mode=True, num_qps_per_rank=num_experts // world)

    b = replay(world=world)
    x, topk_idx, topk_weights = _dispatch_inputs(b, hidden=hidden, num_experts=num_experts)
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, previous_event = \
        b.get_dispatch_layout(topk_idx, num_experts, previous_event=None, async_finish=False,
                              allocate_on_comm_stream=False)
    recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event = b.dispatch(
        x, topk_idx=topk_idx, topk_weights=topk_weights.to(torch.float32), num_tokens_per_rank=num_tokens_per_rank,
        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert, previous_event=previous_event, async_finish=False,
        allocate_on_comm_stream=False)
    tokens_per_expert = torch.tensor(num_recv_tokens_per_expert_list, device=recv_x.device, dtype=torch.int64)
    assert tokens_per_expert.tolist() == [3, 4]
    combined_x, _, event = b.combine(recv_x, handle, async_finish=False, previous_event=None,
                                     allocate_on_comm_stream=False)
    assert combined_x.shape == x.shape

    return_recv_hook = False
    packed_recv_hidden, masked_m, ll_handle, event, hook = b.low_latency_dispatch(
        x, topk_idx, T, num_experts, use_fp8=True, async_finish=not return_recv_hook, return_recv_hook=return_recv_hook)
    assert isinstance(event.event, _FakeEvent) and event.extra_tensors and hook is None
    assert b.log[-1][0] == "record"  # async_finish: an event on the comm stream, no join
    combined, event, hook = b.low_latency_combine(torch.zeros(packed_recv_hidden[0].shape, dtype=torch.bfloat16),
                                                  topk_idx, topk_weights.to(torch.float32), ll_handle,
                                                  async_finish=not return_recv_hook, return_recv_hook=return_recv_hook)
    assert combined.shape == x.shape and isinstance(event.event, _FakeEvent)
