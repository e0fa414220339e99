"""CPU tests of epx._aten, which makes the operations' output tensors and their descriptors in C++:
shapes, dtypes, strides, offsets and storage sharing against what torch makes, and its refusals."""
import random

import pytest

from conftest import require_epx

torch, epx = require_epx()
from epx import _C, _aten  # noqa: E402
from epx._tensors import _DTYPE_CODES, _contiguous_strides  # noqa: E402

_SEED = random.randrange(1 << 30)
print(f"test_cpu_aten seed {_SEED}")


def test_compiled_against_this_torch():
    assert _aten.torch_version == torch.__version__


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("dtype", list(_DTYPE_CODES))
def test_empty_is_a_contiguous_tensor_with_its_descriptor(device, dtype):
    rng = random.Random(_SEED)
    like = torch.zeros(2, dtype=torch.bfloat16, device=device)
    for ndim in (1, 2, 3):
        shape = tuple(rng.randrange(0, 6) for _ in range(ndim))
        t, desc = _aten.empty(like, shape, dtype)
        assert (t.device, t.dtype, tuple(t.shape), t.stride()) == \
            (like.device, dtype, shape, _contiguous_strides(shape)), (device, dtype, shape)
        assert desc == (t.data_ptr(), _DTYPE_CODES[dtype], shape, t.stride()), (shape, desc)


def test_empty_allocates_fresh_memory_each_call():
    like = torch.zeros(2)
    a, _ = _aten.empty(like, (64,), torch.int32)
    b, _ = _aten.empty(like, (64,), torch.int32)
    a.fill_(1)
    b.fill_(2)
    assert a.data_ptr() != b.data_ptr() and int(a.sum()) == 64 and int(b.sum()) == 128


def _span_bytes(shape, strides, itemsize):
    return (1 + sum((n - 1) * s for n, s in zip(shape, strides))) * itemsize if all(shape) else 0


def test_plan_views_share_their_allocation_at_their_offsets():
    # Two allocations: a bf16 block alone, then four views of mixed dtypes, one transposed.
    E, RT, H, S = 3, 8, 256, 2
    st = _contiguous_strides((E, S, RT))
    small = [(torch.float32, (E, RT, S), (st[0], st[2], st[1])), (torch.int32, (E,), (1,)),
             (torch.int64, (E, 4), (4, 1)), (torch.int32, (E, RT), (RT, 1))]
    views, offset = [(0, torch.bfloat16, (E, RT, H), _contiguous_strides((E, RT, H)), 0)], 0
    for dtype, shape, strides in small:
        views.append((1, dtype, shape, strides, offset))
        offset += (_span_bytes(shape, strides, dtype.itemsize) + 15) // 16 * 16
    plan = _aten.plan((E * RT * H * 2, offset), views)
    tensors, descs = _aten.empty_plan(torch.zeros(1), plan)
    assert len(tensors) == len(descs) == len(views)
    for (alloc, dtype, shape, strides, byte_offset), t, d in zip(views, tensors, descs):
        assert (t.dtype, tuple(t.shape), t.stride()) == (dtype, shape, strides)
        assert t.storage_offset() * t.element_size() == byte_offset
        assert d == (t.data_ptr(), _DTYPE_CODES[dtype], shape, strides)
    storages = [t.untyped_storage()._cdata for t in tensors]
    assert storages[0] not in storages[1:] and len(set(storages[1:])) == 1
    assert tensors[1].untyped_storage().nbytes() == offset
    # Disjoint: writing each view with its index leaves every other view's bytes alone.
    for i, t in enumerate(tensors[1:], 1):
        t.fill_(i)
    for i, t in enumerate(tensors[1:], 1):
        assert bool((t == i).all()), f"view {i} was overwritten"
    # A second call makes new allocations.
    again, _ = _aten.empty_plan(torch.zeros(1), plan)
    assert again[1].untyped_storage()._cdata != tensors[1].untyped_storage()._cdata


def test_plan_views_on_meta():
    plan = _aten.plan((64,), [(0, torch.int64, (2, 2), (2, 1), 32)])
    (t,), (d,) = _aten.empty_plan(torch.zeros(1, device="meta"), plan)
    assert t.device.type == "meta" and tuple(t.shape) == (2, 2) and t.storage_offset() == 4
    assert d[1:] == (_C.DTYPE_I64, (2, 2), (2, 1))


@pytest.mark.parametrize("views,why", [
    ([(0, torch.int32, (8,), (1,), 0)], "inside its allocation"),  # 32 bytes in a 16-byte allocation
    ([(0, torch.int32, (2,), (1,), 8)], "16-byte aligned"),        # not at a 16-byte offset
    ([(1, torch.int32, (2,), (1,), 0)], "inside its allocation"),  # no allocation 1
    ([(0, torch.float16, (2,), (1,), 0)], "epx dtype"),            # not a dtype epx takes
    ([(0, torch.int32, (2, 0), (1,), 0)], "as many"),              # strides of another rank
    ([(0, torch.int32, (2,), (-1,), 0)], "non-negative"),
])
def test_plan_refuses_a_view_it_cannot_place(views, why):
    with pytest.raises(TypeError, match=why):
        _aten.plan((16,), views)


def test_refusals_name_the_argument():
    like = torch.zeros(1)
    with pytest.raises(TypeError, match="like: expected a torch.Tensor, got int"):
        _aten.empty(3, (1,), torch.int32)
    with pytest.raises(TypeError, match="dtype: expected a torch.dtype"):
        _aten.empty(like, (1,), "int32")
    with pytest.raises(TypeError, match="dtype: not one epx takes"):
        _aten.empty(like, (1,), torch.float16)
    with pytest.raises(RuntimeError, match="negative dimension"):
        _aten.empty(like, (-1,), torch.int32)
    with pytest.raises(ValueError):
        _aten.empty_plan(like, object())
