"""epx: expert-parallel MoE communication (dispatch / combine over NVLink), DeepEP V1 compatible.

    import epx
    buffer = epx.Buffer(group, num_nvl_bytes=...)          # high-throughput
    buffer = epx.Buffer(group, num_rdma_bytes=..., low_latency_mode=True)   # low-latency
    epx.launch_sim(4, fn, ...)      # fn(group, ...) on 4 simulated ranks on one GPU (epx.sim)

Code written for DeepEP (`import deep_ep`, `from deep_ep.utils import EventOverlap`) runs on epx
after `epx.alias_as_deep_ep()`.

In-tree use (no install): after `cmake --build build`, `PYTHONPATH=build/python python ...`.
"""
import sys

# torch first: it loads the CUDA runtime and NCCL that the extension module then shares.
import torch

from . import _C  # noqa: F401  (epx._C: the binding)
from . import _aten  # the operations' output tensors (python/aten.cpp), compiled against one torch
if _aten.torch_version != torch.__version__:
    raise ImportError(f"epx._aten was compiled against torch {_aten.torch_version}, this process runs torch "
                      f"{torch.__version__} (their C++ ABIs differ): rebuild epx against this torch")
from ._version import __version__
from ._C import EpxError
from . import utils
from .utils import Config, EventHandle, EventOverlap
from . import buffer
from .buffer import Buffer
from .sim import SimGroup, SimRankError, SimWorld, launch_sim

# Dtype of top-k expert ids (as DeepEP's `topk_idx_t`).
topk_idx_t = torch.int64

# The module names code written for DeepEP V1 imports, and the epx modules that serve them.
_DEEP_EP_MODULES = ("deep_ep", "deep_ep.buffer", "deep_ep.utils")


def alias_as_deep_ep() -> None:
    """
    Registers epx under DeepEP's module names (`deep_ep`, `deep_ep.buffer`, `deep_ep.utils` in
    `sys.modules`), so code written for DeepEP V1 imports epx unchanged. Call it before that code
    imports `deep_ep`; calling it again is harmless. If another `deep_ep` is already imported,
    raises EpxError(State) naming it instead of replacing it under code that holds it.
    """
    this = sys.modules[__name__]
    targets = (this, buffer, utils)
    for name, target in zip(_DEEP_EP_MODULES, targets):
        loaded = sys.modules.get(name)
        if loaded is not None and loaded is not target:
            where = getattr(loaded, "__file__", None) or repr(loaded)
            raise utils._error("State", f"alias_as_deep_ep: {name} is already imported from {where}; call "
                                        "epx.alias_as_deep_ep() before anything imports deep_ep")
    for name, target in zip(_DEEP_EP_MODULES, targets):
        sys.modules[name] = target


__all__ = ["Buffer", "Config", "EventHandle", "EventOverlap", "EpxError", "topk_idx_t", "alias_as_deep_ep",
           "__version__", "SimWorld", "SimGroup", "SimRankError", "launch_sim"]
