"""Streams and events of epx.Buffer's operations (design.md 4.6, as DeepEP).

The high-throughput ops run on the buffer's communication stream, which first waits for
`previous_event` (an EventOverlap without an event counts as none) or else for the current stream;
with `async_finish=True` the op returns an EventOverlap holding an event on the communication
stream and records the tensors involved on it, otherwise the current stream waits for the
communication stream before the call returns. The low-latency ops run on the communication stream
too, except with `return_recv_hook=True` (the send and, through the hook, the receive run on the
current stream).

Stream-to-stream waits go through the Buffer's `_stream_wait` (one reusable event, epx._C.StreamJoin);
streams cross the binding as cudaStream_t ints. Nothing here touches CUDA at import.
"""
import contextlib
from typing import Optional, Tuple

import torch

from . import _C  # noqa: F401  (the runtime type in annotations)
from .utils import EventHandle, EventOverlap, _error

_NO_CONTEXT = contextlib.nullcontext()
# Per-call hot path helpers (looked up as module globals: cheaper than torch.cuda.current_stream(),
# which builds a torch.cuda.Stream through several Python frames; the CPU tests replace them).
_current_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or \
    (lambda device_index: torch.cuda.current_stream(device_index).cuda_stream)  # device index -> cudaStream_t int
_current_device = getattr(torch._C, "_cuda_getDevice", None) or \
    (lambda: torch.cuda.current_device())  # torch.cuda.current_device() without its Python frames


def _rt(self) -> "_C.Buffer":
    rt = self.runtime
    if rt is None:
        raise _error("State", "the Buffer was destroyed")
    device = _current_device()
    if device != self._device_index:
        raise _error("InvalidArgument", f"current CUDA device is cuda:{device}, the Buffer "
                                        f"lives on cuda:{self._device_index} (use torch.cuda.set_device)")
    return rt


def _ll_rt(self) -> "_C.Buffer":
    if not self.low_latency_mode:
        raise _error("State", "low-latency operation on a Buffer made without low_latency_mode=True")
    return _rt(self)


def _begin(self, previous_event: Optional[EventOverlap], async_finish: bool,
           allocate_on_comm_stream: bool) -> int:
    """The communication stream waits for `previous_event` or the current stream; returns the
    current stream (its cudaStream_t). An EventOverlap without an event is no event (as in DeepEP)."""
    event = None
    if previous_event is not None:
        try:
            event = previous_event.event
        except AttributeError:
            raise _error("InvalidArgument", f"previous_event: expected an EventOverlap (from Buffer.capture() or "
                                            f"an op with async_finish=True), got {type(previous_event).__name__}") \
                from None
        if event is not None and not isinstance(event, torch.cuda.Event):
            raise _error("InvalidArgument", f"previous_event: its event must be a CUDA event (EventHandle), got "
                                            f"{type(event).__name__}")
    if allocate_on_comm_stream and (event is None or not async_finish):
        raise _error("InvalidArgument", "allocate_on_comm_stream: needs a previous_event holding an event and "
                                        "async_finish=True (as in DeepEP)")
    compute = _current_raw_stream(self._device_index)
    if event is not None:
        event.wait(self._comm_stream)
    else:
        self._stream_wait(self._comm_raw, compute)
    return compute


def _alloc(self, allocate_on_comm_stream: bool):
    return torch.cuda.stream(self._comm_stream) if allocate_on_comm_stream else _NO_CONTEXT


def _end(self, compute: int, async_finish: bool, allocate_on_comm_stream: bool, tensors) -> EventOverlap:
    """Joins (the current stream `compute` waits) or returns an event with the tensors recorded on
    the streams."""
    if not async_finish:
        self._stream_wait(compute, self._comm_raw)
        return EventOverlap()
    comm = self._comm_stream
    event = EventHandle._recorded_on(comm)
    # The current stream is the one of _begin again (allocate_on_comm_stream's context has ended).
    compute_stream = torch.cuda.current_stream(self._device) if allocate_on_comm_stream else None
    for t in tensors:
        if t is not None:
            t.record_stream(comm)
            if compute_stream is not None:
                t.record_stream(compute_stream)
    return EventOverlap(event)


def _ll_begin(self, return_recv_hook: bool) -> Tuple[int, int]:
    """(current stream, launch stream): with return_recv_hook the op runs on the current stream,
    else on the communication stream, which first waits for the current one."""
    compute = _current_raw_stream(self._device_index)
    if return_recv_hook:
        return compute, compute
    self._stream_wait(self._comm_raw, compute)
    return compute, self._comm_raw


def _ll_finish(self, rt, compute: int, async_finish: bool, return_recv_hook: bool, buffer_idx: int, keep):
    """Event or join, and the receive hook (which keeps the op's tensors alive until it runs). The
    op ran on the current stream `compute` with return_recv_hook, else on the communication stream."""
    if return_recv_hook:  # (never with async_finish)
        def hook() -> None:
            _ = keep
            rt.low_latency_receive(buffer_idx=buffer_idx, stream=compute)
        return None, hook
    if async_finish:
        return EventHandle._recorded_on(self._comm_stream), None
    self._stream_wait(compute, self._comm_raw)
    return None, None
