# Sourced by the tools: a toolchain that works on the dev/CI machine and on the GPU machine.
# NVLink multicast stays off everywhere (it can take shared GPU hosts out of service).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi
if [ -x /opt/gcc/bin/g++ ] && ! command -v g++ >/dev/null 2>&1; then
  export CXX=/opt/gcc/bin/g++ CC=/opt/gcc/bin/gcc CUDAHOSTCXX=/opt/gcc/bin/g++
fi
EPX_GENERATOR=""
if command -v ninja >/dev/null 2>&1; then EPX_GENERATOR="-G Ninja"; fi
EPX_JOBS=${EPX_JOBS:-$(nproc)}
# Configure + build everything into $1 (default build/).
epx_build() {
  local dir=${1:-build}
  cmake -S . -B "$dir" $EPX_GENERATOR -DCMAKE_BUILD_TYPE=Release && cmake --build "$dir" -j "$EPX_JOBS"
}
export CUDA_MODULE_LOADING=${CUDA_MODULE_LOADING:-EAGER}  # SimWorld: a lazily loaded kernel's first launch may wait for a peer's running kernel (docs/protocol.md)
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-32}  # SimWorld: ranks share one GPU's hardware queues (docs/protocol.md)
