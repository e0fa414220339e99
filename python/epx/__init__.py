"""epx: expert-parallel MoE communication (dispatch / combine over NVLink), DeepEP V1 compatible.

    import epx
    buffer = epx.Buffer(group, num_nvl_bytes=...)          # high-throughput
    buffer = epx.Buffer(group, num_rdma_bytes=..., low_latency_mode=True)   # low-latency
    epx.launch_sim(4, fn, ...)      # fn(group, ...) on 4 simulated ranks on one GPU (epx.sim)

In-tree use (no install): after `cmake --build build`, `PYTHONPATH=build/python python ...`.
"""
# torch first: it loads the CUDA runtime and NCCL that the extension module then shares.
import torch

from . import _C  # noqa: F401  (epx._C: the binding)
from ._C import EpxError
from .utils import Config, EventOverlap
from .buffer import Buffer
from .sim import SimGroup, SimRankError, SimWorld, launch_sim

# Dtype of top-k expert ids (as DeepEP's `topk_idx_t`).
topk_idx_t = torch.int64

__all__ = ["Buffer", "Config", "EventOverlap", "EpxError", "topk_idx_t", "SimWorld", "SimGroup", "SimRankError",
           "launch_sim"]
