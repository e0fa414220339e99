"""GPU tests (simulated, one GPU) of the Buffer's node_size= keyword: a size that does not divide
the NVLink domain (a SimWorld's whole world) is an error naming node_size; a split into several
(virtual) nodes without num_rdma_bytes names num_rdma_bytes (test_sim_internode.py runs the split
with it); the domain itself is accepted and reaches the core (node_size, num_nodes)."""
import pytest

from conftest import require_epx

torch, epx = require_epx()
from epx_test_utils import num_gpus  # noqa: E402

pytestmark = [pytest.mark.sim,
              pytest.mark.skipif(num_gpus() < 1, reason="sim: needs a GPU")]

WORLD = 4


def _make(group, node_size):
    bytes_ = epx.Buffer.get_nvl_buffer_size_hint(64, 512, group.size())
    try:
        buf = epx.Buffer(group, num_nvl_bytes=bytes_, node_size=node_size)
    except epx.EpxError as e:
        return e.kind, str(e)
    return "ok", (buf.runtime.node_size, buf.runtime.num_nodes)


@pytest.mark.parametrize("node_size,kind,needles", [
    (3, "InvalidArgument", ("node_size", "3", "does not divide the NVLink domain of 4")),
    (2, "InvalidArgument", ("2 virtual nodes of 2", "num_rdma_bytes")),
])
def test_node_size_refused_on_every_rank(node_size, kind, needles):
    for got_kind, message in epx.launch_sim(WORLD, _make, node_size):
        assert got_kind == kind, message
        for n in needles:
            assert n in message, message


@pytest.mark.parametrize("node_size", [0, WORLD])
def test_node_size_of_the_domain_accepted(node_size):
    assert epx.launch_sim(WORLD, _make, node_size) == [("ok", (WORLD, 1))] * WORLD
