#include "host/checks.hpp"

#include <chrono>
#include <thread>

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
    if (std::chrono::steady_clock::now() > deadline)
      EPX_FAIL(ErrorKind::kTimeout, what, ": rank ", rank, " waited more than ", timeout_s, " s for its ", waited_for);
    if (iter > 1000) std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
}

}  // namespace

void host_wait_stream(cudaStream_t stream, double timeout_s, const char* what, int rank) {
  host_wait([stream] { return cudaStreamQuery(stream); }, timeout_s, what, rank, "stream");
}

void host_wait_event(cudaEvent_t event, double timeout_s, const char* what, int rank) {
  host_wait([event] { return cudaEventQuery(event); }, timeout_s, what, rank, "ops");
}

}  // namespace epx
