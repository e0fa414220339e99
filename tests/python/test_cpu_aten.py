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


def test_plan_refuses_what_it_cannot_allocate():
    with pytest.raises(TypeError, match="at most 4 allocations"):
        _aten.plan((16,) * 5, [(0, torch.int32, (2,), (1,), 0)])
    with pytest.raises(TypeError, match="negative"):
        _aten.plan((-16,), [])
    with pytest.raises(TypeError, match=r"\(alloc, dtype, shape, strides, byte_offset\)"):
        _aten.plan((16,), [[0, torch.int32, (2,), (1,), 0]])
    with pytest.raises(TypeError, match="torch.dtype"):
        _aten.plan((16,), [(0, "int32", (2,), (1,), 0)])


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


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_describe_takes_what_the_package_checks(device):
    rng = random.Random(_SEED + 1)
    dev = torch.device(device)
    for dtype, code in _DTYPE_CODES.items():
        shape = tuple(rng.randrange(1, 6) for _ in range(rng.randrange(1, 4)))
        t = torch.zeros(shape, dtype=dtype, device=device)
        if len(shape) > 1 and rng.random() < 0.5:
            t = t.transpose(0, 1)  # strided input: described as it is
        assert _aten.describe(t, dev, 1 << code, t.dim()) == (t.data_ptr(), code, tuple(t.shape), t.stride())
        assert _aten.describe(t, dev, 1 << code, 0) is not None           # any number of dims
        assert _aten.describe(t, dev, 1 << code, t.dim() + 1) is None      # another number of dims
        assert _aten.describe(t, dev, ~(1 << code) & 0xFF, 0) is None      # a dtype the argument does not take
        other = torch.device("meta" if device == "cpu" else "cpu")
        assert _aten.describe(t, other, 1 << code, 0) is None              # another device
    assert _aten.describe(torch.zeros(2, dtype=torch.float16, device=device), dev, 0xFF, 0) is None  # not epx's
    assert _aten.describe([1, 2], dev, 0xFF, 0) is None and _aten.describe(None, dev, 0xFF, 0) is None
    with pytest.raises(TypeError, match="device: expected a torch.device"):
        _aten.describe(torch.zeros(1), "cpu", 0xFF, 0)


def test_package_checks_refuse_with_the_argument_named(monkeypatch):
    from epx import _tensors
    from epx_test_utils import expect_error

    class Owner:
        _device = torch.device("cpu")
    b = Owner()
    x = torch.zeros((4, 8), dtype=torch.bfloat16)
    assert _tensors._desc(b, x, "x", _tensors._BF16, 2) == (x.data_ptr(), _C.DTYPE_BF16, (4, 8), (8, 1))
    with expect_error("InvalidArgument", "x", "expected a torch.Tensor", "list"):
        _tensors._desc(b, [1], "x", _tensors._BF16)
    with expect_error("InvalidArgument", "x", "bfloat16", "float32"):
        _tensors._desc(b, x.float(), "x", _tensors._BF16)
    with expect_error("InvalidArgument", "x", "3 dimensions", "(4, 8)"):
        _tensors._desc(b, x, "x", _tensors._BF16, 3)
    with expect_error("InvalidArgument", "x", "meta"):
        _tensors._desc(b, x.to("meta"), "x", _tensors._BF16)
    with expect_error("InvalidArgument", "topk_idx", "required"):
        _tensors._desc(b, None, "topk_idx", _tensors._I64)
