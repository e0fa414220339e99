#include "host/staged_copy.hpp"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <vector>

#include "host/checks.hpp"
#include "host/env.hpp"
#include "kernels/staged_copy_params.hpp"

namespace epx::detail {
namespace {

// The largest staging buffer; a larger copy goes through it in pieces.
constexpr size_t kMaxStagingBytes = size_t{8} << 20;
constexpr size_t kMinStagingBytes = size_t{64} << 10;

std::atomic<int> g_forced{-1};
std::atomic<uint64_t> g_staged_bytes{0};

// Mapped pinned host memory (portable: usable from every device). NOTE: never freed: cudaFreeHost
// may wait for the device's running kernels (a peer's, in a SimWorld); a thread's buffers go back
// to this process-wide pool when it ends and serve later threads.
struct Staging {
  char* host = nullptr;
  char* device = nullptr;  // the same memory as kernels address it (one address space: UVA)
  size_t num_bytes = 0;
};
std::mutex g_pool_mutex;
std::vector<Staging>* g_pool = new std::vector<Staging>();  // never destroyed (outlives threads)

struct ThreadStaging {
  Staging buf;
  ~ThreadStaging() {
    if (buf.host == nullptr) return;
    std::lock_guard<std::mutex> lock(g_pool_mutex);
    g_pool->push_back(buf);
  }
};

// The calling thread's staging buffer, at least min(num_bytes, kMaxStagingBytes) bytes.
Staging& staging(size_t num_bytes) {
  thread_local ThreadStaging mine;
  const size_t want = std::min(std::max(num_bytes, kMinStagingBytes), kMaxStagingBytes);
  if (mine.buf.num_bytes >= want) return mine.buf;
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  if (mine.buf.host) g_pool->push_back(mine.buf);
  mine.buf = Staging{};
  for (size_t i = 0; i < g_pool->size(); ++i) {
    if ((*g_pool)[i].num_bytes < want) continue;
    mine.buf = (*g_pool)[i];
    g_pool->erase(g_pool->begin() + static_cast<std::ptrdiff_t>(i));
    return mine.buf;
  }
  size_t size = kMinStagingBytes;
  while (size < want) size *= 2;
  void* host = nullptr;
  EPX_CUDA_CHECK(cudaHostAlloc(&host, size, cudaHostAllocMapped | cudaHostAllocPortable));
  void* device = nullptr;
  EPX_CUDA_CHECK(cudaHostGetDevicePointer(&device, host, 0));
  mine.buf = Staging{static_cast<char*>(host), static_cast<char*>(device), size};
  return mine.buf;
}

double bound(double timeout_s) { return timeout_s >= 0 ? timeout_s : env::timeout_s() + 10; }

// One staged piece: device <-> the staging buffer by the copy kernel, waited for.
void staged_piece(void* dst, const void* src, size_t num_bytes, cudaStream_t stream, double timeout_s, const char* what,
                  int rank) {
  kernels::launch_staged_copy(kernels::StagedCopyParams{src, dst, num_bytes}, stream);
  EPX_CUDA_CHECK(cudaGetLastError());
  host_wait_stream(stream, timeout_s, what, rank);
  g_staged_bytes.fetch_add(num_bytes, std::memory_order_relaxed);
}

}  // namespace

bool staged_copies() {
  static const bool from_env = env::sim_staged_copies();
  const int forced = g_forced.load(std::memory_order_relaxed);
  return forced < 0 ? from_env : forced != 0;
}

void set_staged_copies(int mode) { g_forced.store(mode < 0 ? -1 : mode != 0 ? 1 : 0, std::memory_order_relaxed); }

uint64_t num_staged_bytes() { return g_staged_bytes.load(std::memory_order_relaxed); }

namespace {

// One copy either way (to_device: host `src` -> device `dst`), as copy_to_device / copy_to_host say.
void copy(void* dst, const void* src, size_t num_bytes, bool to_device, cudaStream_t stream, double timeout_s,
          const char* what, int rank) {
  if (num_bytes == 0) return;
  timeout_s = bound(timeout_s);
  if (!staged_copies()) {
    EPX_CUDA_CHECK(cudaMemcpyAsync(dst, src, num_bytes, to_device ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToHost,
                                   stream));
    host_wait_stream(stream, timeout_s, what, rank);
    return;
  }
  Staging& s = staging(num_bytes);
  try {
    for (size_t done = 0; done < num_bytes;) {
      const size_t n = std::min(s.num_bytes, num_bytes - done);
      char* to = static_cast<char*>(dst) + done;
      const char* from = static_cast<const char*>(src) + done;
      if (to_device) {
        std::memcpy(s.host, from, n);
        staged_piece(to, s.device, n, stream, timeout_s, what, rank);
      } else {
        staged_piece(s.device, from, n, stream, timeout_s, what, rank);
        std::memcpy(to, s.host, n);
      }
      done += n;
    }
  } catch (...) {
    s = Staging{};  // a copy kernel may still use it: leaked, never reused
    throw;
  }
}

}  // namespace

void copy_to_device(void* dst, const void* src, size_t num_bytes, cudaStream_t stream, double timeout_s,
                    const char* what, int rank) {
  copy(dst, src, num_bytes, /*to_device=*/true, stream, timeout_s, what, rank);
}

void copy_to_host(void* dst, const void* src, size_t num_bytes, cudaStream_t stream, double timeout_s,
                  const char* what, int rank) {
  copy(dst, src, num_bytes, /*to_device=*/false, stream, timeout_s, what, rank);
}

}  // namespace epx::detail
