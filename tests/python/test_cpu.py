"""CPU-only tests of the Python layer: they need the built module and torch, no GPU.

Argument checks are tested on a Buffer whose C++ runtime is a stand-in that fails the test if it is
ever called: so each error below is raised before anything reaches the GPU.
"""
import pickle

import pytest

from conftest import require_epx

torch, epx = require_epx()
from epx import _C, _aten  # noqa: E402
from epx_test_utils import check_binding_call, expect_error, log_ordered_call  # noqa: E402


# ---- Package and errors -------------------------------------------------------------------------------

def test_exports():
    for name in ("Buffer", "Config", "EventOverlap", "EpxError", "topk_idx_t", "SimWorld", "SimGroup", "SimRankError",
                 "launch_sim"):
        assert hasattr(epx, name), name
    assert epx.topk_idx_t is torch.int64
    assert epx.EpxError is _C.EpxError
    assert issubclass(epx.EpxError, RuntimeError)
    assert set(_C.ERROR_KINDS) == {"InvalidArgument", "BufferTooSmall", "Cuda", "Nccl", "Timeout", "State",
                                   "Unsupported", "Aborted"}


def test_cpp_error_becomes_epx_error():
    with expect_error("InvalidArgument", "num_ranks") as ctx:
        _C.nvl_buffer_size_hint(max_rows=16, hidden=128, dtype=_C.DTYPE_BF16, num_topk=2, num_ranks=0)
    e = ctx.error
    assert isinstance(e, RuntimeError)
    assert e.message and e.message in str(e)
    assert str(e).startswith("epx InvalidArgument error:")
    assert e.file and e.file.endswith((".cpp", ".cu")) and isinstance(e.line, int) and e.line > 0
    # Survives pickling with its message (rank processes send exceptions as text, but users may not).
    assert str(pickle.loads(pickle.dumps(e))) == str(e)


def test_constants():
    assert _C.MAX_RANKS >= 8 and _C.MAX_TOPK >= 8 and 1 <= _C.LL_MAX_TOPK <= _C.MAX_TOPK
    assert _C.UNIQUE_ID_BYTES == 128
    assert _C.nccl_version() >= 22800
    assert [_C.dtype_size(c) for c in (_C.DTYPE_BF16, _C.DTYPE_FP8E4M3, _C.DTYPE_F32, _C.DTYPE_I32, _C.DTYPE_I64,
                                       _C.DTYPE_BOOL)] == [2, 1, 4, 4, 8, 1]


def test_dispatch_handle_storage():
    # The binding's layout (the C++ one) tiles the storage with the arrays buffer.py slices from it.
    for R, N in ((1, 0), (3, 7), (8, 4096)):
        total, rpm, cm, sp, nr = _C.DispatchHandle.storage_layout(R, N)
        assert (rpm, cm - rpm, sp - cm, nr - sp, total - nr) == (0, R * R, R * R, N * R, 1), (R, N)
    total, rpm, cm, sp, nr = _C.DispatchHandle.storage_layout(4, 10)
    assert (rpm, cm, sp, nr) == (0, 16, 32, 72) and total == 73
    t = torch.zeros(total, dtype=torch.int32)
    h = _C.DispatchHandle(storage_ptr=t.data_ptr(), storage_numel=total, num_ranks=4, rank=1, num_tokens=10, storage=t)
    assert (h.num_ranks, h.rank, h.num_tokens, h.num_recv_tokens, h.filled) == (4, 1, 10, -1, False)
    assert h.storage is t
    with expect_error("InvalidArgument", "handle storage"):
        _C.DispatchHandle(storage_ptr=t.data_ptr(), storage_numel=total - 1, num_ranks=4, rank=1, num_tokens=10,
                          storage=t)
    with expect_error("InvalidArgument", "num_ranks"):
        _C.DispatchHandle(storage_ptr=t.data_ptr(), storage_numel=total, num_ranks=0, rank=0, num_tokens=10, storage=t)


# ---- Config -------------------------------------------------------------------------------------------

def test_config_fields_and_defaults():
    c = epx.Config()
    # (DeepEP rounds the RDMA receive chunk up to a multiple of the send chunk: 256 -> 258.)
    assert (c.num_sms, c.num_max_nvl_chunked_send_tokens, c.num_max_nvl_chunked_recv_tokens,
            c.num_max_rdma_chunked_send_tokens, c.num_max_rdma_chunked_recv_tokens) == (20, 6, 256, 6, 258)
    assert (c.num_threads, c.timeout_s) == (512, 0.0)
    c = epx.Config(24, 8, 288)  # DeepEP's positional form
    assert (c.num_sms, c.num_max_nvl_chunked_send_tokens, c.num_max_nvl_chunked_recv_tokens) == (24, 8, 288)
    assert epx.Config(24, 8, 288) == c and epx.Config(25, 8, 288) != c
    assert "num_sms=24" in repr(c)
    for r in range(1, _C.MAX_RANKS + 1):
        d = epx.Config.defaults(r)
        assert (d.num_sms, d.num_threads, d.timeout_s) == _C.default_config(r)


@pytest.mark.parametrize("kwargs,name", [
    (dict(num_sms=0), "Config.num_sms"),
    (dict(num_sms=2000), "Config.num_sms"),
    (dict(num_sms=1.5), "Config.num_sms"),
    (dict(num_max_nvl_chunked_send_tokens=256), "Config.num_max_nvl_chunked_send_tokens"),
    (dict(num_max_rdma_chunked_send_tokens=256), "Config.num_max_rdma_chunked_send_tokens"),
    (dict(num_threads=100), "Config.num_threads"),
    (dict(num_threads=1024), "Config.num_threads"),
    (dict(timeout_s=-1.0), "Config.timeout_s"),
    (dict(timeout_s="1"), "Config.timeout_s"),
    (dict(num_max_nvl_chunked_send_tokens=0), "Config.num_max_nvl_chunked_send_tokens"),
    (dict(num_max_rdma_chunked_recv_tokens=-3), "Config.num_max_rdma_chunked_recv_tokens"),
])
def test_config_rejects(kwargs, name):
    with expect_error("InvalidArgument", name):
        epx.Config(**kwargs)


def test_buffer_size_hints():
    ll = epx.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256)
    assert ll > 0 and ll % (1 << 21) == 0
    assert epx.Buffer.get_low_latency_rdma_size_hint(256, 7168, 8, 256) > ll
    assert epx.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256, num_topk=8) <= ll
    with expect_error("InvalidArgument", "hidden"):
        epx.Buffer.get_low_latency_rdma_size_hint(128, 100, 8, 256)
    with expect_error("InvalidArgument", "num_experts"):
        epx.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 250)
    with expect_error("InvalidArgument", "num_topk"):
        epx.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256, num_topk=_C.LL_MAX_TOPK + 1)


def test_low_latency_size_hint_zero_copy_keyword():
    # EP8 DeepSeek-V3 decode (T = 128, hidden 7168, 256 experts, top-8): the zero-copy buffers are
    # two [32, 8 * 128, 7168] bfloat16 tensors (896 MiB); the region without them is 58 MiB.
    mib = 1 << 20
    hint = epx.Buffer.get_low_latency_rdma_size_hint
    assert hint(128, 7168, 8, 256, num_topk=8) == 58 * mib
    assert hint(128, 7168, 8, 256, num_topk=8, zero_copy=False) == 58 * mib
    assert hint(128, 7168, 8, 256, num_topk=8, zero_copy=True) == 954 * mib
    # DeepEP's four positional arguments: no zero-copy buffers, the largest top-k.
    assert hint(128, 7168, 8, 256) == hint(128, 7168, 8, 256, zero_copy=False) == \
        hint(128, 7168, 8, 256, num_topk=_C.LL_MAX_TOPK)
    # Each hint is its layout rounded up to 2 MiB, so they differ by the zero-copy bytes +- 2 MiB.
    for T, hidden, R, E in [(1, 128, 2, 2), (64, 2048, 4, 64), (512, 4096, 8, 64)]:
        with_zc = hint(T, hidden, R, E, num_topk=4, zero_copy=True)
        without = hint(T, hidden, R, E, num_topk=4)
        assert with_zc % (1 << 21) == 0 and without % (1 << 21) == 0
        zero_copy_bytes = 2 * (E // R) * R * T * hidden * 2
        assert zero_copy_bytes - (1 << 21) < with_zc - without < zero_copy_bytes + (1 << 21), (T, hidden, R, E)
    with expect_error("InvalidArgument", "zero_copy"):
        hint(128, 7168, 8, 256, zero_copy="yes")
    bf16 = epx.Buffer.get_nvl_buffer_size_hint(4096, 7168, 8)
    fp8 = epx.Buffer.get_nvl_buffer_size_hint(4096, 7168, 8, dtype=torch.float8_e4m3fn)
    assert bf16 >= fp8 > 0
    assert epx.Buffer.get_nvl_buffer_size_hint(4096, 7168, 8, num_topk=8) <= bf16
    with expect_error("InvalidArgument", "dtype"):
        epx.Buffer.get_nvl_buffer_size_hint(4096, 7168, 8, dtype=torch.float16)


# ---- EventOverlap -------------------------------------------------------------------------------------

def test_event_overlap_without_event():
    e = epx.EventOverlap()
    assert e.event is None and e.extra_tensors is None
    with expect_error("State", "async_finish"):
        e.current_stream_wait()
    with e as same:  # no event: leaving the block does nothing
        assert same is e
    t = torch.zeros(2)
    assert epx.EventOverlap(None, (t,)).extra_tensors[0] is t


# ---- Buffer construction: checks before any collective ----------------------------------------------

class _UntouchableGroup:
    """A process group that fails the test if the Buffer uses it."""

    def __getattr__(self, name):
        raise AssertionError(f"the Buffer used the group ({name}) before rejecting its arguments")


@pytest.mark.parametrize("kwargs,kind,name", [
    (dict(num_nvl_bytes=1 << 20, use_fabric=True), "Unsupported", "use_fabric=True"),
    (dict(num_nvl_bytes=1 << 20, enable_shrink=True), "InvalidArgument", "enable_shrink=True"),
    (dict(num_rdma_bytes=1 << 20, low_latency_mode=True, allow_nvlink_for_low_latency_mode=False), "Unsupported",
     "allow_nvlink_for_low_latency_mode"),
    (dict(low_latency_mode=True), "InvalidArgument", "num_rdma_bytes"),
    (dict(), "InvalidArgument", "num_nvl_bytes"),
    (dict(num_nvl_bytes=-1), "InvalidArgument", "num_nvl_bytes"),
    (dict(num_nvl_bytes=1 << 20, num_qps_per_rank=0), "InvalidArgument", "num_qps_per_rank"),
])
def test_buffer_rejects_options(kwargs, kind, name):
    with expect_error(kind, name):
        epx.Buffer(_UntouchableGroup(), **kwargs)


def test_buffer_needs_group_or_comm():
    with expect_error("InvalidArgument", "group"):
        epx.Buffer(None, num_nvl_bytes=1 << 20)


# ---- Buffer methods: checks before the GPU ----------------------------------------------------------

class _UntouchableRuntime:
    """Stands in for the C++ buffer: the binding's whole calls refuse (None, as the binding does for every
    argument these tests pass, so the package words the error), the package may mark its default config; any
    other call fails the test."""

    def low_latency_dispatch_call(self, *args):
        assert len(args) == 11, args
        return None

    def low_latency_combine_call(self, *args):
        assert len(args) == 8, args
        return None

    def cached_dispatch_call(self, *args):
        assert len(args) == 14, args
        return None

    def combine_call(self, *args):
        assert len(args) == 8, args
        return None

    def mark_default_config(self):
        pass

    def __getattr__(self, name):
        raise AssertionError(f"the C++ runtime was reached ({name}) before the arguments were rejected")


@pytest.fixture
def fake_buffer(monkeypatch):
    """A Buffer on a pretend cuda:0 whose runtime must never be reached."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(epx._streams, "_current_device", lambda: 0)

    def make(low_latency_mode=True, explicitly_destroy=False, world=4):
        b = epx.Buffer.__new__(epx.Buffer)
        b.rank, b.group_size, b.group = 0, world, None
        b.num_nvl_bytes, b.num_rdma_bytes, b.num_qps_per_rank = 1 << 24, 1 << 24, 24
        b.low_latency_mode, b.explicitly_destroy, b.enable_shrink = low_latency_mode, explicitly_destroy, False
        b.runtime, b._comm = _UntouchableRuntime(), None
        b._device_index, b._device = 0, torch.device("cuda", 0)
        b._config_key = epx.Config.defaults(world)._key()
        b._counts_host, b._counts_device_ptr = None, 0
        b._comm_stream, b._comm_raw, b._stream_wait = None, _COMM, None
        b._num_sms_share = 0
        return b
    return make


_COMPUTE, _COMM = 0xA0, 0xC0  # pretend cudaStream_t handles of the current and communication streams


def cpu(*shape, dtype=torch.bfloat16):
    return torch.zeros(shape, dtype=dtype)


def test_dispatch_rejects(fake_buffer):
    b = fake_buffer()
    with expect_error("InvalidArgument", "x", "cuda:0", "cpu"):
        b.dispatch(cpu(8, 128))
    with expect_error("InvalidArgument", "x", "expected a torch.Tensor"):
        b.dispatch([1, 2, 3])
    with expect_error("InvalidArgument", "x", "tuple of 3"):
        b.dispatch((cpu(8, 128), cpu(8, 1), cpu(1)))
    with expect_error("Unsupported", "num_tokens_per_rdma_rank", "one node"):
        b.dispatch(cpu(8, 128), num_tokens_per_rdma_rank=cpu(1, dtype=torch.int32))


def test_combine_rejects(fake_buffer):
    b = fake_buffer()
    with expect_error("InvalidArgument", "handle"):
        b.combine(cpu(8, 128), handle=(1, 2, 3))
    with expect_error("InvalidArgument", "handle"):
        b.combine(cpu(8, 128), handle=None)


def test_low_latency_rejects(fake_buffer):
    b = fake_buffer()
    x, idx = cpu(8, 128), cpu(8, 2, dtype=torch.int64)
    with expect_error("InvalidArgument", "async_finish", "return_recv_hook"):
        b.low_latency_dispatch(x, idx, 8, 16, async_finish=True, return_recv_hook=True)
    with expect_error("InvalidArgument", "use_ue8m0", "round_scale"):
        b.low_latency_dispatch(x, idx, 8, 16, use_ue8m0=True)
    with expect_error("InvalidArgument", "round_scale"):
        b.low_latency_dispatch(x, idx, 8, 16, use_fp8=False, round_scale=True)
    with expect_error("InvalidArgument", "x", "cpu"):
        b.low_latency_dispatch(x, idx, 8, 16)
    handle = (None,) * 9
    with expect_error("Unsupported", "use_logfmt"):
        b.low_latency_combine(x, idx, cpu(8, 2, dtype=torch.float32), handle, use_logfmt=True)
    with expect_error("Unsupported", "combine_wait_recv_cost_stats"):
        b.low_latency_combine(x, idx, cpu(8, 2, dtype=torch.float32), handle, combine_wait_recv_cost_stats=cpu(4))
    with expect_error("InvalidArgument", "handle"):
        b.low_latency_combine(x, idx, cpu(8, 2, dtype=torch.float32), (1, 2, 3, 4, 5))
    with expect_error("InvalidArgument", "handle"):  # the length of one, not its core handle
        b.low_latency_combine(x, idx, cpu(8, 2, dtype=torch.float32), (None,) * 9)
    with expect_error("InvalidArgument", "handle"):
        b.get_next_low_latency_combine_buffer((1, 2))


def test_low_latency_needs_low_latency_mode(fake_buffer):
    b = fake_buffer(low_latency_mode=False)
    with expect_error("State", "low_latency_mode"):
        b.low_latency_dispatch(cpu(8, 128), cpu(8, 2, dtype=torch.int64), 8, 16)
    with expect_error("State", "low_latency_mode"):
        b.clean_low_latency_buffer(8, 128, 16)


def test_misc_rejects(fake_buffer):
    b = fake_buffer()
    with expect_error("State", "explicitly_destroy"):
        b.destroy()
    b.runtime = None
    with expect_error("State", "destroyed"):
        b.get_dispatch_layout(cpu(4, 2, dtype=torch.int64), 16)


def test_tensor_checks_name_the_argument(fake_buffer):
    b = fake_buffer()
    b._device = torch.device("meta")  # tensors on "meta" pass the device check without a GPU
    meta = dict(device="meta")
    with expect_error("InvalidArgument", "topk_idx", "int64", "int32"):
        b.get_dispatch_layout(torch.zeros((4, 2), dtype=torch.int32, **meta), 16)
    with expect_error("InvalidArgument", "topk_idx", "2 dimensions"):
        b.get_dispatch_layout(torch.zeros((4, 2, 1), dtype=torch.int64, **meta), 16)
    with expect_error("InvalidArgument", "num_experts"):
        b.get_dispatch_layout(torch.zeros((4, 2), dtype=torch.int64, **meta), 2.5)
    with expect_error("InvalidArgument", "x", "bfloat16 or float8_e4m3fn", "float16"):
        b.dispatch(torch.zeros((4, 128), dtype=torch.float16, **meta))
    with expect_error("InvalidArgument", "x", "scales"):
        b.dispatch(torch.zeros((4, 128), dtype=torch.float8_e4m3fn, **meta))
    with expect_error("InvalidArgument", "x[1] (scales)", "float32"):
        b.dispatch((torch.zeros((4, 128), dtype=torch.float8_e4m3fn, **meta), torch.zeros((4, 1), **meta).half()))
    with expect_error("InvalidArgument", "expert_alignment"):
        b.dispatch(torch.zeros((4, 128), dtype=torch.bfloat16, **meta), expert_alignment=0)
    with expect_error("InvalidArgument", "config", "epx.Config"):
        b.dispatch(torch.zeros((4, 128), dtype=torch.bfloat16, **meta), config=object())
    x = torch.zeros((4, 128), dtype=torch.bfloat16, **meta)
    with expect_error("InvalidArgument", "num_tokens_per_rank", "required"):
        b.dispatch(x)
    with expect_error("InvalidArgument", "out", "bfloat16"):
        handle = (torch.zeros((2, 8), dtype=torch.int32, **meta), None, 8, 128, 8, None, 2, 0, _ll_core_handle(8, 128, 8, 2))
        b.low_latency_combine(torch.zeros((2, 32, 128), dtype=torch.bfloat16, **meta),
                              torch.zeros((4, 2), dtype=torch.int64, **meta), torch.zeros((4, 2), **meta), handle,
                              out=torch.zeros((4, 128), **meta))


# ---- Hot paths with a recording runtime: stream order, outputs and handles ----------------------------

def _ll_core_handle(T, hidden, num_experts, num_topk, buffer_idx=0):
    """A core low-latency handle without views (for the checks made before it is used)."""
    return _C.LowLatencyHandle(num_max_dispatch_tokens_per_rank=T, hidden=hidden, num_experts=num_experts,
                               num_topk=num_topk, buffer_idx=buffer_idx, src_info=None, layout_range=None,
                               src_topk_slot=None)


def _dispatch_handle(num_ranks, rank, num_tokens):
    storage = torch.zeros(_C.DispatchHandle.storage_layout(num_ranks, num_tokens)[0], dtype=torch.int32)
    return _C.DispatchHandle(storage_ptr=storage.data_ptr(), storage_numel=storage.numel(), num_ranks=num_ranks,
                             rank=rank, num_tokens=num_tokens, storage=storage)


class _RecordingRuntime:
    """Stands in for the C++ buffer on the high-throughput launch paths of the package's general path (the
    low-latency ops, the cached dispatch and the combine in the default stream order run whole in the binding
    and are tested on the GPU: here those whole calls answer None, which the binding may): records each call
    as (name, positional args, keyword args). The operations take keywords only (the binding refuses
    positional ones), as the binding does."""

    def __init__(self, log):
        self.log = log
        self.marks = 0  # mark_default_config calls

    def mark_default_config(self):
        self.marks += 1

    def __getattr__(self, name):
        if name == "set_config":
            return lambda *args: self.log.append((name, args))
        if name in ("cached_dispatch_call", "combine_call"):  # the general path of the package runs
            return lambda *args: None
        if name in ("dispatch", "combine"):
            def record(*args, **kwargs):
                check_binding_call(getattr(_C.Buffer, name), args, kwargs)
                log_ordered_call(self.log, (name, args, kwargs), kwargs)
            return record
        raise AssertionError(f"unexpected runtime call {name}")


@pytest.fixture
def recording_buffer(fake_buffer, monkeypatch):
    """A fake Buffer on "meta" whose runtime and stream waits are recorded into `b.log`."""
    monkeypatch.setattr(epx._streams, "_current_raw_stream", lambda device: _COMPUTE)

    def make(world=4):
        b = fake_buffer(world=world)
        b._device = torch.device("meta")
        b.log = []
        b.runtime = _RecordingRuntime(b.log)
        b._stream_wait = lambda dst, src: b.log.append(("wait", dst, src))
        return b
    return make


def _meta(*shape, dtype=torch.bfloat16):
    return torch.zeros(shape, dtype=dtype, device="meta")


def _desc_of(t):
    return (t.data_ptr(), {torch.bfloat16: _C.DTYPE_BF16, torch.float8_e4m3fn: _C.DTYPE_FP8E4M3,
                           torch.float32: _C.DTYPE_F32, torch.int32: _C.DTYPE_I32, torch.int64: _C.DTYPE_I64,
                           torch.bool: _C.DTYPE_BOOL}[t.dtype], tuple(t.shape), tuple(t.stride()))


def _norm(desc):
    return None if desc is None else (desc[0], desc[1], tuple(desc[2]), tuple(desc[3]))


def test_cached_dispatch_and_combine_streams(recording_buffer):
    b = recording_buffer()
    h = _dispatch_handle(4, 0, 10)
    handle = (None,) * 5 + (h,)
    x = _meta(10, 128)
    recv_x, idx, w, counts, new_handle, event = b.dispatch(x, handle=handle)
    assert (idx, w, counts, new_handle, event.event, event.extra_tensors) == (None,) * 6
    assert recv_x.shape == (0, 128) and recv_x.dtype == torch.bfloat16  # rows unknown until filled: 0
    (w0, (name, args, kw), w1) = b.log
    assert w0 == ("wait", _COMM, _COMPUTE) and w1 == ("wait", _COMPUTE, _COMM)
    assert name == "dispatch" and args == (h,) and kw["stream"] == _COMM
    assert _norm(kw["x"]) == _desc_of(x) and _norm(kw["recv_x"]) == _desc_of(recv_x)
    assert kw.get("topk_idx") is None and kw.get("recv_topk_idx") is None, "cached: the handle's routing"
    with expect_error("InvalidArgument", "topk_idx", "cached handle"):
        b.dispatch(x, handle=handle, topk_idx=_meta(10, 2, dtype=torch.int64))
    with expect_error("InvalidArgument", "num_worst_tokens"):
        b.dispatch(x, handle=handle, num_worst_tokens=5)

    b.log.clear()
    y = _meta(3, 128)
    combined_x, combined_w, event = b.combine(y, handle)
    assert combined_w is None and event.event is None
    assert combined_x.shape == (10, 128) and combined_x.dtype == torch.bfloat16
    (w0, (name, args, kw), w1) = b.log
    assert w0 == ("wait", _COMM, _COMPUTE) and w1 == ("wait", _COMPUTE, _COMM)
    assert name == "combine" and args == (h,) and kw["stream"] == _COMM
    assert _norm(kw["x"]) == _desc_of(y) and _norm(kw["combined_x"]) == _desc_of(combined_x)


def test_default_config_follows_set_num_sms(recording_buffer, monkeypatch):
    b = recording_buffer()
    handle = (None,) * 5 + (_dispatch_handle(4, 0, 10),)
    saved = (epx.Buffer.num_sms, epx.Buffer._num_sms_set)
    changes = []  # set_num_sms voids the binding's marks of the default config
    monkeypatch.setattr(epx._C, "config_defaults_changed", lambda: changes.append(epx.Buffer.num_sms))
    try:
        b.dispatch(_meta(10, 128), handle=handle)
        assert not [c for c in b.log if c[0] == "set_config"]
        assert b.runtime.marks == 1, "config=None marks the config the core has as the default"
        b.combine(_meta(3, 128), handle, config=epx.Buffer._default_config(4))
        assert b.runtime.marks == 1, "an explicit config is not marked"
        epx.Buffer.set_num_sms(24)
        assert changes == [24]
        for _ in range(2):
            b.dispatch(_meta(10, 128), handle=handle)
        # Set once (the core keeps it), with the SMs of set_num_sms.
        assert [c[1] for c in b.log if c[0] == "set_config"] == [epx.Buffer.get_dispatch_config(4)._key()]
        assert epx.Buffer.get_dispatch_config(4).num_sms == 24
        b.log.clear()
        b.combine(_meta(3, 128), handle, config=epx.Config(30))
        assert b.log[0] == ("set_config", epx.Config(30)._key())
        b.log.clear()
        b.combine(_meta(3, 128), handle)
        assert b.log[0] == ("set_config", epx.Buffer.get_combine_config(4)._key())
    finally:
        epx.Buffer.num_sms, epx.Buffer._num_sms_set = saved


@pytest.mark.parametrize("use_fp8,use_ue8m0", [(True, False), (True, True), (False, False)])
def test_low_latency_output_plan(use_fp8, use_ue8m0):
    """The outputs the binding's low_latency_dispatch_call makes (epx._ll._ll_plan through _aten, here on
    "meta"): DeepEP's shapes, dtypes and strides; recv_x alone, the rest disjoint 16-byte aligned views of
    one allocation. The call itself (streams, handle, events) is tested on the GPU (test_ll.py)."""
    world, E, T, H = 4, 16, 8, 640
    outs, descs = _aten.empty_plan(_meta(1), epx._ll._ll_plan(world, E, T, H, use_fp8, use_ue8m0))
    assert len(outs) == (6 if use_fp8 else 5)
    recv_x, scales = outs[0], outs[1] if use_fp8 else None
    count, src_info, layout_range, src_topk_slot = outs[-4:]
    E_loc, RT = E // world, world * T
    assert recv_x.shape == (E_loc, RT, H) and recv_x.is_contiguous()
    assert recv_x.dtype == (torch.float8_e4m3fn if use_fp8 else torch.bfloat16)
    if use_fp8:
        ref = torch.empty((E_loc, (H // 128 + 3) // 4 if use_ue8m0 else H // 128, RT),
                          dtype=torch.int32 if use_ue8m0 else torch.float32).transpose(1, 2)
        assert (scales.shape, scales.stride(), scales.dtype) == (ref.shape, ref.stride(), ref.dtype)
    assert count.shape == (E_loc,) and count.dtype == torch.int32
    assert src_info.shape == src_topk_slot.shape == (E_loc, RT) and src_info.dtype == src_topk_slot.dtype == torch.int32
    assert layout_range.shape == (E_loc, world) and layout_range.dtype == torch.int64
    spans = []
    for t in outs[1:]:
        begin = t.storage_offset() * t.element_size()
        end = begin + (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))) * t.element_size()
        assert begin % 16 == 0 and end <= t.untyped_storage().nbytes(), (begin, end)
        spans.append((begin, end))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans
    storages = {t.untyped_storage()._cdata for t in outs[1:]}
    assert len(storages) == 1 and recv_x.untyped_storage()._cdata not in storages
    assert [_norm(d) for d in descs] == [_desc_of(t) for t in outs]
    assert epx._ll._ll_plan(world, E, T, H, use_fp8, use_ue8m0) is epx._ll._ll_plan(world, E, T, H, use_fp8, use_ue8m0)


def test_low_latency_refusals_are_worded(fake_buffer):
    """What the binding's whole calls refuse, the package words (the runtime here refuses everything)."""
    b = fake_buffer()
    b._device = torch.device("meta")
    x, idx, w = _meta(5, 640), _meta(5, 2, dtype=torch.int64), _meta(5, 2, dtype=torch.float32)
    with expect_error("InvalidArgument", "x", "bfloat16", "float32"):
        b.low_latency_dispatch(x.float(), idx, 8, 16)
    with expect_error("InvalidArgument", "topk_idx", "2 dimensions"):
        b.low_latency_dispatch(x, idx.view(5, 2, 1), 8, 16)
    with expect_error("InvalidArgument", "num_max_dispatch_tokens_per_rank", "int"):
        b.low_latency_dispatch(x, idx, True, 16)
    with expect_error("InvalidArgument", "num_experts", "[1, inf]"):
        b.low_latency_dispatch(x, idx, 8, 0)
    with expect_error("InvalidArgument", "cumulative_local_expert_recv_stats", "int32"):
        b.low_latency_dispatch(x, idx, 8, 16, cumulative_local_expert_recv_stats=_meta(4, dtype=torch.int64))
    with expect_error("InvalidArgument", "dispatch_wait_recv_cost_stats", "1 to 3 dimensions"):
        b.low_latency_dispatch(x, idx, 8, 16, dispatch_wait_recv_cost_stats=_meta(1, 1, 1, 4, dtype=torch.int64))
    with expect_error("State", "binding refused"):
        b.low_latency_dispatch(x, idx, 8, 16)
    handle = (None,) * 8 + (_ll_core_handle(8, 640, 16, 2),)
    with expect_error("InvalidArgument", "x", "3 dimensions"):
        b.low_latency_combine(x, idx, w, handle)
    with expect_error("InvalidArgument", "topk_weights", "float32"):
        b.low_latency_combine(_meta(4, 32, 640), idx, w.double(), handle)
    with expect_error("InvalidArgument", "x", "zero_copy"):
        b.low_latency_combine(_meta(4, 32, 640, dtype=torch.float32), idx, w, handle, zero_copy=True)
    with expect_error("State", "binding refused"):
        b.low_latency_combine(_meta(4, 32, 640), idx, w, handle)


# ---- Simulated ranks (epx.sim): the checks that need no GPU ---------------------------------------------

@pytest.mark.parametrize("args,kwargs,name", [
    ((1,), {}, "num_ranks"),
    ((_C.MAX_WORLD_RANKS + 1,), {}, "num_ranks"),
    ((2.0,), {}, "num_ranks"),
    ((True,), {}, "num_ranks"),
    ((2,), dict(device=-1), "device"),
    ((2,), dict(timeout_s=-1.0), "timeout_s"),
    ((2,), dict(timeout_s="10"), "timeout_s"),
])
def test_sim_world_rejects(args, kwargs, name):
    with expect_error("InvalidArgument", name):
        epx.SimWorld(*args, **kwargs)


def test_launch_sim_rejects():
    with expect_error("InvalidArgument", "num_ranks"):
        epx.launch_sim(1, lambda group: None)
    with expect_error("InvalidArgument", "fn"):
        epx.launch_sim(2, "not a function")


def _idle_sim_world(broken=None, closed=False):
    """A SimWorld object with no world behind it (for the checks `run` makes before any rank)."""
    w = epx.SimWorld.__new__(epx.SimWorld)
    w.num_ranks, w.device, w.broken, w._closed = 2, 0, broken, closed
    return w


def test_sim_world_run_rejects():
    with expect_error("InvalidArgument", "fn"):
        _idle_sim_world().run(42)
    with expect_error("InvalidArgument", "timeout_s"):
        _idle_sim_world().run(print, timeout_s=0)
    with expect_error("State", "broken", "rank 1 failed"):
        _idle_sim_world(broken="rank 1 failed (ValueError)").run(print)
    with expect_error("State", "closed"):
        _idle_sim_world(closed=True).run(print)


def test_sim_rank_error():
    cause = ValueError("boom")
    e = epx.SimRankError("rank 1 failed", {1: cause}, 1)
    assert isinstance(e, RuntimeError) and e.errors == {1: cause} and e.first_rank == 1


class _ThreadedGroup:
    """Looks like torch's threaded process group (backend "threaded"); must not be used further."""

    def getBackendName(self):
        return "threaded"

    def rank(self):
        return 0

    def size(self):
        return 2


def _fake_sim_group(rank=1, world=4):
    g = epx.SimGroup.__new__(epx.SimGroup)
    g._rank, g.device, g.world = rank, 0, _idle_sim_world()
    g.world.num_ranks = world
    return g


def test_simulated_groups_are_recognized():
    from epx import sim
    assert sim._is_simulated(_fake_sim_group()) and sim._is_simulated(_ThreadedGroup())
    assert not sim._is_simulated(object()) and not sim._is_simulated(_UntouchableGroup())


@pytest.mark.parametrize("group", [_fake_sim_group(), _ThreadedGroup()], ids=["SimGroup", "threaded"])
def test_buffer_rejects_simulated_group_with_comm(group):
    class _MpiComm:
        def Get_rank(self):
            raise AssertionError("the Buffer used comm after rejecting it")

    with expect_error("InvalidArgument", "group", "comm", "simulated", "_MpiComm"):
        epx.Buffer(group, num_nvl_bytes=1 << 20, comm=_MpiComm())


def test_default_config_fits_a_simulated_share():
    import threading
    from epx import sim
    full = epx.Config.defaults(8)
    assert epx.Buffer._default_config(8, 0) == full
    assert epx.Buffer._default_config(8, 12).num_sms == min(full.num_sms, 12)
    assert epx.Buffer._default_config(8, 1000).num_sms == full.num_sms
    seen = {}
    outside = (epx.Buffer.get_dispatch_config(8), epx.Buffer.get_combine_config(8))

    def rank_thread():  # what a SimWorld rank's thread sees
        sim._local.num_sms = 12
        seen["dispatch"] = epx.Buffer.get_dispatch_config(8)
        seen["combine"] = epx.Buffer.get_combine_config(8)

    t = threading.Thread(target=rank_thread)
    t.start()
    t.join()
    for name, config in zip(("dispatch", "combine"), outside):
        assert seen[name].num_sms == min(epx.Buffer.num_sms, 12) and config.num_sms == epx.Buffer.num_sms
        seen[name].num_sms = config.num_sms
        assert seen[name] == config, "only num_sms follows the share"
    assert (epx.Buffer.get_dispatch_config(8), epx.Buffer.get_combine_config(8)) == outside  # other threads


def test_simulated_buffer_default_config_follows_the_share(recording_buffer):
    b = recording_buffer()
    b._num_sms_share = 12
    handle = (None,) * 5 + (_dispatch_handle(4, 0, 10),)
    b._config_key = epx.Config.defaults(4)._key()  # as a Buffer made outside a SimWorld has
    b.dispatch(_meta(10, 128), handle=handle)
    expected = epx.Buffer._default_config(4, 12)._key()
    assert expected[0] == 12 < epx.Config.defaults(4).num_sms
    assert [c[1] for c in b.log if c[0] == "set_config"] == [expected] and b._config_key == expected


# ---- Test references ----------------------------------------------------------------------------------

def _round_to_f32(x) -> float:
    """The exact rational `x` (a Fraction, normal float32 range) rounded to nearest-even float32."""
    import math
    from fractions import Fraction
    if x == 0:
        return 0.0
    e = math.frexp(float(abs(x)))[1]  # 2^(e-1) <= |x| < 2^e, up to one step
    while abs(x) >= Fraction(2) ** e:
        e += 1
    while abs(x) < Fraction(2) ** (e - 1):
        e -= 1
    quantum = Fraction(2) ** (e - 24)
    return float(round(x / quantum) * quantum)  # Fraction.__round__: exact, ties to even


def test_fma_f32_rounds_once():
    """epx_test_utils.fma_f32 (the low-latency combine's reference) equals a * b + c computed exactly and
    rounded once, where a float64 a * b + c rounded to float32 (two roundings) differs."""
    from fractions import Fraction
    from epx_test_utils import fma_f32
    g = torch.Generator().manual_seed(11)
    a = (torch.rand(4000, generator=g) * 4 - 2).float()
    b = (torch.randn(4000, generator=g) * 3).to(torch.bfloat16).float()
    c = (torch.randn(4000, generator=g) * torch.pow(2.0, torch.randint(-30, 30, (4000,), generator=g).float())).float()
    # Cases where the exact sum lies just above a float32 halfway point by less than half a float64 ulp:
    # a float64 sum lands on the halfway point and then rounds to even, the wrong way. a * b =
    # (2^30 + 1) * 2^(e - 54) = half a float32 ulp of c (1 <= |c| / 2^e < 2) times (1 + 2^-30), from
    # 2^30 + 1 = 5237765 * 205 (a: 23 bits, float32; b: 8 bits, bfloat16).
    hard_c = torch.tensor([1.0, -1.0, 3.0, 1.5 * 2.0 ** -10], dtype=torch.float32)
    e = torch.floor(torch.log2(hard_c.abs()))
    hard_a = (5237765.0 * torch.pow(2.0, e.double() - 47)).float()
    hard_b = (torch.sign(hard_c) * 205.0 / 128.0).to(torch.bfloat16).float()
    a, b, c = torch.cat([a, hard_a]), torch.cat([b, hard_b]), torch.cat([c, hard_c])
    got = fma_f32(a, b, c)
    expected = torch.tensor([_round_to_f32(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z)))
                             for x, y, z in zip(a.tolist(), b.tolist(), c.tolist())], dtype=torch.float32)
    diff = (got.view(torch.int32) != expected.view(torch.int32)).nonzero().flatten().tolist()
    assert not diff, f"fma_f32 differs from the once-rounded value at {diff[:5]}"
    twice = (a.double() * b.double() + c.double()).float()
    assert bool((twice.view(torch.int32) != expected.view(torch.int32)).any()), \
        "the hard cases must separate one rounding from two (else this test shows nothing)"


# ---- The tests' own comparison -------------------------------------------------------------------------

def test_mismatch_names_the_received_row_its_source_and_the_element():
    from epx_test_utils import assert_equal, ref_dispatch
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn((5, 8), generator=g).to(torch.bfloat16) for _ in range(2)]
    topk = [torch.tensor([[0, 3]] * 5), torch.tensor([[1, 2]] * 5)]
    weights = [torch.rand((5, 2), generator=g) for _ in range(2)]
    ref = ref_dispatch(xs, None, topk, weights, 0, 4)  # rank 0: every token of ranks 0 and 1
    got = ref.topk_weights.clone()
    got[7, 1] = 0.5  # row 7 = rank 1's token 2
    with pytest.raises(AssertionError, match=r"first at \[\[7, 1\]\].*row 7 = source rank 1 token 2"):
        assert_equal(got, ref.topk_weights, "recv_topk_weights", rows=ref)
    assert_equal(ref.topk_weights.clone(), ref.topk_weights, "recv_topk_weights", rows=ref)


def test_static_helpers_take_keywords_only():
    calls = [(_C.nvl_buffer_size_hint, dict(max_rows=16, hidden=128, dtype=_C.DTYPE_BF16, num_topk=2, num_ranks=2)),
             (_C.rdma_buffer_size_hint, dict(num_ranks=4, node_size=2, num_channels=4, chunk_tokens=6, ring_slots=252,
                                             hidden_bytes=256, num_topk=8)),
             (_C.nvl_ring_buffer_size_hint, dict(num_sms=20, num_threads=512, hidden_bytes=256, num_ranks=2,
                                                 rows_per_ring=128)),
             (_C.low_latency_size_hint, dict(num_max_dispatch_tokens_per_rank=8, hidden=128, num_ranks=2,
                                             num_experts=4, num_topk=2)),
             (_C.validate_config, dict(num_sms=20, num_threads=512, timeout_s=10.0))]
    for fn, kwargs in calls:
        fn(**kwargs)
        with pytest.raises(TypeError):
            fn(*kwargs.values())
