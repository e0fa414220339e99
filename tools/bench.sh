#!/usr/bin/env bash
# The main job (README): build, then the benchmark on every local GPU with the default workload.
# Extra arguments go to epx_bench (see `epx_bench --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/env.sh
epx_build build >/dev/null
exec ./build/bench/epx_bench "$@"
