"""Tensors across the binding (part of epx.Buffer): torch dtypes as the core's codes, descriptors
`(data_ptr, dtype code, shape, strides)`, and tensors over memory the core owns. The operations'
outputs and their descriptors come from epx._aten (python/aten.cpp), in one call each.

The checks here are the ones the C++ core cannot make (Python type, device, torch dtype); shapes,
strides and ranges are the core's, whose errors name the argument too.
"""
from typing import Optional, Tuple

import torch

from . import _C, _aten
from .utils import _error

_DTYPE_CODES = {
    torch.bfloat16: _C.DTYPE_BF16,
    torch.float8_e4m3fn: _C.DTYPE_FP8E4M3,
    torch.float32: _C.DTYPE_F32,
    torch.int32: _C.DTYPE_I32,
    torch.int64: _C.DTYPE_I64,
    torch.bool: _C.DTYPE_BOOL,
}


class _Dtypes(tuple):
    """The torch dtypes an argument takes, and `mask`: their codes as the bits _aten.describe reads."""

    def __new__(cls, *dtypes):
        self = super().__new__(cls, dtypes)
        self.mask = sum(1 << _DTYPE_CODES[d] for d in dtypes)
        return self


_BF16 = _Dtypes(torch.bfloat16)
_BF16_FP8 = _Dtypes(torch.bfloat16, torch.float8_e4m3fn)
_FP8 = _Dtypes(torch.float8_e4m3fn)
_F32 = _Dtypes(torch.float32)
_I32 = _Dtypes(torch.int32)
_I64 = _Dtypes(torch.int64)
_BOOL = _Dtypes(torch.bool)
_SCALES = _Dtypes(torch.float32, torch.int32)  # fp8 scales: float32, or int32 (UE8M0-packed)


def _dtype_names(dtypes) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def _contiguous_strides(shape) -> Tuple[int, ...]:
    """The strides torch gives a contiguous tensor of `shape` (a dimension of size 0 counts as 1)."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


class _DeviceMemory:
    """Exposes raw device memory to torch.as_tensor; keeps `owner` alive as long as the tensor."""

    def __init__(self, ptr: int, num_bytes: int, owner: object) -> None:
        self.__cuda_array_interface__ = {"shape": (num_bytes,), "typestr": "|u1", "data": (ptr, False),
                                         "version": 3, "strides": None}
        self.owner = owner


_describe = _aten.describe


def _bad_tensor(self, t, name: str, dtypes, ndim: int) -> Exception:
    """The error of `_desc` for a tensor it refuses."""
    if not isinstance(t, torch.Tensor):
        if t is None:
            return _error("InvalidArgument", f"{name}: required")
        return _error("InvalidArgument", f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device != self._device:
        return _error("InvalidArgument", f"{name}: expected a tensor on {self._device}, got one on {t.device}")
    if t.dtype not in dtypes:
        return _error("InvalidArgument", f"{name}: expected dtype {_dtype_names(dtypes)}, got "
                                         f"{str(t.dtype).replace('torch.', '')}")
    expected = f"{ndim} dimensions" if ndim else "1 to 3 dimensions"
    return _error("InvalidArgument", f"{name}: expected {expected}, got shape {tuple(t.shape)}")


def _desc(self, t, name: str, dtypes: _Dtypes, ndim: int = 0):
    """Checks what the core cannot see (type, device, torch dtype; `ndim` where the Python layer reads
    the shape, 0: any of the 1 to 3 a descriptor holds) and returns the descriptor (made by _aten.describe)."""
    d = _describe(t, self._device, dtypes.mask, ndim)
    if d is None:
        raise _bad_tensor(self, t, name, dtypes, ndim)
    return d


def _opt_desc(self, t, name: str, dtypes: _Dtypes, ndim: int = 0):
    """`_desc` of an optional argument: None stays None."""
    return None if t is None else _desc(self, t, name, dtypes, ndim)


def _wrap(self, ptr: int, num_bytes: int, dtype: torch.dtype, shape, strides) -> torch.Tensor:
    """A tensor over memory the core owns; it keeps this Buffer alive."""
    raw = torch.as_tensor(_DeviceMemory(ptr, num_bytes, self), device=self._device)
    return raw.view(dtype).as_strided(shape, strides)
