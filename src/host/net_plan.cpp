#include "host/net_plan.hpp"

#include <cstring>

#include "common/rdma_layout.hpp"
#include "epx/error.hpp"
#include "epx/limits.hpp"

namespace epx {

const char* net_backend_name(NetBackend backend) {
  switch (backend) {
    case NetBackend::kNone: return "none";
    case NetBackend::kEmu: return "EmuNet";
    case NetBackend::kGin: return "GinNet";
  }
  return "unknown";
}

NetBackend choose_net_backend(bool simulated, int world, int nvlink_domain_size, int num_nodes) {
  if (num_nodes <= 1) return NetBackend::kNone;
  if (simulated || nvlink_domain_size >= world) return NetBackend::kEmu;
  return NetBackend::kGin;
}

GinRequest gin_request(int num_nodes, int num_channels) {
  RdmaLayout rdma;
  rdma.num_nodes = num_nodes;
  rdma.num_channels = num_channels;
  GinRequest r;
  r.num_contexts = kMaxNetContexts;
  r.num_rdma_signals = rdma.num_signals();
  r.count_signal_base = r.num_rdma_signals;
  r.num_signals = r.count_signal_base + num_nodes;
  return r;
}

void fill_dev_comm_requirements(ncclDevCommRequirements& reqs, const GinRequest* gin) {
  std::memset(&reqs, 0, sizeof(reqs));
#ifdef NCCL_DEV_COMM_REQUIREMENTS_INITIALIZER
  // NCCL >= 2.30 versions the struct (size, magic, version) and connects GIN only when asked to.
  if (gin != nullptr) {
    reqs = NCCL_DEV_COMM_REQUIREMENTS_INITIALIZER;
    reqs.ginConnectionType = NCCL_GIN_CONNECTION_FULL;  // puts to any world rank, not only rail peers
  }
#endif
  reqs.lsaMultimem = false;  // never multicast (NVLS) on shared hosts
  reqs.lsaBarrierCount = 1;
  if (gin == nullptr) return;
  reqs.ginContextCount = gin->num_contexts;
  reqs.ginSignalCount = gin->num_signals;
}

std::string nccl_version_string(int code) {
  return detail::concat(code / 10000, ".", code / 100 % 100, ".", code % 100);
}

std::string gin_unavailable_message(const std::string& world, int nccl_version, const std::string& reason) {
  return detail::concat(world, ": a world of several NVLink domains (NCCL nodes) runs its RDMA leg over NCCL GIN, "
                        "which is unavailable with NCCL ", nccl_version_string(nccl_version), ": ", reason,
                        "; virtual nodes inside one NVLink domain (BufferOptions::node_size) run over the NVLink "
                        "emulation");
}

}  // namespace epx
