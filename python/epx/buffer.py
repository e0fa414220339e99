"""epx.Buffer: DeepEP V1's Python API over epx's NVLink kernels.

Semantics follow DeepEP V1 (signatures, defaults, returned tuples, stream rules); where epx cannot
honour a DeepEP option (LogFMT, use_fabric, ...) the call raises EpxError(kind="Unsupported")
instead of ignoring it. Tensor checks that the C++ core cannot make (device, torch dtype) happen
here; shapes, strides and ranges are checked by the core, whose errors name the argument too.

The Buffer is composed of one module per mode: _ht.py (high-throughput: layout, dispatch, combine,
cached dispatch), _ll.py (low-latency), _streams.py (streams, events, the runtime and device
checks every operation starts with) and _tensors.py (descriptors across the binding). This file
holds construction, lifecycle, DeepEP's static helpers and the raw buffer access.

Streams (design.md 4.6, as DeepEP): the high-throughput ops run on the buffer's communication
stream, which first waits for `previous_event` (an EventOverlap without an event counts as none)
or else for the current stream. With `async_finish=True` the returned EventOverlap holds an
event (an EventHandle) on the communication stream and the tensors involved are `record_stream`-ed
to it; otherwise the current stream waits for the communication stream before the call returns.
`allocate_on_comm_stream=True` (which needs `previous_event` and `async_finish`) allocates the
outputs on the communication stream. The low-latency ops run on the communication stream too,
except with `return_recv_hook=True`, where the send and (later, through the hook) the receive run
on the current stream.
"""
import weakref
from typing import Optional

import torch
import torch.distributed as dist

from . import _C, _aten, _ht, _ll, _streams, _tensors
from . import sim as _sim
from ._C import EpxError  # noqa: F401  (deep_ep.buffer's namespace)
from ._tensors import _BF16_FP8, _DTYPE_CODES, _dtype_names
from .utils import Config, EventHandle, EventOverlap, _DEEPEP_COMBINE_CHUNKS, _DEEPEP_DISPATCH_CHUNKS, _check_int, \
    _error

__all__ = ["Buffer", "Config", "EventHandle", "EventOverlap"]

# The binding's whole calls (the low-latency ops, the cached dispatch, the combine) take the
# package's helpers from here, once (nothing touches CUDA).
_C._use_package(tensor_api=_aten.tensor_api, ll_plan=_ll._ll_plan, current_stream=_streams._current_raw_stream,
                ll_finish=_streams._ll_finish, event_overlap=EventOverlap, config_type=Config)


class Buffer:
    """
    The symmetric NVLink buffer of one rank and the expert-parallel operations on it:
        - high-throughput dispatch and combine (training, prefill): `dispatch`, `combine`;
        - low-latency dispatch and combine (decode, CUDA-graph capturable):
          `low_latency_dispatch`, `low_latency_combine`.
    Every operation is collective: all ranks of the group issue the same sequence.

    Attributes (as DeepEP's):
        num_sms: SMs of the high-throughput kernels used by `get_dispatch_config` /
            `get_combine_config` once `set_num_sms` was called (else epx's defaults).
        rank, group_size, group: this rank, the number of ranks, the process group.
        num_nvl_bytes: bytes of the high-throughput part of the buffer.
        num_rdma_bytes: across (virtual) nodes, bytes of the RDMA region (the high-throughput rings
            between nodes); in low-latency mode (one node), bytes of the low-latency region.
        low_latency_mode, explicitly_destroy, enable_shrink: as given.
        runtime: the C++ buffer (epx._C.Buffer), None after `destroy()`.
    """

    num_sms: int = 20
    _num_sms_set: bool = False
    _num_nodes: int = 1  # nodes of the group (set at construction)

    def __init__(self, group: Optional[dist.ProcessGroup],
                 num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True,
                 allow_mnnvl: bool = False,
                 use_fabric: bool = False,
                 explicitly_destroy: bool = False,
                 enable_shrink: bool = False,
                 comm: Optional[object] = None, *,
                 node_size: int = 0) -> None:
        """
        Creates the buffer (collective over the group: every rank calls it with the same sizes).

        Arguments:
            group: the torch.distributed process group of the expert-parallel ranks (its backend
                only carries the NCCL unique id; epx makes its own NCCL communicator). Or a
                simulated group, whose ranks are threads of this process on one GPU (epx.sim): the
                `epx.SimGroup` a rank's function of `epx.launch_sim` / `epx.SimWorld.run` gets, or
                torch's threaded process group; the buffer then uses the rank's simulated
                communicator and its SM share bounds `num_sms` (the default fits it).
            num_nvl_bytes: bytes for high-throughput dispatch/combine (see
                `get_nvl_buffer_size_hint`); 0 with `low_latency_mode` = low-latency only.
            num_rdma_bytes: across (virtual) nodes (see `node_size`), the bytes of the RDMA region:
                the bounded rings of the high-throughput dispatch and combine between nodes, whose
                size is a function of the node split, the channels (the construction config's
                num_sms), the rings (DeepEP's 6-message chunks, 252 slots) and the row shape, never
                of the batch (`epx._C.rdma_buffer_size_hint` with those values). Required
                (> 0) when the group spans several nodes (EpxError(InvalidArgument) naming it
                otherwise; EpxError(BufferTooSmall) naming the minimum when it cannot hold the
                rings), 0 within one node. In low-latency mode (one node), the bytes of the
                low-latency region (see `get_low_latency_rdma_size_hint`); the zero-copy combine
                buffers (`get_next_low_latency_combine_buffer`) are laid out when the region holds
                them, i.e. when it was sized with `zero_copy=True`.
            low_latency_mode: enables the low-latency operations.
            num_qps_per_rank: accepted for DeepEP compatibility (must be positive); NVLink has no
                queue pairs, so it does not change anything.
            allow_nvlink_for_low_latency_mode: must be True (epx's low-latency mode is NVLink).
            allow_mnnvl: accepted either way: it allows, not requires, multi-node NVLink. epx uses
                the NVLink domain NCCL reports and refuses (EpxError(Unsupported)) a group that
                spans more than one.
            use_fabric: must be False: epx's buffer is allocated by NCCL (ncclMemAlloc), which picks
                the memory handle type itself.
            explicitly_destroy: if True, `destroy()` must be called to free the buffer; otherwise
                it is freed when garbage-collected (a collective step: all ranks should drop it
                at the same point of the program).
            enable_shrink: DeepEP's shrink mode (needs low_latency_mode): in the low-latency ops a
                masked rank is neither sent to nor waited for, and a wait that times out masks the
                rank it waited for instead of failing; see the `low_latency_*_mask_buffer` calls.
            comm: an mpi4py communicator used instead of `group` to share the unique id.
            node_size: ranks per node (epx's extension, keyword-only). 0 = the environment's
                EPX_NODE_SIZE if set, else the NVLink domain. A smaller size splits the domain into
                virtual nodes (it must divide the domain: EpxError(InvalidArgument) otherwise), on
                which `dispatch` and `combine` run DeepEP's internode semantics (the RDMA leg over
                epx's NVLink emulation); nodes hold at most MAX_RANKS ranks. The low-latency mode
                serves one node only.
        """
        _check_int("num_nvl_bytes", num_nvl_bytes, 0)
        _check_int("num_rdma_bytes", num_rdma_bytes, 0)
        _check_int("num_qps_per_rank", num_qps_per_rank, 1)
        _check_int("node_size", node_size, 0)
        if not allow_nvlink_for_low_latency_mode:
            raise _error("Unsupported", "allow_nvlink_for_low_latency_mode=False: epx moves low-latency traffic "
                                        "over NVLink only (no RDMA path)")
        if use_fabric:
            raise _error("Unsupported", "use_fabric=True: epx allocates its buffer through NCCL (ncclMemAlloc), which "
                                        "chooses the memory handle type itself; pass use_fabric=False")
        if enable_shrink and not low_latency_mode:
            raise _error("InvalidArgument", "enable_shrink=True: masks ranks in the low-latency operations, so it "
                                            "needs low_latency_mode=True")
        if low_latency_mode:
            if num_rdma_bytes == 0:
                raise _error("InvalidArgument", "num_rdma_bytes: low_latency_mode needs the low-latency region size "
                                                "(Buffer.get_low_latency_rdma_size_hint), got 0")
        else:
            if num_nvl_bytes == 0:
                raise _error("InvalidArgument", "num_nvl_bytes: must be > 0 without low_latency_mode "
                                                "(see Buffer.get_nvl_buffer_size_hint)")

        if group is not None:
            self.rank, self.group_size = group.rank(), group.size()

            def all_gather_object(obj):
                objects = [None] * self.group_size
                dist.all_gather_object(objects, obj, group)
                return objects
        elif comm is not None:
            self.rank, self.group_size = comm.Get_rank(), comm.Get_size()
            all_gather_object = comm.allgather
        else:
            raise _error("InvalidArgument", "group: either `group` or `comm` must be given")
        simulated = group is not None and _sim._is_simulated(group)
        if simulated and comm is not None:
            raise _error("InvalidArgument", f"group, comm: group {group!r} is simulated (its ranks are threads on one "
                                            f"GPU) and comm is a {type(comm).__name__} (real ranks); pass one of them")
        if self.group_size > _C.MAX_WORLD_RANKS:
            raise _error("Unsupported", f"group: {self.group_size} ranks; epx supports at most "
                                        f"{_C.MAX_WORLD_RANKS} ({_C.MAX_NODES} nodes of {_C.MAX_RANKS})")

        self.group = group
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.num_qps_per_rank = num_qps_per_rank
        self.explicitly_destroy = explicitly_destroy
        self.enable_shrink = enable_shrink
        self.runtime = None
        self._comm = None

        self._device_index = torch.cuda.current_device()
        self._device = torch.device("cuda", self._device_index)
        # A simulated rank's communicator (no NCCL); None for real ranks and on other threads.
        sim_comm = _sim._group_communicator(group, self, self._device_index) if group is not None else None
        if sim_comm is not None:
            self._comm = sim_comm
            self._num_sms_share = sim_comm.num_device_sms
        else:
            unique_id = _C.get_unique_id() if self.rank == 0 else None
            unique_id = all_gather_object(unique_id)[0]
            self._comm = _C.Communicator(unique_id, self.rank, self.group_size, self._device_index)
            self._num_sms_share = 0  # SMs a simulated rank owns, 0 = the whole device
        # The core needs a (small) high-throughput part even in low-latency-only mode.
        nvl_bytes = num_nvl_bytes if num_nvl_bytes > 0 else _C.nvl_buffer_size_hint(
            max_rows=0, hidden=8, dtype=_C.DTYPE_BF16, num_topk=0, num_ranks=self.group_size)
        config = Buffer._default_config(self.group_size, self._num_sms_share)
        self._config_key = config._key()
        num_sms, num_threads, timeout_s = self._config_key
        self.runtime = _C.Buffer(self._comm, num_nvl_bytes=nvl_bytes,
                                 num_ll_bytes=num_rdma_bytes if low_latency_mode else 0, num_sms=num_sms,
                                 num_threads=num_threads, timeout_s=timeout_s, enable_shrink=enable_shrink,
                                 ll_zero_copy=_C.LlZeroCopy.kIfRoom, node_size=node_size,
                                 num_rdma_bytes=0 if low_latency_mode else num_rdma_bytes)
        # Across nodes: the node split and the RDMA rings' channels (the construction config's SMs,
        # which a later config must keep), read by the high-throughput ops.
        self._num_nodes = self.runtime.num_nodes
        self._node_size = self.runtime.node_size
        self._rdma_channels = num_sms
        if sim_comm is not None:
            # A stream no other simulated rank uses (torch's pooled streams repeat after 32).
            self._comm_stream, stream_handle = _sim._acquire_stream(self._device_index, priority=-1)
            weakref.finalize(self, _sim._release_stream, stream_handle)
        else:
            self._comm_stream = torch.cuda.Stream(device=self._device, priority=-1)
        self._comm_raw = self._comm_stream.cuda_stream  # its cudaStream_t, for the binding
        # The binding's whole calls run on it, on this device; the core's config is the default.
        self.runtime.attach_package(device=self._device_index, comm_stream=self._comm_stream)
        self.runtime.mark_default_config()
        # Stream-to-stream waits (comm <-> current) through the core buffer's reusable event.
        self._stream_wait = self.runtime.stream_wait
        self._counts_host = None  # pinned [MAX_LOCAL_EXPERTS] int32 the notify kernel writes
        self._counts_device_ptr = 0

    # ---- Lifecycle ------------------------------------------------------------------------------

    def destroy(self) -> None:
        """Frees the buffer and its NCCL communicator now (collective); needs `explicitly_destroy`."""
        if not self.explicitly_destroy:
            raise _error("State", "destroy() needs Buffer(..., explicitly_destroy=True); otherwise the buffer is "
                                  "freed when garbage-collected")
        if self.runtime is None:
            raise _error("State", "destroy(): the buffer was already destroyed")
        self.runtime.destroy()
        self.runtime = None
        self._comm.destroy()
        self._comm = None



    @property
    def failed(self) -> bool:
        """True once a device-side error was raised; the buffer then refuses work until `reset()`."""
        return self._rt().failed

    def check(self) -> None:
        """Raises the device-side error recorded since the last check, if any (non-blocking)."""
        self._rt().check()

    def synchronize(self) -> None:
        """Waits for the communication stream (bounded by the config timeout), then `check()`."""
        self._rt().synchronize(self._comm_stream.cuda_stream)

    def reset(self) -> None:
        """Collective: clears a recorded error and the buffer's flags so work can start again."""
        self._rt().reset()

    # ---- Static helpers (DeepEP) ----------------------------------------------------------------

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Sets the SMs used by the configs of `get_dispatch_config` / `get_combine_config`."""
        Buffer.num_sms = _check_int("new_num_sms", new_num_sms, 1)
        Buffer._num_sms_set = True
        _C.config_defaults_changed()  # the binding's whole calls no longer take config=None as applied

    @staticmethod
    def capture() -> EventOverlap:
        """An EventOverlap with an event recorded on `torch.cuda.current_stream()`."""
        return EventOverlap(EventHandle())

    @staticmethod
    def is_sm90_compiled() -> bool:
        """True: epx is built with the SM90 (Hopper) feature set only (DeepEP's build without it,
        DISABLE_SM90_FEATURES, has no epx counterpart)."""
        return True

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int, *, num_topk: Optional[int] = None,
                                       zero_copy: bool = False) -> int:
        """
        Bytes of `num_rdma_bytes` (the low-latency region) for up to
        `num_max_dispatch_tokens_per_rank` tokens per rank of `hidden` channels. Two epx
        extensions: `num_topk` gives a tighter size (by default the largest top-k epx supports is
        assumed); `zero_copy=True` adds the zero-copy combine buffers that
        `get_next_low_latency_combine_buffer` and `low_latency_combine(..., zero_copy=True)` need
        (two `[num_experts / num_ranks, num_ranks * T, hidden]` bfloat16 buffers: 896 MiB of the
        954 MiB at EP8 DeepSeek-V3 decode, T = 128, hidden 7168, 256 experts, num_topk=8; without
        them those calls raise EpxError(BufferTooSmall)).
        """
        if not isinstance(zero_copy, bool):
            raise _error("InvalidArgument", f"zero_copy: expected a bool, got {type(zero_copy).__name__}")
        return _C.low_latency_size_hint(num_max_dispatch_tokens_per_rank=num_max_dispatch_tokens_per_rank, hidden=hidden,
                                        num_ranks=num_ranks, num_experts=num_experts,
                                        num_topk=_C.LL_MAX_TOPK if num_topk is None else num_topk, zero_copy=zero_copy)

    @staticmethod
    def get_nvl_buffer_size_hint(num_max_recv_tokens: int, hidden: int, num_ranks: int,
                                 num_topk: Optional[int] = None, dtype: torch.dtype = torch.bfloat16) -> int:
        """
        (epx) Bytes of `num_nvl_bytes` so that a dispatch where a rank receives up to
        `num_max_recv_tokens` rows of `hidden` channels of `dtype` (and the matching combine)
        fits. `num_topk` defaults to the largest top-k epx supports. Across (virtual) nodes pass
        the node size as `num_ranks`, and as rows the most a rank receives in dispatch or handles in
        combine (its own node's rows, those it forwards and its tokens' partials): the NVLink part
        holds them all there (EpxError(BufferTooSmall) naming num_nvl_bytes otherwise).
        """
        if dtype not in _BF16_FP8:
            raise _error("InvalidArgument", f"dtype: expected {_dtype_names(_BF16_FP8)}, got {dtype}")
        return _C.nvl_buffer_size_hint(max_rows=num_max_recv_tokens, hidden=hidden, dtype=_DTYPE_CODES[dtype],
                                       num_topk=_C.MAX_TOPK if num_topk is None else num_topk, num_ranks=num_ranks)

    @staticmethod
    def _default_config(num_ranks: int, num_sms_share: Optional[int] = None) -> Config:
        """The config of an op given config=None: epx's measured default for `num_ranks`, with the
        SMs of `set_num_sms` once it was called, and at most the SM share of a simulated rank:
        `num_sms_share`, or by default that of the simulated rank this thread runs (0: not one)."""
        _check_int("num_ranks", num_ranks, 1)
        if num_ranks > _C.MAX_WORLD_RANKS:
            raise _error("Unsupported", f"num_ranks: {num_ranks} ranks; epx supports at most {_C.MAX_WORLD_RANKS} "
                                        f"({_C.MAX_NODES} nodes of {_C.MAX_RANKS})")
        config = Config.defaults(num_ranks)
        if Buffer._num_sms_set:
            config.num_sms = Buffer.num_sms
        share = _sim._rank_share() if num_sms_share is None else num_sms_share
        if share and config.num_sms > share:
            config.num_sms = share
        return config

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """
        DeepEP's recommended dispatch config for `num_ranks`: `Config(Buffer.num_sms, ...)` with
        DeepEP's chunk sizes (a rank count DeepEP does not list, such as 3, takes the next listed
        one; more than 160 raises EpxError(Unsupported)). The internode entries (16..160 ranks)
        are DeepEP's values, untuned for epx. On a simulated rank's thread num_sms is at most the
        rank's SM share.
        """
        return Buffer._fit_share(Config._deepep_table(_DEEPEP_DISPATCH_CHUNKS, Buffer.num_sms, num_ranks))

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """DeepEP's recommended combine config for `num_ranks` (see `get_dispatch_config`)."""
        return Buffer._fit_share(Config._deepep_table(_DEEPEP_COMBINE_CHUNKS, Buffer.num_sms, num_ranks))

    @staticmethod
    def _fit_share(config: Config) -> Config:
        """`config` with num_sms at most the SM share of the simulated rank this thread runs (if any)."""
        share = _sim._rank_share()
        if share and config.num_sms > share:
            config.num_sms = share
        return config

    def get_num_rdma_ranks(self) -> int:
        """Nodes of this Buffer's world (DeepEP's RDMA ranks): group size / node size (1 within one node)."""
        return self.runtime.num_nodes

    def get_rdma_rank(self) -> int:
        """This rank's node index (DeepEP's RDMA rank): rank // node size."""
        return self.rank // self.runtime.node_size

    def get_root_rdma_rank(self, global_: bool) -> int:
        """
        The root of this rank's RDMA team (its rail: the ranks of its local index on every node), as
        DeepEP: node 0's member; with `global_` its global rank (this rank's local index, node 0),
        else its RDMA rank (0).
        """
        return self.rank % self.runtime.node_size if global_ else 0

    def get_comm_stream(self) -> torch.cuda.Stream:
        """The communication stream."""
        return self._comm_stream

    def get_local_buffer_tensor(self, dtype: torch.dtype, size: Optional[torch.Size] = None,
                                offset: int = 0, use_rdma_buffer: bool = False) -> torch.Tensor:
        """
        This rank's raw buffer as a 1-D tensor of `dtype` starting `offset` bytes in (or the
        first `size.numel()` elements of it, viewed as `size`): the high-throughput part, or with
        `use_rdma_buffer=True` the low-latency region (empty without low-latency mode).

        Unlike DeepEP's, the tensor leaves out the bytes at the start of each region that hold
        epx's protocol flags (`epx._C.NVL_FLAG_BYTES` / `LL_FLAG_BYTES`): `offset` 0 is the first
        byte after them, and the tensor ends where the region ends. What it covers only stages
        rows, so with no operation in flight it may be overwritten (vLLM zeroes it to clean the
        low-latency buffer) and the next operation works as usual.
        """
        rt = self._rt()
        if not isinstance(dtype, torch.dtype):
            raise _error("InvalidArgument", f"dtype: expected a torch.dtype, got {dtype!r}")
        element_size = dtype.itemsize
        if use_rdma_buffer:
            # The low-latency region follows the high-throughput part in the symmetric allocation.
            region = self.num_rdma_bytes if self.low_latency_mode else 0
            flags = _C.LL_FLAG_BYTES if region else 0
            base = rt.peer_pointer(self.rank) + rt.num_nvl_bytes + flags
        else:
            region = rt.num_nvl_bytes
            flags = _C.NVL_FLAG_BYTES
            base = rt.peer_pointer(self.rank) + flags
        num_bytes = max(region - flags, 0)
        _check_int("offset", offset, 0, num_bytes)
        if offset % element_size:
            raise _error("InvalidArgument", f"offset: must be a multiple of the element size {element_size}, got {offset}")
        numel = (num_bytes - offset) // element_size
        tensor = self._wrap(base + offset, numel * element_size, dtype, (numel,), (1,))
        if size is None:
            return tensor
        size = torch.Size(size)
        if size.numel() > numel:
            raise _error("InvalidArgument", f"size: {tuple(size)} needs {size.numel()} elements, the buffer holds "
                                            f"{numel} past offset {offset}")
        return tensor[:size.numel()].view(size)

    # ---- The operations, one module per mode ----------------------------------------------------

    # Streams, events, runtime and device checks (_streams.py); descriptors (_tensors.py).
    _rt = _streams._rt
    _ll_rt = _streams._ll_rt
    _begin = _streams._begin
    _alloc = _streams._alloc
    _end = _streams._end
    _desc = _tensors._desc
    _opt_desc = _tensors._opt_desc
    _wrap = _tensors._wrap

    # High-throughput (_ht.py).
    _apply_config = _ht._apply_config
    _recv_counts = _ht._recv_counts
    _check_handle = _ht._check_handle
    get_dispatch_layout = _ht.get_dispatch_layout
    dispatch = _ht.dispatch
    combine = _ht.combine
    internode_dispatch = _ht.internode_dispatch
    internode_combine = _ht.internode_combine

    # Low-latency (_ll.py).
    clean_low_latency_buffer = _ll.clean_low_latency_buffer
    low_latency_dispatch = _ll.low_latency_dispatch
    low_latency_combine = _ll.low_latency_combine
    low_latency_update_mask_buffer = _ll.low_latency_update_mask_buffer
    low_latency_query_mask_buffer = _ll.low_latency_query_mask_buffer
    low_latency_clean_mask_buffer = _ll.low_latency_clean_mask_buffer
    get_next_low_latency_combine_buffer = _ll.get_next_low_latency_combine_buffer

    def __repr__(self) -> str:
        state = "destroyed" if self.runtime is None else f"cuda:{self._device_index}"
        return (f"epx.Buffer(rank {self.rank}/{self.group_size}, {state}, num_nvl_bytes={self.num_nvl_bytes}, "
                f"num_rdma_bytes={self.num_rdma_bytes}, low_latency_mode={self.low_latency_mode})")
