#!/usr/bin/env bash
# Build, tests and benchmark in one command on a GPU machine; logs under $OUT, summary last.
#   tools/gpu-check.sh [bench args...]
# Stages (EPX_STAGES, default "tests bench"; each bounded by `timeout`; one device call holds
# 10 minutes, so run `sanitize` and `python` as calls of their own on the warm machine).
#   tests     C++ CPU + GPU tests (ctest): on one GPU the simulated (SimWorld) cases run at R = 2, 3,
#             4, 8 and the real ones skip with their reason; EPX_CTEST_ARGS adds ctest arguments
#             (e.g. "-L sim")
#   sanitize  compute-sanitizer memcheck, racecheck and synccheck over a SimWorld subset
#             (EPX_SANITIZE_FILTER, a gtest filter; each tool at most EPX_SANITIZE_TIMEOUT, 170 s),
#             with EPX_SIM_STAGED_COPIES=1 (the copies staged: see the stage's comment)
#   bench     epx_bench (ht + ll), args passed on; on one GPU: --sim ${EPX_SIM_WORLD:-4} (simulated);
#             bench.json, and bench.md: its tables by tools/perf_tables.py
#   python    tests/python/run_gpu.sh: pytest (real on >= 2 GPUs, simulated on one), the MoE example,
#             the overhead script (~4-5 min: a second call on the warm machine: EPX_STAGES=python)
set -uo pipefail
cd "$(dirname "$0")/.."
source tools/env.sh
OUT=${OUT:-/tmp/epx-out}
mkdir -p "$OUT"
num_gpus=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU" || true)
stages=" ${EPX_STAGES:-tests bench} "
nvidia-smi -L > "$OUT/gpus.txt" 2>&1; nvidia-smi topo -m >> "$OUT/gpus.txt" 2>&1
echo "gpus: $num_gpus; stages:$stages"
t0=$(date +%s)
status=0
if [[ $stages == *" tests "* || $stages == *" bench "* || $stages == *" sanitize "* ]]; then
  if ! epx_build build-gpu > "$OUT/build.log" 2>&1; then
    grep -E "error|Error" "$OUT/build.log" | head -40; echo "BUILD FAILED"; exit 1
  fi
  echo "build: $(( $(date +%s) - t0 )) s"
fi
if [[ $stages == *" tests "* ]]; then
  export EPX_TIMEOUT_S=${EPX_TIMEOUT_S:-20}
  # --verbose: every test's own lines (cases, the time from a failure to the peers' errors) land in tests.log.
  timeout ${EPX_TEST_TIMEOUT:-420} ctest --test-dir build-gpu --verbose ${EPX_CTEST_ARGS:-} \
    > "$OUT/tests.log" 2>&1 || status=1
  grep -E "Test +#.*(Gpu|Ll|Sim)|tests passed|tests failed" "$OUT/tests.log" | grep -v "Skipped" | sed "s/  */ /g" | tail -40
  echo "skipped: $(grep -c "(Skipped)" "$OUT/tests.log")"
fi
if [[ $stages == *" sanitize "* ]]; then
  # Instrumented kernels run far slower: a longer device-wait bound keeps slow from reading as hung.
  # Under compute-sanitizer a cudaMemcpyAsync (H2D or D2H) or cudaStreamSynchronize on one stream
  # waits for the kernels running on every other stream (epx/sim_world.hpp): a SimWorld rank would
  # wait for a peer's kernel that waits for it. EPX_SIM_STAGED_COPIES=1 stages the copies of the
  # library and the harness through mapped host memory and a copy kernel, waited for by events.
  filter=${EPX_SANITIZE_FILTER:-"*HtWorld.MatchesReferenceInEveryMode/sim_world2:*LlWorld.MatchesReferenceInEveryMode/sim_world2:*GpuErrors.*/sim"}
  for tool in memcheck racecheck synccheck; do
    # In process: compute-sanitizer follows only the process it starts, not the harness's fork.
    EPX_SIM_STAGED_COPIES=1 EPX_TEST_IN_PROCESS=1 EPX_TIMEOUT_S=${EPX_SANITIZE_WAIT_S:-120} \
      timeout ${EPX_SANITIZE_TIMEOUT:-170} \
      compute-sanitizer --tool $tool --error-exitcode 9 ./build-gpu/tests/epx_gpu_tests --gtest_filter="$filter" \
      > "$OUT/sanitize-$tool.log" 2>&1
    rc=$?
    [ $rc -eq 0 ] || status=1
    echo "sanitize $tool (rc $rc$([ $rc -eq 124 ] && echo ": timed out")): $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/sanitize-$tool.log" | tail -1)" \
      "$(grep -E "^\[  (PASSED|FAILED) " "$OUT/sanitize-$tool.log" | tr '\n' ' ')"
  done
fi
if [[ $stages == *" bench "* ]]; then
  bench_args=("$@")
  if [ "$num_gpus" -lt 2 ]; then bench_args=(--sim "${EPX_SIM_WORLD:-4}" "$@"); fi
  # A hang becomes an error naming rank, peer and phase within seconds (library default: 100 s).
  EPX_TIMEOUT_S=${EPX_TIMEOUT_S:-20} timeout ${EPX_BENCH_TIMEOUT:-240} ./build-gpu/bench/epx_bench --json "$OUT/bench.json" \
    "${bench_args[@]}" > "$OUT/bench.log" 2>&1 || status=1
  tail -36 "$OUT/bench.log"
  # The run as docs/performance.md's tables (commit, machine, date per table).
  if [ -f "$OUT/bench.json" ] && command -v python3 >/dev/null 2>&1; then
    python3 tools/perf_tables.py "$OUT/bench.json" > "$OUT/bench.md" 2>&1 || true
  fi
fi
if [[ $stages == *" python "* ]]; then
  PYTEST_TIMEOUT=${PYTEST_TIMEOUT:-360} EXAMPLE_TIMEOUT=${EXAMPLE_TIMEOUT:-150} OVERHEAD_TIMEOUT=${OVERHEAD_TIMEOUT:-60} \
    tests/python/run_gpu.sh build-python || status=1
fi
echo "--- summary ---"
grep -E "tests passed|tests failed" "$OUT/tests.log" 2>/dev/null
echo "total: $(( $(date +%s) - t0 )) s, status $status"
exit $status
