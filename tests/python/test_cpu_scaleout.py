"""CPU tests of the scale-out options of the Python Buffer: node_size= (keyword-only) is validated
before the Buffer reaches its group, and reaches the core's BufferOptions.node_size."""
import inspect

import pytest

from conftest import require_epx

torch, epx = require_epx()
from epx_test_utils import expect_error  # noqa: E402
from test_cpu_api import _GroupReached, _StopAtGroup  # noqa: E402


def test_node_size_is_keyword_only_with_default_zero():
    p = inspect.signature(epx.Buffer.__init__).parameters["node_size"]
    assert p.kind == inspect.Parameter.KEYWORD_ONLY and p.default == 0


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True])
def test_node_size_must_be_a_non_negative_int(bad):
    with expect_error("InvalidArgument", "node_size"):
        epx.Buffer(_StopAtGroup(), num_nvl_bytes=1 << 20, node_size=bad)


@pytest.mark.parametrize("good", [0, 1, 2, 8])
def test_node_size_accepted_until_the_group(good):
    with pytest.raises(_GroupReached):
        epx.Buffer(_StopAtGroup(), num_nvl_bytes=1 << 20, node_size=good)


def test_core_buffer_takes_node_size():
    assert "node_size" in epx._C.Buffer.__init__.__doc__
