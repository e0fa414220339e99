"""Streams and events of epx.Buffer's operations (design.md 4.6, as DeepEP).

The high-throughput ops run on the buffer's communication stream, which first waits for
`previous_event` (an EventOverlap without an event counts as none) or else for the current stream;
with `async_finish=True` the op returns an EventOverlap holding an event on the communication
stream and records the tensors involved on it, otherwise the current stream waits for the
communication stream before the call returns. The low-latency ops run on the communication stream
too, except with `return_recv_hook=True` (the send and, through the hook, the receive run on the
current stream); the binding's low-latency calls order them (binding.cpp, `ll_streams`) and ask
`_ll_finish` for the event or the hook. The binding's whole cached dispatch and combine take only the
default order (no previous_event, async_finish or allocate_on_comm_stream) and leave the rest to
`_begin` / `_end` here.

The stream waits around an operation are made by its binding call (`wait_stream`: the stream it
launches on first waits for it; `join_stream`: it waits for that stream after the launch; one
reusable event of the core buffer); the fresh dispatch, which queues work of its own around its
binding calls, waits through the Buffer's `_stream_wait` (the core buffer's `stream_wait`, the same
event). Streams cross the binding as cudaStream_t ints. Nothing here touches CUDA at import.
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
           allocate_on_comm_stream: bool) -> Tuple[Optional[int], Optional[int]]:
    """The communication stream waits for `previous_event` (here) or for the current stream (the
    binding call's `wait_stream`). Returns (wait_stream, join_stream) as cudaStream_t ints or None:
    join_stream is the current stream, which waits for the operation, unless async_finish (then
    `_end` returns an event). An EventOverlap without an event is no event (as in DeepEP)."""
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
    join = None if async_finish else compute
    if event is not None:
        event.wait(self._comm_stream)
        return None, join
    return compute, join


def _alloc(self, allocate_on_comm_stream: bool):
    return torch.cuda.stream(self._comm_stream) if allocate_on_comm_stream else _NO_CONTEXT


def _end(self, async_finish: bool, allocate_on_comm_stream: bool, tensors) -> EventOverlap:
    """With async_finish, an event on the communication stream, the tensors recorded on the streams;
    else none (the binding call's join_stream made the current stream wait)."""
    if not async_finish:
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


def _ll_finish(comm_stream: torch.cuda.Stream, rt, compute: int, async_finish: bool, return_recv_hook: bool,
               buffer_idx: int, keep):
    """(event, hook) of a low-latency op the binding launched with async_finish or return_recv_hook: the
    event recorded on the communication stream, or the receive hook (on the current stream `compute`,
    where the send ran), which keeps the op's tensors `keep` alive until it runs."""
    if return_recv_hook:  # (never with async_finish)
        def hook() -> None:
            _ = keep
            rt.low_latency_receive(buffer_idx=buffer_idx, stream=compute)
        return None, hook
    return EventHandle._recorded_on(comm_stream), None
