#!/usr/bin/env bash
# Build, tests and benchmark in one command on a GPU machine; logs under $OUT, summary last.
#   tools/gpu-check.sh [bench args...]
# Stages (EPX_STAGES, default "tests bench"; each bounded by `timeout`):
#   tests   C++ CPU + GPU tests (ctest)            ~2-3 min on 4xH100
#   bench   epx_bench (ht + ll), args passed on     ~1-2 min
#   python  tests/python/run_gpu.sh: pytest on 2 and 4 GPUs, the MoE example, the overhead script
#           (~4-5 min: run it as a second call on the warm machine: EPX_STAGES=python)
set -uo pipefail
cd "$(dirname "$0")/.."
source tools/env.sh
OUT=${OUT:-/tmp/epx-out}
mkdir -p "$OUT"
stages=" ${EPX_STAGES:-tests bench} "
nvidia-smi -L > "$OUT/gpus.txt" 2>&1; nvidia-smi topo -m >> "$OUT/gpus.txt" 2>&1
t0=$(date +%s)
status=0
if [[ $stages == *" tests "* || $stages == *" bench "* ]]; then
  if ! epx_build build-gpu > "$OUT/build.log" 2>&1; then
    grep -E "error|Error" "$OUT/build.log" | head -40; echo "BUILD FAILED"; exit 1
  fi
  echo "build: $(( $(date +%s) - t0 )) s"
fi
if [[ $stages == *" tests "* ]]; then
  export EPX_TIMEOUT_S=${EPX_TIMEOUT_S:-20}
  timeout ${EPX_TEST_TIMEOUT:-400} ctest --test-dir build-gpu --output-on-failure ${EPX_CTEST_ARGS:-} \
    > "$OUT/tests.log" 2>&1 || status=1
  grep -E "Test +#.*(Gpu|Ll)|tests passed|tests failed" "$OUT/tests.log" | sed "s/  */ /g" | tail -30
fi
if [[ $stages == *" bench "* ]]; then
  # A hang becomes an error naming rank, peer and phase within seconds (library default: 100 s).
  EPX_TIMEOUT_S=${EPX_TIMEOUT_S:-20} timeout ${EPX_BENCH_TIMEOUT:-240} ./build-gpu/bench/epx_bench --json "$OUT/bench.json" "$@" > "$OUT/bench.log" 2>&1 || status=1
  tail -36 "$OUT/bench.log"
fi
if [[ $stages == *" python "* ]]; then
  PYTEST_TIMEOUT=${PYTEST_TIMEOUT:-360} EXAMPLE_TIMEOUT=${EXAMPLE_TIMEOUT:-150} OVERHEAD_TIMEOUT=${OVERHEAD_TIMEOUT:-60} \
    tests/python/run_gpu.sh build-python || status=1
fi
echo "--- summary ---"
grep -E "tests passed|tests failed" "$OUT/tests.log" 2>/dev/null
echo "total: $(( $(date +%s) - t0 )) s, status $status"
exit $status
