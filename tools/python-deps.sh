#!/usr/bin/env bash
# Installs what the Python binding and its tests need, only when missing: pybind11 (build),
# scikit-build-core (pip install .), pytest and torch (tests).
#   Usage: tools/python-deps.sh [python]      (default: $PYTHON or python3)
# torch comes from PyPI (its CUDA build: a large download) and brings the nvidia-nccl-cu13
# package: a build of the binding for this interpreter compiles epx against that NCCL
# (cmake/FindNCCL.cmake), since torch loads it at run time. A machine that has torch keeps its own.
set -euo pipefail
py=${1:-${PYTHON:-python3}}
where=$("$py" -c 'import sys; print(sys.executable)')
missing=()
for spec in pybind11:pybind11 scikit_build_core:scikit-build-core pytest:pytest torch:torch; do
  module=${spec%%:*} package=${spec#*:}
  if ! "$py" -c "import $module" >/dev/null 2>&1; then missing+=("$package"); fi
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "python-deps: all present for $where"
else
  echo "python-deps: installing ${missing[*]} for $where"
  "$py" -m pip install "${missing[@]}"
fi
# The binding also needs this interpreter's headers (Python.h).
if ! "$py" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
  echo "python-deps: Python.h not found for $where: install its development package (e.g. python3-dev)" >&2
  exit 1
fi
nccl=$("$py" -c 'import nvidia.nccl as m; print(list(m.__path__)[0])' 2>/dev/null || true)
if [ -n "$nccl" ] && [ -f "$nccl/include/nccl.h" ]; then
  version=$(awk '/define NCCL_(MAJOR|MINOR|PATCH) /{printf "%s%s", sep, $3; sep="."}' "$nccl/include/nccl.h")
  echo "python-deps: $where has NCCL $version ($nccl): a build of the binding for it uses that NCCL"
fi
