// Host<->device copies that return when done, for code that runs in a SimWorld while peer ranks'
// kernels may be running (epx/sim_world.hpp, "copies"): the library's and the GPU test harness's.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace epx::detail {

// Copies `num_bytes` from host memory `src` to device memory `dst` (copy_to_device), or from device
// memory to host memory (copy_to_host), in order on `stream`, and returns when the copy is done:
// bounded by `timeout_s` (< 0: EPX_TIMEOUT_S + 10 s), Error(kTimeout) naming `what` and `rank`
// (rank < 0: none named). Host memory may be pageable or pinned.
//  - staged_copies() off (the default): cudaMemcpyAsync, then a wait for an event recorded after it.
//  - on: through the calling thread's mapped pinned staging buffer (grown as needed up to 8 MiB,
//    larger copies go in pieces) and the staged copy kernel on `stream`, each piece waited for by an
//    event. No cudaMemcpy*: under compute-sanitizer those wait for every other stream's running
//    kernel, here a peer's that may be spinning for this rank.
void copy_to_device(void* dst, const void* src, size_t num_bytes, cudaStream_t stream, double timeout_s = -1,
                    const char* what = "copy_to_device", int rank = -1);
void copy_to_host(void* dst, const void* src, size_t num_bytes, cudaStream_t stream, double timeout_s = -1,
                  const char* what = "copy_to_host", int rank = -1);

// Whether the copies above are staged: what EPX_SIM_STAGED_COPIES says (read once per process),
// unless set_staged_copies forced it.
bool staged_copies();
// Internal (tests): 1 = staged, 0 = plain, -1 = as EPX_SIM_STAGED_COPIES says. Process-wide.
void set_staged_copies(int mode);
// Bytes copied through the staged path since the process started (tests prove it was taken).
uint64_t num_staged_bytes();

}  // namespace epx::detail
