// Transport setup: the LSA (NVLink) pointer of every peer's symmetric buffer, read once on the
// device from the NCCL window and handed to the host, which passes them in each op's params.
#include <nccl.h>
#include <nccl_device.h>

#include "kernels/launch.cuh"
#include "kernels/ht_params.hpp"
#include "kernels/transport.hpp"

namespace epx::kernels {
namespace {

__global__ void query_peers_kernel(ncclDevComm dev_comm, ncclWindow_t window, void** out) {
  const int lsa_size = dev_comm.lsaSize;
  for (int p = threadIdx.x; p < lsa_size; p += blockDim.x) out[p] = ncclGetLsaPointer(window, 0, p);
}

}  // namespace

void launch_query_peers(const ncclDevComm& dev_comm, ncclWindow_t window, void** out, cudaStream_t stream) {
  query_peers_kernel<<<1, 32, 0, stream>>>(dev_comm, window, out);
}

void load_transport_kernels() { load_kernel(query_peers_kernel, "query_peers_kernel"); }

}  // namespace epx::kernels
