#!/usr/bin/env bash
# The main job (README): build, then the benchmark on every local GPU with the default workload
# (`ht` and `ll` of docs/benchmarks.md). Extra arguments go to epx_bench (see `epx_bench --help`); on
# one GPU, `--sim R` runs the workloads simulated (R ranks as threads; not NVLink numbers).
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/env.sh
mkdir -p build
if ! epx_build build > build/bench-build.log 2>&1; then
  tail -40 build/bench-build.log
  echo "bench.sh: build failed (full log: build/bench-build.log)" >&2
  exit 1
fi
exec ./build/bench/epx_bench "$@"
