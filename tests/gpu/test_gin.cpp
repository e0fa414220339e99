// A world that spans NCCL nodes on a host without a GIN-capable NIC: two processes made to look
// like two nodes (NCCL_HOSTID differs per rank, so NCCL puts each in an NVLink domain of its own and
// connects them over its network transport; with one GPU both processes use it). A Buffer with num_rdma_bytes asks NCCL for GIN
// resources; without GIN both ranks must raise Error(kUnsupported) naming GIN and the NCCL version,
// never crash or hang, and tear down. Real ranks only: a SimWorld never asks for GIN.
#include <gtest/gtest.h>

#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "epx/version.hpp"
#include "gpu/harness.hpp"
#include "host/net_plan.hpp"
#include "host/plan.hpp"

namespace epx::test {
namespace {

int run_nodes_without_gin(int rank, int world, const ncclUniqueId& id) {
  try {
    // NCCL reads its host identity (NCCL_HOSTID replaces the hostname in its host hash) when the
    // communicator is made: set before that, in this rank's process only. The two "nodes" then talk
    // over NCCL's socket transport, on the loopback interface unless the caller chose one.
    const std::string host_id = detail::concat("epx-gin-test-node-", rank);
    REQUIRE(setenv("NCCL_HOSTID", host_id.c_str(), 1) == 0, "setenv NCCL_HOSTID");
    REQUIRE(setenv("NCCL_SOCKET_IFNAME", "lo", 0) == 0, "setenv NCCL_SOCKET_IFNAME");
    // One GPU per rank where there are enough; else they share: in NVLink domains of one rank
    // each (different NCCL hosts), two ranks on one GPU are no duplicate to NCCL.
    int num_devices = 0;
    REQUIRE(cudaGetDeviceCount(&num_devices) == cudaSuccess && num_devices > 0, "no GPU");
    Communicator comm(id, rank, world, rank % num_devices);
    REQUIRE(comm.local_size() == 1 && comm.num_nodes() == world, "NCCL_HOSTID=", host_id, ": expected an NVLink ",
            "domain of 1 rank (", world, " NCCL nodes), NCCL reports ", comm.local_size(), " of ", comm.world());
    BufferOptions options;
    options.config = Config::defaults(world);
    plan::RdmaShape shape{world, 1, options.config.num_sms, options.rdma_chunk_tokens, options.rdma_ring_slots,
                          2 * 1024, 8};
    options.num_rdma_bytes = plan::rdma_bytes_for(shape);
    const std::string version = nccl_version_string(nccl_loaded_version());
    try {
      Buffer buffer(comm, 64 << 20, options);
      throw Failure(detail::concat("rank ", rank, ": a Buffer across ", world,
                                   " NCCL nodes was made on this host (its NCCL ", version,
                                   " has GIN here): the test needs a host without a GIN-capable NIC"));
    } catch (const Error& e) {
      const std::string what = e.what();
      REQUIRE(e.kind() == ErrorKind::kUnsupported, "rank ", rank, ": expected Error(kUnsupported), got ",
              error_kind_name(e.kind()), ": ", what);
      REQUIRE(what.find("GIN") != std::string::npos, "rank ", rank, ": the message does not name GIN: ", what);
      REQUIRE(what.find(version) != std::string::npos, "rank ", rank, ": the message does not name NCCL ", version,
              ": ", what);
      REQUIRE(what.find(detail::concat("form ", world, " nodes of 1")) != std::string::npos, "rank ", rank,
              ": the message does not describe the world's nodes: ", what);
      std::printf("[world %d] rank %d: %s: %s\n", world, rank, error_kind_name(e.kind()), what.c_str());
    }
    // The communicator NCCL refused GIN takes no further window: a second Buffer is refused too.
    try {
      Buffer again(comm, 64 << 20, options);
      throw Failure(detail::concat("rank ", rank, ": a second Buffer was made after NCCL refused GIN"));
    } catch (const Error& e) {
      REQUIRE(e.kind() == ErrorKind::kUnsupported, "rank ", rank, ": second Buffer: expected Error(kUnsupported), got ",
              error_kind_name(e.kind()), ": ", e.what());
    }
    std::fflush(stdout);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[rank %d] FAILED: %s\n", rank, e.what());
    return 1;
  }
}

class GpuGin : public ::testing::TestWithParam<WorldMode> {};

TEST_P(GpuGin, NcclNodesWithoutGinAreUnsupportedOnEveryRank) {
  SKIP_UNLESS_RUNNABLE(GetParam(), 1);  // the two processes share GPU 0 when it is the only one
  // A hang (a rank left in a collective) ends at the launcher's bound and counts as failed ranks.
  EXPECT_EQ(launch_local(2, run_nodes_without_gin, 90), 0);
}

INSTANTIATE_TEST_SUITE_P(Gpu, GpuGin, ::testing::Values(WorldMode::kReal), mode_param_name);

}  // namespace
}  // namespace epx::test
