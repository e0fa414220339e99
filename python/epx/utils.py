"""EventOverlap, Config and the small helpers the Buffer shares (DeepEP V1 compatible)."""
from typing import Any, Optional, Tuple

import torch

from . import _C
from ._C import EpxError

__all__ = ["EventOverlap", "Config", "EpxError"]


def _error(kind: str, message: str) -> EpxError:
    """An EpxError raised by the Python layer, shaped like the ones the C++ core raises."""
    assert kind in _C.ERROR_KINDS, kind
    e = EpxError(f"epx {kind} error: {message}")
    e.kind, e.message, e.file, e.line = kind, message, None, None
    return e


class EventOverlap:
    """
    A CUDA event with the tensors that must stay alive until it completes (as in DeepEP).

    Attributes:
        event: the `torch.cuda.Event` recorded after the communication kernels, or None when the
            operation already joined the current stream (`async_finish=False`).
        extra_tensors: tensors kept alive with the event instead of `record_stream` (the
            low-latency path uses this: it stays compatible with CUDA graphs).
    """

    __slots__ = ("event", "extra_tensors")

    def __init__(self, event: Optional[torch.cuda.Event] = None,
                 extra_tensors: Optional[Tuple[torch.Tensor, ...]] = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        """Makes `torch.cuda.current_stream()` wait for the event (no host synchronization)."""
        if self.event is None:
            raise _error("State", "EventOverlap.current_stream_wait: no event (the operation ran with "
                                  "async_finish=False and has already joined the current stream)")
        torch.cuda.current_stream().wait_event(self.event)

    def __enter__(self) -> "EventOverlap":
        """
        `with event_overlap:` runs the block on the current stream overlapped with the
        communication; on exit the current stream waits for the event.
        """
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def __repr__(self) -> str:
        return f"EventOverlap(event={'set' if self.event is not None else None})"


class Config:
    """
    Tuning of the high-throughput kernels, constructed like DeepEP's `Config`.

    Arguments (positional order as in DeepEP):
        num_sms: thread blocks (one per SM) of dispatch and combine; at most the device's SMs.
        num_max_nvl_chunked_send_tokens, num_max_nvl_chunked_recv_tokens,
        num_max_rdma_chunked_send_tokens, num_max_rdma_chunked_recv_tokens: accepted for
            compatibility with DeepEP (they must be positive) but **not used**: epx's dispatch is
            one-sided (after the count exchange every sender writes each row straight into its
            final slot in the receiver's buffer), so it has no rings or chunks to size; combine's
            rings (from 3 ranks) use the C++ core's measured defaults (epx::Config ring_slots,
            ring_chunk), which the Python Config does not set.
        num_threads: (epx, keyword only) threads per block, a multiple of 32 in [64, 512].
        timeout_s: (epx, keyword only) bound of every device wait; 0 = `EPX_TIMEOUT_S` (100 s).

    Values are checked at construction (EpxError naming the field); `num_sms` is checked against
    the device when a Buffer uses the config.
    """

    __slots__ = ("num_sms", "num_max_nvl_chunked_send_tokens", "num_max_nvl_chunked_recv_tokens",
                 "num_max_rdma_chunked_send_tokens", "num_max_rdma_chunked_recv_tokens",
                 "num_threads", "timeout_s")

    def __init__(self, num_sms: int = 20,
                 num_max_nvl_chunked_send_tokens: int = 6, num_max_nvl_chunked_recv_tokens: int = 256,
                 num_max_rdma_chunked_send_tokens: int = 6, num_max_rdma_chunked_recv_tokens: int = 256,
                 *, num_threads: int = 512, timeout_s: float = 0.0) -> None:
        self.num_sms = num_sms
        self.num_max_nvl_chunked_send_tokens = num_max_nvl_chunked_send_tokens
        self.num_max_nvl_chunked_recv_tokens = num_max_nvl_chunked_recv_tokens
        self.num_max_rdma_chunked_send_tokens = num_max_rdma_chunked_send_tokens
        self.num_max_rdma_chunked_recv_tokens = num_max_rdma_chunked_recv_tokens
        self.num_threads = num_threads
        self.timeout_s = timeout_s
        self.validate()

    @classmethod
    def defaults(cls, num_ranks: int) -> "Config":
        """epx's default config for `num_ranks` (the C++ core's measured table)."""
        num_sms, num_threads, timeout_s = _C.default_config(_check_int("num_ranks", num_ranks, 1))
        return cls(num_sms, num_threads=num_threads, timeout_s=timeout_s)

    def validate(self, num_device_sms: int = 0) -> None:
        """Raises EpxError(InvalidArgument) naming the field that is out of range."""
        for name in ("num_sms", "num_threads"):
            _check_int(f"Config.{name}", getattr(self, name))
        for name in ("num_max_nvl_chunked_send_tokens", "num_max_nvl_chunked_recv_tokens",
                     "num_max_rdma_chunked_send_tokens", "num_max_rdma_chunked_recv_tokens"):
            _check_int(f"Config.{name}", getattr(self, name), 1)
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)):
            raise _error("InvalidArgument", f"Config.timeout_s: expected a number of seconds, got {self.timeout_s!r}")
        _C.validate_config(self.num_sms, self.num_threads, float(self.timeout_s), num_device_sms)

    def _key(self) -> Tuple[int, int, float]:
        """The fields the C++ core uses."""
        return (self.num_sms, self.num_threads, float(self.timeout_s))

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int,
                                 num_max_recv_tokens: Optional[int] = None, num_topk: Optional[int] = None) -> int:
        """
        Bytes of `num_nvl_bytes` for rows of `hidden_bytes` (bf16 rows: 2 * hidden).

        DeepEP sizes its rings from the chunk sizes alone; epx stores every received row, so it
        needs `num_max_recv_tokens`: the most rows any rank receives in a dispatch (at most
        num_tokens * num_ranks) or sends in a combine. `num_topk` defaults to the largest top-k
        epx supports. Without `num_max_recv_tokens` this raises EpxError(InvalidArgument).
        """
        _check_int("hidden_bytes", hidden_bytes, 2)
        _check_int("num_ranks", num_ranks, 1)
        if num_max_recv_tokens is None:
            raise _error("InvalidArgument",
                         "Config.get_nvl_buffer_size_hint: num_max_recv_tokens is required: epx's one-sided "
                         "dispatch holds every received row in the buffer, so its size depends on the row count, "
                         "not on the chunk sizes (see also Buffer.get_nvl_buffer_size_hint)")
        if hidden_bytes % 2:
            raise _error("InvalidArgument", f"hidden_bytes: expected bf16 rows (an even byte count), got {hidden_bytes}")
        num_topk = _C.MAX_TOPK if num_topk is None else num_topk
        return _C.nvl_buffer_size_hint(_check_int("num_max_recv_tokens", num_max_recv_tokens, 0),
                                       hidden_bytes // 2, _C.DTYPE_BF16, _check_int("num_topk", num_topk, 0),
                                       num_ranks)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Internode (RDMA) buffers are not implemented by epx: raises EpxError(Unsupported)."""
        raise _error("Unsupported", "Config.get_rdma_buffer_size_hint: epx has no internode (RDMA) buffer; "
                                    "use Buffer.get_low_latency_rdma_size_hint for the low-latency region")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and all(getattr(self, f) == getattr(other, f) for f in self.__slots__)

    def __repr__(self) -> str:
        return "Config(" + ", ".join(f"{f}={getattr(self, f)!r}" for f in self.__slots__) + ")"


def _check_int(name: str, value: Any, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _error("InvalidArgument", f"{name}: expected an int, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise _error("InvalidArgument", f"{name}: expected a value in {bounds}, got {value}")
    return value
