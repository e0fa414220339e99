"""epx.Buffer: DeepEP V1's Python API over epx's NVLink kernels.

Semantics follow DeepEP V1 (signatures, defaults, returned tuples, stream rules); where epx cannot
honour a DeepEP option (internode RDMA, LogFMT, ...) the call raises EpxError(kind="Unsupported")
instead of ignoring it. Tensor checks that the C++ core cannot make (device, torch dtype) happen
here; shapes, strides and ranges are checked by the core, whose errors name the argument too.

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
import contextlib
import weakref
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from . import _C
from . import sim as _sim
from ._C import EpxError
from .utils import Config, EventHandle, EventOverlap, _DEEPEP_COMBINE_CHUNKS, _DEEPEP_DISPATCH_CHUNKS, _check_int, \
    _error

__all__ = ["Buffer", "Config", "EventHandle", "EventOverlap"]

_DTYPE_CODES = {
    torch.bfloat16: _C.DTYPE_BF16,
    torch.float8_e4m3fn: _C.DTYPE_FP8E4M3,
    torch.float32: _C.DTYPE_F32,
    torch.int32: _C.DTYPE_I32,
    torch.int64: _C.DTYPE_I64,
    torch.bool: _C.DTYPE_BOOL,
}
_BF16 = (torch.bfloat16,)
_BF16_FP8 = (torch.bfloat16, torch.float8_e4m3fn)
_FP8 = (torch.float8_e4m3fn,)
_F32 = (torch.float32,)
_I32 = (torch.int32,)
_I64 = (torch.int64,)
_BOOL = (torch.bool,)
_NO_CONTEXT = contextlib.nullcontext()
# Per-call hot path helpers (looked up as module globals: cheaper than torch.cuda.current_stream(),
# which builds a torch.cuda.Stream through several Python frames; the CPU tests replace them).
_current_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or \
    (lambda device_index: torch.cuda.current_stream(device_index).cuda_stream)  # device index -> cudaStream_t int
_current_device = torch._C._cuda_getDevice  # torch.cuda.current_device() without its Python frames
# (num_ranks, Buffer.num_sms if set_num_sms was called else None, SM share of a simulated rank or 0)
# -> the default config's key.
_DEFAULT_CONFIG_KEYS = {}
# Low-latency dispatch output layouts by geometry (see _ll_layout).
_LL_LAYOUTS = {}

# A dispatch handle: (rank_prefix_matrix, count_matrix, send_pos, recv_src_idx, is_token_in_rank,
# the core's handle). The first element is DeepEP's `rank_prefix_matrix` ([R, R] int32, inclusive
# prefix over source ranks of the rows each rank receives).
_HANDLE_LEN = 6
# A low-latency handle: DeepEP's (src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden,
# num_experts) followed by epx's (src_topk_slot, num_topk, buffer_idx).
_LL_HANDLE_LEN = 8


def _contiguous_strides(shape) -> Tuple[int, ...]:
    """The strides torch gives a contiguous tensor of `shape` (a dimension of size 0 counts as 1)."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _ll_layout(num_ranks: int, num_experts: int, T: int, hidden: int, use_fp8: bool, use_ue8m0: bool):
    """
    The outputs of a low-latency dispatch as (shape, strides, torch dtype, (dtype code, shape,
    strides)) for recv_x, recv_scales (None without fp8), recv_count, src_info, layout_range and
    src_topk_slot: computed once per geometry (shape and strides as DeepEP makes them; the scales
    are column-major in the last two dims).
    """
    key = (num_ranks, num_experts, T, hidden, use_fp8, use_ue8m0)
    layout = _LL_LAYOUTS.get(key)
    if layout is not None:
        return layout
    E, RT = num_experts // num_ranks, num_ranks * T

    def spec(shape, dtype, strides=None):
        strides = _contiguous_strides(shape) if strides is None else strides
        return shape, strides, dtype, (_DTYPE_CODES[dtype], shape, strides)

    scales = None
    if use_fp8:
        num_scales = (hidden // 128 + 3) // 4 if use_ue8m0 else hidden // 128
        st = _contiguous_strides((E, num_scales, RT))  # allocated [E, S, RT], returned transposed
        scales = spec((E, RT, num_scales), torch.int32 if use_ue8m0 else torch.float32, (st[0], st[2], st[1]))
    layout = (spec((E, RT, hidden), torch.float8_e4m3fn if use_fp8 else torch.bfloat16), scales,
              spec((E,), torch.int32), spec((E, RT), torch.int32), spec((E, num_ranks), torch.int64),
              spec((E, RT), torch.int32))
    if len(_LL_LAYOUTS) >= 64:
        _LL_LAYOUTS.clear()
    _LL_LAYOUTS[key] = layout
    return layout


def _dtype_names(dtypes) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


class _DeviceMemory:
    """Exposes raw device memory to torch.as_tensor; keeps `owner` alive as long as the tensor."""

    def __init__(self, ptr: int, num_bytes: int, owner: object) -> None:
        self.__cuda_array_interface__ = {"shape": (num_bytes,), "typestr": "|u1", "data": (ptr, False),
                                         "version": 3, "strides": None}
        self.owner = owner


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
        num_rdma_bytes: bytes of the low-latency part (epx has no RDMA buffer; in low-latency mode
            this sizes the low-latency region, over NVLink).
        low_latency_mode, explicitly_destroy, enable_shrink: as given.
        runtime: the C++ buffer (epx._C.Buffer), None after `destroy()`.
    """

    num_sms: int = 20
    _num_sms_set: bool = False

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
            num_rdma_bytes: in low-latency mode, the bytes of the low-latency region (see
                `get_low_latency_rdma_size_hint`); must be 0 otherwise (no internode RDMA). The
                zero-copy combine buffers (`get_next_low_latency_combine_buffer`) are laid out
                when the region holds them, i.e. when it was sized with `zero_copy=True`.
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
                virtual nodes (it must divide the domain: EpxError(InvalidArgument) otherwise).
                Dispatch and combine across nodes are not implemented: a group of more than one
                node is refused with EpxError(Unsupported).
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
            if num_rdma_bytes != 0:
                raise _error("Unsupported", f"num_rdma_bytes={num_rdma_bytes} without low_latency_mode asks for the "
                                            "internode RDMA buffer, which epx does not implement")
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
        if self.group_size > _C.MAX_RANKS:
            raise _error("Unsupported", f"group: {self.group_size} ranks; epx supports one NVLink domain of at most "
                                        f"{_C.MAX_RANKS} ranks (no internode mode)")

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
        nvl_bytes = num_nvl_bytes if num_nvl_bytes > 0 else _C.nvl_buffer_size_hint(0, 8, _C.DTYPE_BF16, 0,
                                                                                     self.group_size)
        config = Buffer._default_config(self.group_size, self._num_sms_share)
        self._config_key = config._key()
        self.runtime = _C.Buffer(self._comm, nvl_bytes, num_rdma_bytes if low_latency_mode else 0,
                                 *self._config_key, enable_shrink=enable_shrink,
                                 ll_zero_copy=_C.LlZeroCopy.kIfRoom, node_size=node_size)
        if sim_comm is not None:
            # A stream no other simulated rank uses (torch's pooled streams repeat after 32).
            self._comm_stream, stream_handle = _sim._acquire_stream(self._device_index, priority=-1)
            weakref.finalize(self, _sim._release_stream, stream_handle)
        else:
            self._comm_stream = torch.cuda.Stream(device=self._device, priority=-1)
        self._comm_raw = self._comm_stream.cuda_stream  # its cudaStream_t, for the binding
        # Stream-to-stream waits (comm <-> current) through one reusable event on this device.
        self._stream_wait = _C.StreamJoin(sim_comm is not None).wait
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
        return self._rt()

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
        return _C.low_latency_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts,
                                        _C.LL_MAX_TOPK if num_topk is None else num_topk, zero_copy)

    @staticmethod
    def get_nvl_buffer_size_hint(num_max_recv_tokens: int, hidden: int, num_ranks: int,
                                 num_topk: Optional[int] = None, dtype: torch.dtype = torch.bfloat16) -> int:
        """
        (epx) Bytes of `num_nvl_bytes` so that a dispatch where a rank receives up to
        `num_max_recv_tokens` rows of `hidden` channels of `dtype` (and the matching combine)
        fits. `num_topk` defaults to the largest top-k epx supports.
        """
        if dtype not in _BF16_FP8:
            raise _error("InvalidArgument", f"dtype: expected {_dtype_names(_BF16_FP8)}, got {dtype}")
        return _C.nvl_buffer_size_hint(num_max_recv_tokens, hidden, _DTYPE_CODES[dtype],
                                       _C.MAX_TOPK if num_topk is None else num_topk, num_ranks)

    @staticmethod
    def _default_config(num_ranks: int, num_sms_share: Optional[int] = None) -> Config:
        """The config of an op given config=None: epx's measured default for `num_ranks`, with the
        SMs of `set_num_sms` once it was called, and at most the SM share of a simulated rank:
        `num_sms_share`, or by default that of the simulated rank this thread runs (0: not one)."""
        _check_int("num_ranks", num_ranks, 1)
        if num_ranks > _C.MAX_RANKS:
            raise _error("Unsupported", f"num_ranks: {num_ranks} ranks; epx supports at most {_C.MAX_RANKS} "
                                        "(one NVLink domain)")
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

    # ---- Internals ------------------------------------------------------------------------------

    def _desc(self, t, name: str, dtypes, ndim: Optional[int] = None):
        """Checks what the core cannot see (type, device, torch dtype) and returns the descriptor."""
        if not isinstance(t, torch.Tensor):
            if t is None:
                raise _error("InvalidArgument", f"{name}: required")
            raise _error("InvalidArgument", f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.device != self._device:
            raise _error("InvalidArgument", f"{name}: expected a tensor on {self._device}, got one on {t.device}")
        dtype = t.dtype
        if dtype not in dtypes:
            raise _error("InvalidArgument", f"{name}: expected dtype {_dtype_names(dtypes)}, got "
                                            f"{str(dtype).replace('torch.', '')}")
        if ndim is not None and t.dim() != ndim:
            raise _error("InvalidArgument", f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
        return (t.data_ptr(), _DTYPE_CODES[dtype], t.shape, t.stride())

    def _opt_desc(self, t, name: str, dtypes, ndim: Optional[int] = None):
        """`_desc` of an optional argument: None stays None."""
        return None if t is None else self._desc(t, name, dtypes, ndim)

    @staticmethod
    def _out_desc(t: torch.Tensor):
        return (t.data_ptr(), _DTYPE_CODES[t.dtype], t.shape, t.stride())

    def _wrap(self, ptr: int, num_bytes: int, dtype: torch.dtype, shape, strides) -> torch.Tensor:
        """A tensor over memory the core owns; it keeps this Buffer alive."""
        raw = torch.as_tensor(_DeviceMemory(ptr, num_bytes, self), device=self._device)
        return raw.view(dtype).as_strided(shape, strides)

    def _apply_config(self, config: Optional[Config]) -> None:
        """Sets `config` (None: the default of `get_dispatch_config` / `get_combine_config`, which
        are the same) on the core if it differs from the one it has."""
        if config is None:
            # The default depends only on the group size and on set_num_sms: computed once each.
            marker = (self.group_size, Buffer.num_sms if Buffer._num_sms_set else None, self._num_sms_share)
            key = _DEFAULT_CONFIG_KEYS.get(marker)
            if key is None:
                key = _DEFAULT_CONFIG_KEYS[marker] = Buffer._default_config(self.group_size,
                                                                            self._num_sms_share)._key()
        elif isinstance(config, Config):
            key = config._key()
        else:
            raise _error("InvalidArgument", f"config: expected an epx.Config, got {type(config).__name__}")
        if key != self._config_key:
            self.runtime.set_config(*key)
            self._config_key = key

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

    def _recv_counts(self, num_local_experts: int):
        """Pinned host memory the notify kernel writes the per-expert counts into (read after its host sync)."""
        if self._counts_host is None:
            # device="cpu": torch.set_default_device("cuda") must not move this host buffer.
            self._counts_host = torch.zeros((_C.MAX_LOCAL_EXPERTS,), dtype=torch.int32, device="cpu", pin_memory=True)
            self._counts_device_ptr = _C.host_device_pointer(self._counts_host.data_ptr())
        return (self._counts_device_ptr, _C.DTYPE_I32, (num_local_experts,), (1,))

    def _check_handle(self, handle) -> "_C.DispatchHandle":
        if not isinstance(handle, tuple) or len(handle) != _HANDLE_LEN or not isinstance(handle[-1], _C.DispatchHandle):
            raise _error("InvalidArgument", "handle: expected the handle tuple returned by Buffer.dispatch")
        h = handle[-1]
        if h.num_ranks != self.group_size or h.rank != self.rank:
            raise _error("InvalidArgument", f"handle: made on rank {h.rank} of {h.num_ranks}, this buffer is rank "
                                            f"{self.rank} of {self.group_size}")
        return h

    # ---- Layout ---------------------------------------------------------------------------------

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int,
                            previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                            allocate_on_comm_stream: bool = False) -> \
            Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor, EventOverlap]:
        """
        Counts what a dispatch will send.

        Arguments:
            topk_idx: `[num_tokens, num_topk]` int64 expert ids, -1 = no expert in that slot.
            num_experts: the number of experts (a multiple of the number of ranks).
            previous_event, async_finish, allocate_on_comm_stream: see the module docstring.

        Returns:
            num_tokens_per_rank: `[num_ranks]` int32, tokens sent to each rank (a token counts once
                per rank even if several of its experts live there).
            num_tokens_per_rdma_rank: None (no internode mode).
            num_tokens_per_expert: `[num_experts]` int32, tokens sent to each expert.
            is_token_in_rank: `[num_tokens, num_ranks]` bool.
            event: the EventOverlap (its event is set only with `async_finish`).
        """
        rt = self._rt()
        d_topk = self._desc(topk_idx, "topk_idx", _I64, ndim=2)
        _check_int("num_experts", num_experts, 1)
        R, num_tokens = self.group_size, topk_idx.size(0)
        compute = self._begin(previous_event, async_finish, allocate_on_comm_stream)
        with self._alloc(allocate_on_comm_stream):
            num_tokens_per_rank = torch.empty((R,), dtype=torch.int32, device=self._device)
            num_tokens_per_expert = torch.empty((num_experts,), dtype=torch.int32, device=self._device)
            is_token_in_rank = torch.empty((num_tokens, R), dtype=torch.bool, device=self._device)
        rt.get_dispatch_layout(d_topk, num_experts, self._out_desc(num_tokens_per_rank),
                               self._out_desc(num_tokens_per_expert), self._out_desc(is_token_in_rank),
                               self._comm_raw)
        event = self._end(compute, async_finish, allocate_on_comm_stream,
                          (topk_idx, num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank))
        return num_tokens_per_rank, None, num_tokens_per_expert, is_token_in_rank, event

    # ---- High-throughput dispatch / combine -----------------------------------------------------

    def dispatch(self, x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
                 handle: Optional[Tuple] = None,
                 num_tokens_per_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
                 is_token_in_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_expert: Optional[torch.Tensor] = None,
                 topk_idx: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0,
                 config: Optional[Config] = None,
                 previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False) -> \
            Tuple[Union[Tuple[torch.Tensor, torch.Tensor], torch.Tensor], Optional[torch.Tensor],
                  Optional[torch.Tensor], Optional[List[int]], Optional[Tuple], EventOverlap]:
        """
        Sends each token once to every rank that holds one of its experts.

        Arguments:
            x: `[num_tokens, hidden]` bfloat16, or a tuple (`[num_tokens, hidden]` float8_e4m3fn,
                `[num_tokens, ceil(hidden / 128)]` float32 scales); rows may be strided (16-byte
                aligned). The fp8 bytes and scales are moved as they are.
            handle: a handle from an earlier dispatch: cached mode, the same routing is reused and
                the count exchange skipped (then topk_idx, topk_weights and the layout tensors
                must not be given).
            num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert: from
                `get_dispatch_layout` (required for a fresh dispatch).
            num_tokens_per_rdma_rank: must be None (no internode mode).
            topk_idx: `[num_tokens, num_topk]` int64, optional (without it only x moves; the layout tensors route).
            topk_weights: `[num_tokens, num_topk]` float32, optional.
            expert_alignment: each count of `num_recv_tokens_per_expert_list` is rounded up to it.
            num_worst_tokens: > 0: the received tensors get this many rows (padding rows: x 0,
                topk_idx -1, weights 0, src_idx -1), nothing syncs with the host and the call is
                CUDA-graph capturable; `num_recv_tokens_per_expert_list` is then an empty list.
                0: the host waits for the count exchange and allocates exactly the received rows.
            config: an epx.Config (default `get_dispatch_config(group_size)`).
            previous_event, async_finish, allocate_on_comm_stream: see the module docstring.

        Returns:
            recv_x: the received rows, ordered by (source rank, source token index): a tensor, or
                a (fp8 tensor, scales) tuple like `x`.
            recv_topk_idx: `[rows, num_topk]` int64 ids of this rank's local experts (-1 for
                experts elsewhere), None without topk_idx or in cached mode.
            recv_topk_weights: `[rows, num_topk]` float32 (0 where the id is -1), or None.
            num_recv_tokens_per_expert_list: list of `num_local_experts` ints (aligned to
                `expert_alignment`); empty with num_worst_tokens > 0; None in cached mode.
            handle: (rank_prefix_matrix `[R, R]` int32, count_matrix `[R, R]` int32, send_pos
                `[num_tokens, R]` int32, recv_src_idx `[rows]` int32, is_token_in_rank, core
                handle); None in cached mode.
            event: the EventOverlap (its event is set only with `async_finish`).
        """
        rt = self._rt()
        R = self.group_size
        if num_tokens_per_rdma_rank is not None:
            raise _error("Unsupported", "num_tokens_per_rdma_rank: epx has no internode (RDMA) dispatch; pass None")
        if isinstance(x, tuple):
            if len(x) != 2:
                raise _error("InvalidArgument", f"x: expected a tensor or a (fp8 tensor, scales) tuple, got a tuple "
                                                f"of {len(x)}")
            x, x_scales = x
            d_x = self._desc(x, "x[0]", _FP8, 2)
            # float32 or int32 (UE8M0-packed) scales, [N] or [N, C]: moved as 32-bit words.
            d_scales = self._desc(x_scales, "x[1] (scales)", (torch.float32, torch.int32))
            if x_scales.dim() not in (1, 2):
                raise _error("InvalidArgument", f"x[1] (scales): expected [num_tokens] or [num_tokens, C], got shape "
                                                f"{tuple(x_scales.shape)}")
        else:
            x_scales, d_scales = None, None
            d_x = self._desc(x, "x", _BF16_FP8, 2)
            if d_x[1] == _C.DTYPE_FP8E4M3:
                raise _error("InvalidArgument", "x: an fp8 tensor needs its scales: pass x as (fp8 tensor, scales)")
        if type(expert_alignment) is not int or expert_alignment < 1:  # (the common case without a call)
            _check_int("expert_alignment", expert_alignment, 1)
        if type(num_worst_tokens) is not int or num_worst_tokens < 0:
            _check_int("num_worst_tokens", num_worst_tokens, 0)
        self._apply_config(config)
        num_tokens, hidden = d_x[2]

        if handle is not None:
            h = self._check_handle(handle)
            if topk_idx is not None or topk_weights is not None or num_tokens_per_rank is not None or \
                    is_token_in_rank is not None or num_tokens_per_expert is not None:
                given = [name for name, t in (("topk_idx", topk_idx), ("topk_weights", topk_weights),
                                              ("num_tokens_per_rank", num_tokens_per_rank),
                                              ("is_token_in_rank", is_token_in_rank),
                                              ("num_tokens_per_expert", num_tokens_per_expert)) if t is not None]
                raise _error("InvalidArgument", f"{', '.join(given)}: not allowed with a cached handle (the handle's "
                                                "routing is reused)")
            worst = h.num_worst_tokens
            if num_worst_tokens != 0 and num_worst_tokens != worst:
                raise _error("InvalidArgument", f"num_worst_tokens: the handle was made with num_worst_tokens="
                                                f"{worst}, got {num_worst_tokens}")
            rows = max(worst if worst > 0 else h.num_recv_tokens, 0)
            compute = self._begin(previous_event, async_finish, allocate_on_comm_stream)
            dev = self._device
            if allocate_on_comm_stream:
                with torch.cuda.stream(self._comm_stream):
                    recv_x = torch.empty((rows, hidden), dtype=x.dtype, device=dev)
                    recv_x_scales = None if x_scales is None else \
                        torch.empty((rows,) + tuple(x_scales.shape[1:]), dtype=x_scales.dtype, device=dev)
            else:
                recv_x = torch.empty((rows, hidden), dtype=x.dtype, device=dev)
                recv_x_scales = None if x_scales is None else \
                    torch.empty((rows,) + tuple(x_scales.shape[1:]), dtype=x_scales.dtype, device=dev)
            out_desc = self._out_desc
            rt.dispatch(h, d_x, d_scales, None, None, expert_alignment, worst, out_desc(recv_x),
                        None if recv_x_scales is None else out_desc(recv_x_scales), None, None, None, self._comm_raw)
            event = self._end(compute, async_finish, allocate_on_comm_stream,
                              (x, x_scales, recv_x, recv_x_scales, h.storage) if async_finish else None)
            return (recv_x, recv_x_scales) if x_scales is not None else recv_x, None, None, None, None, event

        d_ntpr = self._desc(num_tokens_per_rank, "num_tokens_per_rank", _I32)
        d_itir = self._desc(is_token_in_rank, "is_token_in_rank", _BOOL)
        d_ntpe = self._desc(num_tokens_per_expert, "num_tokens_per_expert", _I32, 1)
        d_topk = self._opt_desc(topk_idx, "topk_idx", _I64, 2)
        d_weights = self._opt_desc(topk_weights, "topk_weights", _F32, 2)
        num_local_experts = num_tokens_per_expert.size(0) // R
        total, o_rpm, o_cm, o_sp, o_nr = _C.DispatchHandle.storage_layout(R, num_tokens)

        stream = self._comm_raw
        compute = self._begin(previous_event, async_finish, allocate_on_comm_stream)
        with self._alloc(allocate_on_comm_stream):
            storage = torch.empty((total,), dtype=torch.int32, device=self._device)
        _C.memset_async(storage.data_ptr(), 0, total * 4, stream)
        h = _C.DispatchHandle(storage.data_ptr(), total, R, self.rank, num_tokens, storage)
        host_synced = num_worst_tokens == 0
        d_counts = self._recv_counts(num_local_experts) if host_synced else None
        num_recv = rt.dispatch_notify(h, d_x, d_scales, d_topk, d_weights, d_ntpr, d_itir, d_ntpe, expert_alignment,
                                      num_worst_tokens, d_counts, stream)
        if host_synced:
            counts = self._counts_host[:num_local_experts].tolist()
            rows = num_recv
        else:
            counts = []
            rows = num_worst_tokens
        num_topk = 0 if topk_idx is None else topk_idx.size(1)
        with self._alloc(allocate_on_comm_stream):
            recv_x = torch.empty((rows, hidden), dtype=x.dtype, device=self._device)
            recv_x_scales = None if x_scales is None else \
                torch.empty((rows,) + tuple(x_scales.shape[1:]), dtype=x_scales.dtype, device=self._device)
            recv_topk_idx = None if topk_idx is None else \
                torch.empty((rows, num_topk), dtype=torch.int64, device=self._device)
            recv_topk_weights = None if topk_weights is None else \
                torch.empty((rows, num_topk), dtype=torch.float32, device=self._device)
            recv_src_idx = torch.empty((rows,), dtype=torch.int32, device=self._device)
        rt.dispatch(h, d_x, d_scales, d_topk, d_weights, expert_alignment, num_worst_tokens,
                    self._out_desc(recv_x), None if recv_x_scales is None else self._out_desc(recv_x_scales),
                    None if recv_topk_idx is None else self._out_desc(recv_topk_idx),
                    None if recv_topk_weights is None else self._out_desc(recv_topk_weights),
                    self._out_desc(recv_src_idx), stream)
        rank_prefix_matrix = storage[o_rpm:o_cm].view(R, R)
        count_matrix = storage[o_cm:o_sp].view(R, R)
        send_pos = storage[o_sp:o_nr].view(num_tokens, R)
        new_handle = (rank_prefix_matrix, count_matrix, send_pos, recv_src_idx, is_token_in_rank, h)
        event = self._end(compute, async_finish, allocate_on_comm_stream,
                          (x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank,
                           num_tokens_per_expert, storage, recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights,
                           recv_src_idx))
        recv = (recv_x, recv_x_scales) if x_scales is not None else recv_x
        return recv, recv_topk_idx, recv_topk_weights, counts, new_handle, event

    def combine(self, x: torch.Tensor, handle: Tuple,
                topk_weights: Optional[torch.Tensor] = None,
                bias: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor], None] = None,
                config: Optional[Config] = None,
                previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                allocate_on_comm_stream: bool = False) -> \
            Tuple[torch.Tensor, Optional[torch.Tensor], EventOverlap]:
        """
        Sends the rows back to the ranks they came from and sums them there (fp32), **without**
        weights (weight rows before combining, as in DeepEP). The reverse of `dispatch`.

        Arguments:
            x: `[rows, hidden]` bfloat16 in the order `dispatch` returned them.
            handle: the handle of that dispatch.
            topk_weights: `[rows, num_topk]` float32, optional: summed the same way.
            bias: a `[num_tokens, hidden]` bfloat16 tensor or a tuple of two, added to the sum.
            config: an epx.Config (default `get_combine_config(group_size)`).
            previous_event, async_finish, allocate_on_comm_stream: see the module docstring.

        Returns:
            combined_x: `[num_tokens, hidden]` bfloat16.
            combined_topk_weights: `[num_tokens, num_topk]` float32, or None.
            event: the EventOverlap (its event is set only with `async_finish`).
        """
        rt = self._rt()
        h = self._check_handle(handle)
        d_x = self._desc(x, "x", _BF16, 2)
        d_weights = None if topk_weights is None else self._desc(topk_weights, "topk_weights", _F32, 2)
        if bias is None:
            bias_0 = bias_1 = d_bias_0 = d_bias_1 = None
        else:
            if isinstance(bias, torch.Tensor):
                bias_0, bias_1 = bias, None
            elif isinstance(bias, tuple) and len(bias) == 2:
                bias_0, bias_1 = bias
            else:
                raise _error("InvalidArgument", "bias: expected a tensor or a tuple of two tensors")
            d_bias_0 = self._opt_desc(bias_0, "bias[0]", _BF16)
            d_bias_1 = self._opt_desc(bias_1, "bias[1]", _BF16)
        self._apply_config(config)
        num_tokens = h.num_tokens
        compute = self._begin(previous_event, async_finish, allocate_on_comm_stream)
        dev = self._device
        if allocate_on_comm_stream:
            with torch.cuda.stream(self._comm_stream):
                combined_x = torch.empty((num_tokens, d_x[2][1]), dtype=torch.bfloat16, device=dev)
                combined_topk_weights = None if d_weights is None else \
                    torch.empty((num_tokens, d_weights[2][1]), dtype=torch.float32, device=dev)
        else:
            combined_x = torch.empty((num_tokens, d_x[2][1]), dtype=torch.bfloat16, device=dev)
            combined_topk_weights = None if d_weights is None else \
                torch.empty((num_tokens, d_weights[2][1]), dtype=torch.float32, device=dev)
        out_desc = self._out_desc
        rt.combine(h, d_x, d_weights, d_bias_0, d_bias_1, out_desc(combined_x),
                   None if combined_topk_weights is None else out_desc(combined_topk_weights), self._comm_raw)
        event = self._end(compute, async_finish, allocate_on_comm_stream,
                          (x, topk_weights, bias_0, bias_1, h.storage, combined_x, combined_topk_weights)
                          if async_finish else None)
        return combined_x, combined_topk_weights, event

    def internode_dispatch(self, x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
                           handle: Optional[Tuple] = None,
                           num_tokens_per_rank: Optional[torch.Tensor] = None,
                           num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
                           is_token_in_rank: Optional[torch.Tensor] = None,
                           num_tokens_per_expert: Optional[torch.Tensor] = None,
                           topk_idx: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None,
                           expert_alignment: int = 1, num_worst_tokens: int = 0,
                           config: Optional[Config] = None,
                           previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                           allocate_on_comm_stream: bool = False):
        """DeepEP's internode (RDMA + NVLink) dispatch: EpxError(Unsupported), epx serves one NVLink
        domain (`dispatch` is the one to call)."""
        raise _error("Unsupported", "internode_dispatch: epx has no internode (RDMA) mode; use dispatch")

    def internode_combine(self, x: torch.Tensor, handle: Tuple,
                          topk_weights: Optional[torch.Tensor] = None,
                          bias: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor], None] = None,
                          config: Optional[Config] = None,
                          previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                          allocate_on_comm_stream: bool = False):
        """DeepEP's internode combine: EpxError(Unsupported) (see `internode_dispatch`)."""
        raise _error("Unsupported", "internode_combine: epx has no internode (RDMA) mode; use combine")

    # ---- Low-latency dispatch / combine ---------------------------------------------------------

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """
        Collective: zeroes the low-latency flags. epx does not need it between high-throughput and
        low-latency ops (their memory is separate); it recovers after an error. The arguments
        (DeepEP's) are checked but the whole low-latency region is cleaned.
        """
        rt = self._ll_rt()
        _check_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, 1)
        _check_int("hidden", hidden, 1)
        _check_int("num_experts", num_experts, 1)
        rt.clean_low_latency_buffer()

    def _check_ll_handle(self, handle):
        if not isinstance(handle, tuple) or len(handle) != _LL_HANDLE_LEN:
            raise _error("InvalidArgument", "handle: expected the handle tuple returned by Buffer.low_latency_dispatch")
        return handle

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor,
                             num_max_dispatch_tokens_per_rank: int, num_experts: int,
                             cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                             dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None,
                             use_fp8: bool = True, round_scale: bool = False, use_ue8m0: bool = False,
                             async_finish: bool = False, return_recv_hook: bool = False) -> \
            Tuple[Union[Tuple[torch.Tensor, torch.Tensor], torch.Tensor], torch.Tensor, Tuple, EventOverlap,
                  Optional[Callable]]:
        """
        Sends each token to its experts' ranks into fixed-size per-expert tensors (no host sync,
        CUDA-graph capturable). At most two low-latency results may be in flight at once.

        Arguments:
            x: `[num_tokens, hidden]` bfloat16, num_tokens <= num_max_dispatch_tokens_per_rank,
                hidden a multiple of 128.
            topk_idx: `[num_tokens, num_topk]` int64, -1 = none (a token's experts are distinct).
            num_max_dispatch_tokens_per_rank: T, the same on every rank.
            num_experts: the number of experts.
            cumulative_local_expert_recv_stats: optional `[num_local_experts]` int32, += the rows
                each local expert receives.
            dispatch_wait_recv_cost_stats: optional `[num_ranks]` int64, += wait time per source
                rank (epx takes one counter per source rank).
            use_fp8: cast to fp8 e4m3 with one scale per 128 channels (else bf16 rows).
            round_scale: power-of-two scales.
            use_ue8m0: scales packed as UE8M0 exponents, 4 per int32 (needs round_scale=True).
            async_finish: return an event instead of joining the current stream.
            return_recv_hook: launch only the send (on the current stream); the returned hook
                launches the receive. Holds no SM in between. Not with async_finish.

        Returns:
            recv_x: `[num_local_experts, num_ranks * T, hidden]` bf16, or with use_fp8 a tuple
                (float8_e4m3fn tensor, scales): scales `[E_loc, R*T, hidden // 128]` float32, or
                with use_ue8m0 `[E_loc, R*T, ceil(hidden / 512)]` int32; column-major in the last
                two dims. Only the first recv_count[j] rows of expert j are valid.
            recv_count: `[num_local_experts]` int32.
            handle: for `low_latency_combine` (DeepEP's 5 fields, then epx's).
            event: the EventOverlap (event set only with `async_finish`; it keeps the tensors).
            hook: with return_recv_hook, a callable that launches the receive; else None.
        """
        rt = self._ll_rt()
        if async_finish and return_recv_hook:
            raise _error("InvalidArgument", "async_finish and return_recv_hook: choose one (as in DeepEP)")
        if use_ue8m0 and not round_scale:
            raise _error("InvalidArgument", "use_ue8m0: needs round_scale=True (UE8M0 holds power-of-two scales)")
        if not use_fp8 and (round_scale or use_ue8m0):
            raise _error("InvalidArgument", "round_scale / use_ue8m0: only with use_fp8=True")
        d_x = self._desc(x, "x", _BF16, 2)
        d_topk = self._desc(topk_idx, "topk_idx", _I64, 2)
        T = num_max_dispatch_tokens_per_rank
        if type(T) is not int or T < 1:
            _check_int("num_max_dispatch_tokens_per_rank", T, 1)
        if type(num_experts) is not int or num_experts < 1:
            _check_int("num_experts", num_experts, 1)
        d_cum = self._opt_desc(cumulative_local_expert_recv_stats, "cumulative_local_expert_recv_stats", _I32)
        d_wait = self._opt_desc(dispatch_wait_recv_cost_stats, "dispatch_wait_recv_cost_stats", _I64)
        hidden, num_topk = d_x[2][1], d_topk[2][1]
        l_x, l_scales, l_count, l_info, l_range, l_slot = \
            _ll_layout(self.group_size, num_experts, T, hidden, use_fp8, use_ue8m0)

        compute, launch = self._ll_begin(return_recv_hook)
        dev, empty = self._device, torch.empty_strided
        recv_x = empty(l_x[0], l_x[1], dtype=l_x[2], device=dev)
        recv_scales = None if l_scales is None else empty(l_scales[0], l_scales[1], dtype=l_scales[2], device=dev)
        recv_count = empty(l_count[0], l_count[1], dtype=torch.int32, device=dev)
        src_info = empty(l_info[0], l_info[1], dtype=torch.int32, device=dev)
        layout_range = empty(l_range[0], l_range[1], dtype=torch.int64, device=dev)
        src_topk_slot = empty(l_slot[0], l_slot[1], dtype=torch.int32, device=dev)
        buffer_idx = rt.low_latency_dispatch(
            d_x, d_topk, T, num_experts, use_fp8, round_scale, use_ue8m0, d_cum, d_wait, return_recv_hook,
            (recv_x.data_ptr(),) + l_x[3],
            None if recv_scales is None else (recv_scales.data_ptr(),) + l_scales[3],
            (recv_count.data_ptr(),) + l_count[3], (src_info.data_ptr(),) + l_info[3],
            (layout_range.data_ptr(),) + l_range[3], (src_topk_slot.data_ptr(),) + l_slot[3], launch)
        handle = (src_info, layout_range, T, hidden, num_experts, src_topk_slot, num_topk, buffer_idx)
        tensors = (x, topk_idx, recv_x, recv_scales, recv_count, src_info, layout_range, src_topk_slot,
                   cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats) \
            if async_finish or return_recv_hook else None
        event, hook = self._ll_finish(rt, compute, async_finish, return_recv_hook, buffer_idx, tensors)
        recv = (recv_x, recv_scales) if use_fp8 else recv_x
        return recv, recv_count, handle, EventOverlap(event, tensors if async_finish else None), hook

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
                rt.low_latency_receive(buffer_idx, compute)
            return None, hook
        if async_finish:
            return EventHandle._recorded_on(self._comm_stream), None
        self._stream_wait(compute, self._comm_raw)
        return None, None

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                            handle: Tuple, use_logfmt: bool = False, zero_copy: bool = False,
                            async_finish: bool = False, return_recv_hook: bool = False,
                            out: Optional[torch.Tensor] = None,
                            combine_wait_recv_cost_stats: Optional[torch.Tensor] = None) -> \
            Tuple[torch.Tensor, EventOverlap, Optional[Callable]]:
        """
        Brings the expert outputs back and reduces them **with** the weights:
        out[t] = sum over k of topk_weights[t, k] * y(expert topk_idx[t, k], t), in fp32.

        Arguments:
            x: `[num_local_experts, num_ranks * T, hidden]` bfloat16, in the layout
                `low_latency_dispatch` returned.
            topk_idx, topk_weights: `[num_tokens, num_topk]` int64 / float32, the dispatch's ids.
            handle: the handle of that dispatch.
            use_logfmt: not supported (must be False).
            zero_copy: the expert outputs are already in `get_next_low_latency_combine_buffer`
                (x then only has to match its shape and dtype and is not read). Needs the zero-copy
                buffers (`num_rdma_bytes` from `get_low_latency_rdma_size_hint(..., zero_copy=True)`);
                without them EpxError(BufferTooSmall), raised inside the collective operation, so
                the peers' combines end too (EpxError(Aborted)).
            async_finish, return_recv_hook: as in `low_latency_dispatch`.
            out: optional `[num_tokens, hidden]` bfloat16 output, returned.
            combine_wait_recv_cost_stats: not supported (must be None).

        Returns:
            combined_x: `[num_tokens, hidden]` bfloat16.
            event: the EventOverlap (event set only with `async_finish`; it keeps the tensors).
            hook: with return_recv_hook, a callable that launches the receive; else None.
        """
        rt = self._ll_rt()
        if use_logfmt:
            raise _error("Unsupported", "use_logfmt=True: epx's low-latency combine sends bf16 only")
        if combine_wait_recv_cost_stats is not None:
            raise _error("Unsupported", "combine_wait_recv_cost_stats: not collected by epx; pass None")
        if async_finish and return_recv_hook:
            raise _error("InvalidArgument", "async_finish and return_recv_hook: choose one (as in DeepEP)")
        src_info, layout_range, T, hidden, num_experts, src_topk_slot, num_topk, buffer_idx = \
            self._check_ll_handle(handle)
        if zero_copy:
            # Not read: the core checks its shape and sends from the zero-copy buffer.
            if not isinstance(x, torch.Tensor) or x.dtype != torch.bfloat16:
                raise _error("InvalidArgument", f"x: with zero_copy, expected a bfloat16 tensor shaped like "
                                                f"get_next_low_latency_combine_buffer, got "
                                                f"{getattr(x, 'dtype', type(x).__name__)}")
            d_x = self._out_desc(x)
        else:
            d_x = self._desc(x, "x", _BF16, 3)
        d_topk = self._desc(topk_idx, "topk_idx", _I64, 2)
        d_weights = self._desc(topk_weights, "topk_weights", _F32, 2)
        d_out = None if out is None else self._desc(out, "out", _BF16, 2)
        compute, launch = self._ll_begin(return_recv_hook)
        out_desc = self._out_desc
        if out is None:
            out = torch.empty((d_topk[2][0], hidden), dtype=torch.bfloat16, device=self._device)
            d_out = out_desc(out)
        rt.low_latency_combine(T, hidden, num_experts, num_topk, buffer_idx, out_desc(src_info),
                               out_desc(layout_range), out_desc(src_topk_slot), d_x, d_topk, d_weights,
                               return_recv_hook, d_out, bool(zero_copy), launch)
        # The combine used the buffer that was next before it (the two alternate); only the hook needs it.
        used_buffer = rt.next_low_latency_buffer() ^ 1 if return_recv_hook else -1
        tensors = (x, topk_idx, topk_weights, src_info, layout_range, src_topk_slot, out) \
            if async_finish or return_recv_hook else None
        event, hook = self._ll_finish(rt, compute, async_finish, return_recv_hook, used_buffer, tensors)
        return out, EventOverlap(event, tensors if async_finish else None), hook

    # ---- Rank masking (DeepEP's shrink mode) ------------------------------------------------------

    def _mask_runtime(self, op: str) -> "_C.Buffer":
        if not self.enable_shrink:
            raise _error("State", f"{op}: needs a Buffer made with enable_shrink=True (masking failed ranks)")
        return self._ll_rt()

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        """
        Masks (`mask=True`) or unmasks `rank_to_mask` in this rank's view, for the low-latency
        operations launched afterwards: a masked rank is neither sent to nor waited for, its
        experts receive nothing and contribute nothing. Needs `enable_shrink=True`.
        """
        self._mask_runtime("low_latency_update_mask_buffer").low_latency_update_mask_buffer(rank_to_mask, bool(mask))

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        """
        Writes this rank's view of every rank into `mask_status` (`[num_ranks]` int32 on this
        device, 1 = masked, by hand or by a timeout), ordered on the current stream. Needs
        `enable_shrink=True`.
        """
        rt = self._mask_runtime("low_latency_query_mask_buffer")
        desc = self._desc(mask_status, "mask_status", (torch.int32,), ndim=1)
        rt.low_latency_query_mask_buffer(desc, torch.cuda.current_stream(self._device).cuda_stream)

    def low_latency_clean_mask_buffer(self) -> None:
        """Unmasks every rank in this rank's view. Needs `enable_shrink=True`. A rank that comes
        back rejoins after `clean_low_latency_buffer()` on every rank (collective), then this."""
        self._mask_runtime("low_latency_clean_mask_buffer").low_latency_clean_mask_buffer()

    def get_next_low_latency_combine_buffer(self, handle: Tuple) -> torch.Tensor:
        """
        The `[num_local_experts, num_ranks * T, hidden]` bfloat16 buffer (inside the symmetric
        memory) the next low-latency combine sends from: write the expert outputs here and call
        `low_latency_combine(..., zero_copy=True)` to skip one copy. Needs `num_rdma_bytes` from
        `get_low_latency_rdma_size_hint(..., zero_copy=True)`, else EpxError(BufferTooSmall) naming
        the bytes (the same on every rank: the region and the shape are).
        """
        rt = self._ll_rt()
        _, _, T, hidden, num_experts, _, num_topk, _ = self._check_ll_handle(handle)
        ptr, _, shape, strides = rt.next_combine_buffer(T, hidden, num_experts, num_topk)
        num_bytes = 2 * (1 + sum((s - 1) * st for s, st in zip(shape, strides))) if all(shape) else 0
        return self._wrap(ptr, num_bytes, torch.bfloat16, shape, strides)

    def __repr__(self) -> str:
        state = "destroyed" if self.runtime is None else f"cuda:{self._device_index}"
        return (f"epx.Buffer(rank {self.rank}/{self.group_size}, {state}, num_nvl_bytes={self.num_nvl_bytes}, "
                f"num_rdma_bytes={self.num_rdma_bytes}, low_latency_mode={self.low_latency_mode})")
