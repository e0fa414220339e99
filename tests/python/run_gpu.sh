#!/usr/bin/env bash
# The Python layer on a GPU machine, in one command: builds the binding (build dir, default
# build-python), runs the Python tests (every multi-rank test real on as many GPUs as it needs, and
# simulated on GPU 0), then the overhead script (real ranks with 2 GPUs or more; else simulated ranks
# on GPU 0, then one real rank alone) and, with 2 GPUs or more, the MoE example.
# Full logs in $OUT (the device tool's output folder) or <build dir>/logs; a summary is printed last;
# the overhead table also as overhead.json and (tools/perf_tables.py) overhead.md.
#   Usage: tests/python/run_gpu.sh [build-dir]
#   Env: EPX_TEST_SEED (replay), PYTEST_ARGS (e.g. "-m sim": the simulated tests only, "-m real"),
#   and time limits in seconds: PYTEST_TIMEOUT (1200), EXAMPLE_TIMEOUT (600), OVERHEAD_TIMEOUT (300; real ranks),
#   OVERHEAD_SIM_TIMEOUT (60 each: simulated ranks on one GPU, then one real rank alone).
set -uo pipefail
cd "$(dirname "$0")/../.."
source tools/env.sh
dir=${1:-build-python}
logs=${OUT:-$dir/logs}
mkdir -p "$logs"
py=${PYTHON:-python3}
start=$(date +%s)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
overhead_label=(--label "epx $commit" --commit "$commit")
if ! { cmake -S . -B "$dir" $EPX_GENERATOR -DCMAKE_BUILD_TYPE=Release -DEPX_BUILD_PYTHON=ON -DEPX_BUILD_TESTS=OFF \
         -DEPX_BUILD_BENCH=OFF -DPython3_EXECUTABLE="$(command -v "$py")" > "$logs/configure.log" 2>&1 &&
       cmake --build "$dir" -j "$EPX_JOBS" --target epx_python > "$logs/build.log" 2>&1; }; then
  tail -40 "$logs/configure.log" "$logs/build.log"
  echo "run_gpu: BUILD FAILED"
  exit 1
fi
echo "run_gpu: built in $(( $(date +%s) - start )) s"
export EPX_BUILD_DIR=$dir EPX_TIMEOUT_S=${EPX_TIMEOUT_S:-60}
nvidia-smi --query-gpu=index,name,memory.used --format=csv > "$logs/gpus.txt" 2>&1 || true

timeout ${PYTEST_TIMEOUT:-1200} "$py" -m pytest tests/python -v -rs ${PYTEST_ARGS:-} > "$logs/pytest.log" 2>&1
rc_tests=$?
num_gpus=$("$py" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$num_gpus" -ge 2 ]; then
  timeout ${EXAMPLE_TIMEOUT:-600} "$py" examples/moe_layer.py > "$logs/moe_layer.log" 2>&1
  rc_example=$?
  timeout ${OVERHEAD_TIMEOUT:-300} "$py" tests/python/overhead.py --json "$logs/overhead.json" "${overhead_label[@]}" > "$logs/overhead.log" 2>&1
  rc_overhead=$?
else  # one rank per GPU: the example needs 2; the overhead script runs simulated ranks on GPU 0, then one real rank
  echo "[skipped: $num_gpus GPU(s); the example needs 2]" > "$logs/moe_layer.log"
  rc_example=0
  if [ "$num_gpus" -ge 1 ]; then
    timeout ${OVERHEAD_SIM_TIMEOUT:-60} "$py" tests/python/overhead.py --sim 2 --json "$logs/overhead.json" "${overhead_label[@]}" > "$logs/overhead.log" 2>&1
    rc_overhead=$?
    # One real rank alone: a rank's host cost without what simulated ranks add.
    timeout ${OVERHEAD_SIM_TIMEOUT:-60} "$py" tests/python/overhead.py --num-processes 1 --json "$logs/overhead-ep1.json" \
      "${overhead_label[@]}" >> "$logs/overhead.log" 2>&1 || rc_overhead=1
  else
    echo "[skipped: no GPU]" > "$logs/overhead.log"
    rc_overhead=0
  fi
fi

echo "=== pytest (rc $rc_tests) ==="
grep -E "^(FAILED|ERROR)|EPX_TEST_SEED" "$logs/pytest.log" | grep -B1 -E "^(FAILED|ERROR)" | head -40
tail -3 "$logs/pytest.log"
echo "=== examples/moe_layer.py (rc $rc_example) ==="
grep -E "^\[|moe_layer|failed" "$logs/moe_layer.log" | tail -12
echo "=== tests/python/overhead.py (rc $rc_overhead) ==="
tail -16 "$logs/overhead.log"
overhead_files=()
for f in "$logs/overhead.json" "$logs/overhead-ep1.json"; do [ -f "$f" ] && overhead_files+=("$f"); done
[ ${#overhead_files[@]} -gt 0 ] && "$py" tools/perf_tables.py "${overhead_files[@]}" > "$logs/overhead.md" 2>&1
echo "run_gpu: $(( $(date +%s) - start )) s in all; logs in $logs"
[ $rc_tests -eq 0 ] && [ $rc_example -eq 0 ] && [ $rc_overhead -eq 0 ]
