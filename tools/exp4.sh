#!/usr/bin/env bash
# Session 4 call 4: LL tests + LL bench, then the LL trace build.
cd "$(dirname "$0")/.."
source tools/env.sh
EPX_CTEST_ARGS="-R Ll|Lifecycle" EPX_TEST_TIMEOUT=200 EPX_BENCH_TIMEOUT=100 tools/gpu-check.sh --mode ll --iters 100
cmake -S . -B build-trace $EPX_GENERATOR -DCMAKE_BUILD_TYPE=Release -DEPX_BUILD_TESTS=OFF -DEPX_BUILD_PYTHON=OFF \
  -DCMAKE_CUDA_FLAGS=-DEPX_LL_TRACE > $OUT/trace-build.log 2>&1 && cmake --build build-trace -j 16 --target epx_bench >> $OUT/trace-build.log 2>&1 || { tail -20 $OUT/trace-build.log; exit 1; }
EPX_TIMEOUT_S=20 timeout 120 ./build-trace/bench/epx_bench --mode ll > $OUT/trace.log 2>&1
grep -c LLT $OUT/trace.log
