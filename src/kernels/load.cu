// load_kernels: every epx kernel loaded before the first op (see ht_params.hpp for why).
#include <mutex>

#include "host/checks.hpp"
#include "kernels/ht_params.hpp"
#include "kernels/internode_params.hpp"
#include "kernels/scaleout_params.hpp"
#include "kernels/staged_copy_params.hpp"

namespace epx::kernels {

void load_kernels() {
  // Per process and device: the first Buffer of each device loads them into that device's context.
  static std::mutex mutex;
  static bool loaded[64] = {};
  int device = 0;
  EPX_CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mutex);
  if (device >= 0 && device < 64 && loaded[device]) return;
  load_abort_kernels();
  load_layout_kernels();
  load_layout_scaleout_kernels();
  load_notify_kernels();
  load_dispatch_kernels();
  load_combine_kernels();
  load_combine_rings_kernels();
  load_ll_dispatch_kernels();
  load_ll_combine_kernels();
  load_transport_kernels();
  load_internode_kernels();
  load_staged_copy_kernels();
  if (device >= 0 && device < 64) loaded[device] = true;
}

}  // namespace epx::kernels
