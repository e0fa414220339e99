// The scale-out interface's contract (device/net.cuh), over the NVLink emulation in both modes, at
// several (world, node size) splits: on one GPU through SimWorld (sim_*), and on the GPUs of one
// host with NCCL windows, split into virtual nodes (real_*):
//  - Delivery: chunks over 4 contexts, a put_signal per group; a receiver that copies out what
//    each observed signal covers reads exactly the payload (source, destination, chunk, word);
//    hand-off: puts of every warp, committed, covered by one warp's signal.
//  - FlushBeforeReuse: one staging slot per destination, flushed before each rewrite.
//  - NEGATIVE, ReuseBeforeFlushIsCaught / CrossContextReadIsCaught / HandOffWithoutCommitIsCaught:
//    code that breaks the contract (rewrites a source before flush; reads data signalled on
//    another context; signals other warps' puts without their commit). The direct mode
//    happens to order it, so it reads right data there; the adversarial mode must make it read
//    wrong data, exactly the wrong data the contract allows. The test asserts both outcomes.
// Every case also checks each window at the end: every put landed once, nothing else was written.
#include <cuda_runtime_api.h>

#include <cstdio>
#include <functional>
#include <sstream>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "gpu/harness.hpp"
#include "epx/version.hpp"
#include "gpu/net_kernels.hpp"
#include "host/checks.hpp"
#include "host/net.hpp"
#include "host/symmetric.hpp"
#include "host/topology.hpp"
#include "reference/reference_scaleout.hpp"
#include "kernels/scaleout_params.hpp"

namespace epx::test {
namespace {

constexpr int kMaxChunks = 10;
constexpr int kChunkBytes = 256;
constexpr uint8_t kSnapshotSentinel = 0xEE;

// sim: a SimWorld on one GPU; real: one process per GPU, the windows NCCL's (LSA pointers).
struct NetCase {
  int world, node_size;
  EmuMode mode;
  WorldMode world_mode = WorldMode::kSim;
};
void PrintTo(const NetCase& c, std::ostream* os) {
  *os << mode_name(c.world_mode) << "_world" << c.world << "_node" << c.node_size
      << (c.mode == EmuMode::kAdversarial ? "_adversarial" : "_direct");
}
std::string case_name(const ::testing::TestParamInfo<NetCase>& info) {
  std::ostringstream os;
  PrintTo(info.param, &os);
  return os.str();
}
// Both emulator modes of every split, simulated; and real on the GPUs of one host (each a
// virtual-node split of the one NVLink domain) for the splits in `real`.
std::vector<NetCase> cases(const std::vector<std::pair<int, int>>& sim,
                           const std::vector<std::pair<int, int>>& real = {}) {
  std::vector<NetCase> out;
  for (WorldMode world_mode : {WorldMode::kSim, WorldMode::kReal})
    for (const auto& [world, node_size] : world_mode == WorldMode::kSim ? sim : real)
      for (EmuMode mode : {EmuMode::kDirect, EmuMode::kAdversarial})
        out.push_back({world, node_size, mode, world_mode});
  return out;
}
const std::vector<std::pair<int, int>> kRealSplits = {{2, 1}, {4, 1}, {4, 2}, {8, 2}, {8, 4}};

// What a receiver's snapshot of chunk c from `src` must hold, given the scenario and mode:
// 0 = the chunk's payload, 1 = the payload of chunk `n - 1` (a source rewritten before its put
// ran), 2 = the sentinel (the put had not landed).
int predicted(NetScenario s, EmuMode mode, int c, int n) {
  if (mode != EmuMode::kAdversarial) return 0;
  if (s == NetScenario::kReuseWithoutFlush) return c < n - 1 ? 1 : 0;
  if (s == NetScenario::kCrossContext) return 2;
  return 0;
}

struct Tally {
  int num_chunks = 0, num_wrong = 0;
};

// Compares one chunk (of snapshot or window) with what it must hold; throws naming the word.
void expect_chunk(const uint32_t* got, const std::function<uint32_t(int)>& want, const std::string& what) {
  for (int i = 0; i < kChunkBytes / 4; ++i)
    REQUIRE(got[i] == want(i), what, ": word ", i, " is ", got[i], ", want ", want(i));
}

void run_rank(int rank, int world, Communicator& comm, const NetCase& c, NetScenario scenario, uint64_t seed64,
              Tally& tally) {
  cudaStream_t stream = nullptr;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  {
    RankStream rank_stream_scope(stream);
    const uint32_t seed = static_cast<uint32_t>(seed64 ^ (seed64 >> 32));
    const Topology topo = Topology::make(world, rank, world, c.node_size);
    NetTestLayout l;
    l.num_ranks = world;
    l.num_warps = world;
    l.max_chunks = kMaxChunks;
    l.chunk_bytes = kChunkBytes;
    // Whole 2 MiB granules, as a Buffer asks for (an NCCL window's registration granularity).
    std::unique_ptr<SymmetricMemory> mem = SymmetricMemory::create(comm, align_up(l.num_bytes(), 1 << 21), 60);
    char* window = mem->local();
    CUDA_OK(cudaMemsetAsync(window, 0, l.recv_offset(), stream));  // sync area and signals
    CUDA_OK(cudaMemsetAsync(window + l.recv_offset(), kNetSentinel & 0xff, l.num_bytes() - l.recv_offset(), stream));
    DeviceMem windows = DeviceMem::from(std::vector<char*>(mem->peers(), mem->peers() + world));
    const size_t num_snapshot_bytes = l.chunk(l.num_recv_slots());
    DeviceMem snapshot(num_snapshot_bytes);
    snapshot.fill(kSnapshotSentinel);
    DeviceMem error(sizeof(ErrorRecord));
    error.fill(0);

    NetTestArgs a;
    a.scenario = scenario;
    a.mode = c.mode;
    a.seed = seed;
    a.chunks_per_signal = 1 + static_cast<int>(seed % 3);
    a.layout = l;
    a.topology = topo.view();
    a.windows = static_cast<char* const*>(windows.get());
    const std::vector<int> node = topo.node_ranks();
    for (int i = 0; i < topo.node_size; ++i) a.op.peers[i] = mem->peers()[node[i]];
    a.op.rank = topo.local_idx();
    a.op.num_ranks = topo.node_size;
    a.op.err = static_cast<ErrorRecord*>(error.get());
    a.op.timeout_ns = 30ull * 1000 * 1000 * 1000;
    a.snapshot = static_cast<char*>(snapshot.get());
    load_net_test_kernels();
    host_wait_stream(stream, 60, "the net test's stream", rank);
    comm.barrier(60);  // every window initialized before any rank puts

    launch_net_test(a, stream);
    CUDA_OK(cudaGetLastError());
    host_wait_stream(stream, 60, "the net test's stream", rank);
    comm.barrier(60);  // every rank's puts into this window done

    const std::vector<ErrorRecord> err = error.download<ErrorRecord>(1);
    REQUIRE(err[0].state == 0, "rank ", rank, ": device error kind ", err[0].kind, " phase ", err[0].phase, " peer ",
            err[0].peer, " observed ", err[0].observed, " expected ", err[0].expected);
    const std::vector<uint32_t> snap = snapshot.download<uint32_t>(num_snapshot_bytes / 4);
    std::vector<uint32_t> recv(num_snapshot_bytes / 4);
    download_bytes(recv.data(), window + l.recv_offset(), num_snapshot_bytes);
    const TopologyView v = topo.view();
    const uint32_t snapshot_word = 0x01010101u * kSnapshotSentinel;
    auto at = [&](const std::vector<uint32_t>& words, int slot) { return words.data() + l.chunk(slot) / 4; };
    for (int src = 0; src < world; ++src) {
      const bool sends = !v.same_node(src);
      const int n = num_chunks(seed, src, rank, kMaxChunks);
      for (int slot = 0; slot < kMaxChunks; ++slot) {
        const std::string what = detail::concat("rank ", rank, ": chunk ", slot, " from rank ", src, " (",
                                                scenario_name(scenario), ", seed ", seed, ")");
        const int s = l.recv_slot(src, slot);
        if (!sends || slot >= n || scenario == NetScenario::kHandOffWithoutCommit) {  // nothing may arrive here
          expect_chunk(at(recv, s), [](int) { return kNetSentinel; }, what + " (window, unused slot)");
          expect_chunk(at(snap, s), [&](int) { return snapshot_word; }, what + " (snapshot, unused slot)");
          continue;
        }
        const int p = predicted(scenario, c.mode, slot, n);
        const int shown = p == 1 ? n - 1 : slot;
        expect_chunk(at(snap, s), [&](int i) { return p == 2 ? kNetSentinel : payload(seed, src, rank, shown, i); },
                     what + (p == 0 ? " (snapshot)" : " (snapshot: the adversarial mode must show the violation)"));
        // In the end every put landed; a put whose source was rewritten first carried the rewrite.
        const int landed = scenario == NetScenario::kReuseWithoutFlush && c.mode == EmuMode::kAdversarial ? n - 1 : slot;
        expect_chunk(at(recv, s), [&](int i) { return payload(seed, src, rank, landed, i); }, what + " (window)");
        ++tally.num_chunks;
        tally.num_wrong += p != 0;
      }
      const bool hand_off = scenario == NetScenario::kDelivery || scenario == NetScenario::kHandOffWithoutCommit;
      for (int w = 0; w < l.num_warps; ++w) {  // hand-off chunks, from rail peers only
        const int s = l.handoff_slot(src, w);
        const std::string what = detail::concat("rank ", rank, ": hand-off chunk of warp ", w, " from rank ", src);
        if (hand_off && sends && v.local_of(src) == v.local_idx()) {
          // Without commit only the signalling warp's (0) puts are covered: the adversarial mode
          // still holds the others'.
          const bool held = scenario == NetScenario::kHandOffWithoutCommit && c.mode == EmuMode::kAdversarial && w != 0;
          expect_chunk(at(snap, s), [&](int i) { return held ? kNetSentinel : payload(seed, src, rank, kMaxChunks + w, i); },
                       what + (held ? " (snapshot: the adversarial mode must show the violation)" : " (snapshot)"));
          expect_chunk(at(recv, s), [&](int i) { return payload(seed, src, rank, kMaxChunks + w, i); }, what + " (window)");
          ++tally.num_chunks;
          tally.num_wrong += held;
        } else {
          expect_chunk(at(recv, s), [](int) { return kNetSentinel; }, what + " (window, unused slot)");
        }
      }
    }
    comm.barrier(60);  // no peer still reads or writes the windows
  }
  CUDA_OK(cudaStreamDestroy(stream));
}

// Runs the scenario on a SimWorld; every rank checks its snapshot and window against what the
// contract predicts for the mode (exactly: right data, or exactly the wrong data the violation
// allows), and the child also requires the adversarial mode to have shown a negative scenario's
// violation in at least one chunk.
void run_case(const NetCase& c, NetScenario scenario) {
  const uint64_t seed = run_seed();
  const bool negative = scenario == NetScenario::kReuseWithoutFlush || scenario == NetScenario::kCrossContext ||
                        scenario == NetScenario::kHandOffWithoutCommit;
  const bool must_show = negative && c.mode == EmuMode::kAdversarial;
  if (c.world_mode == WorldMode::kReal) {
    // Each rank checks its own chunks; in a negative case every rank has sources on another node
    // whose chunks the adversarial mode must show wrong.
    EXPECT_EQ(run_world(WorldMode::kReal, c.world, 64 << 20, Config{}, [&](RankCtx& ctx) {
      Tally tally;
      run_rank(ctx.rank, ctx.world, *ctx.comm, c, scenario, seed, tally);
      REQUIRE(must_show ? tally.num_wrong > 0 : tally.num_wrong == 0, "rank ", ctx.rank, ": ", tally.num_wrong,
              " of ", tally.num_chunks, " chunks read wrong");
      std::printf("net %s %s real world %d node %d rank %d: %d chunks checked, %d read wrong (as predicted)\n",
                  scenario_name(scenario), c.mode == EmuMode::kAdversarial ? "adversarial" : "direct", c.world,
                  c.node_size, ctx.rank, tally.num_chunks, tally.num_wrong);
    }), 0);
    return;
  }
  const int rc = run_in_child([&] {
    std::vector<Tally> tallies(c.world);
    const int failed = launch_sim(c.world, [&](int rank, int world, Communicator& comm) {
      run_rank(rank, world, comm, c, scenario, seed, tallies[rank]);
      return 0;
    }, 0, 120);
    if (failed != 0) return 1;
    Tally total;
    for (const Tally& t : tallies) {
      total.num_chunks += t.num_chunks;
      total.num_wrong += t.num_wrong;
    }
    std::printf("net %s %s world %d node %d: %d chunks checked, %d read wrong (as predicted)\n",
                scenario_name(scenario), c.mode == EmuMode::kAdversarial ? "adversarial" : "direct", c.world,
                c.node_size, total.num_chunks, total.num_wrong);
    if (must_show && total.num_wrong == 0) {
      std::printf("net: the adversarial mode did not expose the violation\n");
      return 1;
    }
    return must_show || total.num_wrong == 0 ? 0 : 1;
  }, 200);
  EXPECT_EQ(rc, 0);
}

class NetContract : public ::testing::TestWithParam<NetCase> {};

TEST_P(NetContract, Delivery) {
  SKIP_UNLESS_RUNNABLE(GetParam().world_mode, GetParam().world);
  run_case(GetParam(), NetScenario::kDelivery);
}

TEST_P(NetContract, FlushBeforeReuse) {
  SKIP_UNLESS_RUNNABLE(GetParam().world_mode, GetParam().world);
  run_case(GetParam(), NetScenario::kFlushReuse);
}

INSTANTIATE_TEST_SUITE_P(Splits, NetContract,
                         ::testing::ValuesIn(cases({{2, 1}, {4, 1}, {4, 2}, {8, 2}, {8, 4}, {16, 8}}, kRealSplits)),
                         case_name);

class NetContractNegative : public ::testing::TestWithParam<NetCase> {};

// Rewriting a put's source before flush: the adversarial mode runs the put at the signal, so
// every chunk but the last carries the last chunk's payload.
TEST_P(NetContractNegative, ReuseBeforeFlushIsCaught) {
  SKIP_UNLESS_RUNNABLE(GetParam().world_mode, GetParam().world);
  run_case(GetParam(), NetScenario::kReuseWithoutFlush);
}

// Reading data put on context 0 after a signal on context 1: the adversarial mode holds the puts
// until the sender's flush (after the receiver's ack), so the receiver reads the sentinel.
TEST_P(NetContractNegative, CrossContextReadIsCaught) {
  SKIP_UNLESS_RUNNABLE(GetParam().world_mode, GetParam().world);
  run_case(GetParam(), NetScenario::kCrossContext);
}

// Putting from several warps and signalling from one without commit: the adversarial mode holds
// the other warps' puts until their flush (after the receiver's ack), so the receiver reads the
// sentinel in their chunks (warp 0's own, which its signal covers, are right).
TEST_P(NetContractNegative, HandOffWithoutCommitIsCaught) {
  SKIP_UNLESS_RUNNABLE(GetParam().world_mode, GetParam().world);
  run_case(GetParam(), NetScenario::kHandOffWithoutCommit);
}

INSTANTIATE_TEST_SUITE_P(Splits, NetContractNegative,
                         ::testing::ValuesIn(cases({{2, 1}, {8, 2}, {16, 8}}, {{2, 1}, {4, 2}, {8, 4}})), case_name);

// ---- The two-level count exchange (kernels/count_exchange.cu) ---------------------------------

// Tokens rank `src` sends to rank `dst` in exchange `round`.
int exchange_count(uint64_t seed, int round, int src, int dst) {
  return static_cast<int>(net_mix(static_cast<uint32_t>(seed) ^ net_mix(static_cast<uint32_t>(round * 65536 + src * 256 + dst))) % 5000);
}

// Two exchanges back to back on each rank's stream (no host step between: the two-slot layout
// and the cumulative signals must carry them), over EmuNet; every rank must end each with the
// whole matrix, row s = rank s's counts.
constexpr int kExchangeRounds = 2;

void count_exchange_rank(int rank, int world, Communicator& comm, const NetCase& c, uint64_t seed) {
  constexpr int kRounds = kExchangeRounds;
  cudaStream_t stream = nullptr;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  {
    RankStream rank_stream_scope(stream);
    const Topology topo = Topology::make(world, rank, world, c.node_size);
    ScaleoutCountLayout layout;
    layout.num_ranks = world;
    layout.node_size = c.node_size;
    layout.base = 4096;  // after the SyncArea (the waits' abort words)
    std::unique_ptr<SymmetricMemory> mem = SymmetricMemory::create(comm, align_up(layout.end(), 1 << 21), 60);
    CUDA_OK(cudaMemsetAsync(mem->local(), 0, layout.end(), stream));
    DeviceMem windows = DeviceMem::from(std::vector<char*>(mem->peers(), mem->peers() + world));
    DeviceMem error(sizeof(ErrorRecord));
    error.fill(0);
    DeviceMem epoch(sizeof(uint64_t));
    epoch.fill(0);
    std::vector<DeviceMem> rows, matrices;
    for (int round = 0; round < kRounds; ++round) {
      std::vector<int> row(world);
      for (int r = 0; r < world; ++r) row[r] = exchange_count(seed, round, rank, r);
      rows.push_back(DeviceMem::from(row));
      matrices.emplace_back(sizeof(int) * world * world);
      matrices.back().fill(0xEE);
    }
    kernels::CountExchangeParams<EmuNetView> p{};
    const std::vector<int> node = topo.node_ranks();
    for (int i = 0; i < topo.node_size; ++i) p.ctx.peers[i] = mem->peers()[node[i]];
    p.ctx.rank = topo.local_idx();
    p.ctx.num_ranks = topo.node_size;
    p.ctx.err = static_cast<ErrorRecord*>(error.get());
    p.ctx.timeout_ns = 30ull * 1000 * 1000 * 1000;
    p.topology = topo.view();
    p.net.windows = static_cast<char* const*>(windows.get());
    p.net.rank = rank;
    p.net.num_ranks = world;
    p.net.signal_offset = layout.signals();
    p.net.num_signals = layout.num_nodes();
    p.layout = layout;
    p.epoch = static_cast<uint64_t*>(epoch.get());
    kernels::load_count_exchange_kernels();
    host_wait_stream(stream, 60, "the net test's stream", rank);
    comm.barrier(60);
    const EmuMode mode = c.mode;
    for (int round = 0; round < kRounds; ++round) {
      p.num_tokens_per_rank = static_cast<const int*>(rows[round].get());
      p.count_matrix = static_cast<int*>(matrices[round].get());
      kernels::launch_count_exchange(p, mode, stream);
      CUDA_OK(cudaGetLastError());
    }
    host_wait_stream(stream, 60, "the net test's stream", rank);
    comm.barrier(60);
    const std::vector<ErrorRecord> err = error.download<ErrorRecord>(1);
    REQUIRE(err[0].state == 0, "rank ", rank, ": device error kind ", err[0].kind, " phase ", err[0].phase,
            " peer ", err[0].peer, " observed ", err[0].observed, " expected ", err[0].expected);
    REQUIRE(epoch.download<uint64_t>(1)[0] == kRounds, "rank ", rank, ": epoch ", epoch.download<uint64_t>(1)[0]);
    for (int round = 0; round < kRounds; ++round) {
      const std::vector<int> got = matrices[round].download<int>(static_cast<size_t>(world) * world);
      for (int s = 0; s < world; ++s)
        for (int r = 0; r < world; ++r)
          REQUIRE(got[s * world + r] == exchange_count(seed, round, s, r), "rank ", rank, " exchange ", round,
                  ": count_matrix[", s, "][", r, "] = ", got[s * world + r], ", want ",
                  exchange_count(seed, round, s, r), " (rank ", s, " is on node ", s / c.node_size, ")");
    }
    comm.barrier(60);
  }
  CUDA_OK(cudaStreamDestroy(stream));
}

void run_count_exchange(const NetCase& c) {
  const uint64_t seed = run_seed();
  if (c.world_mode == WorldMode::kReal) {
    EXPECT_EQ(run_world(WorldMode::kReal, c.world, 64 << 20, Config{}, [&](RankCtx& ctx) {
      count_exchange_rank(ctx.rank, ctx.world, *ctx.comm, c, seed);
    }), 0);
    return;
  }
  const int rc = run_in_child([&] {
    const int failed = launch_sim(c.world, [&](int rank, int world, Communicator& comm) {
      count_exchange_rank(rank, world, comm, c, seed);
      return 0;
    }, 0, 120);
    if (failed == 0)
      std::printf("count exchange world %d node %d (%s): %d exchanges, every rank holds the whole matrix\n", c.world,
                  c.node_size, c.mode == EmuMode::kAdversarial ? "adversarial" : "direct", kExchangeRounds);
    return failed == 0 ? 0 : 1;
  }, 200);
  EXPECT_EQ(rc, 0);
}

class NetCountExchange : public ::testing::TestWithParam<NetCase> {};

TEST_P(NetCountExchange, EveryRankHoldsTheWholeMatrix) {
  SKIP_WITHOUT_SIM_WORLD(GetParam().world);
  run_count_exchange(GetParam());
}

INSTANTIATE_TEST_SUITE_P(Splits, NetCountExchange,
                         ::testing::ValuesIn(cases({{2, 1}, {4, 1}, {4, 2}, {8, 2}, {8, 4}, {16, 8}, {32, 8}}, kRealSplits)),
                         case_name);

// ---- get_dispatch_layout's num_tokens_per_rdma_rank (kernels/layout_scaleout.cu) ---------------

// The kernel alone on one GPU (it talks to no peer), for worlds a Buffer does not take yet, against
// the CPU reference; the output is pre-filled with a sentinel.
TEST(NetLayout, TokensPerRdmaRankMatchReference) {
  if (num_gpus() < 1) GTEST_SKIP() << "needs 1 GPU, found 0";
  const uint64_t seed = run_seed();
  EXPECT_EQ(run_in_child([&] {
    cudaStream_t stream = nullptr;
    CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    RankStream rank_stream_scope(stream);
    kernels::load_layout_scaleout_kernels();
    std::mt19937_64 rng(seed);
    for (const auto& [world, node_size] :
         std::vector<std::pair<int, int>>{{2, 1}, {4, 2}, {8, 2}, {8, 4}, {16, 8}, {64, 8}, {160, 8}, {256, 8}}) {
      for (int num_tokens : {0, 1, 300, 4096}) {
        const int num_topk = 8, num_experts = world * 4;
        std::vector<int64_t> topk_idx(static_cast<size_t>(num_tokens) * num_topk);
        for (int64_t& e : topk_idx) e = rng() % 8 == 0 ? -1 : static_cast<int64_t>(rng() % num_experts);
        const ref::Layout layout = ref::get_dispatch_layout(topk_idx, num_tokens, num_topk, num_experts, world);
        const std::vector<int> want = ref::num_tokens_per_rdma_rank(layout, num_tokens, world, node_size);
        std::vector<uint8_t> mask_bytes(layout.is_token_in_rank.begin(), layout.is_token_in_rank.end());
        DeviceMem mask = DeviceMem::from(mask_bytes.empty() ? std::vector<uint8_t>(1, 0) : mask_bytes);
        DeviceMem out(sizeof(int) * want.size());
        out.fill(0xEE);
        kernels::RdmaRankCountParams p{};
        p.is_token_in_rank = static_cast<const bool*>(mask.get());
        p.num_tokens = num_tokens;
        p.num_ranks = world;
        p.node_size = node_size;
        p.num_tokens_per_rdma_rank = static_cast<int*>(out.get());
        kernels::launch_rdma_rank_counts(p, stream);
        CUDA_OK(cudaGetLastError());
        const std::vector<int> got = out.download<int>(want.size());
        for (size_t n = 0; n < want.size(); ++n)
          REQUIRE(got[n] == want[n], "world ", world, " node ", node_size, " tokens ", num_tokens, ": node ", n,
                  " counts ", got[n], ", want ", want[n], " (seed ", seed, ")");
      }
    }
    std::printf("num_tokens_per_rdma_rank: 8 splits x 4 batch sizes match the reference\n");
    return 0;
  }, 120), 0);
}

// The Buffer's side: node_size is validated (a size that does not divide the NVLink domain names
// node_size; a split into several nodes without num_rdma_bytes names num_rdma_bytes), and
// get_dispatch_layout fills num_tokens_per_rdma_rank for its one node as the reference does.
class NetBuffer : public ::testing::TestWithParam<int> {};

TEST_P(NetBuffer, NodeSizeAndRdmaRankCounts) {
  SKIP_WITHOUT_SIM_WORLD(GetParam());
  const uint64_t seed = run_seed();
  EXPECT_EQ(run_world(WorldMode::kSim, GetParam(), 64 << 20, Config{}, [&](RankCtx& ctx) {
    const int R = ctx.world;
    REQUIRE(ctx.buffer->node_size() == R && ctx.buffer->num_nodes() == 1, "rank ", ctx.rank, ": node_size ",
            ctx.buffer->node_size(), ", num_nodes ", ctx.buffer->num_nodes());
    BufferOptions bad = ctx.options;
    bad.node_size = 3;
    require_error([&] { Buffer b(*ctx.comm, 64 << 20, bad); }, ErrorKind::kInvalidArgument,
                  {"node_size", "3", "does not divide the NVLink domain of " + std::to_string(R)});
    bad.node_size = 2;
    require_error([&] { Buffer b(*ctx.comm, 64 << 20, bad); }, ErrorKind::kInvalidArgument,
                  std::vector<std::string>{"num_rdma_bytes", "2 virtual nodes of 2"});
    InputSpec spec;
    spec.num_tokens = 300;
    spec.num_experts = 32;
    const ref::RankInput in = make_input(seed, ctx.rank, spec);
    const ref::Layout want = ref::get_dispatch_layout(in.topk_idx, spec.num_tokens, spec.num_topk, spec.num_experts, R);
    const std::vector<int> want_rdma = ref::num_tokens_per_rdma_rank(want, spec.num_tokens, R, R);
    DeviceMem topk = DeviceMem::from(in.topk_idx);
    DeviceMem per_rank(sizeof(int) * R), per_rdma(sizeof(int)), per_expert(sizeof(int) * spec.num_experts),
        in_rank(static_cast<size_t>(spec.num_tokens) * R);
    per_rdma.fill(0x7F);
    ctx.buffer->get_dispatch_layout(View::of(topk.get(), DType::kI64, {spec.num_tokens, spec.num_topk}),
                                    spec.num_experts, View::of(per_rank.get(), DType::kI32, {R}),
                                    View::of(per_rdma.get(), DType::kI32, {1}),
                                    View::of(per_expert.get(), DType::kI32, {spec.num_experts}),
                                    View::of(in_rank.get(), DType::kBool, {spec.num_tokens, R}), ctx.stream);
    ctx.buffer->synchronize(ctx.stream);
    expect_equal(per_rdma.download<int>(1), want_rdma, 1, "num_tokens_per_rdma_rank");
    expect_equal(per_rank.download<int>(R), want.num_tokens_per_rank, R, "num_tokens_per_rank");
  }), 0);
}

// EPX_NODE_SIZE is the node size of a Buffer made without BufferOptions::node_size (set before the
// ranks' threads start: the environment is the process's).
TEST_P(NetBuffer, EnvNodeSizeIsTheDefault) {
  SKIP_WITHOUT_SIM_WORLD(GetParam());
  const int world = GetParam();
  EXPECT_EQ(run_in_child([&] {
    for (const auto& [value, kind, needle] : std::vector<std::tuple<std::string, ErrorKind, std::string>>{
             {"3", ErrorKind::kInvalidArgument, "EPX_NODE_SIZE: 3 does not divide the NVLink domain of 4"},
             {"2", ErrorKind::kInvalidArgument, "2 virtual nodes of 2"}}) {
      setenv("EPX_NODE_SIZE", value.c_str(), 1);
      const int failed = launch_sim(world, [&](int, int, Communicator& comm) {
        Config config;
        config.num_sms = std::min(config.num_sms, comm.num_device_sms());
        BufferOptions options;
        options.config = config;
        require_error([&] { Buffer b(comm, 64 << 20, options); }, kind, needle);
        return 0;
      }, 0, 60);
      if (failed != 0) return 1;
    }
    unsetenv("EPX_NODE_SIZE");
    std::printf("EPX_NODE_SIZE=3 refused, =2 (virtual nodes without num_rdma_bytes) refused on every rank as named\n");
    return 0;
  }, 120), 0);
}

INSTANTIATE_TEST_SUITE_P(Sim, NetBuffer, ::testing::Values(4),
                         [](const ::testing::TestParamInfo<int>& info) { return "sim_world" + std::to_string(info.param); });

// GinNet is part of the build exactly when the NCCL headers have GIN; where it is, the version
// check passes only with the NCCL it was compiled against (checked on the CPU: no GPU needed).
TEST(NetGin, BuiltWhereTheHeadersHaveGin) {
#if defined(__has_include)
#if __has_include(<nccl_device/gin.h>)
  const bool headers_have_gin = NCCL_VERSION_CODE >= 22809;
#else
  const bool headers_have_gin = false;
#endif
#endif
  EXPECT_EQ(net_gin_compiled(), headers_have_gin);
  if (!net_gin_compiled()) {
    try {
      check_gin_usable();
      ADD_FAILURE() << "check_gin_usable passed in a build without GIN";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::kUnsupported) << e.what();
    }
    return;
  }
  if (nccl_loaded_version() == nccl_compiled_version()) {
    EXPECT_NO_THROW(check_gin_usable());
  } else {
    try {
      check_gin_usable();
      ADD_FAILURE() << "check_gin_usable passed with NCCL " << nccl_loaded_version() << " loaded";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::kNccl) << e.what();
    }
  }
  std::printf("GinNet built against NCCL %d, this process runs NCCL %d\n", nccl_compiled_version(),
              nccl_loaded_version());
}

}  // namespace
}  // namespace epx::test
