// The host decisions of the scale-out transport (host/net_plan.hpp): which backend a Buffer uses,
// the GIN resources it asks NCCL for, and what the error says when a world across NCCL nodes has
// no GIN.
#include <gtest/gtest.h>

#include <set>
#include <string>

#include "common/rdma_layout.hpp"
#include "common/scaleout_layout.hpp"
#include "epx/limits.hpp"
#include "host/net_plan.hpp"

namespace epx {
namespace {

TEST(NetBackendChoice, OneNodeHasNoScaleOutLeg) {
  for (bool simulated : {false, true})
    for (int world : {1, 2, 8}) {
      EXPECT_EQ(choose_net_backend(simulated, world, world, 1), NetBackend::kNone) << world;
    }
  // A real world of two NVLink domains whose Buffer is one node is refused by the topology before
  // any backend is chosen; the choice itself asks nothing of NCCL.
  EXPECT_EQ(choose_net_backend(false, 16, 8, 1), NetBackend::kNone);
}

TEST(NetBackendChoice, VirtualNodesAndSimWorldsTakeTheEmulation) {
  // Virtual nodes inside one NVLink domain: every node split of 8 ranks.
  for (int node_size : {1, 2, 4}) EXPECT_EQ(choose_net_backend(false, 8, 8, 8 / node_size), NetBackend::kEmu);
  // A SimWorld is one NVLink domain whatever it reports: never GIN.
  EXPECT_EQ(choose_net_backend(true, 16, 16, 2), NetBackend::kEmu);
  EXPECT_EQ(choose_net_backend(true, 16, 8, 2), NetBackend::kEmu);
  EXPECT_EQ(choose_net_backend(true, 32, 4, 8), NetBackend::kEmu);
}

TEST(NetBackendChoice, RealNodesTakeGin) {
  EXPECT_EQ(choose_net_backend(false, 2, 1, 2), NetBackend::kGin);    // two processes as two NCCL nodes
  EXPECT_EQ(choose_net_backend(false, 16, 8, 2), NetBackend::kGin);   // two HGX nodes
  EXPECT_EQ(choose_net_backend(false, 16, 8, 4), NetBackend::kGin);   // virtual nodes of 4 in them
  EXPECT_EQ(choose_net_backend(false, 256, 8, 32), NetBackend::kGin);
  EXPECT_STREQ(net_backend_name(NetBackend::kGin), "GinNet");
  EXPECT_STREQ(net_backend_name(NetBackend::kEmu), "EmuNet");
  EXPECT_STREQ(net_backend_name(NetBackend::kNone), "none");
}

TEST(GinRequest, SignalsCoverTheRingsThenTheCountExchange) {
  for (int nodes : {2, 3, 4, 32})
    for (int channels : {1, 20, kMaxHtBlocks}) {
      const GinRequest r = gin_request(nodes, channels);
      RdmaLayout rdma;
      rdma.num_nodes = nodes;
      rdma.num_channels = channels;
      EXPECT_EQ(r.num_contexts, kMaxNetContexts);
      EXPECT_EQ(r.num_rdma_signals, rdma.num_signals());
      EXPECT_EQ(r.count_signal_base, r.num_rdma_signals);
      EXPECT_EQ(r.num_signals, r.count_signal_base + nodes);
      // Every id an op uses is in range and no two ops share one.
      std::set<int> ids;
      for (int m = 0; m < nodes; ++m)
        for (int c = 0; c < channels; ++c) {
          ids.insert(rdma.tail_signal(m, c));
          ids.insert(rdma.head_signal(m, c));
        }
      InternodeCountLayout count;
      for (int m = 0; m < nodes; ++m) ids.insert(r.count_signal_base + count.signal(m));
      EXPECT_EQ(static_cast<int>(ids.size()), r.num_signals) << nodes << " nodes, " << channels << " channels";
      EXPECT_EQ(*ids.begin(), 0);
      EXPECT_EQ(*ids.rbegin(), r.num_signals - 1);
    }
}

TEST(GinRequest, DevCommRequirementsAskForGinOnlyWhenGiven) {
  ncclDevCommRequirements plain;
  fill_dev_comm_requirements(plain, nullptr);
  EXPECT_FALSE(plain.lsaMultimem);
  EXPECT_EQ(plain.lsaBarrierCount, 1);
  EXPECT_EQ(plain.ginContextCount, 0);
  EXPECT_EQ(plain.ginSignalCount, 0);
  EXPECT_EQ(plain.ginCounterCount, 0);
  EXPECT_EQ(plain.barrierCount, 0);
  EXPECT_EQ(plain.railGinBarrierCount, 0);
  EXPECT_FALSE(plain.ginForceEnable);

  const GinRequest request = gin_request(2, 24);
  ncclDevCommRequirements gin;
  fill_dev_comm_requirements(gin, &request);
  EXPECT_FALSE(gin.lsaMultimem);
  EXPECT_EQ(gin.lsaBarrierCount, 1);
  EXPECT_EQ(gin.ginContextCount, kMaxNetContexts);
  EXPECT_EQ(gin.ginSignalCount, 2 * 2 * 24 + 2);
  EXPECT_EQ(gin.ginCounterCount, 0);
  EXPECT_EQ(gin.railGinBarrierCount, 0);
  EXPECT_FALSE(gin.ginForceEnable);
#ifdef NCCL_DEV_COMM_REQUIREMENTS_INITIALIZER
  EXPECT_EQ(gin.size, sizeof(ncclDevCommRequirements));
  EXPECT_EQ(gin.ginConnectionType, NCCL_GIN_CONNECTION_FULL);
#endif
}

TEST(GinUnavailable, MessageNamesTheWorldGinAndTheNcclVersion) {
  EXPECT_EQ(nccl_version_string(22809), "2.28.9");
  EXPECT_EQ(nccl_version_string(23007), "2.30.7");
  const std::string world = "the 2 ranks form 2 nodes of 1 (NVLink domain of 1)";
  const std::string reason = "ncclDevCommCreate with GIN resources (4 contexts, 6 signals) failed on rank 1: "
                             "invalid usage (GIN not supported.)";
  const std::string message = gin_unavailable_message(world, 22809, reason);
  EXPECT_EQ(message.rfind(world, 0), 0u) << message;
  EXPECT_NE(message.find("NCCL GIN"), std::string::npos) << message;
  EXPECT_NE(message.find("unavailable with NCCL 2.28.9"), std::string::npos) << message;
  EXPECT_NE(message.find(reason), std::string::npos) << message;
  EXPECT_NE(message.find("BufferOptions::node_size"), std::string::npos) << message;
}

}  // namespace
}  // namespace epx
