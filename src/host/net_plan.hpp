// Host decisions of the scale-out transport that make no NCCL call (tests/cpu/test_net_plan.cpp):
// which backend a Buffer's ops across nodes use, the GIN resources its devComm asks NCCL for, and
// the words of the error when a world that spans NCCL nodes finds no GIN.
#pragma once
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include <nccl_device.h>

namespace epx {

enum class NetBackend {
  kNone,  // one node: no scale-out leg
  kEmu,   // every node inside one NVLink domain (virtual nodes, every SimWorld): EmuNet
  kGin,   // the world spans several NVLink domains (NCCL nodes): GinNet
};
const char* net_backend_name(NetBackend backend);

// The backend of a Buffer whose world of `world` ranks forms `num_nodes` nodes (real or virtual),
// on a communicator whose NVLink domain (NCCL LSA team; a SimWorld's whole world) has
// `nvlink_domain_size` ranks. Only a real communicator whose domain is smaller than its world
// takes GIN: virtual nodes inside one domain and SimWorlds never ask NCCL for GIN resources
// (on a host without a NIC that request fails and leaves NCCL 2.28.9's communicator unusable).
NetBackend choose_net_backend(bool simulated, int world, int nvlink_domain_size, int num_nodes);

// The GIN resources of a Buffer across NCCL nodes. Signal ids (NCCL-owned, from 0): the RDMA
// rings' (RdmaLayout::num_signals of the Buffer's nodes and channels, ids [0, num_rdma_signals)),
// then the count exchange's (InternodeCountLayout::signal(m) + count_signal_base, one per node).
struct GinRequest {
  int num_contexts = 0;       // ginContextCount: a hint, NCCL may give fewer (kernels take ctx modulo)
  int num_rdma_signals = 0;
  int count_signal_base = 0;  // = num_rdma_signals
  int num_signals = 0;        // ginSignalCount: every id above
};
GinRequest gin_request(int num_nodes, int num_channels);

// The devComm requirements of a Buffer's window: one LSA barrier, never multimem (NVLS), and the
// GIN resources of `gin` when given (null: none, NCCL sets up no GIN).
void fill_dev_comm_requirements(ncclDevCommRequirements& reqs, const GinRequest* gin);

// "2.28.9" from NCCL_VERSION_CODE's encoding (major * 10000 + minor * 100 + patch).
std::string nccl_version_string(int code);

// The message of Error(kUnsupported) for a world that spans NCCL nodes without GIN: `world`
// describes the split (ranks, nodes, NVLink domain), `nccl_version` the NCCL in use, `reason`
// what is missing.
std::string gin_unavailable_message(const std::string& world, int nccl_version, const std::string& reason);

}  // namespace epx
