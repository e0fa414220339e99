#!/usr/bin/env bash
# The test command (README; .ci/run calls it): build, then every test. GPU tests skip cleanly on a
# machine without enough GPUs. Usage: tools/test.sh [build-dir]
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/env.sh
dir=${1:-build}
epx_build "$dir"
export EPX_TIMEOUT_S=${EPX_TIMEOUT_S:-60}
ctest --test-dir "$dir" --output-on-failure
