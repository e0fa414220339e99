#!/usr/bin/env bash
# The test command (README; .ci/run calls it): build, then every test. GPU tests skip cleanly on a
# machine without enough GPUs. The Python tests need torch: when python3 lacks it, a venv with it
# is made once (EPX_VENV, default ~/.cache/epx/venv; EPX_PYTHON_TESTS=0 skips this step).
# Usage: tools/test.sh [build-dir]; EPX_CTEST_ARGS go to ctest (e.g. "-L sim": the GPU tests
# simulated on one GPU; "-L real": those on one GPU per rank).
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/env.sh
dir=${1:-build}
pytest_python=$(command -v python3 || true)
if [ "${EPX_PYTHON_TESTS:-1}" != 0 ] && [ -n "$pytest_python" ] && ! python3 -c "import torch" >/dev/null 2>&1; then
  venv=${EPX_VENV:-$HOME/.cache/epx/venv}
  if { [ -x "$venv/bin/python" ] || python3 -m venv --system-site-packages "$venv"; } &&
     tools/python-deps.sh "$venv/bin/python"; then
    pytest_python=$venv/bin/python
  else
    echo "test.sh: could not set up torch for the Python tests; they will be reported as skipped" >&2
  fi
fi
cmake -S . -B "$dir" $EPX_GENERATOR -DCMAKE_BUILD_TYPE=Release ${pytest_python:+-DEPX_PYTEST_PYTHON="$pytest_python"}
cmake --build "$dir" -j "$EPX_JOBS"
export EPX_TIMEOUT_S=${EPX_TIMEOUT_S:-60}
ctest --test-dir "$dir" --output-on-failure ${EPX_CTEST_ARGS:-}
