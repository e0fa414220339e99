// SimWorld: R expert-parallel ranks as threads of one process on ONE GPU (design.md §3).
//
// For developing and testing EP programs on a single GPU: every rank has its own thread, stream,
// Communicator and Buffer, exactly as in a real run; the Buffers' symmetric windows are slices of
// one device allocation, the host barrier is a thread barrier, and each rank may use SMs / R of the
// device, so all ranks' blocks are resident together and every protocol of epx runs as it does on
// R GPUs. Results are bit for bit those of a real run. Timings are NOT NVLink numbers (all ranks
// share one GPU's SMs and memory): use real GPUs to measure.
//
// Rules for code that runs in a SimWorld (they hold for epx itself):
//  - use the rank's own non-blocking stream; no cudaDeviceSynchronize, no cudaMemset/cudaMemcpy on
//    the legacy default stream, no cudaFree while peers run (each of these waits for, or serializes
//    behind, every rank's kernels, which may be waiting for this rank: a deadlock until timeout);
//  - copy device -> pageable host memory only once the rank's stream is done (or into pinned
//    memory): CUDA serializes such copies across streams, so one queued behind a rank's kernel
//    that waits for a peer holds up every other rank's copy;
//  - wait for a stream through an event (cudaEventRecord, then cudaEventSynchronize or polling
//    cudaEventQuery), not cudaStreamSynchronize; under compute-sanitizer (memcheck, measured on an
//    H200) a cudaStreamSynchronize of stream B, and a cudaMemcpyAsync H2D or D2H on B (pageable and
//    pinned alike), waits until a kernel running on another stream A ends; cudaMallocAsync,
//    cudaFreeAsync, cudaMemsetAsync, cudaHostAlloc, kernel launches and event record + sync do not.
//    Without the sanitizer none of them waits. To run a SimWorld under the sanitizer, set
//    EPX_SIM_STAGED_COPIES=1: epx's own host<->device copies (and its GPU test harness's) then go
//    through mapped pinned host memory and a copy kernel on the rank's stream, waited for by an
//    event (src/host/staged_copy.hpp); a program's own copies must do the same;
//  - capture CUDA graphs with cudaStreamCaptureModeThreadLocal (or Relaxed);
//  - load every kernel before the ranks' first op: with CUDA_MODULE_LOADING=LAZY a kernel's first
//    launch may wait for every running kernel of the process, a peer's waiting one included.
//    Export CUDA_MODULE_LOADING=EAGER (tools/env.sh does; a SimWorld sets it when CUDA has not
//    started yet), or call cudaFuncGetAttributes on your kernels first. epx loads its own kernels
//    when a Buffer is created.
//
// Example:
//   epx::launch_sim(4, [&](int rank, int world, epx::Communicator& comm) {
//     epx::Buffer buffer(comm, bytes);   // collective over the 4 threads
//     ...
//     return 0;
//   });
#pragma once
#include <functional>
#include <memory>
#include <string>

#include "epx/communicator.hpp"

namespace epx {

class SimWorld {
 public:
  // Fewest SMs a simulated rank must own (the low-latency receive needs one block per SM).
  static constexpr int kMinSmsPerRank = 4;
  // Largest R on `device`: min(kMaxWorldRanks, device SMs / kMinSmsPerRank). The whole world is
  // one NVLink domain; a Buffer's nodes hold at most kMaxRanks ranks, so a world beyond kMaxRanks
  // is split into virtual nodes (BufferOptions::node_size).
  static int max_world(int device = 0);
  // SMs each of `world` ranks would own on `device` (device SMs / world), without making a world.
  static int sms_per_rank(int world, int device = 0);

  // world in [2, max_world(device)]; `timeout_s` bounds every host collective (0 = EPX_TIMEOUT_S).
  // Creates `world` Communicators; creating them makes no CUDA call beyond device queries.
  explicit SimWorld(int world, int device = 0, double timeout_s = 0);
  // Frees what the ranks' Buffers left behind. Destroy the world after every rank's thread ended.
  ~SimWorld();
  SimWorld(const SimWorld&) = delete;
  SimWorld& operator=(const SimWorld&) = delete;

  int world() const;
  int device() const;
  // SMs each rank owns: the device's SMs / world (Communicator::num_device_sms()).
  int num_sms_per_rank() const;
  // The communicator of `rank`: use it from that rank's thread only.
  Communicator& comm(int rank);
  // `rank`'s thread failed and takes no further part: the peers' host collectives fail at once
  // with an error naming it (device waits end by their own timeout, naming the peer).
  void leave(int rank, const std::string& reason);

  struct State;  // internal (src/host/sim_world.cpp)
  State& state() { return *state_; }

 private:
  std::unique_ptr<State> state_;
};

// Runs fn(rank, world, comm) on `world` threads of this process on GPU `device` (the current
// device set in each thread), one SimWorld for the call. Returns the number of ranks that failed:
// fn returned non-zero or threw (the exception is printed with the rank; the rank leaves the world
// so its peers stop waiting for it). timeout_s: bound of the world's host collectives (0 =
// EPX_TIMEOUT_S).
int launch_sim(int world, const std::function<int(int rank, int world, Communicator& comm)>& fn, int device = 0,
               double timeout_s = 0);

}  // namespace epx
