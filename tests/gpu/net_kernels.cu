// Kernels of the scale-out contract tests (net_kernels.hpp): one sender and one receiver block
// per rank, templated over the backend of device/net.cuh.
#include "gpu/net_kernels.hpp"

#include "device/copy.cuh"
#include "device/net.cuh"
#include "device/net_emu.cuh"
#include "device/net_gin.cuh"

namespace epx::test {
namespace {

using device::kMaxNetContexts;
using device::kWarpSize;

template <typename View>
struct NetTestParams {
  NetTestArgs args;
  View net;
};

// Writes chunk c (src -> dst) at `at` in this rank's window: lane l writes the 16-byte vectors
// l, l + 32, ..., the ones it reads again in the put's copy (no other lane's write in between).
__device__ void write_chunk(char* at, const NetTestArgs& a, int src, int dst, int c, int lane) {
  const int num_vec = a.layout.chunk_bytes / 16;
  for (int v = lane; v < num_vec; v += kWarpSize) {
    uint4 w;
    w.x = payload(a.seed, src, dst, c, 4 * v);
    w.y = payload(a.seed, src, dst, c, 4 * v + 1);
    w.z = payload(a.seed, src, dst, c, 4 * v + 2);
    w.w = payload(a.seed, src, dst, c, 4 * v + 3);
    reinterpret_cast<uint4*>(at)[v] = w;
  }
}

// What one observed signal covers, copied out of the window at once.
__device__ void snapshot(const NetTestArgs& a, int slot, int lane) {
  const NetTestLayout& l = a.layout;
  device::coop_copy<4>(a.snapshot + l.chunk(slot), a.windows[a.topology.rank] + l.recv(slot), l.chunk_bytes, lane,
                       kWarpSize);
}

// Signal group g of context ctx covers data chunks c = ctx + 4k, k in [g * cps, (g + 1) * cps).
__device__ int chunks_on_context(int n, int ctx) { return n > ctx ? (n - ctx + kMaxNetContexts - 1) / kMaxNetContexts : 0; }

template <typename Net>
__device__ void send(const NetTestParams<typename Net::View>& p, typename Net::Warp& net, int warp, int lane) {
  const NetTestArgs& a = p.args;
  const NetTestLayout& l = a.layout;
  const TopologyView& t = a.topology;
  const int me = t.rank;
  char* window = a.windows[me];
  if (a.scenario == NetScenario::kDelivery) {
    // Hand-off: every warp puts one chunk to each rail peer on context 0, commits; after the
    // barrier warp 0 signals once per rail peer, covering all warps' puts.
    for (int node = 0; node < t.num_nodes(); ++node) {
      if (node == t.node_idx()) continue;
      const int dst = t.rail_peer(node);
      write_chunk(window + l.handoff_src(warp, dst), a, me, dst, l.max_chunks + warp, lane);
      net.put(0, dst, l.recv(l.handoff_slot(me, warp)), l.handoff_src(warp, dst), l.chunk_bytes);
    }
    net.commit();
    __syncthreads();
    if (warp == 0)
      for (int node = 0; node < t.num_nodes(); ++node)
        if (node != t.node_idx()) net.signal(0, t.rail_peer(node), l.sig_handoff(me), 1);
  }
  if (a.scenario == NetScenario::kHandOffWithoutCommit) {
    // As the hand-off above, but without commit: only warp 0's own puts precede its signal.
    for (int node = 0; node < t.num_nodes(); ++node) {
      if (node == t.node_idx()) continue;
      const int dst = t.rail_peer(node);
      write_chunk(window + l.handoff_src(warp, dst), a, me, dst, l.max_chunks + warp, lane);
      net.put(0, dst, l.recv(l.handoff_slot(me, warp)), l.handoff_src(warp, dst), l.chunk_bytes);
    }
    __syncthreads();
    if (warp == 0)
      for (int node = 0; node < t.num_nodes(); ++node)
        if (node != t.node_idx()) net.signal(0, t.rail_peer(node), l.sig_handoff(me), 1);
    // The receivers have read what the signal let them read; only now may the held puts go.
    for (int node = 0; node < t.num_nodes(); ++node)
      if (node != t.node_idx())
        device::net_wait_geq(a.op, net, l.sig_ack(t.rail_peer(node)), 1, Phase::kSend, t.rail_peer(node));
    net.flush();
    return;
  }
  const int dst = warp;
  if (dst >= t.num_ranks || t.same_node(dst)) return;
  const int n = num_chunks(a.seed, me, dst, l.max_chunks);
  switch (a.scenario) {
    case NetScenario::kDelivery:
      for (int c = 0; c < n; ++c) {
        const int ctx = c % kMaxNetContexts, k = c / kMaxNetContexts;
        write_chunk(window + l.src(dst, c), a, me, dst, c, lane);
        const bool last_of_group = (k + 1) % a.chunks_per_signal == 0 || k + 1 == chunks_on_context(n, ctx);
        if (last_of_group)
          net.put_signal(ctx, dst, l.recv(l.recv_slot(me, c)), l.src(dst, c), l.chunk_bytes, l.sig_data(me, ctx), 1);
        else
          net.put(ctx, dst, l.recv(l.recv_slot(me, c)), l.src(dst, c), l.chunk_bytes);
      }
      break;
    case NetScenario::kFlushReuse:
    case NetScenario::kReuseWithoutFlush:
      for (int c = 0; c < n; ++c) {
        write_chunk(window + l.staging(dst), a, me, dst, c, lane);
        net.put(0, dst, l.recv(l.recv_slot(me, c)), l.staging(dst), l.chunk_bytes);
        if (a.scenario == NetScenario::kFlushReuse) net.flush();
      }
      net.signal(0, dst, l.sig_data(me, 0), 1);
      break;
    case NetScenario::kCrossContext:
      for (int c = 0; c < n; ++c) {
        write_chunk(window + l.src(dst, c), a, me, dst, c, lane);
        net.put(0, dst, l.recv(l.recv_slot(me, c)), l.src(dst, c), l.chunk_bytes);
      }
      net.signal(1, dst, l.sig_data(me, 1), 1);
      // The receiver has read what the signal on context 1 let it read; only now may the puts
      // of context 0 go (in the adversarial mode they do, here).
      device::net_wait_geq(a.op, net, l.sig_ack(dst), 1, Phase::kSend, dst);
      net.flush();
      break;
    case NetScenario::kHandOffWithoutCommit:
      break;
  }
}

template <typename Net>
__device__ void receive(const NetTestParams<typename Net::View>& p, typename Net::Warp& net, int warp, int lane) {
  const NetTestArgs& a = p.args;
  const NetTestLayout& l = a.layout;
  const TopologyView& t = a.topology;
  const int me = t.rank;
  const int src = warp;
  if (src >= t.num_ranks || t.same_node(src)) return;
  const int n = num_chunks(a.seed, src, me, l.max_chunks);
  switch (a.scenario) {
    case NetScenario::kHandOffWithoutCommit:
      if (t.local_of(src) == t.local_idx()) {
        if (!device::net_wait_geq(a.op, net, l.sig_handoff(src), 1, Phase::kReceive, src)) return;
        for (int w = 0; w < l.num_warps; ++w) snapshot(a, l.handoff_slot(src, w), lane);
        __syncwarp();  // every lane's snapshot reads before the ack
        net.signal(0, src, l.sig_ack(me), 1);
      }
      break;
    case NetScenario::kDelivery:
      if (t.local_of(src) == t.local_idx()) {  // a rail peer: its hand-off chunks
        if (!device::net_wait_geq(a.op, net, l.sig_handoff(src), 1, Phase::kReceive, src)) return;
        for (int w = 0; w < l.num_warps; ++w) snapshot(a, l.handoff_slot(src, w), lane);
      }
      for (int ctx = 0; ctx < kMaxNetContexts; ++ctx) {
        const int on_ctx = chunks_on_context(n, ctx);
        for (int k0 = 0, group = 1; k0 < on_ctx; k0 += a.chunks_per_signal, ++group) {
          if (!device::net_wait_geq(a.op, net, l.sig_data(src, ctx), group, Phase::kReceive, src)) return;
          for (int k = k0; k < on_ctx && k < k0 + a.chunks_per_signal; ++k)
            snapshot(a, l.recv_slot(src, ctx + kMaxNetContexts * k), lane);
        }
      }
      break;
    case NetScenario::kFlushReuse:
    case NetScenario::kReuseWithoutFlush:
    case NetScenario::kCrossContext: {
      const int ctx = a.scenario == NetScenario::kCrossContext ? 1 : 0;
      if (!device::net_wait_geq(a.op, net, l.sig_data(src, ctx), 1, Phase::kReceive, src)) return;
      for (int c = 0; c < n; ++c) snapshot(a, l.recv_slot(src, c), lane);
      if (a.scenario == NetScenario::kCrossContext) {
        __syncwarp();  // every lane's snapshot reads before the ack
        net.signal(1, src, l.sig_ack(me), 1);
      }
      break;
    }
  }
}

template <typename Net>
__global__ void net_test_kernel(const __grid_constant__ NetTestParams<typename Net::View> p) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  typename Net::Warp net(p.net);
  if (blockIdx.x == 0)
    send<Net>(p, net, warp, lane);
  else
    receive<Net>(p, net, warp, lane);
  net.flush();
}

template <typename Net>
void launch(const NetTestArgs& args, cudaStream_t stream) {
  NetTestParams<EmuNetView> p;
  p.args = args;
  p.net.windows = args.windows;
  p.net.rank = args.topology.rank;
  p.net.num_ranks = args.topology.num_ranks;
  p.net.signal_offset = NetTestLayout::kSignalOffset;
  p.net.num_signals = args.layout.num_signals();
  net_test_kernel<Net><<<2, args.layout.num_warps * kWarpSize, 0, stream>>>(p);
}

#if EPX_HAVE_GIN
// GinNet: compiled against the NCCL headers here, never launched by the tests (no NIC).
template __global__ void net_test_kernel<device::GinNet>(const __grid_constant__ NetTestParams<GinNetView>);
#endif

}  // namespace

const char* scenario_name(NetScenario s) {
  switch (s) {
    case NetScenario::kDelivery: return "delivery";
    case NetScenario::kFlushReuse: return "flush_reuse";
    case NetScenario::kReuseWithoutFlush: return "reuse_without_flush";
    case NetScenario::kCrossContext: return "cross_context";
    case NetScenario::kHandOffWithoutCommit: return "hand_off_without_commit";
  }
  return "?";
}

void load_net_test_kernels() {
  cudaFuncAttributes attr;
  cudaFuncGetAttributes(&attr, net_test_kernel<device::EmuNetDirect>);
  cudaFuncGetAttributes(&attr, net_test_kernel<device::EmuNetAdversarial>);
}

void launch_net_test(const NetTestArgs& args, cudaStream_t stream) {
  if (args.mode == EmuMode::kAdversarial)
    launch<device::EmuNetAdversarial>(args, stream);
  else
    launch<device::EmuNetDirect>(args, stream);
}

}  // namespace epx::test
