// DeviceArena: a Buffer's own device memory and control stream.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>

namespace epx {

// Where a Buffer's own device memory comes from, and its control stream (zeroing, frees).
// Real ranks: cudaMalloc / cudaFree (one rank per process: a device-wide sync waits only for it).
// Simulated ranks (SimWorld): stream-ordered on `stream`, which joins every op's stream after the
// launch, so a free is ordered after every op issued before it and never waits for the other
// ranks' kernels (design.md §3). Shared with the handles whose storage it made (they may outlive
// the Buffer).
struct DeviceArena {
  DeviceArena(int device, bool stream_ordered);
  ~DeviceArena();
  void* alloc(size_t num_bytes);
  void free(void* ptr) noexcept;
  // Simulated ranks: `stream` waits for the work queued on `op_stream` so far (not while
  // op_stream is being captured into a CUDA graph: a graph's replays are the caller's to sync).
  void join(cudaStream_t op_stream);
  // Waits until every op joined so far (simulated) or all work of the device (real) is done.
  void quiesce(double timeout_s, const char* what, int rank);
  const int device;
  const bool stream_ordered;
  cudaStream_t stream = nullptr;
  cudaEvent_t joined = nullptr;
};

}  // namespace epx
