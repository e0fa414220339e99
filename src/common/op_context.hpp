// OpContext: what every op kernel needs to talk to its peers, part of each kernel's params struct.
// Plain data, built on the host (Buffer::Impl::context) and read on the device.
#pragma once
#include <cstdint>

#include "common/hd.hpp"
#include "common/layout.hpp"

namespace epx::device {

struct OpContext {
  char* peers[kMaxPeers];  // base of each rank's symmetric buffer (own included), LSA pointers
  int rank = 0;       // index into peers: the rank, or (a world across nodes) its local index
  int num_ranks = 0;  // entries of peers: the world, or (across nodes) the node's ranks
  int first_rank = 0; // world rank of peers[0] (0 within one node): error records name world ranks
  Workspace* ws = nullptr;
  ErrorRecord* err = nullptr;  // host-mapped
  uint64_t timeout_ns = 0;
  int op = 0;  // OpCode
  uint64_t plan[2] = {0, 0};  // this op's OpPlan words (host/plan.hpp): every rank must agree

  EPX_HD SyncArea* sync(int r) const {
    return reinterpret_cast<SyncArea*>(peers[r] + SymmetricLayout::kSyncOffset);
  }
  EPX_HD NotifyArea* notify(int r) const {
    return reinterpret_cast<NotifyArea*>(peers[r] + SymmetricLayout::kNotifyOffset);
  }
  EPX_HD char* rows(int r) const { return peers[r] + SymmetricLayout::kRowsOffset; }
  EPX_HD RingCtl* ring_ctl(int r) const {
    return reinterpret_cast<RingCtl*>(peers[r] + SymmetricLayout::kRingCtlOffset);
  }
};

}  // namespace epx::device
