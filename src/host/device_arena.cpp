#include "host/device_arena.hpp"

#include <chrono>
#include <cstdio>
#include <thread>

#include "host/checks.hpp"

namespace epx {
namespace {
// Distinct op streams tracked at once; an op on one more stream replaces the oldest, after its
// event completed (waited for).
constexpr size_t kMaxTrackedStreams = 16;
}  // namespace

DeviceArena::DeviceArena(int device, bool simulated, int rank) : device_(device), simulated_(simulated), rank_(rank) {
  EPX_CUDA_CHECK(cudaSetDevice(device));
  EPX_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
}

DeviceArena::~DeviceArena() {
  // Queued frees finish on their own: destroying a stream does not drop its work.
  for (const Tracked& t : tracked_) cudaEventDestroy(t.done);
  if (stream_) cudaStreamDestroy(stream_);
}

void* DeviceArena::alloc(size_t num_bytes) {
  void* ptr = nullptr;
  if (num_bytes == 0) num_bytes = 16;
  if (!simulated_) {
    EPX_CUDA_CHECK(cudaMalloc(&ptr, num_bytes));
    return ptr;
  }
  EPX_CUDA_CHECK(cudaMallocAsync(&ptr, num_bytes, stream_));
  // Usable on any stream once allocated: wait here (allocations are rare: creation, handles),
  // through an event (epx/sim_world.hpp: no stream synchronize in a SimWorld).
  try {
    host_wait_stream(stream_, timeout_s_ + 10, "allocating Buffer memory", rank_);
  } catch (...) {
    cudaFreeAsync(ptr, stream_);
    throw;
  }
  return ptr;
}

void DeviceArena::free(void* ptr) noexcept {
  if (ptr == nullptr) return;
  if (!simulated_) {
    cudaFree(ptr);
    return;
  }
  try {
    wait_ops("freeing Buffer memory");
  } catch (const Error& e) {
    std::fprintf(stderr, "epx[rank %d]: leaking %p: %s\n", rank_, ptr, e.what());
    return;
  }
  cudaFreeAsync(ptr, stream_);
}

void DeviceArena::join(cudaStream_t op_stream) {
  if (!simulated_) return;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  EPX_CUDA_CHECK(cudaStreamIsCapturing(op_stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return;
  std::lock_guard<std::mutex> lock(mutex_);
  Tracked* slot = nullptr;
  for (Tracked& t : tracked_)
    if (t.stream == op_stream) slot = &t;
  if (slot == nullptr && tracked_.size() < kMaxTrackedStreams) {
    cudaEvent_t done = nullptr;
    EPX_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
    tracked_.push_back(Tracked{op_stream, done});
    slot = &tracked_.back();
  }
  if (slot == nullptr) {
    // Full: the oldest entry's ops must be done before its event is reused for this stream.
    slot = &tracked_.front();
    host_wait_event(slot->done, timeout_s_, "a Buffer op", rank_);
    slot->stream = op_stream;
  }
  EPX_CUDA_CHECK(cudaEventRecord(slot->done, op_stream));
}

void DeviceArena::wait_ops(const char* what) {
  std::lock_guard<std::mutex> lock(mutex_);
  for (const Tracked& t : tracked_) host_wait_event(t.done, timeout_s_, what, rank_);
}

void DeviceArena::quiesce(const char* what) {
  if (simulated_) {
    wait_ops(what);
    return;
  }
  EPX_CUDA_CHECK(cudaSetDevice(device_));
  EPX_CUDA_CHECK(cudaDeviceSynchronize());
}

}  // namespace epx
