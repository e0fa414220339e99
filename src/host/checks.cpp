#include "host/checks.hpp"

#include "host/staged_copy.hpp"

#include <chrono>
#include <thread>
#include <vector>

namespace epx {

namespace {

// Polls `query` until it reports done; bounded by `timeout_s`.
template <typename Query>
void host_wait(Query query, double timeout_s, const char* what, int rank, const char* waited_for) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  for (int iter = 0;; ++iter) {
    const cudaError_t st = query();
    if (st == cudaSuccess) return;
    if (st != cudaErrorNotReady) EPX_FAIL(ErrorKind::kCuda, what, ": ", waited_for, " failed: ", cudaGetErrorString(st));
    if (std::chrono::steady_clock::now() > deadline) {
      if (rank < 0) EPX_FAIL(ErrorKind::kTimeout, what, ": waited more than ", timeout_s, " s for its ", waited_for);
      EPX_FAIL(ErrorKind::kTimeout, what, ": rank ", rank, " waited more than ", timeout_s, " s for its ", waited_for);
    }
    if (iter > 1000) std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
}

// The calling thread's events, one per device, made on first use and destroyed with the thread.
struct ThreadEvents {
  std::vector<cudaEvent_t> by_device;
  ~ThreadEvents() {
    for (cudaEvent_t e : by_device)
      if (e) cudaEventDestroy(e);
  }
};

}  // namespace

cudaEvent_t thread_event(int device) {
  thread_local ThreadEvents events;
  EPX_ARG_CHECK(device >= 0, "thread_event device: expected >= 0, got ", device);
  if (static_cast<size_t>(device) >= events.by_device.size()) events.by_device.resize(device + 1, nullptr);
  cudaEvent_t& e = events.by_device[device];
  if (e == nullptr) {
    int current = 0;
    EPX_CUDA_CHECK(cudaGetDevice(&current));
    if (current != device) EPX_CUDA_CHECK(cudaSetDevice(device));
    const cudaError_t st = cudaEventCreateWithFlags(&e, cudaEventDisableTiming);
    if (current != device) cudaSetDevice(current);
    if (st != cudaSuccess) e = nullptr;
    EPX_CUDA_CHECK(st);
  }
  return e;
}

void host_wait_stream(cudaStream_t stream, double timeout_s, const char* what, int rank) {
  // Outside the staged-copies mode (EPX_SIM_STAGED_COPIES, for compute-sanitizer) the stream is
  // queried. A capturing stream is queried too (which ends the capture with an error).
  const auto query = [&] { host_wait([stream] { return cudaStreamQuery(stream); }, timeout_s, what, rank, "stream"); };
  if (!detail::staged_copies()) return query();
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  EPX_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return query();
  // Through an event: under compute-sanitizer a wait for the stream itself may wait for every other
  // stream's running kernel (epx/sim_world.hpp); an event wait waits for this stream's work alone.
  int device = 0;
  EPX_CUDA_CHECK(cudaStreamGetDevice(stream, &device));
  const cudaEvent_t done = thread_event(device);
  EPX_CUDA_CHECK(cudaEventRecord(done, stream));
  host_wait_event(done, timeout_s, what, rank);
}

void host_wait_event(cudaEvent_t event, double timeout_s, const char* what, int rank) {
  host_wait([event] { return cudaEventQuery(event); }, timeout_s, what, rank, "ops");
}

}  // namespace epx
