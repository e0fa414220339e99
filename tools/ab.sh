#!/usr/bin/env bash
# Developer A/B on the GPU machine: builds build-gpu, then evaluates AB_RUNS (bash), in which
#   variant NAME "-DDEFINES"   builds a copy of the tree with those CUDA defines (spills allowed),
#                              its drivers at /tmp/v_NAME/build/bench/epx_bench and epx_sweep;
#   run LABEL BINARY ARGS...   runs an epx_bench or epx_sweep, log in $OUT/LABEL.log, prints its combine lines.
# Example: AB_RUNS='run A ./build-gpu/bench/epx_sweep --mode ht --sms 24 --combine-configs w3c8,w6c2' tools/ab.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source tools/env.sh
OUT=${OUT:-/tmp/epx-out}; mkdir -p "$OUT"
t0=$(date +%s)
epx_build build-gpu > "$OUT/build.log" 2>&1 || { grep -E "error" "$OUT/build.log" | head; echo BUILD FAILED; exit 1; }
echo "main built $(( $(date +%s) - t0 )) s"
# variant NAME "CUDA defines": a copy of the tree built with those defines (spills allowed)
variant() {
  local name=$1 defs=$2
  rm -rf /tmp/v_$name; mkdir -p /tmp/v_$name
  tar --exclude=./build-gpu --exclude=./build-ci --exclude=./build --exclude=./.git -cf - . | tar -xf - -C /tmp/v_$name
  sed -i 's/-Xptxas=-Werror//' /tmp/v_$name/CMakeLists.txt
  (cd /tmp/v_$name && cmake -S . -B build $EPX_GENERATOR -DCMAKE_BUILD_TYPE=Release "-DCMAKE_CUDA_FLAGS=$defs" > build.log 2>&1 &&
   cmake --build build -j 8 --target epx_bench epx_sweep >> build.log 2>&1) || { grep -E "error" /tmp/v_$name/build.log | head -5; echo "variant $name FAILED"; return 1; }
  echo "variant $name built $(( $(date +%s) - t0 )) s"
}
run() {  # label binary args...
  local label=$1 bin=$2; shift 2
  echo "=== $label: $*"
  EPX_TIMEOUT_S=20 timeout 150 $bin "$@" > "$OUT/$label.log" 2>&1 || echo "($label failed rc=$?)"
  grep -E "^(combine|nccl a2a combine|raw)" "$OUT/$label.log"
}
eval "${AB_RUNS:?}"
echo "total $(( $(date +%s) - t0 )) s"
