#include "host/checks.hpp"

#include <chrono>
#include <thread>

namespace epx {

void host_wait_stream(cudaStream_t stream, double timeout_s, const char* what, int rank) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  for (int iter = 0;; ++iter) {
    const cudaError_t st = cudaStreamQuery(stream);
    if (st == cudaSuccess) return;
    if (st != cudaErrorNotReady) EPX_FAIL(ErrorKind::kCuda, what, ": stream failed: ", cudaGetErrorString(st));
    if (std::chrono::steady_clock::now() > deadline)
      EPX_FAIL(ErrorKind::kTimeout, what, ": rank ", rank, " waited more than ", timeout_s, " s for its stream");
    if (iter > 1000) std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
}

}  // namespace epx
