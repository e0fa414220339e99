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
  ctest --test-dir build-gpu --output-on-failure ${EPX_CTEST_ARGS:-} > "$OUT/tests.log" 2>&1 || status=1
  grep -E "seed|case .* ok|FAILED|Failed|SKIPPED|Passed|tests passed|Test +#" "$OUT/tests.log" | tail -60
fi
./build-gpu/bench/epx_bench --json "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log" | tail -40 || status=1
echo "--- summary ---"
grep -E "tests passed|tests failed" "$OUT/tests.log" 2>/dev/null
echo "total: $(( $(date +%s) - t0 )) s, status $status"
exit $status
