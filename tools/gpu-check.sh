#!/usr/bin/env bash
# The one command the GPU machine runs each session (device tool):
#   build, CPU tests, GPU tests (C++), benchmark; full logs under $OUT, summary table last.
# Usage: tools/gpu-check.sh [bench args...]   (EPX_SKIP_TESTS=1 to only benchmark)
set -uo pipefail
cd "$(dirname "$0")/.."
source tools/env.sh
OUT=${OUT:-/tmp/epx-out}
mkdir -p "$OUT"
nvidia-smi -L > "$OUT/gpus.txt" 2>&1; nvidia-smi topo -m >> "$OUT/gpus.txt" 2>&1
t0=$(date +%s)
if ! epx_build build-gpu > "$OUT/build.log" 2>&1; then
  grep -E "error|Error" "$OUT/build.log" | head -40; echo "BUILD FAILED"; exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s"
status=0
if [ "${EPX_SKIP_TESTS:-0}" != 1 ]; then
  export EPX_TIMEOUT_S=${EPX_TIMEOUT_S:-20}
  timeout ${EPX_TEST_TIMEOUT:-400} ctest --test-dir build-gpu --output-on-failure ${EPX_CTEST_ARGS:-} \
    > "$OUT/tests.log" 2>&1 || status=1
  grep -E "Test +#.*(Gpu|Ll)|tests passed|tests failed" "$OUT/tests.log" | sed "s/  */ /g" | tail -30
fi
timeout ${EPX_BENCH_TIMEOUT:-180} ./build-gpu/bench/epx_bench --json "$OUT/bench.json" "$@" > "$OUT/bench.log" 2>&1 || status=1
tail -32 "$OUT/bench.log"
echo "--- summary ---"
grep -E "tests passed|tests failed" "$OUT/tests.log" 2>/dev/null
echo "total: $(( $(date +%s) - t0 )) s, status $status"
exit $status
