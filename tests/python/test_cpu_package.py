"""CPU tests of the package itself: its version, and the one NCCL it is built against and runs."""
import re
from pathlib import Path

from conftest import require_epx

torch, epx = require_epx()
from epx import _C, _version  # noqa: E402

_REPO = Path(__file__).resolve().parents[2]


def test_version_is_the_projects():
    # One version: CMakeLists.txt's project(); pyproject.toml reads it from there.
    declared = re.search(r"project\(epx VERSION ([0-9.]+)", (_REPO / "CMakeLists.txt").read_text()).group(1)
    assert epx.__version__ == declared
    assert "__version__" in epx.__all__


def test_runs_the_nccl_it_was_built_against():
    # Compiled NCCL device API code only works with the library version it was compiled against.
    built, loaded = _version.nccl_version_built, _C.nccl_version()
    assert built == loaded, f"built against NCCL {built}, runs {loaded}"
    # torch loads its libnccl.so.2 before epx's module, which then runs on it.
    major, minor, patch = torch.cuda.nccl.version()[:3]
    assert major * 10000 + minor * 100 + patch == loaded, f"torch runs NCCL {major}.{minor}.{patch}, epx {loaded}"
