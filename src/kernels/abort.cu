// Abort: a rank whose op failed on the host tells every peer (docs/protocol.md, the abort word).
#include "device/sync.cuh"
#include "kernels/ht_params.hpp"
#include "kernels/launch.cuh"

namespace epx::kernels {
namespace {

__global__ void raise_abort_kernel(const __grid_constant__ AbortParams p) {
  const device::OpContext& ctx = p.ctx;
  const int peer = static_cast<int>(threadIdx.x);
  if (peer < ctx.num_ranks && peer != ctx.rank) device::st_release_sys(&ctx.sync(peer)->abort[ctx.rank], p.word);
}

}  // namespace

void launch_raise_abort(const AbortParams& p, cudaStream_t stream) {
  raise_abort_kernel<<<1, 32, 0, stream>>>(p);
}

void load_abort_kernels() { load_kernel(raise_abort_kernel, "raise_abort_kernel"); }

}  // namespace epx::kernels
