// Host-side call checks (CUDA, NCCL) and the bounded host wait.
#pragma once
#include <cuda_runtime_api.h>
#include <nccl.h>

#include "epx/error.hpp"

#define EPX_CUDA_CHECK(call)                                                                     \
  do {                                                                                           \
    const cudaError_t epx_err_ = (call);                                                         \
    if (epx_err_ != cudaSuccess)                                                                 \
      EPX_FAIL(::epx::ErrorKind::kCuda, #call, " failed: ", cudaGetErrorString(epx_err_));       \
  } while (0)

#define EPX_NCCL_CHECK(call)                                                                     \
  do {                                                                                           \
    const ncclResult_t epx_res_ = (call);                                                        \
    if (epx_res_ != ncclSuccess)                                                                 \
      EPX_FAIL(::epx::ErrorKind::kNccl, #call, " failed: ", ncclGetErrorString(epx_res_));       \
  } while (0)

namespace epx {

// Waits until all work on `stream` is done, at most `timeout_s`, by recording the calling thread's
// event on it and polling that (never cudaStreamSynchronize / cudaStreamQuery: epx/sim_world.hpp
// says why); on expiry throws Error(kTimeout) naming `what` and `rank` (rank < 0: none named).
void host_wait_stream(cudaStream_t stream, double timeout_s, const char* what, int rank);
// The same for the work before `event`'s last record.
void host_wait_event(cudaEvent_t event, double timeout_s, const char* what, int rank);
// The calling thread's reusable event on `device` (timing off), made on first use; for waits that
// record it and wait at once (not kept recorded across calls of others).
cudaEvent_t thread_event(int device);

}  // namespace epx
