// The one table of EPX_* environment variables (name, default, meaning). Read nowhere else.
#pragma once

namespace epx::env {

// EPX_TIMEOUT_S (default 100): bound of every device and host wait, in seconds, when the Config
// does not set one. A Buffer reads it when it is made and at each set_config, not per operation.
double timeout_s();
// EPX_NODE_SIZE (default unset = the NVLink domain): ranks per (virtual) node, an integer in
// [1, kMaxRanks] that divides the NVLink domain; a Buffer made without BufferOptions::node_size
// splits its domain into nodes of this size, so the scale-out path runs inside one domain.
int node_size();
// EPX_DEBUG (default 0; 0 or 1): 1 = once an op step's kernels are launched (get_dispatch_layout,
// dispatch_notify, dispatch, combine, each low-latency send/receive half or fused launch), print one
// line to stderr naming the rank, a steady-clock time in ms and the step
// ("epx[rank 0] 1234.567 ms: dispatch launched"). Nothing is printed for other launches (abort
// words, staged copies).
bool debug();
// EPX_SIM_STAGED_COPIES (default 0): 1 = the host<->device copies of SimWorld code paths (the
// library's and the GPU test harness's) are staged through mapped pinned host memory and a copy
// kernel on the rank's stream instead of cudaMemcpyAsync (epx/sim_world.hpp says why: under
// compute-sanitizer a cudaMemcpyAsync waits for every other stream's running kernel). Parsed at
// each call; src/host/staged_copy.cpp reads it once per process.
bool sim_staged_copies();

}  // namespace epx::env
