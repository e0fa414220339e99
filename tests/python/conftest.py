"""pytest setup for the Python tests of epx.

Finds the package: EPX_BUILD_DIR/python (if set), else <repo>/build/python (the in-tree build of
`cmake --build build`), else an installed `epx`. GPU tests run each test function on every rank of
a pool of processes (one per GPU, torch.distributed over NCCL on a free localhost port) and skip
when fewer GPUs are visible. Seeds: fresh per test and printed; EPX_TEST_SEED=<n> replays one.
"""
import os
import sys
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[2]


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


class PoolHandle:
    """A rank pool of `world` processes that is (re)started on demand."""

    def __init__(self, world: int) -> None:
        self.world = world

    def run(self, fn, *args, timeout_s: float = 300.0):
        from epx_test_utils import RankPool
        pool = _pools.get(self.world)
        if pool is None or pool.broken:
            pool = _pools[self.world] = RankPool(self.world)
        return pool.run(fn, *args, timeout_s=timeout_s)


def pytest_sessionfinish(session, exitstatus):
    for pool in _pools.values():
        pool.close()
    _pools.clear()


@pytest.fixture(scope="module", params=[2, 4, 8], ids=lambda w: f"ep{w}")
def ranks(request):
    """Runs `fn(ctx, *args)` on 2, 4 or 8 GPU ranks (skipped without enough GPUs): `ranks.run(fn, *args)` -> results by rank."""
    from epx_test_utils import num_gpus
    world = request.param
    have = num_gpus()
    if have < world:
        pytest.skip(f"needs {world} GPUs, {have} visible")
    return PoolHandle(world)


@pytest.fixture
def seed():
    from epx_test_utils import fresh_seed
    s = fresh_seed()
    print(f"[epx] EPX_TEST_SEED={s}")
    return s
