"""CPU tests of the seam between epx.Buffer and the C++ API (epx._C): the binding's operations take
keywords only, named as the fields of the C++ API's structs (include/epx/buffer.hpp), a misspelled
or positional argument is refused naming it, and the package's modules import without touching CUDA.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_epx

torch, epx = require_epx()
from epx import _C  # noqa: E402
from epx_test_utils import binding_signature  # noqa: E402

_REPO = Path(__file__).resolve().parents[2]


def _struct_fields(header: str, name: str) -> set:
    """The data members of `struct name { ... };` in the header text."""
    body = re.search(r"^struct " + name + r" \{\n(.*?)^\};", header, re.S | re.M)
    assert body, f"struct {name} not found"
    fields = set()
    for line in body.group(1).splitlines():
        code = line.split("//")[0].strip()
        m = re.match(r"^(?:View|int|bool|long long|LowLatencyScale|std::shared_ptr<void>)\s+(.+);$", code)
        if m:
            for decl in m.group(1).split(","):
                fields.add(decl.split("=")[0].strip())
    assert fields, f"struct {name}: no fields read"
    return fields


def _keywords(fn) -> tuple:
    """(positional parameter names after self, keyword-only names) of a binding function."""
    return binding_signature(fn)[:2]


@pytest.fixture(scope="module")
def header():
    return (_REPO / "include" / "epx" / "buffer.hpp").read_text()


def test_operations_take_the_cpp_field_names_as_keywords(header):
    f = {name: _struct_fields(header, name) for name in (
        "DispatchInputs", "DispatchOutputs", "CombineInputs", "CombineOutputs", "LowLatencyHandle",
        "LowLatencyDispatchArgs", "LowLatencyDispatchOutputs", "LowLatencyCombineArgs")}
    assert "expert_alignment" in f["DispatchInputs"] and "num_max_dispatch_tokens_per_rank" in f["LowLatencyHandle"]
    layout_params = set()  # both overloads' (the binding calls the one with num_tokens_per_rdma_rank)
    for params in re.findall(r"void get_dispatch_layout\(const View& topk_idx, int num_experts, (.*?)\);", header, re.S):
        layout_params |= set(params.replace("const View&", "").replace("cudaStream_t", "").replace("\n", " ").split(","))
    assert {"num_tokens_per_rdma_rank", "stream"} <= {p.strip() for p in layout_params}
    order = {"wait_stream", "join_stream"}  # the binding's stream order around a launch (StreamOrder)
    expected = {  # op: (positional parameters, the keywords' source)
        "get_dispatch_layout": ((), {"topk_idx", "num_experts"} | {p.strip() for p in layout_params} | order),
        "dispatch_notify": (("handle",), f["DispatchInputs"] | {"num_recv_tokens_per_expert", "stream"} | order),
        "dispatch": (("handle",), f["DispatchInputs"] | f["DispatchOutputs"] | {"stream"} | order),
        "combine": (("handle",), f["CombineInputs"] | f["CombineOutputs"] | {"stream"} | order),
        "low_latency_dispatch": ((), f["LowLatencyDispatchArgs"] | f["LowLatencyDispatchOutputs"] | {"stream"} | order),
        "low_latency_combine": (("handle",), f["LowLatencyCombineArgs"] | {"out", "stream"} | order),
        "low_latency_receive": ((), {"buffer_idx", "stream"}),
        "low_latency_query_mask_buffer": ((), {"mask_status", "stream"}),
    }
    for op, (positional, allowed) in expected.items():
        got_positional, keywords = _keywords(getattr(_C.Buffer, op))
        assert got_positional == positional, f"_C.Buffer.{op}: positional {got_positional}, expected {positional}"
        assert keywords and set(keywords) <= allowed, \
            f"_C.Buffer.{op}: keywords {sorted(set(keywords) - allowed)} are no field of its C++ structs"
    # Every field of an op's structs reaches the binding (the ops that take them whole).
    for op, structs in (("dispatch_notify", ("DispatchInputs",)), ("combine", ("CombineInputs", "CombineOutputs")),
                        ("low_latency_dispatch", ("LowLatencyDispatchArgs", "LowLatencyDispatchOutputs"))):
        keywords = set(_keywords(getattr(_C.Buffer, op))[1])
        for s in structs:
            assert f[s] <= keywords, f"_C.Buffer.{op}: {sorted(f[s] - keywords)} of {s} missing"
    positional, keywords = _keywords(_C.LowLatencyHandle.__init__)
    assert positional == () and set(keywords) == f["LowLatencyHandle"]
    positional, keywords = _keywords(_C.DispatchHandle.__init__)
    assert positional == () and {"num_ranks", "rank", "num_tokens", "storage"} <= set(keywords)
    positional, keywords = _keywords(_C.Buffer.__init__)
    assert positional == ("comm",) and {"num_nvl_bytes", "num_ll_bytes", "node_size"} <= set(keywords)
    options = _struct_fields(header.replace("size_t ", "int "), "BufferOptions")  # the RDMA fields reach the binding
    assert {"num_rdma_bytes", "rdma_chunk_tokens", "rdma_ring_slots", "node_size"} <= options & set(keywords)


def test_misspelled_or_positional_arguments_are_refused_naming_them():
    storage = torch.zeros(_C.DispatchHandle.storage_layout(2, 4)[0], dtype=torch.int32)
    good = dict(storage_ptr=storage.data_ptr(), storage_numel=storage.numel(), num_ranks=2, rank=0, num_tokens=4,
                storage=storage)
    assert _C.DispatchHandle(**good).num_tokens == 4
    with pytest.raises(TypeError, match="num_rank="):
        _C.DispatchHandle(**{("num_rank" if k == "num_ranks" else k): v for k, v in good.items()})
    with pytest.raises(TypeError):
        _C.DispatchHandle(*good.values())
    ll = dict(num_max_dispatch_tokens_per_rank=8, hidden=128, num_experts=4, num_topk=2, buffer_idx=1, src_info=None,
              layout_range=None, src_topk_slot=None)
    h = _C.LowLatencyHandle(**ll)
    assert (h.num_max_dispatch_tokens_per_rank, h.hidden, h.num_experts, h.num_topk, h.buffer_idx) == (8, 128, 4, 2, 1)
    with pytest.raises(TypeError, match="hiden="):
        _C.LowLatencyHandle(**{("hiden" if k == "hidden" else k): v for k, v in ll.items()})
    with pytest.raises(TypeError):
        _C.LowLatencyHandle(*ll.values())
    with pytest.raises(epx.EpxError, match="src_info"):
        _C.LowLatencyHandle(**dict(ll, src_info=(0, _C.DTYPE_I32, (2,), (1, 1))))


_REFUSED_CALLS = r"""
import sys
import torch
from epx import _C
# A Buffer object without a C++ buffer: every call below must be refused while its arguments are
# matched, before the operation runs (which would need the buffer).
b = _C.Buffer.__new__(_C.Buffer)
desc = (0, _C.DTYPE_BF16, (1, 128), (128, 1))
calls = {  # what must be named: (the call, the TypeError's text)
    "recv_xx": (lambda: b.dispatch(None, x=desc, recv_xx=desc, stream=0), "unexpected keyword argument 'recv_xx'"),
    "topk_weight": (lambda: b.combine(None, x=desc, combined_x=desc, topk_weight=None, stream=0),
                    "unexpected keyword argument 'topk_weight'"),
    "num_max_dispatch_tokens": (lambda: b.low_latency_dispatch(x=desc, topk_idx=desc, num_max_dispatch_tokens=8,
                                                               num_experts=4, recv_x=desc, recv_count=desc,
                                                               src_info=desc, layout_range=desc, src_topk_slot=desc,
                                                               stream=0),
                                "unexpected keyword argument 'num_max_dispatch_tokens'"),
    "zerocopy": (lambda: b.low_latency_combine(None, x=desc, topk_idx=desc, topk_weights=desc, out=desc,
                                               zerocopy=True, stream=0), "unexpected keyword argument 'zerocopy'"),
    "buffer": (lambda: b.low_latency_receive(buffer=0, stream=0), "unexpected keyword argument 'buffer'"),
    "stream": (lambda: b.dispatch(None, x=desc, recv_x=desc), "missing required argument 'stream'"),
    "handle": (lambda: b.combine(None, handle=None, x=desc, combined_x=desc, stream=0),
               "multiple values for argument 'handle'"),
    "mask_status": (lambda: b.low_latency_query_mask_buffer(stream=0), "missing required argument 'mask_status'"),
    "positional": (lambda: b.low_latency_receive(0, 0), "positional"),
    "positional dispatch": (lambda: b.dispatch(None, desc, None, None, None, 1, 0, desc, None, None, None, None, 0),
                            "positional"),
    "positional layout": (lambda: b.get_dispatch_layout(desc, 4, desc, desc, desc, 0), "positional"),
}
for name, (call, expected) in calls.items():
    try:
        call()
    except TypeError as e:
        if expected not in str(e):
            sys.exit(f"{name}: the TypeError does not say {expected!r}: {e}")
    else:
        sys.exit(f"{name}: accepted")
print("refused")
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))


def test_buffer_operations_refuse_misspelled_keywords_naming_them():
    # In a process of its own: a call the binding accepted would reach a Buffer that was never made.
    r = _run(_REFUSED_CALLS)
    assert r.returncode == 0 and "refused" in r.stdout, r.stdout + r.stderr


_IMPORT_WITHOUT_CUDA = r"""
import torch
def refuse(*args, **kwargs):
    raise AssertionError("CUDA was initialized at import")
torch.cuda._lazy_init = refuse
torch.cuda.init = refuse
import epx, epx.buffer, epx._ht, epx._ll, epx._streams, epx._tensors, epx.sim, epx.utils
assert not torch.cuda.is_initialized()
assert epx.Buffer.dispatch is epx._ht.dispatch and epx.Buffer.low_latency_dispatch is epx._ll.low_latency_dispatch
print("imported")
"""


def test_modules_import_without_cuda():
    r = _run(_IMPORT_WITHOUT_CUDA)
    assert r.returncode == 0 and "imported" in r.stdout, r.stdout + r.stderr
