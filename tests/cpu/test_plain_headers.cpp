// The headers src/common shares between host and device compile as plain C++ on their own: they are
// included first here, before any CUDA header could define __device__ and hide device code in them.
#include "common/layout.hpp"
#include "common/ll_layout.hpp"
#include "common/op_context.hpp"
#include "common/rdma_layout.hpp"
#include "common/scaleout_layout.hpp"
#include "common/topology.hpp"

#include <gtest/gtest.h>

#include <vector>

namespace epx {
namespace {

// OpContext's accessors, callable on the host, address each peer's regions at the layout's offsets.
TEST(PlainHeaders, OpContextAddressesEveryPeersRegionsOnTheHost) {
  std::vector<char> windows[2] = {std::vector<char>(SymmetricLayout::kMinBytes),
                                  std::vector<char>(SymmetricLayout::kMinBytes)};
  device::OpContext ctx;
  ctx.num_ranks = 2;
  for (int r = 0; r < 2; ++r) ctx.peers[r] = windows[r].data();
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(reinterpret_cast<char*>(ctx.sync(r)), windows[r].data() + SymmetricLayout::kSyncOffset);
    EXPECT_EQ(reinterpret_cast<char*>(ctx.notify(r)), windows[r].data() + SymmetricLayout::kNotifyOffset);
    EXPECT_EQ(ctx.rows(r), windows[r].data() + SymmetricLayout::kRowsOffset);
    EXPECT_EQ(reinterpret_cast<char*>(ctx.ring_ctl(r)), windows[r].data() + SymmetricLayout::kRingCtlOffset);
  }
}

}  // namespace
}  // namespace epx
