// Warp roles of the pipelined high-throughput kernels (Config::pipeline_send_warps /
// pipeline_send_blocks): a warp either pushes rows ("sender") or works on what arrived (reduce or
// copy-out), and gets its index among the grid's warps of that role.
#pragma once
#include "device/copy.cuh"

namespace epx::kernels {

struct WarpRole {
  bool sends;
  int index;  // among the grid's warps of this role
  int count;  // the grid's warps of this role
};

// send_blocks > 0: blocks [0, send_blocks) send, the others receive; else the first send_warps
// warps of every block send.
__device__ __forceinline__ WarpRole pipeline_role(int send_blocks, int send_warps) {
  const int warps = blockDim.x / device::kWarpSize, warp = threadIdx.x / device::kWarpSize;
  const int block = static_cast<int>(blockIdx.x), grid = static_cast<int>(gridDim.x);
  if (send_blocks > 0) {
    const bool sends = block < send_blocks;
    const int first = sends ? 0 : send_blocks, blocks = sends ? send_blocks : grid - send_blocks;
    return {sends, (block - first) * warps + warp, blocks * warps};
  }
  const bool sends = warp < send_warps;
  const int per_block = sends ? send_warps : warps - send_warps;
  return {sends, block * per_block + (sends ? warp : warp - send_warps), grid * per_block};
}

}  // namespace epx::kernels
