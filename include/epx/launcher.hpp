// Local launcher: runs `fn(rank, world, id)` in one forked process per visible GPU (or `world`
// processes) and shares the NCCL unique id through shared memory. Returns the number of ranks that
// failed (non-zero exit or signal); each child's exceptions are printed with its rank.
// For R ranks on one GPU (threads, no NCCL), see launch_sim in epx/sim_world.hpp.
#pragma once
#include <functional>
#include <nccl.h>

namespace epx {

// world <= 0: one process per visible GPU (counted without initializing CUDA in the parent).
int launch_local(int world, const std::function<int(int rank, int world, const ncclUniqueId& id)>& fn,
                 double timeout_s = 600.0);
// Number of visible GPUs, counted in a child process so the caller's CUDA state stays untouched.
int count_local_gpus();

}  // namespace epx
