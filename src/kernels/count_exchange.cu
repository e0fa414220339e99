// The two-level count exchange across nodes (docs/scaleout.md §4): NVLink inside the node, one
// put per remote rail peer, so every rank ends with the whole [R, R] count matrix and takes the
// same capacity decisions. Layout and ordering contract: common/scaleout_layout.hpp.
#include "device/net.cuh"
#include "device/net_emu.cuh"
#include "device/net_gin.cuh"
#include "device/ptx.cuh"
#include "device/sync.cuh"
#include "kernels/launch.cuh"
#include "kernels/scaleout_params.hpp"

namespace epx::kernels {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ T* at(char* window, size_t offset) {
  return reinterpret_cast<T*>(window + offset);
}

// Scale-up: this rank's row into node_rows[e & 1][local] of every rank of its node, then its flag.
template <typename View>
__device__ void publish_row(const CountExchangeParams<View>& p, uint64_t e) {
  const TopologyView& t = p.topology;
  const ScaleoutCountLayout& l = p.layout;
  const int parity = static_cast<int>(e & 1);
  for (int local = 0; local < t.node_size; ++local) {
    int* row = at<int>(p.ctx.peers[local], l.node_row(parity, t.local_idx()));
    for (int r = threadIdx.x; r < t.num_ranks; r += blockDim.x) row[r] = p.num_tokens_per_rank[r];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    device::fence_acq_rel_sys();  // with the relaxed stores: a release of every thread's row
    for (int local = 0; local < t.node_size; ++local)
      device::st_relaxed_sys(at<uint64_t>(p.ctx.peers[local], l.flags()) + t.local_idx(), e);
  }
}

// Waits for the node's rows, then copies them into this rank's own block (the put source).
template <typename View>
__device__ bool gather_node_block(const CountExchangeParams<View>& p, uint64_t e) {
  const TopologyView& t = p.topology;
  const ScaleoutCountLayout& l = p.layout;
  const int parity = static_cast<int>(e & 1);
  char* own = p.ctx.peers[t.local_idx()];
  bool ok = true;
  if (threadIdx.x < t.node_size)
    ok = device::wait_geq(p.ctx, at<uint64_t>(own, l.flags()) + threadIdx.x, e, Phase::kCountExchange,
                          t.rank_of(t.node_idx(), threadIdx.x)).ok;
  if (!__syncthreads_and(ok)) return false;
  const int row_ints = static_cast<int>(l.row_bytes() / 4);
  const int* rows = at<int>(own, l.node_row(parity, 0));  // [U][row_ints], contiguous
  int* block = at<int>(own, l.block(parity, t.node_idx()));
  for (int i = threadIdx.x; i < t.node_size * row_ints; i += blockDim.x) block[i] = rows[i];
  __syncthreads();
  return true;
}

// Scale-out (warp 0): the node block to the rail peer on every other node, then the other nodes'
// blocks from this rank's rail peers.
template <typename Net>
__device__ bool exchange_blocks(const CountExchangeParams<typename Net::View>& p, uint64_t e) {
  bool ok = true;
  if (threadIdx.x < 32) {
    const TopologyView& t = p.topology;
    const ScaleoutCountLayout& l = p.layout;
    const int parity = static_cast<int>(e & 1);
    typename Net::Warp net(p.net);
    const size_t mine = l.block(parity, t.node_idx());
    for (int node = 0; node < t.num_nodes(); ++node)
      if (node != t.node_idx()) net.put_signal(0, t.rail_peer(node), mine, mine, l.block_bytes(), l.signal(t.node_idx()), 1);
    for (int node = 0; ok && node < t.num_nodes(); ++node)
      if (node != t.node_idx())
        ok = device::net_wait_geq(p.ctx, net, l.signal(node), e, Phase::kCountExchange, t.rail_peer(node));
    net.flush();
  }
  return __syncthreads_and(ok);
}

template <typename View>
__device__ void write_matrix(const CountExchangeParams<View>& p, uint64_t e) {
  const TopologyView& t = p.topology;
  const ScaleoutCountLayout& l = p.layout;
  const int parity = static_cast<int>(e & 1);
  char* own = p.ctx.peers[t.local_idx()];
  const int R = t.num_ranks, row_ints = static_cast<int>(l.row_bytes() / 4);
  for (int i = threadIdx.x; i < R * R; i += blockDim.x) {
    const int src = i / R, dst = i % R;
    const int* block = at<int>(own, l.block(parity, t.node_of(src)));
    p.count_matrix[i] = block[t.local_of(src) * row_ints + dst];
  }
}

template <typename Net>
__global__ void __launch_bounds__(kThreads) count_exchange_kernel(const __grid_constant__ CountExchangeParams<typename Net::View> p) {
  const uint64_t e = *p.epoch + 1;
  publish_row(p, e);
  if (!gather_node_block(p, e)) return;
  if (!exchange_blocks<Net>(p, e)) return;
  write_matrix(p, e);
  if (threadIdx.x == 0) *p.epoch = e;
}

}  // namespace

void launch_count_exchange(const CountExchangeParams<EmuNetView>& p, EmuMode mode, cudaStream_t stream) {
  if (mode == EmuMode::kAdversarial)
    count_exchange_kernel<device::EmuNetAdversarial><<<1, kThreads, 0, stream>>>(p);
  else
    count_exchange_kernel<device::EmuNetDirect><<<1, kThreads, 0, stream>>>(p);
}

#if EPX_HAVE_GIN
void launch_count_exchange(const CountExchangeParams<GinNetView>& p, cudaStream_t stream) {
  count_exchange_kernel<device::GinNet><<<1, kThreads, 0, stream>>>(p);
}
#endif

void load_count_exchange_kernels() {
  load_kernel(count_exchange_kernel<device::EmuNetDirect>, "count_exchange_kernel<EmuNetDirect>");
  load_kernel(count_exchange_kernel<device::EmuNetAdversarial>, "count_exchange_kernel<EmuNetAdversarial>");
#if EPX_HAVE_GIN
  load_kernel(count_exchange_kernel<device::GinNet>, "count_exchange_kernel<GinNet>");
#endif
}

}  // namespace epx::kernels
