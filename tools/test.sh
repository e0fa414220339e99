#!/usr/bin/env bash
# The test command (README; .ci/run calls it): build everything, the Python binding included, then
# run every test. GPU tests skip cleanly on a machine without enough GPUs; the CPU tests, C++ and
# Python, always run, and a Python test that cannot run fails the command.
#
# The binding and the Python tests use python3 when it has torch; otherwise a virtual environment
# with torch (from PyPI, ~5 GB with its CUDA libraries) is made once in EPX_VENV (default
# ~/.cache/epx/venv) and reused. EPX_PYTHON_TESTS=0 builds and tests without Python.
# Usage: tools/test.sh [build-dir]; EPX_CTEST_ARGS go to ctest (e.g. "-L sim": the GPU tests
# simulated on one GPU; "-L real": those on one GPU per rank).
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/env.sh
dir=${1:-build}
python_args=(-DEPX_BUILD_PYTHON=OFF)
if [ "${EPX_PYTHON_TESTS:-1}" != 0 ]; then
  py=$(command -v python3 || true)
  if [ -z "$py" ]; then
    echo "test.sh: python3 not found (EPX_PYTHON_TESTS=0 tests without Python)" >&2
    exit 1
  fi
  if ! "$py" -c "import torch" >/dev/null 2>&1; then
    venv=${EPX_VENV:-$HOME/.cache/epx/venv}
    if [ ! -x "$venv/bin/python" ]; then
      echo "test.sh: making $venv (torch and its CUDA libraries from PyPI, ~5 GB, once)"
      python3 -m venv --system-site-packages "$venv"
    fi
    py=$venv/bin/python
  fi
  # What the binding and its tests need (scikit-build-core only serves pip install).
  if ! "$py" -c "import torch, pybind11, pytest" >/dev/null 2>&1; then
    tools/python-deps.sh "$py"
  fi
  python_args=(-DEPX_BUILD_PYTHON=ON -DPython3_EXECUTABLE="$py")
fi
cmake -S . -B "$dir" $EPX_GENERATOR -DCMAKE_BUILD_TYPE=Release "${python_args[@]}"
cmake --build "$dir" -j "$EPX_JOBS"
export EPX_TIMEOUT_S=${EPX_TIMEOUT_S:-60}
status=0
ctest --test-dir "$dir" --output-on-failure ${EPX_CTEST_ARGS:-} || status=$?
# The Python CPU tests' own count (ctest shows them as one test).
if [ "${EPX_PYTHON_TESTS:-1}" != 0 ]; then
  summary=$(sed -n '/python_cpu_tests/,/^"python_cpu_tests" end time/p' "$dir/Testing/Temporary/LastTest.log" |
            grep -E "^=*.*[0-9]+ (passed|failed|error)" | tail -1 || true)
  if [ -n "$summary" ]; then
    echo "test.sh: Python CPU tests: $summary"
  elif [ -z "${EPX_CTEST_ARGS:-}" ]; then  # the full run must include them (a filter may leave them out)
    echo "test.sh: the Python CPU tests did not run (no pytest summary in the ctest log): failing" >&2
    status=1
  fi
fi
exit $status
