#pragma once
#include <cuda_runtime_api.h>
#include <nccl.h>
#include <nccl_device.h>

namespace epx::kernels {
// out[p] = this rank's mapping of LSA peer p's window base, p < dev_comm.lsaSize.
void launch_query_peers(const ncclDevComm& dev_comm, ncclWindow_t window, void** out, cudaStream_t stream);
}  // namespace epx::kernels
