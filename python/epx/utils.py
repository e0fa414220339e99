"""EventHandle, EventOverlap, Config and the small helpers the Buffer shares (DeepEP V1's `deep_ep.utils`).

Code written for DeepEP imports `EventOverlap` and `EventHandle` from here (`from deep_ep.utils
import EventHandle, EventOverlap` once epx is aliased as `deep_ep`, see `epx.alias_as_deep_ep`).
"""
from typing import Any, Optional, Tuple

import torch

from . import _C
from ._C import EpxError

__all__ = ["EventHandle", "EventOverlap", "Config", "EpxError", "check_nvlink_connections"]


def _error(kind: str, message: str) -> EpxError:
    """An EpxError raised by the Python layer, shaped like the ones the C++ core raises."""
    assert kind in _C.ERROR_KINDS, kind
    e = EpxError(f"epx {kind} error: {message}")
    e.kind, e.message, e.file, e.line = kind, message, None, None
    return e


class EventHandle(torch.cuda.Event):
    """
    A CUDA event recorded on `torch.cuda.current_stream()` when it is constructed (DeepEP's
    `EventHandle()`), so `EventOverlap(EventHandle())` marks "everything issued so far".

    It is a `torch.cuda.Event`, so `record`, `wait`, `query` and `synchronize` work too; the events
    epx returns (`EventOverlap.event` after `async_finish=True`) are EventHandles as well.
    """

    def __new__(cls) -> "EventHandle":
        return super().__new__(cls)

    def __init__(self) -> None:
        self.record(torch.cuda.current_stream())

    @classmethod
    def _recorded_on(cls, stream: torch.cuda.Stream) -> "EventHandle":
        """An EventHandle recorded on `stream` instead of the current stream (the Buffer's comm stream)."""
        event = cls.__new__(cls)
        event.record(stream)
        return event

    def current_stream_wait(self) -> None:
        """Makes `torch.cuda.current_stream()` wait for the event (no host synchronization)."""
        torch.cuda.current_stream().wait_event(self)


class EventOverlap:
    """
    A CUDA event with the tensors that must stay alive until it completes (as in DeepEP).

    Attributes:
        event: the EventHandle recorded after the communication kernels, or None when the
            operation already joined the current stream (`async_finish=False`). An EventOverlap
            whose event is None passed as `previous_event` means "no event" (as in DeepEP).
        extra_tensors: tensors kept alive with the event instead of `record_stream` (the
            low-latency path uses this: it stays compatible with CUDA graphs).
    """

    __slots__ = ("event", "extra_tensors")

    def __init__(self, event: Optional[EventHandle] = None,
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


def check_nvlink_connections(group) -> None:
    """
    DeepEP's pre-check that the group's GPUs are NVLink-connected, kept for code that calls it.

    epx makes the real check when a Buffer is created: every rank must be in the NVLink domain
    NCCL reports (its LSA team), else EpxError(Unsupported). Here, as in DeepEP, a PCIe GPU
    (pairwise NVLink bridges at most) refuses a group of more than 2 ranks.
    """
    if "PCIE" in torch.cuda.get_device_name().upper() and group.size() > 2:
        raise _error("Unsupported", f"group: {group.size()} ranks on PCIe GPUs, which have pairwise NVLink "
                                    "connections only (at most 2 ranks)")


# DeepEP V1's chunk sizes (nvl_send, nvl_recv, rdma_send, rdma_recv) of get_dispatch_config /
# get_combine_config: 2..8 ranks are one NVLink domain; 16..160 are internode (nodes of 8), DeepEP's
# values, not tuned for epx (epx's internode kernels have not been measured on a cluster).
_DEEPEP_DISPATCH_CHUNKS = {2: (24, 256, 6, 128), 4: (6, 256, 6, 128), 8: (6, 256, 6, 128),
                           16: (16, 288, 20, 128), 24: (8, 288, 32, 128), 32: (8, 288, 32, 128),
                           64: (20, 288, 28, 128), 128: (20, 560, 32, 128), 144: (32, 720, 12, 128),
                           160: (28, 720, 12, 128)}
_DEEPEP_COMBINE_CHUNKS = {2: (10, 256, 6, 128), 4: (9, 256, 6, 128), 8: (4, 256, 6, 128),
                          16: (2, 288, 28, 128), 24: (1, 288, 20, 128), 32: (1, 288, 20, 128),
                          64: (1, 288, 20, 128), 128: (1, 560, 12, 128), 144: (2, 720, 8, 128),
                          160: (2, 720, 8, 128)}


class Config:
    """
    Tuning of the high-throughput kernels, constructed like DeepEP's `Config`.

    Arguments (positional order and defaults as in DeepEP):
        num_sms: thread blocks (one per SM) of dispatch and combine; at most the device's SMs.
        num_max_nvl_chunked_send_tokens, num_max_nvl_chunked_recv_tokens,
        num_max_rdma_chunked_send_tokens, num_max_rdma_chunked_recv_tokens: DeepEP's chunk
            sizes, checked as DeepEP checks them (send < recv, after the RDMA recv size is rounded
            up to a multiple of the RDMA send size). epx's kernels do not chunk (a sender writes
            each row straight into its final slot in the receiver's buffer, or into a bounded ring
            when a call's rows do not all fit it), so they only set the size
            `get_nvl_buffer_size_hint` returns.
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
        self.num_max_nvl_chunked_send_tokens = _check_int("Config.num_max_nvl_chunked_send_tokens",
                                                          num_max_nvl_chunked_send_tokens, 1)
        self.num_max_nvl_chunked_recv_tokens = _check_int("Config.num_max_nvl_chunked_recv_tokens",
                                                          num_max_nvl_chunked_recv_tokens, 1)
        rdma_send = _check_int("Config.num_max_rdma_chunked_send_tokens", num_max_rdma_chunked_send_tokens, 1)
        rdma_recv = _check_int("Config.num_max_rdma_chunked_recv_tokens", num_max_rdma_chunked_recv_tokens, 1)
        self.num_max_rdma_chunked_send_tokens = rdma_send
        # As DeepEP's Config: the RDMA receive chunk is a whole number of send chunks.
        self.num_max_rdma_chunked_recv_tokens = (rdma_recv + rdma_send - 1) // rdma_send * rdma_send
        self.num_threads = num_threads
        self.timeout_s = timeout_s
        self.validate()

    @classmethod
    def defaults(cls, num_ranks: int) -> "Config":
        """(epx) epx's measured default for `num_ranks` (the C++ core's table), DeepEP's chunk sizes."""
        num_sms, num_threads, timeout_s = _C.default_config(_check_int("num_ranks", num_ranks, 1))
        return cls(num_sms, num_threads=num_threads, timeout_s=timeout_s)

    @classmethod
    def _deepep_table(cls, table, num_sms: int, num_ranks: int) -> "Config":
        """DeepEP's entry for `num_ranks`; a count DeepEP does not list takes the next listed one."""
        _check_int("num_ranks", num_ranks, 1)
        if num_ranks > max(table):
            raise _error("Unsupported", f"num_ranks: {num_ranks} ranks; DeepEP's config tables end at {max(table)}")
        listed = min(r for r in table if r >= num_ranks)
        return cls(num_sms, *table[listed])

    def validate(self, num_device_sms: int = 0) -> None:
        """Raises EpxError(InvalidArgument) naming the field that is out of range."""
        for name in ("num_sms", "num_threads"):
            _check_int(f"Config.{name}", getattr(self, name))
        for name in ("num_max_nvl_chunked_send_tokens", "num_max_nvl_chunked_recv_tokens",
                     "num_max_rdma_chunked_send_tokens", "num_max_rdma_chunked_recv_tokens"):
            _check_int(f"Config.{name}", getattr(self, name), 1)
        for kind in ("nvl", "rdma"):
            send = getattr(self, f"num_max_{kind}_chunked_send_tokens")
            recv = getattr(self, f"num_max_{kind}_chunked_recv_tokens")
            if send >= recv:
                raise _error("InvalidArgument", f"Config.num_max_{kind}_chunked_send_tokens: must be < "
                                                f"num_max_{kind}_chunked_recv_tokens ({recv}), got {send}")
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)):
            raise _error("InvalidArgument", f"Config.timeout_s: expected a number of seconds, got {self.timeout_s!r}")
        _C.validate_config(num_sms=self.num_sms, num_threads=self.num_threads, timeout_s=float(self.timeout_s),
                           num_device_sms=num_device_sms)

    def _key(self) -> Tuple[int, int, float]:
        """The fields the C++ core uses."""
        return (self.num_sms, self.num_threads, float(self.timeout_s))

    def _num_hint_rows(self, num_ranks: int) -> int:
        """Rows DeepEP's rings hold at once for this config: (num_sms // 2) * num_ranks * nvl_recv."""
        return max(self.num_sms // 2, 1) * _check_int("num_ranks", num_ranks, 1) * self.num_max_nvl_chunked_recv_tokens

    def _rows_per_ring(self) -> int:
        """Rows of each of epx's num_ranks x num_sms rings in `get_nvl_buffer_size_hint`: DeepEP's rows
        (`_num_hint_rows`) spread over them."""
        return -(-max(self.num_sms // 2, 1) * self.num_max_nvl_chunked_recv_tokens // self.num_sms)

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """
        Bytes of `num_nvl_bytes` that serve any batch of rows of up to `hidden_bytes` bytes (DeepEP's
        signature): a function of this config, `hidden_bytes` and `num_ranks` only.

        A dispatch or combine whose rows do not all fit the row region streams through bounded
        rings, num_ranks x num_sms of them (one per source rank and block of this config's grid), so
        any batch runs in this size, whatever the routing. Each ring holds the rows DeepEP's rings
        hold at once spread over them, ceil((num_sms // 2) * num_max_nvl_chunked_recv_tokens /
        num_sms) rows (128 with DeepEP's default configs; within [64, 4096]), and at least every
        ring's minimum (two publication rounds of a dispatch block's sending warps, and a combine
        ring's). A row has room for hidden_bytes of payload plus the scales of an fp8 row of
        hidden_bytes channels, and for the top-k ids and weights of epx's largest top-k. Pass the
        bytes of the widest row moved: 2 * hidden when the combine moves bf16 rows (Megatron-core's
        `get_hidden_bytes` does; fp8 dispatches then fit too). Calls whose rows fit the row region
        take the all-rows path; `Buffer.get_nvl_buffer_size_hint(num_max_recv_tokens, ...)` sizes
        for that path by rows.
        """
        _check_int("hidden_bytes", hidden_bytes, 1)
        _check_int("num_ranks", num_ranks, 1)
        if num_ranks > _C.MAX_RANKS:
            raise _error("Unsupported", f"num_ranks: {num_ranks} ranks; the NVLink rings this hint sizes serve one "
                                        f"node of at most {_C.MAX_RANKS} ranks; across nodes a Buffer's num_nvl_bytes "
                                        "must hold every row of an op (Buffer.get_nvl_buffer_size_hint(rows, hidden, node_size))")
        return _C.nvl_ring_buffer_size_hint(num_sms=self.num_sms, num_threads=self.num_threads, hidden_bytes=hidden_bytes,
                                            num_ranks=num_ranks, rows_per_ring=self._rows_per_ring())

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int, *, node_size: int = 0) -> int:
        """
        Bytes of `num_rdma_bytes` for the internode buffer (DeepEP's signature): 0 when the ranks
        are one node, as in DeepEP. Across nodes, the RDMA region's bounded rings
        (docs/protocol.md, "RDMA region") as a Buffer made for `num_ranks` lays them out: per
        (node, channel) a send and a receive ring of epx._C.RDMA_RING_SLOTS messages put in chunks
        of epx._C.RDMA_CHUNK_TOKENS (the Buffer's rings are fixed at construction, so this
        config's chunk fields do not size them), one channel per SM of the Buffer's construction
        config (this config's num_sms, or epx's default for num_ranks when that is more: a Buffer
        made after `set_num_sms(n)` takes n, one made without takes the default), messages of
        hidden_bytes of payload plus fp8 scales, epx's largest top-k and the source meta. A
        function of num_sms, hidden_bytes and the node split only, never of the batch.

        node_size: (epx, keyword only) ranks per node; 0 = DeepEP's 8 (all ranks when fewer).
        Raises EpxError(InvalidArgument) naming the argument out of range (node_size not dividing
        num_ranks, more than MAX_NODES nodes).
        """
        _check_int("hidden_bytes", hidden_bytes, 1)
        _check_int("num_ranks", num_ranks, 1)
        _check_int("node_size", node_size, 0, _C.MAX_RANKS)
        node_size = node_size or min(num_ranks, _C.MAX_RANKS)
        if num_ranks <= node_size:
            return 0
        channels = max(self.num_sms, Config.defaults(num_ranks).num_sms)
        return _C.rdma_buffer_size_hint(num_ranks=num_ranks, node_size=node_size, num_channels=channels,
                                        chunk_tokens=_C.RDMA_CHUNK_TOKENS, ring_slots=_C.RDMA_RING_SLOTS,
                                        hidden_bytes=hidden_bytes, num_topk=_C.MAX_TOPK)

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
