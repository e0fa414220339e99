#include "epx/launcher.hpp"

#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

#include <cuda_runtime_api.h>

#include "epx/communicator.hpp"
#include "epx/error.hpp"
#include "host/checks.hpp"

namespace epx {
namespace {

// Shared between the forked ranks: rank 0 publishes the NCCL unique id here.
struct SharedId {
  std::atomic<int> state;  // 0 = not yet, 1 = id valid, 2 = rank 0 failed
  ncclUniqueId id;
};

int wait_child(pid_t pid, bool block) {
  int status = 0;
  const pid_t r = waitpid(pid, &status, block ? 0 : WNOHANG);
  if (r == 0) return -1;  // still running
  if (r < 0) return 1;
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  return 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
}

int run_rank(int rank, int world, SharedId* shared,
             const std::function<int(int, int, const ncclUniqueId&)>& fn) {
  try {
    if (rank == 0) {
      shared->id = Communicator::make_unique_id();
      shared->state.store(1);
    } else {
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
      while (shared->state.load() == 0) {
        if (std::chrono::steady_clock::now() > deadline)
          EPX_FAIL(ErrorKind::kTimeout, "launch_local: rank ", rank, " got no NCCL unique id from rank 0");
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
      EPX_CHECK(shared->state.load() == 1, ErrorKind::kState, "launch_local: rank 0 failed before sharing the id");
    }
    return fn(rank, world, shared->id);
  } catch (const std::exception& e) {
    if (rank == 0 && shared->state.load() == 0) shared->state.store(2);
    std::fprintf(stderr, "[rank %d] %s\n", rank, e.what());
    return 1;
  }
}

}  // namespace

int count_local_gpus() {
  int fds[2];
  EPX_CHECK(pipe(fds) == 0, ErrorKind::kState, "count_local_gpus: pipe() failed");
  const pid_t pid = fork();
  EPX_CHECK(pid >= 0, ErrorKind::kState, "count_local_gpus: fork() failed");
  if (pid == 0) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) n = 0;
    (void)!write(fds[1], &n, sizeof(n));
    _exit(0);
  }
  close(fds[1]);
  int n = 0;
  if (read(fds[0], &n, sizeof(n)) != sizeof(n)) n = 0;
  close(fds[0]);
  wait_child(pid, true);
  return n;
}

int launch_local(int world, const std::function<int(int, int, const ncclUniqueId&)>& fn, double timeout_s) {
  if (world <= 0) world = count_local_gpus();
  EPX_CHECK(world >= 1, ErrorKind::kUnsupported, "launch_local: no GPU visible (CUDA found 0 devices)");
  void* mem = mmap(nullptr, sizeof(SharedId), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  EPX_CHECK(mem != MAP_FAILED, ErrorKind::kState, "launch_local: mmap failed");
  auto* shared = new (mem) SharedId();
  shared->state.store(0);

  std::fflush(stdout);
  std::fflush(stderr);
  std::vector<pid_t> pids(world);
  for (int r = 0; r < world; ++r) {
    pids[r] = fork();
    EPX_CHECK(pids[r] >= 0, ErrorKind::kState, "launch_local: fork() failed for rank ", r);
    if (pids[r] == 0) {
      const int rc = run_rank(r, world, shared, fn);
      std::fflush(stdout);
      std::fflush(stderr);
      _exit(rc);
    }
  }
  // Reap; after the first failure the others get a grace period, then are killed (they may wait
  // on the failed rank forever inside an NCCL collective).
  int failed = 0, done = 0;
  std::vector<int> rc(world, -1);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  while (done < world) {
    for (int r = 0; r < world; ++r) {
      if (rc[r] >= 0) continue;
      const int s = wait_child(pids[r], false);
      if (s < 0) continue;
      rc[r] = s;
      ++done;
      if (s != 0) {
        std::fprintf(stderr, "launch_local: rank %d exited with status %d\n", r, s);
        if (failed++ == 0) {
          const auto grace = std::chrono::steady_clock::now() + std::chrono::seconds(15);
          if (grace < deadline) deadline = grace;
        }
      }
    }
    if (done < world && std::chrono::steady_clock::now() > deadline) {
      for (int r = 0; r < world; ++r) {
        if (rc[r] >= 0) continue;
        std::fprintf(stderr, "launch_local: killing rank %d (timed out)\n", r);
        kill(pids[r], SIGKILL);
        rc[r] = wait_child(pids[r], true);
        ++failed;
        ++done;
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  munmap(mem, sizeof(SharedId));
  return failed;
}

}  // namespace epx
