"""The high-throughput operations of epx.Buffer (training, prefill): get_dispatch_layout, dispatch
(fresh: host-synced or worst-case sized; cached: a handle's routing again) and combine. Methods of
Buffer (buffer.py binds them); streams and events as in _streams.py.

A dispatch handle within one node is DeepEP's tuple (rank_prefix_matrix, count_matrix, send_pos,
recv_src_idx, is_token_in_rank) followed by the core's epx._C.DispatchHandle, whose device arrays
live in one int32 tensor placed by the binding's DispatchHandle.storage_layout
(src/host/handle_storage.hpp); the first three elements are views of it. Across (virtual) nodes it
is DeepEP's internode 10-tuple (see `dispatch`), whose last slot holds the core's handle. Either
way combine and a cached re-dispatch read only the core's handle.
"""
from typing import List, Optional, Tuple, Union

import torch

from . import _C, _aten
from ._streams import _alloc, _begin, _end, _rt
from ._tensors import _BF16, _BF16_FP8, _BOOL, _F32, _FP8, _I32, _I64, _SCALES, _desc, _opt_desc
from .utils import Config, EventOverlap, _check_int, _error

# (num_ranks, Buffer.num_sms if set_num_sms was called else None, SM share of a simulated rank or 0)
# -> the default config's key.
_DEFAULT_CONFIG_KEYS = {}
# A dispatch handle: DeepEP's 5 elements, then the core's handle (one node); DeepEP's internode
# 10-tuple, the core's handle in its last slot (send_nvl_head's), across nodes.
_HANDLE_LEN = 6
_INTERNODE_HANDLE_LEN = 10


def _apply_config(self, config: Optional[Config]) -> None:
    """Sets `config` (None: the default of `get_dispatch_config` / `get_combine_config`, which
    are the same) on the core if it differs from the one it has."""
    if config is None:
        # The default depends only on the group size and on set_num_sms: computed once each.
        cls = type(self)
        marker = (self.group_size, cls.num_sms if cls._num_sms_set else None, self._num_sms_share)
        key = _DEFAULT_CONFIG_KEYS.get(marker)
        if key is None:
            key = _DEFAULT_CONFIG_KEYS[marker] = cls._default_config(self.group_size, self._num_sms_share)._key()
    elif isinstance(config, Config):
        key = config._key()
    else:
        raise _error("InvalidArgument", f"config: expected an epx.Config, got {type(config).__name__}")
    if key != self._config_key:
        self.runtime.set_config(*key)
        self._config_key = key
    if config is None:
        self.runtime.mark_default_config()  # (what the binding's whole calls check config=None against)


def _recv_counts(self, num_local_experts: int):
    """Pinned host memory the notify kernel writes the per-expert counts into (read after its host sync)."""
    if self._counts_host is None:
        # device="cpu": torch.set_default_device("cuda") must not move this host buffer.
        self._counts_host = torch.zeros((_C.MAX_LOCAL_EXPERTS,), dtype=torch.int32, device="cpu", pin_memory=True)
        self._counts_device_ptr = _C.host_device_pointer(self._counts_host.data_ptr())
    return (self._counts_device_ptr, _C.DTYPE_I32, (num_local_experts,), (1,))


def _check_handle(self, handle) -> "_C.DispatchHandle":
    length = _INTERNODE_HANDLE_LEN if self._num_nodes > 1 else _HANDLE_LEN
    if not isinstance(handle, tuple) or len(handle) != length or not isinstance(handle[-1], _C.DispatchHandle):
        where = f"across {self._num_nodes} nodes" if self._num_nodes > 1 else "within one node"
        got = f"a tuple of {len(handle)}" if isinstance(handle, tuple) else type(handle).__name__
        raise _error("InvalidArgument", f"handle: expected the handle tuple returned by Buffer.dispatch ({length} "
                                        f"elements {where}, the last an epx._C.DispatchHandle), got {got}")
    return handle[-1]  # the core checks that it is this rank's (its rank and number of ranks)


def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int,
                        previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                        allocate_on_comm_stream: bool = False) -> \
        Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor, EventOverlap]:
    """
    Counts what a dispatch will send.

    Arguments:
        topk_idx: `[num_tokens, num_topk]` int64 expert ids, -1 = no expert in that slot.
        num_experts: the number of experts (a multiple of the number of ranks).
        previous_event, async_finish, allocate_on_comm_stream: see epx.buffer's module docstring.

    Returns:
        num_tokens_per_rank: `[num_ranks]` int32, tokens sent to each rank (a token counts once
            per rank even if several of its experts live there).
        num_tokens_per_rdma_rank: across (virtual) nodes, `[num_nodes]` int32, tokens with at least
            one expert on a rank of each node (a token counts once per node); None within one node
            (as DeepEP).
        num_tokens_per_expert: `[num_experts]` int32, tokens sent to each expert.
        is_token_in_rank: `[num_tokens, num_ranks]` bool.
        event: the EventOverlap (its event is set only with `async_finish`).
    """
    rt = _rt(self)
    d_topk = _desc(self, topk_idx, "topk_idx", _I64, ndim=2)
    _check_int("num_experts", num_experts, 1)
    R, num_tokens = self.group_size, topk_idx.size(0)
    wait, join = _begin(self, previous_event, async_finish, allocate_on_comm_stream)
    with _alloc(self, allocate_on_comm_stream):  # on topk_idx's device (checked)
        num_tokens_per_rank, d_per_rank = _aten.empty(topk_idx, (R,), torch.int32)
        num_tokens_per_expert, d_per_expert = _aten.empty(topk_idx, (num_experts,), torch.int32)
        is_token_in_rank, d_in_rank = _aten.empty(topk_idx, (num_tokens, R), torch.bool)
        num_tokens_per_rdma_rank, d_per_rdma_rank = (None, None) if self._num_nodes == 1 else \
            _aten.empty(topk_idx, (self._num_nodes,), torch.int32)
    rt.get_dispatch_layout(topk_idx=d_topk, num_experts=num_experts, num_tokens_per_rank=d_per_rank,
                           num_tokens_per_rdma_rank=d_per_rdma_rank, num_tokens_per_expert=d_per_expert,
                           is_token_in_rank=d_in_rank, stream=self._comm_raw, wait_stream=wait, join_stream=join)
    event = _end(self, async_finish, allocate_on_comm_stream,
                 (topk_idx, num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank))
    return num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, event


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
        num_tokens_per_rdma_rank: across nodes, the `[num_nodes]` int32 of `get_dispatch_layout`
            (optional: the core derives the node counts from is_token_in_rank, so it is only
            checked); must be None within one node.
        topk_idx: `[num_tokens, num_topk]` int64, optional (without it only x moves; the layout tensors route).
        topk_weights: `[num_tokens, num_topk]` float32, optional.
        expert_alignment: each count of `num_recv_tokens_per_expert_list` is rounded up to it.
        num_worst_tokens: > 0: the received tensors get this many rows (padding rows: x 0,
            topk_idx -1, weights 0, src_idx -1), nothing syncs with the host and the call is
            CUDA-graph capturable; `num_recv_tokens_per_expert_list` is then an empty list.
            0: the host waits for the count exchange and allocates exactly the received rows.
        config: an epx.Config (default `get_dispatch_config(group_size)`).
        previous_event, async_finish, allocate_on_comm_stream: see epx.buffer's module docstring.

    Returns:
        recv_x: the received rows, ordered by (source rank, source token index): a tensor, or
            a (fp8 tensor, scales) tuple like `x`.
        recv_topk_idx: `[rows, num_topk]` int64 ids of this rank's local experts (-1 for
            experts elsewhere), None without topk_idx or in cached mode.
        recv_topk_weights: `[rows, num_topk]` float32 (0 where the id is -1), or None.
        num_recv_tokens_per_expert_list: list of `num_local_experts` ints (aligned to
            `expert_alignment`); empty with num_worst_tokens > 0; None in cached mode.
        handle: within one node (rank_prefix_matrix `[R, R]` int32, count_matrix `[R, R]` int32,
            send_pos `[num_tokens, R]` int32, recv_src_idx `[rows]` int32, is_token_in_rank, core
            handle). Across nodes DeepEP's internode 10-tuple, in its order, N nodes, C channels
            (the construction config's num_sms; channel c holds tokens [c q, min((c + 1) q, T)),
            q = ceil(T / C)), inclusive prefix sums (docs/protocol.md, "Internode dispatch and
            combine"): is_token_in_rank `[T, R]`; rdma_channel_prefix_matrix `[N, C]` int32
            (tokens to node m over channels, a token once per node); gbl_channel_prefix_matrix
            `[R, C]` int32 (tokens to rank r over channels); recv_rdma_channel_prefix_matrix,
            recv_rdma_rank_prefix_sum, recv_gbl_channel_prefix_matrix: None (the forwarder's and
            the sources' channel bookkeeping of DeepEP's kernels, which epx's kernels neither
            need nor return); recv_gbl_rank_prefix_sum `[R]` int32 (rows received from source
            ranks 0..s: a view of the core's rank_prefix_matrix, index -4 as in DeepEP);
            recv_src_idx `[rows]` int32 in recv_src_meta's slot (DeepEP's slot of one entry per
            received row: its size(0) is the rows received, as in DeepEP); send_rdma_head
            `[T, N]` int32 (the token's position among this rank's tokens to node m, -1 if none);
            and the core's handle in send_nvl_head's slot. None in cached mode.
        event: the EventOverlap (its event is set only with `async_finish`).
    """
    rt = self.runtime
    if handle is not None and rt is not None:
        # Cached, in the default stream order, with the config the core has: the binding's whole call
        # (binding.cpp); None for every other call, which the general path below runs (and words).
        result = rt.cached_dispatch_call(x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                                         num_tokens_per_expert, topk_idx, topk_weights, expert_alignment,
                                         num_worst_tokens, config, previous_event, async_finish,
                                         allocate_on_comm_stream)
        if result is not None:
            return result
    rt = _rt(self)
    R = self.group_size
    if num_tokens_per_rdma_rank is not None:
        if self._num_nodes == 1:
            raise _error("Unsupported", "num_tokens_per_rdma_rank: the buffer spans one node (no RDMA leg); pass "
                                        "None (get_dispatch_layout returns None there)")
        _desc(self, num_tokens_per_rdma_rank, "num_tokens_per_rdma_rank", _I32, 1)
    if isinstance(x, tuple):
        if len(x) != 2:
            raise _error("InvalidArgument", f"x: expected a tensor or a (fp8 tensor, scales) tuple, got a tuple "
                                            f"of {len(x)}")
        x, x_scales = x
        d_x = _desc(self, x, "x[0]", _FP8, 2)
        # float32 or int32 (UE8M0-packed) scales, [N] or [N, C]: moved as 32-bit words.
        d_scales = _desc(self, x_scales, "x[1] (scales)", _SCALES)
        if x_scales.dim() not in (1, 2):
            raise _error("InvalidArgument", f"x[1] (scales): expected [num_tokens] or [num_tokens, C], got shape "
                                            f"{tuple(x_scales.shape)}")
    else:
        x_scales, d_scales = None, None
        d_x = _desc(self, x, "x", _BF16_FP8, 2)
        if d_x[1] == _C.DTYPE_FP8E4M3:
            raise _error("InvalidArgument", "x: an fp8 tensor needs its scales: pass x as (fp8 tensor, scales)")
    if type(expert_alignment) is not int or expert_alignment < 1:  # (the common case without a call)
        _check_int("expert_alignment", expert_alignment, 1)
    if type(num_worst_tokens) is not int or num_worst_tokens < 0:
        _check_int("num_worst_tokens", num_worst_tokens, 0)
    _apply_config(self, config)
    num_tokens, hidden = d_x[2]

    if handle is not None:
        h = _check_handle(self, handle)
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
        wait, join = _begin(self, previous_event, async_finish, allocate_on_comm_stream)
        with _alloc(self, allocate_on_comm_stream):  # x's dtype and device (checked)
            recv_x, d_recv_x = _aten.empty(x, (rows, hidden), x.dtype)
            recv_x_scales, d_recv_x_scales = (None, None) if x_scales is None else \
                _aten.empty(x, (rows,) + tuple(x_scales.shape[1:]), x_scales.dtype)
        rt.dispatch(h, x=d_x, x_scales=d_scales, expert_alignment=expert_alignment, num_worst_tokens=worst,
                    recv_x=d_recv_x, recv_x_scales=d_recv_x_scales, stream=self._comm_raw, wait_stream=wait,
                    join_stream=join)
        event = _end(self, async_finish, allocate_on_comm_stream,
                     (x, x_scales, recv_x, recv_x_scales, h.storage) if async_finish else None)
        return (recv_x, recv_x_scales) if x_scales is not None else recv_x, None, None, None, None, event

    d_ntpr = _desc(self, num_tokens_per_rank, "num_tokens_per_rank", _I32)
    d_itir = _desc(self, is_token_in_rank, "is_token_in_rank", _BOOL)
    d_ntpe = _desc(self, num_tokens_per_expert, "num_tokens_per_expert", _I32, 1)
    d_topk = _opt_desc(self, topk_idx, "topk_idx", _I64, 2)
    d_weights = _opt_desc(self, topk_weights, "topk_weights", _F32, 2)
    num_local_experts = num_tokens_per_expert.size(0) // R
    total, o_rpm, o_cm, o_sp, o_nr = _C.DispatchHandle.storage_layout(R, num_tokens)

    stream = self._comm_raw
    # The fresh dispatch queues work of its own on the communication stream (the handle's memset
    # before, across nodes the handle's slots after its binding calls): it waits itself.
    wait, join = _begin(self, previous_event, async_finish, allocate_on_comm_stream)
    if wait is not None:
        self._stream_wait(stream, wait)
    with _alloc(self, allocate_on_comm_stream):
        storage = torch.empty((total,), dtype=torch.int32, device=self._device)
    _C.memset_async(storage.data_ptr(), 0, total * 4, stream)
    h = _C.DispatchHandle(storage_ptr=storage.data_ptr(), storage_numel=total, num_ranks=R, rank=self.rank,
                          num_tokens=num_tokens, storage=storage)
    host_synced = num_worst_tokens == 0
    d_counts = _recv_counts(self, num_local_experts) if host_synced else None
    num_recv = rt.dispatch_notify(h, x=d_x, x_scales=d_scales, topk_idx=d_topk, topk_weights=d_weights,
                                  num_tokens_per_rank=d_ntpr, is_token_in_rank=d_itir, num_tokens_per_expert=d_ntpe,
                                  expert_alignment=expert_alignment, num_worst_tokens=num_worst_tokens,
                                  num_recv_tokens_per_expert=d_counts, stream=stream)
    if host_synced:
        counts = self._counts_host[:num_local_experts].tolist()
        rows = num_recv
    else:
        counts = []
        rows = num_worst_tokens
    num_topk = 0 if topk_idx is None else topk_idx.size(1)
    none = (None, None)
    with _alloc(self, allocate_on_comm_stream):  # on x's device (checked)
        recv_x, d_recv_x = _aten.empty(x, (rows, hidden), x.dtype)
        recv_x_scales, d_recv_x_scales = none if x_scales is None else \
            _aten.empty(x, (rows,) + tuple(x_scales.shape[1:]), x_scales.dtype)
        recv_topk_idx, d_recv_topk_idx = none if topk_idx is None else _aten.empty(x, (rows, num_topk), torch.int64)
        recv_topk_weights, d_recv_topk_weights = none if topk_weights is None else \
            _aten.empty(x, (rows, num_topk), torch.float32)
        recv_src_idx, d_recv_src_idx = _aten.empty(x, (rows,), torch.int32)
    rt.dispatch(h, x=d_x, x_scales=d_scales, topk_idx=d_topk, topk_weights=d_weights,
                expert_alignment=expert_alignment, num_worst_tokens=num_worst_tokens, recv_x=d_recv_x,
                recv_x_scales=d_recv_x_scales, recv_topk_idx=d_recv_topk_idx, recv_topk_weights=d_recv_topk_weights,
                recv_src_idx=d_recv_src_idx, stream=stream)
    rank_prefix_matrix = storage[o_rpm:o_cm].view(R, R)
    count_matrix = storage[o_cm:o_sp].view(R, R)
    send_pos = storage[o_sp:o_nr].view(num_tokens, R)
    if self._num_nodes == 1:
        new_handle = (rank_prefix_matrix, count_matrix, send_pos, recv_src_idx, is_token_in_rank, h)
        computed = ()
    else:
        new_handle = _internode_handle(self, is_token_in_rank, rank_prefix_matrix, recv_src_idx, h,
                                       allocate_on_comm_stream)
        computed = new_handle[1:3] + new_handle[8:9]
    if join is not None:
        self._stream_wait(join, stream)
    event = _end(self, async_finish, allocate_on_comm_stream,
                 (x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                  num_tokens_per_expert, storage, recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights,
                  recv_src_idx) + computed)
    recv = (recv_x, recv_x_scales) if x_scales is not None else recv_x
    return recv, recv_topk_idx, recv_topk_weights, counts, new_handle, event


def _internode_handle(self, is_token_in_rank, rank_prefix_matrix, recv_src_idx, h,
                      allocate_on_comm_stream: bool) -> Tuple:
    """DeepEP's internode 10-tuple (see `dispatch`), the core's handle in the last slot. The slots
    computed from this rank's routing are computed on the communication stream (where
    is_token_in_rank is ready after previous_event) into tensors allocated like the op's outputs.

    Channel c holds tokens [c q, min((c + 1) q, T)), q = ceil(T / C), so the inclusive prefix over
    channels of a column's true entries is its running count over tokens at the channel's last
    token: one cumulative sum over tokens gives both prefix matrices and send_rdma_head."""
    T = is_token_in_rank.size(0)
    N, U, C, R = self._num_nodes, self._node_size, self._rdma_channels, self.group_size
    dev = is_token_in_rank.device
    with _alloc(self, allocate_on_comm_stream):
        prefix = torch.empty((N + R, C), dtype=torch.int32, device=dev)  # rows: nodes, then ranks
        send_rdma_head = torch.empty((T, N), dtype=torch.int32, device=dev)
    with torch.cuda.stream(self._comm_stream):
        in_node = is_token_in_rank.reshape(T, N, U).any(2)
        running = torch.cumsum(torch.cat((in_node, is_token_in_rank), 1), 0, dtype=torch.int32)  # [T, N + R]
        if T > 0:
            q = -(-T // C)  # the last token of channel c: min((c + 1) q, T) - 1 (all tokens past the end)
            ends = torch.arange(q - 1, C * q, q, dtype=torch.int64, device=dev).clamp_(max=T - 1)
            prefix.copy_(running.index_select(0, ends).t())
        else:
            prefix.zero_()
        torch.sub(running[:, :N], 1, out=send_rdma_head).masked_fill_(in_node.logical_not(), -1)
    return (is_token_in_rank, prefix[:N], prefix[N:], None, None, None,
            rank_prefix_matrix[:, self.rank], recv_src_idx, send_rdma_head, h)


def combine(self, x: torch.Tensor, handle: Tuple,
            topk_weights: Optional[torch.Tensor] = None,
            bias: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor], None] = None,
            config: Optional[Config] = None,
            previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
            allocate_on_comm_stream: bool = False) -> \
        Tuple[torch.Tensor, Optional[torch.Tensor], EventOverlap]:
    """
    Sends the rows back to the ranks they came from and sums them there (fp32), **without**
    weights (weight rows before combining, as in DeepEP). The reverse of `dispatch`. Across nodes
    in two levels (docs/protocol.md): each node's rows of a token are summed in fp32 on the
    forwarder (local index ascending), a remote node's partial crosses as bf16 (rounded once), the
    owner adds the partials in node order, then the biases, and rounds once.

    Arguments:
        x: `[rows, hidden]` bfloat16 in the order `dispatch` returned them.
        handle: the handle of that dispatch.
        topk_weights: `[rows, num_topk]` float32, optional: summed the same way.
        bias: a `[num_tokens, hidden]` bfloat16 tensor or a tuple of two, added to the sum.
        config: an epx.Config (default `get_combine_config(group_size)`).
        previous_event, async_finish, allocate_on_comm_stream: see epx.buffer's module docstring.

    Returns:
        combined_x: `[num_tokens, hidden]` bfloat16.
        combined_topk_weights: `[num_tokens, num_topk]` float32, or None.
        event: the EventOverlap (its event is set only with `async_finish`).
    """
    rt = self.runtime
    if rt is not None:
        # In the default stream order with the config the core has: the binding's whole call (binding.cpp);
        # None for every other call, which the general path below runs (and words).
        result = rt.combine_call(x, handle, topk_weights, bias, config, previous_event, async_finish,
                                 allocate_on_comm_stream)
        if result is not None:
            return result
    rt = _rt(self)
    h = _check_handle(self, handle)
    d_x = _desc(self, x, "x", _BF16, 2)
    d_weights = None if topk_weights is None else _desc(self, topk_weights, "topk_weights", _F32, 2)
    if bias is None:
        bias_0 = bias_1 = d_bias_0 = d_bias_1 = None
    else:
        if isinstance(bias, torch.Tensor):
            bias_0, bias_1 = bias, None
        elif isinstance(bias, tuple) and len(bias) == 2:
            bias_0, bias_1 = bias
        else:
            raise _error("InvalidArgument", "bias: expected a tensor or a tuple of two tensors")
        d_bias_0 = _opt_desc(self, bias_0, "bias[0]", _BF16)
        d_bias_1 = _opt_desc(self, bias_1, "bias[1]", _BF16)
    _apply_config(self, config)
    num_tokens = h.num_tokens
    wait, join = _begin(self, previous_event, async_finish, allocate_on_comm_stream)
    with _alloc(self, allocate_on_comm_stream):  # on x's device (checked)
        combined_x, d_combined_x = _aten.empty(x, (num_tokens, d_x[2][1]), torch.bfloat16)
        combined_topk_weights, d_combined_topk_weights = (None, None) if d_weights is None else \
            _aten.empty(x, (num_tokens, d_weights[2][1]), torch.float32)
    rt.combine(h, x=d_x, topk_weights=d_weights, bias_0=d_bias_0, bias_1=d_bias_1, combined_x=d_combined_x,
               combined_topk_weights=d_combined_topk_weights, stream=self._comm_raw, wait_stream=wait,
               join_stream=join)
    event = _end(self, async_finish, allocate_on_comm_stream,
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
    """DeepEP's internode dispatch: `dispatch` on a buffer that spans several (virtual) nodes
    (EpxError(Unsupported) within one node, where `dispatch` is the one to call)."""
    if self._num_nodes == 1:
        raise _error("Unsupported", "internode_dispatch: the buffer spans one node; use dispatch")
    return dispatch(self, x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                    num_tokens_per_expert, topk_idx, topk_weights, expert_alignment, num_worst_tokens, config,
                    previous_event, async_finish, allocate_on_comm_stream)


def internode_combine(self, x: torch.Tensor, handle: Tuple,
                      topk_weights: Optional[torch.Tensor] = None,
                      bias: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor], None] = None,
                      config: Optional[Config] = None,
                      previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                      allocate_on_comm_stream: bool = False):
    """DeepEP's internode combine: `combine` on a buffer that spans several nodes (see
    `internode_dispatch`)."""
    if self._num_nodes == 1:
        raise _error("Unsupported", "internode_combine: the buffer spans one node; use combine")
    return combine(self, x, handle, topk_weights, bias, config, previous_event, async_finish, allocate_on_comm_stream)
