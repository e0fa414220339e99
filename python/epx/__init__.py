"""epx: expert-parallel MoE communication (dispatch / combine over NVLink), DeepEP V1 compatible.

    import epx
    buffer = epx.Buffer(group, num_nvl_bytes=...)          # high-throughput
    buffer = epx.Buffer(group, num_rdma_bytes=..., low_latency_mode=True)   # low-latency

In-tree use (no install): after `cmake --build build`, `PYTHONPATH=build/python python ...`.
"""
# torch first: it loads the CUDA runtime and NCCL that the extension module then shares.
import torch

from . import _C  # noqa: F401  (epx._C: the binding)
from ._version import __version__
from ._C import EpxError
from .utils import Config, EventOverlap
from .buffer import Buffer

# Dtype of top-k expert ids (as DeepEP's `topk_idx_t`).
topk_idx_t = torch.int64

__all__ = ["Buffer", "Config", "EventOverlap", "EpxError", "topk_idx_t", "__version__"]
