"""The low-latency operations of epx.Buffer (decode, CUDA-graph capturable): low_latency_dispatch,
low_latency_combine, the zero-copy combine buffer, and DeepEP's shrink-mode masks. Methods of Buffer
(buffer.py binds them); streams and events as in _streams.py.

A low-latency handle is DeepEP's tuple (src_info, layout_range, num_max_dispatch_tokens_per_rank,
hidden, num_experts) followed by epx's (src_topk_slot, num_topk, buffer_idx) and the core's
epx._C.LowLatencyHandle the dispatch returned (its views are the tuple's tensors; buffer_idx is its
low-latency buffer). The combine returns the buffer it used, which its receive hook takes.
"""
from typing import Callable, Optional, Tuple, Union

import torch

from . import _C, _aten
from ._streams import _current_raw_stream, _ll_rt
from ._tensors import _BF16, _F32, _I32, _I64, _contiguous_strides, _desc, _opt_desc
from .utils import EventOverlap, _check_int, _error

# The _aten plans of the low-latency dispatch's outputs, by geometry (see _ll_plan).
_LL_PLANS = {}
# A low-latency handle: DeepEP's 5 elements, epx's 3, then the core's handle.
_LL_HANDLE_LEN = 9


def _ll_plan(num_ranks: int, num_experts: int, T: int, hidden: int, use_fp8: bool, use_ue8m0: bool):
    """
    The outputs of a low-latency dispatch as an _aten plan, made once per geometry: recv_x in an
    allocation of its own; recv_scales (with fp8), recv_count, src_info, layout_range and
    src_topk_slot in a second one (one allocation instead of five), each at a 16-byte aligned
    offset. Shapes and strides as DeepEP makes them; the scales are column-major in the last two
    dims. `empty_plan` returns them in that order.
    """
    key = (num_ranks, num_experts, T, hidden, use_fp8, use_ue8m0)
    plan = _LL_PLANS.get(key)
    if plan is not None:
        return plan
    E, RT = num_experts // num_ranks, num_ranks * T
    x_dtype = torch.float8_e4m3fn if use_fp8 else torch.bfloat16
    views = [(0, x_dtype, (E, RT, hidden), _contiguous_strides((E, RT, hidden)), 0)]
    small = []
    if use_fp8:
        num_scales = (hidden // 128 + 3) // 4 if use_ue8m0 else hidden // 128
        st = _contiguous_strides((E, num_scales, RT))  # allocated [E, S, RT], returned transposed
        small.append((torch.int32 if use_ue8m0 else torch.float32, (E, RT, num_scales), (st[0], st[2], st[1])))
    small += [(dtype, shape, _contiguous_strides(shape)) for dtype, shape in
              ((torch.int32, (E,)), (torch.int32, (E, RT)), (torch.int64, (E, num_ranks)), (torch.int32, (E, RT)))]
    offset = 0
    for dtype, shape, strides in small:
        views.append((1, dtype, shape, strides, offset))
        span = 1 + sum((n - 1) * s for n, s in zip(shape, strides)) if all(shape) else 0  # elements
        offset += (span * dtype.itemsize + 15) // 16 * 16
    plan = _aten.plan((E * RT * hidden * x_dtype.itemsize, max(offset, 16)), views)
    if len(_LL_PLANS) >= 64:
        _LL_PLANS.clear()
    _LL_PLANS[key] = plan
    return plan


def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
    """
    Collective: zeroes the low-latency flags. epx does not need it between high-throughput and
    low-latency ops (their memory is separate); it recovers after an error. The arguments
    (DeepEP's) are checked but the whole low-latency region is cleaned.
    """
    rt = _ll_rt(self)
    _check_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, 1)
    _check_int("hidden", hidden, 1)
    _check_int("num_experts", num_experts, 1)
    rt.clean_low_latency_buffer()


def _check_ll_handle(handle):
    if not isinstance(handle, tuple) or len(handle) != _LL_HANDLE_LEN or \
            not isinstance(handle[_LL_HANDLE_LEN - 1], _C.LowLatencyHandle):
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
        The outputs after recv_x (scales, recv_count and the handle's tensors) are disjoint views of
        one allocation: its memory is freed when the last of them is.
        event: the EventOverlap (event set only with `async_finish`; it keeps the tensors).
        hook: with return_recv_hook, a callable that launches the receive; else None.
    """
    rt = self.runtime
    if rt is not None and self.low_latency_mode:
        result = rt.low_latency_dispatch_call(
            x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, cumulative_local_expert_recv_stats,
            dispatch_wait_recv_cost_stats, use_fp8, round_scale, use_ue8m0, async_finish, return_recv_hook)
        if result is not None:
            return result
    raise _dispatch_refusal(self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                            cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats, use_fp8,
                            round_scale, use_ue8m0, async_finish, return_recv_hook)


def _dispatch_refusal(self, x, topk_idx, T, num_experts, cumulative_stats, wait_stats, use_fp8, round_scale,
                      use_ue8m0, async_finish, return_recv_hook) -> Exception:
    """The error of a low_latency_dispatch the binding refused (its checks, in words)."""
    _ll_rt(self)
    if async_finish and return_recv_hook:
        return _error("InvalidArgument", "async_finish and return_recv_hook: choose one (as in DeepEP)")
    if use_ue8m0 and not round_scale:
        return _error("InvalidArgument", "use_ue8m0: needs round_scale=True (UE8M0 holds power-of-two scales)")
    if not use_fp8 and (round_scale or use_ue8m0):
        return _error("InvalidArgument", "round_scale / use_ue8m0: only with use_fp8=True")
    _desc(self, x, "x", _BF16, 2)
    _desc(self, topk_idx, "topk_idx", _I64, 2)
    _check_int("num_max_dispatch_tokens_per_rank", T, 1)
    _check_int("num_experts", num_experts, 1)
    _opt_desc(self, cumulative_stats, "cumulative_local_expert_recv_stats", _I32)
    _opt_desc(self, wait_stats, "dispatch_wait_recv_cost_stats", _I64)
    return _refused("low_latency_dispatch")


def _refused(op: str) -> Exception:
    return _error("State", f"{op}: the binding refused arguments the package accepts (epx._C and the package "
                           f"disagree: a mismatched installation?)")


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
    if use_logfmt:
        raise _error("Unsupported", "use_logfmt=True: epx's low-latency combine sends bf16 only")
    if combine_wait_recv_cost_stats is not None:
        raise _error("Unsupported", "combine_wait_recv_cost_stats: not collected by epx; pass None")
    rt = self.runtime
    if rt is not None and self.low_latency_mode:
        result = rt.low_latency_combine_call(x, topk_idx, topk_weights, handle, zero_copy, async_finish,
                                             return_recv_hook, out)
        if result is not None:
            return result
    raise _combine_refusal(self, x, topk_idx, topk_weights, handle, zero_copy, async_finish, return_recv_hook, out)


def _combine_refusal(self, x, topk_idx, topk_weights, handle, zero_copy, async_finish, return_recv_hook,
                     out) -> Exception:
    """The error of a low_latency_combine the binding refused (its checks, in words)."""
    _ll_rt(self)
    if async_finish and return_recv_hook:
        return _error("InvalidArgument", "async_finish and return_recv_hook: choose one (as in DeepEP)")
    _check_ll_handle(handle)
    if zero_copy:
        # Not read: the core checks its shape and sends from the zero-copy buffer.
        if not isinstance(x, torch.Tensor) or x.dtype != torch.bfloat16 or not 1 <= x.dim() <= 3:
            return _error("InvalidArgument", f"x: with zero_copy, expected a bfloat16 tensor shaped like "
                                             f"get_next_low_latency_combine_buffer, got "
                                             f"{getattr(x, 'dtype', type(x).__name__)}")
    else:
        _desc(self, x, "x", _BF16, 3)
    _desc(self, topk_idx, "topk_idx", _I64, 2)
    _desc(self, topk_weights, "topk_weights", _F32, 2)
    _opt_desc(self, out, "out", _BF16, 2)
    return _refused("low_latency_combine")


def _mask_runtime(self, op: str) -> "_C.Buffer":
    if not self.enable_shrink:
        raise _error("State", f"{op}: needs a Buffer made with enable_shrink=True (masking failed ranks)")
    return _ll_rt(self)


def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
    """
    Masks (`mask=True`) or unmasks `rank_to_mask` in this rank's view, for the low-latency
    operations launched afterwards: a masked rank is neither sent to nor waited for, its
    experts receive nothing and contribute nothing. Needs `enable_shrink=True`.
    """
    _mask_runtime(self, "low_latency_update_mask_buffer").low_latency_update_mask_buffer(rank_to_mask, bool(mask))


def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
    """
    Writes this rank's view of every rank into `mask_status` (`[num_ranks]` int32 on this
    device, 1 = masked, by hand or by a timeout), ordered on the current stream. Needs
    `enable_shrink=True`.
    """
    rt = _mask_runtime(self, "low_latency_query_mask_buffer")
    desc = _desc(self, mask_status, "mask_status", _I32, ndim=1)
    rt.low_latency_query_mask_buffer(mask_status=desc, stream=_current_raw_stream(self._device_index))


def low_latency_clean_mask_buffer(self) -> None:
    """Unmasks every rank in this rank's view. Needs `enable_shrink=True`. A rank that comes
    back rejoins after `clean_low_latency_buffer()` on every rank (collective), then this."""
    _mask_runtime(self, "low_latency_clean_mask_buffer").low_latency_clean_mask_buffer()


def get_next_low_latency_combine_buffer(self, handle: Tuple) -> torch.Tensor:
    """
    The `[num_local_experts, num_ranks * T, hidden]` bfloat16 buffer (inside the symmetric
    memory) the next low-latency combine sends from: write the expert outputs here and call
    `low_latency_combine(..., zero_copy=True)` to skip one copy. Needs `num_rdma_bytes` from
    `get_low_latency_rdma_size_hint(..., zero_copy=True)`, else EpxError(BufferTooSmall) naming
    the bytes (the same on every rank: the region and the shape are).
    """
    rt = _ll_rt(self)
    core = _check_ll_handle(handle)[_LL_HANDLE_LEN - 1]
    ptr, _, shape, strides = rt.next_combine_buffer(core)
    num_bytes = 2 * (1 + sum((s - 1) * st for s, st in zip(shape, strides))) if all(shape) else 0
    return self._wrap(ptr, num_bytes, torch.bfloat16, shape, strides)

