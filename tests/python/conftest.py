"""pytest setup for the Python tests of epx.

Finds the package: EPX_BUILD_DIR/python (if set), else <repo>/build/python (the in-tree build of
`cmake --build build`), else an installed `epx`. Multi-rank GPU tests run each test function on
every rank, two ways, each with its marker:
  - `real`: a pool of processes, one per GPU (torch.distributed over NCCL on a free localhost
    port), at 2, 4 and 8 ranks; skipped when fewer GPUs are visible;
  - `sim`: R threads of this process on GPU 0 (an epx.SimWorld), at 2, 3, 4 and 8 ranks; skipped
    without a GPU or when the GPU holds fewer ranks.
`pytest -m sim` runs the simulated ones only (one GPU is enough), `-m real` the real ones.
Seeds: fresh per test and printed; EPX_TEST_SEED=<n> replays one.
"""
import os
import sys
from pathlib import Path

import pytest

# Simulated ranks share one GPU's hardware queues: more of them (read when CUDA makes its context,
# so before any CUDA call) keep one rank's queued work from holding back a peer's.
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")
# And every kernel loaded when the context is made: a lazily loaded kernel's first launch may wait
# for a peer rank's running kernel (docs/protocol.md, SimWorld).
os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")

_REPO = Path(__file__).resolve().parents[2]
REAL_WORLDS = (2, 4, 8)
SIM_WORLDS = (2, 3, 4, 8)


def _add_build_tree() -> None:
    build = os.environ.get("EPX_BUILD_DIR")
    candidate = (Path(build) if build else _REPO / "build") / "python"
    if (candidate / "epx" / "__init__.py").exists() and str(candidate) not in sys.path:
        sys.path.insert(0, str(candidate))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(candidate), os.environ.get("PYTHONPATH")]))


_add_build_tree()
_pools = {}


def require_epx():
    """For the test modules: skips them (with the reason) where torch or the built epx is missing,
    or fails them instead when EPX_REQUIRE_PYTHON_TESTS=1 (the test command's ctest run); a broken
    build (epx present but failing to import) always fails."""
    def missing(reason):
        if os.environ.get("EPX_REQUIRE_PYTHON_TESTS") == "1":
            pytest.fail(f"{reason} (EPX_REQUIRE_PYTHON_TESTS=1)", pytrace=False)
        pytest.skip(reason, allow_module_level=True)

    try:
        import torch
    except ModuleNotFoundError:
        missing("the Python tests need torch (tools/python-deps.sh installs it)")
    try:
        import epx
    except ModuleNotFoundError as e:
        missing(f"epx is not built ({e}): cmake -S . -B build && cmake --build build (EPX_BUILD_PYTHON=ON), "
                "or set EPX_BUILD_DIR")
    return torch, epx


def pytest_configure(config):
    config.addinivalue_line("markers", "real: multi-rank GPU test on real ranks (one process per GPU; needs R GPUs)")
    config.addinivalue_line("markers", "sim: multi-rank GPU test on simulated ranks (R threads on one GPU, "
                                       "epx.SimWorld; needs one GPU)")


class PoolHandle:
    """A rank pool of `world` ranks, real (processes) or simulated (threads), (re)started on demand.
    One simulated pool lives at a time (a SimWorld's ranks share the GPU's SMs)."""

    def __init__(self, mode: str, world: int) -> None:
        self.mode, self.world = mode, world

    def run(self, fn, *args, timeout_s: float = 300.0):
        from epx_test_utils import RankPool, SimRankPool
        key = (self.mode, self.world)
        pool = _pools.get(key)
        if pool is None or pool.broken:
            if self.mode == "sim":
                for other in [k for k in _pools if k[0] == "sim"]:
                    _pools.pop(other).close()
            pool = _pools[key] = (SimRankPool if self.mode == "sim" else RankPool)(self.world)
        return pool.run(fn, *args, timeout_s=timeout_s)


def pytest_sessionfinish(session, exitstatus):
    for pool in _pools.values():
        pool.close()
    _pools.clear()


_WORLD_PARAMS = ([pytest.param(("real", w), marks=pytest.mark.real, id=f"real-ep{w}") for w in REAL_WORLDS] +
                 [pytest.param(("sim", w), marks=pytest.mark.sim, id=f"sim-ep{w}") for w in SIM_WORLDS])


@pytest.fixture(scope="module", params=_WORLD_PARAMS)
def ranks(request):
    """Runs `fn(ctx, *args)` on every rank of a world (`ranks.run(fn, *args)` -> results by rank):
    real (2, 4, 8 GPUs; skipped without enough) or simulated (2, 3, 4, 8 threads on GPU 0; skipped
    without a GPU or where it holds fewer ranks)."""
    from epx_test_utils import num_gpus, sim_max_world
    mode, world = request.param
    have = num_gpus()
    if mode == "real" and have < world:
        pytest.skip(f"real: needs {world} GPUs, {have} visible (the simulated run of this test needs one)")
    if mode == "sim":
        if have < 1:
            pytest.skip("sim: needs a GPU")
        if world > sim_max_world():
            pytest.skip(f"sim: GPU 0 holds at most {sim_max_world()} simulated ranks, this test needs {world}")
    return PoolHandle(mode, world)


@pytest.fixture
def seed():
    from epx_test_utils import fresh_seed
    s = fresh_seed()
    print(f"[epx] EPX_TEST_SEED={s}")
    return s
