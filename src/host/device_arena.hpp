// DeviceArena: a Buffer's own device memory and control stream.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <mutex>
#include <vector>

namespace epx {

// Where a Buffer's own device memory comes from, and its control stream (zeroing, frees).
// Real ranks: cudaMalloc / cudaFree (one rank per process: a device-wide sync waits only for it).
// Simulated ranks (SimWorld): an event recorded after every op on the op's stream tells the host
// when this rank's work is done; memory is allocated and freed stream-ordered on the control
// stream, a free only after this rank's ops issued before it have finished, so nothing waits for
// the other ranks' kernels (design.md §3).
// NOTE: the control stream never waits on another stream (no cudaStreamWaitEvent): with more
// streams than hardware queues, a queued wait would block the queue it shares with a peer's
// stream, whose next kernel this rank's ops may be waiting for.
// Shared with the handles whose storage it made (they may outlive the Buffer).
class DeviceArena {
 public:
  DeviceArena(int device, bool simulated, int rank);
  ~DeviceArena();
  DeviceArena(const DeviceArena&) = delete;
  DeviceArena& operator=(const DeviceArena&) = delete;

  void* alloc(size_t num_bytes);
  // Simulated: waits (bounded) for this rank's ops so far, then frees stream-ordered; a wait that
  // times out leaks the memory with one printed line (frees run in destructors: no throw).
  void free(void* ptr) noexcept;
  // After an op's launch on `op_stream` (simulated ranks; nothing while op_stream is being
  // captured into a CUDA graph: a graph's replays are the caller's to synchronize).
  void join(cudaStream_t op_stream);
  // Waits until every op joined so far (simulated) or all work of the device (real) is done.
  void quiesce(const char* what);
  void set_timeout(double timeout_s) { timeout_s_ = timeout_s; }
  cudaStream_t stream() const { return stream_; }
  bool simulated() const { return simulated_; }

 private:
  void wait_ops(const char* what);
  const int device_;
  const bool simulated_;
  const int rank_;
  double timeout_s_ = 100;
  cudaStream_t stream_ = nullptr;
  std::mutex mutex_;  // handles may be freed from other threads
  struct Tracked {
    cudaStream_t stream;
    cudaEvent_t done;
  };
  std::vector<Tracked> tracked_;
};

}  // namespace epx
