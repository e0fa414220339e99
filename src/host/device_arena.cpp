#include "host/device_arena.hpp"

#include "host/checks.hpp"

namespace epx {

DeviceArena::DeviceArena(int device, bool stream_ordered) : device(device), stream_ordered(stream_ordered) {
  EPX_CUDA_CHECK(cudaSetDevice(device));
  EPX_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  if (stream_ordered) EPX_CUDA_CHECK(cudaEventCreateWithFlags(&joined, cudaEventDisableTiming));
}

DeviceArena::~DeviceArena() {
  // Pending frees finish on their own: destroying a stream does not drop its queued work.
  if (joined) cudaEventDestroy(joined);
  if (stream) cudaStreamDestroy(stream);
}

void* DeviceArena::alloc(size_t num_bytes) {
  void* ptr = nullptr;
  if (num_bytes == 0) num_bytes = 16;
  if (stream_ordered) {
    EPX_CUDA_CHECK(cudaMallocAsync(&ptr, num_bytes, stream));
    // Usable on any stream once allocated: wait here, allocations are rare (creation, handles).
    const cudaError_t st = cudaStreamSynchronize(stream);
    if (st != cudaSuccess) {
      cudaFreeAsync(ptr, stream);
      EPX_FAIL(ErrorKind::kCuda, "cudaStreamSynchronize after cudaMallocAsync failed: ", cudaGetErrorString(st));
    }
  } else {
    EPX_CUDA_CHECK(cudaMalloc(&ptr, num_bytes));
  }
  return ptr;
}

void DeviceArena::free(void* ptr) noexcept {
  if (ptr == nullptr) return;
  if (stream_ordered) cudaFreeAsync(ptr, stream);
  else cudaFree(ptr);
}

void DeviceArena::join(cudaStream_t op_stream) {
  if (!stream_ordered) return;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  EPX_CUDA_CHECK(cudaStreamIsCapturing(op_stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return;
  EPX_CUDA_CHECK(cudaEventRecord(joined, op_stream));
  EPX_CUDA_CHECK(cudaStreamWaitEvent(stream, joined, 0));
}

void DeviceArena::quiesce(double timeout_s, const char* what, int rank) {
  if (stream_ordered) {
    host_wait_stream(stream, timeout_s, what, rank);
  } else {
    EPX_CUDA_CHECK(cudaSetDevice(device));
    EPX_CUDA_CHECK(cudaDeviceSynchronize());
  }
}

}  // namespace epx
