// Buffer: symmetric memory, device state, validation and launches of the high-throughput ops.
#include "epx/buffer.hpp"

#include <nccl.h>
#include <nccl_device.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <vector>

#include "epx/sim_world.hpp"
#include "epx/version.hpp"
#include "host/buffer_impl.hpp"
#include "host/handle_storage.hpp"
#include "host/net.hpp"
#include "host/net_plan.hpp"
#include "host/sim_world_state.hpp"
#include "host/tuning.hpp"
#include "host/validate.hpp"
#include "kernels/internode_params.hpp"
#include "kernels/scaleout_params.hpp"

namespace epx {

using validate::kAny;

namespace {

// A handle holds one rank's routing: another rank's (a simulated peer's thread, a handle passed
// between ranks) would send this rank's rows by the peer's plan.
void check_handle_rank(const DispatchHandle& h, int rank, int num_ranks) {
  EPX_ARG_CHECK(h.rank == rank && h.num_ranks == num_ranks, "handle: made on rank ", h.rank, " of ", h.num_ranks,
                ", this buffer is rank ", rank, " of ", num_ranks);
}

// Config.num_sms is bounded by the SMs this rank owns; a simulated rank owns a share of the device.
// The Buffer's tuning must hold for the config too (its warp counts and chunk are bounded by it).
void validate_config(const Communicator& comm, const Config& config, const Tuning& tuning) {
  if (comm.simulated())
    EPX_ARG_CHECK(config.num_sms <= comm.num_device_sms(), "Config.num_sms: ", config.num_sms,
                  " exceeds this simulated rank's SM share of ", comm.num_device_sms(), " (the device's SMs / ",
                  comm.world(), " ranks)");
  config.validate(comm.num_device_sms());
  tuning.validate(config);
}

const char* ll_zero_copy_name(LlZeroCopy mode) {
  switch (mode) {
    case LlZeroCopy::kOff: return "kOff";
    case LlZeroCopy::kOn: return "kOn";
    case LlZeroCopy::kIfRoom: return "kIfRoom";
  }
  return "unknown";
}

}  // namespace

Buffer::Buffer(Communicator& comm, size_t num_nvl_bytes, BufferOptions options) : impl_(new Impl) {
  Impl& m = *impl_;
  m.comm = &comm;
  validate_config(comm, options.config, m.tuning);
  m.set_config(options.config);
  {
    const char* source = "node_size";
    const int node_size = requested_node_size(options.node_size, &source);
    m.topology = Topology::make(comm.world(), comm.rank(), comm.local_size(), node_size, source);
  }
  // rank = node * node_size + local holds only when each NVLink domain is a block of consecutive ranks.
  EPX_CHECK(comm.local_rank() == comm.rank() % comm.local_size(), ErrorKind::kUnsupported, "rank ", comm.rank(),
            " is rank ", comm.local_rank(), " of its NVLink domain of ", comm.local_size(),
            "; epx needs each domain to hold consecutive ranks (rank = node * node_size + local)");
  m.internode = m.topology.num_nodes() > 1;
  std::string split;  // the world's nodes in words (errors name it)
  if (m.internode) {
    split = detail::concat("the ", comm.world(), " ranks form ", m.topology.num_nodes(),
                                             m.topology.virtual_nodes ? " virtual" : "", " nodes of ",
                                             m.topology.node_size, " (NVLink domain of ", comm.local_size(), ")");
    m.net = choose_net_backend(comm.simulated(), comm.world(), comm.local_size(), m.topology.num_nodes());
    if (m.net == NetBackend::kGin) {
      EPX_CHECK(net_gin_compiled(), ErrorKind::kUnsupported,
                gin_unavailable_message(split, nccl_compiled_version(),
                                        "epx was compiled against NCCL headers without GIN (nccl_device/gin.h, "
                                        "NCCL >= 2.28.9)"));
      check_nccl_version();  // GIN's device code is inline: the NCCL that runs it must be the compiled one
      m.gin = gin_request(m.topology.num_nodes(), options.config.num_sms);
    }
    EPX_ARG_CHECK(options.num_rdma_bytes > 0, "num_rdma_bytes: ", split,
                  ", so the Buffer needs the RDMA region (num_rdma_bytes > 0; plan::rdma_bytes_for gives the "
                  "bytes of a row shape), got 0");
    EPX_CHECK(options.num_ll_bytes == 0, ErrorKind::kUnsupported, "num_ll_bytes: ", split,
              "; the low-latency mode across nodes is not implemented (num_ll_bytes must be 0)");
    EPX_ARG_CHECK(options.config.num_threads >= 128, "Config.num_threads: ", split,
                  "; the dispatch across nodes needs at least 4 warps per block, got ", options.config.num_threads);
    EPX_ARG_CHECK(options.rdma_chunk_tokens >= 1, "rdma_chunk_tokens: must be >= 1, got ", options.rdma_chunk_tokens);
    EPX_ARG_CHECK(options.rdma_ring_slots > options.rdma_chunk_tokens &&
                      options.rdma_ring_slots % options.rdma_chunk_tokens == 0,
                  "rdma_ring_slots: must be a multiple of rdma_chunk_tokens (", options.rdma_chunk_tokens,
                  ") above it, got ", options.rdma_ring_slots);
    // The smallest row shape's rings: below that no op fits.
    plan::RdmaShape smallest{comm.world(), m.topology.node_size, options.config.num_sms, options.rdma_chunk_tokens,
                             options.rdma_ring_slots, 16, 0};
    const size_t minimum = plan::rdma_bytes_for(smallest);
    EPX_CHECK(options.num_rdma_bytes >= minimum, ErrorKind::kBufferTooSmall, "num_rdma_bytes: ",
              options.num_rdma_bytes, " bytes, the RDMA rings of ", m.topology.num_nodes(), " nodes x ",
              options.config.num_sms, " channels need >= ", minimum,
              " even for the smallest rows (plan::rdma_bytes_for names the bytes of a row shape)");
    m.rdma_channels = options.config.num_sms;
    m.rdma_chunk_tokens = options.rdma_chunk_tokens;
    m.rdma_ring_slots = options.rdma_ring_slots;
  } else {
    EPX_ARG_CHECK(options.num_rdma_bytes == 0, "num_rdma_bytes: the ", comm.world(),
                  " ranks form one node, which has no RDMA region; expected 0, got ", options.num_rdma_bytes);
  }
  EPX_CHECK(m.topology.node_size <= kMaxPeers, ErrorKind::kUnsupported, "node size ", m.topology.node_size,
            " exceeds the NVLink domain limit of ", kMaxPeers, " ranks");
  EPX_ARG_CHECK(num_nvl_bytes >= SymmetricLayout::kMinBytes, "num_nvl_bytes: expected >= ",
                SymmetricLayout::kMinBytes, ", got ", num_nvl_bytes);
  num_nvl_bytes = align_up(num_nvl_bytes, 1 << 21);
  m.num_nvl_bytes = num_nvl_bytes;
  EPX_CUDA_CHECK(cudaSetDevice(comm.device()));
  // Before any op: a kernel's first launch must not wait for the peers' running kernels.
  kernels::load_kernels();

  const size_t num_ll_bytes = options.num_ll_bytes > 0 ? align_up(options.num_ll_bytes, 1 << 21) : 0;
  const int zero_copy_mode = static_cast<int>(options.ll_zero_copy);
  EPX_ARG_CHECK(zero_copy_mode >= 0 && zero_copy_mode <= static_cast<int>(LlZeroCopy::kIfRoom),
                "ll_zero_copy: unknown mode ", zero_copy_mode);
  // Every rank must use the same sizes (offsets are symmetric) and the same zero-copy mode (it
  // places the low-latency buffers). Every rank checks every other, so all of them raise alike.
  {
    struct Sizes {
      unsigned long long num_nvl_bytes, num_ll_bytes, ll_zero_copy, num_rdma_bytes, rdma_rings;
    } mine{num_nvl_bytes, num_ll_bytes, static_cast<unsigned long long>(zero_copy_mode), options.num_rdma_bytes,
           (static_cast<unsigned long long>(m.rdma_channels) << 40) |
               (static_cast<unsigned long long>(m.rdma_chunk_tokens & 0xfffff) << 20) |
               static_cast<unsigned long long>(m.rdma_ring_slots & 0xfffff)};
    std::vector<Sizes> all(comm.world());
    comm.all_gather(&mine, all.data(), sizeof(Sizes), m.timeout_s());
    for (int r = 0; r < comm.world(); ++r) {
      EPX_ARG_CHECK(all[r].num_nvl_bytes == mine.num_nvl_bytes && all[r].num_ll_bytes == mine.num_ll_bytes,
                    "num_nvl_bytes / num_ll_bytes: must be equal on all ranks; rank ", comm.rank(), " has ",
                    num_nvl_bytes, " / ", num_ll_bytes, ", rank ", r, " has ", all[r].num_nvl_bytes, " / ",
                    all[r].num_ll_bytes, " (after rounding up to 2 MiB)");
      EPX_ARG_CHECK(all[r].num_rdma_bytes == mine.num_rdma_bytes && all[r].rdma_rings == mine.rdma_rings,
                    "num_rdma_bytes / rdma_chunk_tokens / rdma_ring_slots / Config.num_sms: must be equal on all "
                    "ranks across nodes; rank ", comm.rank(), " and rank ", r, " differ");
      EPX_ARG_CHECK(all[r].ll_zero_copy == mine.ll_zero_copy, "ll_zero_copy: must be equal on all ranks; rank ",
                    comm.rank(), " has ", ll_zero_copy_name(options.ll_zero_copy), ", rank ", r, " has ",
                    ll_zero_copy_name(static_cast<LlZeroCopy>(all[r].ll_zero_copy)));
    }
  }

  m.arena = std::make_shared<DeviceArena>(comm.device(), comm.simulated(), comm.rank());
  m.arena->set_timeout(m.timeout_s() + 10);
  m.ll_offset = num_nvl_bytes;
  m.num_ll_bytes = num_ll_bytes;
  m.ll_zero_copy = options.ll_zero_copy;
  EPX_ARG_CHECK(!options.enable_shrink || num_ll_bytes > 0,
                "enable_shrink: masks ranks in the low-latency ops, so it needs num_ll_bytes > 0");
  m.shrink = options.enable_shrink;
  size_t window_bytes = num_nvl_bytes + num_ll_bytes;
  if (m.internode) {
    m.rdma_offset = window_bytes;
    m.num_rdma_bytes = align_up(options.num_rdma_bytes, kRdmaAlign);
    m.count_offset = align_up(m.rdma_offset + m.num_rdma_bytes, 1 << 21);
    m.count_bytes = m.count_layout().num_bytes();
    window_bytes = align_up(m.count_offset + m.count_bytes, 1 << 21);
  }
  if (m.net == NetBackend::kGin) {
    const SymmetricMemory::GinSetup gin{m.gin, split};
    m.memory = SymmetricMemory::create(comm, window_bytes, m.timeout_s(), &gin);
  } else {
    m.memory = SymmetricMemory::create(comm, window_bytes, m.timeout_s());
  }
  m.symmetric = m.memory->local();
  {
    // The peer table of the op context: the node's windows by local index.
    const int first = m.internode ? m.topology.node_idx() * m.topology.node_size : 0;
    const int count = m.internode ? m.topology.node_size : comm.world();
    for (int p = 0; p < count; ++p) m.peers[p] = m.memory->peers()[first + p];
  }
  if (m.internode) {
    m.windows_device = static_cast<char**>(m.arena->alloc(sizeof(char*) * comm.world()));
    detail::copy_to_device(m.windows_device, m.memory->peers(), sizeof(char*) * comm.world(), m.arena->stream(),
                           m.timeout_s() + 10, "Buffer (the window table)", comm.rank());
    m.exchanges = static_cast<uint64_t*>(m.arena->alloc(sizeof(uint64_t)));
  }

  m.workspace = static_cast<Workspace*>(m.arena->alloc(sizeof(Workspace)));
  if (m.num_ll_bytes > 0) m.ll_ws = static_cast<LlWorkspace*>(m.arena->alloc(sizeof(LlWorkspace)));
  EPX_CUDA_CHECK(cudaHostAlloc(&m.error, sizeof(ErrorRecord), cudaHostAllocMapped));
  EPX_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&m.error_device), m.error, 0));
  EPX_CUDA_CHECK(cudaHostAlloc(&m.mailbox, sizeof(HostMailbox), cudaHostAllocMapped));
  EPX_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&m.mailbox_device), m.mailbox, 0));
  m.zero_state();
  comm.barrier(m.timeout_s());
}

Buffer::~Buffer() {
  if (!impl_) return;
  Impl& m = *impl_;
  cudaSetDevice(m.comm->device());
  try { m.quiesce("~Buffer"); } catch (const Error&) {}
  // Deregistration is collective: keep ranks in step so no peer still writes into our memory.
  try { m.comm->barrier(m.timeout_s()); } catch (const Error&) {}
  try {
    const std::string overrun = m.memory->check_bounds(m.arena->stream());
    if (!overrun.empty())
      std::fprintf(stderr, "epx[rank %d]: ~Buffer: symmetric window overrun: %s\n", m.comm->rank(), overrun.c_str());
  } catch (const Error&) {}
  m.memory.reset();
  m.arena->free(m.workspace);
  m.arena->free(m.ll_ws);
  m.arena->free(m.windows_device);
  m.arena->free(m.exchanges);
  if (m.comm->simulated()) {
    // cudaFreeHost may wait for every rank's kernels: the world frees these when it ends.
    m.comm->sim_world()->state().defer_free_host(m.error);
    m.comm->sim_world()->state().defer_free_host(m.mailbox);
  } else {
    if (m.error) cudaFreeHost(m.error);
    if (m.mailbox) cudaFreeHost(m.mailbox);
  }
}

Communicator& Buffer::comm() const { return *impl_->comm; }
const Config& Buffer::config() const { return impl_->config; }
void Buffer::set_config(const Config& config) {
  validate_config(*impl_->comm, config, impl_->tuning);
  if (impl_->internode) {
    EPX_ARG_CHECK(config.num_sms == impl_->rdma_channels, "Config.num_sms: the RDMA rings of a Buffer across nodes "
                  "have ", impl_->rdma_channels, " channels, fixed at construction; got ", config.num_sms);
    EPX_ARG_CHECK(config.num_threads >= 128, "Config.num_threads: the dispatch across nodes needs at least 4 warps "
                  "per block, got ", config.num_threads);
  }
  impl_->set_config(config);
}

struct detail::BufferAccess {
  static Buffer::Impl& impl(const Buffer& buffer) { return *buffer.impl_; }
};
void set_tuning(Buffer& buffer, const Tuning& tuning) {
  Buffer::Impl& m = detail::BufferAccess::impl(buffer);
  tuning.validate(m.config);
  m.tuning = tuning;
}
const Tuning& tuning(const Buffer& buffer) { return detail::BufferAccess::impl(buffer).tuning; }

int Buffer::rank() const { return impl_->comm->rank(); }
int Buffer::num_ranks() const { return impl_->comm->world(); }
int Buffer::node_size() const { return impl_->topology.node_size; }
int Buffer::num_nodes() const { return impl_->topology.num_nodes(); }
bool Buffer::failed() const { return impl_->failed; }
void* Buffer::peer_pointer(int peer) const {
  validate::in_range(peer, "peer", 0, num_ranks() - 1);
  return impl_->memory->peers()[peer];
}
size_t Buffer::num_nvl_bytes() const { return impl_->num_nvl_bytes; }
size_t Buffer::flag_bytes(bool low_latency) {
  return low_latency ? LlLayout::kSyncBytes : SymmetricLayout::kRowsOffset;
}

int64_t Buffer::row_capacity(int hidden, DType x_dtype, int num_topk) const {
  const RowLayout d = plan::dispatch_rows(impl_->num_nvl_bytes, hidden, x_dtype, num_topk);
  const RowLayout c = plan::combine_rows(impl_->num_nvl_bytes, hidden, num_topk);
  return d.capacity < c.capacity ? d.capacity : c.capacity;
}

void Buffer::check() { impl_->raise_recorded_error(); }

void Buffer::synchronize(cudaStream_t stream) {
  host_wait_stream(stream, impl_->timeout_s() + 10, "Buffer::synchronize", rank());
  impl_->raise_recorded_error();
}

void Buffer::reset() {
  Impl& m = *impl_;
  EPX_CUDA_CHECK(cudaSetDevice(m.comm->device()));
  // Kernels are bounded, so this returns; after the barrier no peer is writing into our memory.
  m.quiesce("Buffer::reset");
  m.comm->barrier(m.timeout_s());
  // Simulated windows have guard bands: every rank checks its own, and all learn of any overrun.
  if (m.comm->simulated()) {
    const std::string overrun = m.memory->check_bounds(m.arena->stream());
    const char mine = overrun.empty() ? 0 : 1;
    std::vector<char> all(num_ranks());
    m.comm->all_gather(&mine, all.data(), 1, m.timeout_s());
    for (int r = 0; r < num_ranks(); ++r)
      EPX_CHECK(all[r] == 0, ErrorKind::kState, "Buffer::reset: a kernel wrote outside rank ", r,
                "'s symmetric window", r == rank() ? detail::concat(" (", overrun, ")") : std::string(""));
  }
  m.zero_state();
  m.failed = false;
  m.failure.clear();
  m.comm->barrier(m.timeout_s());
}

// ---------------------------------------------------------------------------------------------
// Layout

void Buffer::get_dispatch_layout(const View& topk_idx, int num_experts, const View& num_tokens_per_rank,
                                 const View& num_tokens_per_expert, const View& is_token_in_rank,
                                 cudaStream_t stream) {
  get_dispatch_layout(topk_idx, num_experts, num_tokens_per_rank, View{}, num_tokens_per_expert, is_token_in_rank,
                      stream);
}

void Buffer::get_dispatch_layout(const View& topk_idx, int num_experts, const View& num_tokens_per_rank,
                                 const View& num_tokens_per_rdma_rank, const View& num_tokens_per_expert,
                                 const View& is_token_in_rank, cudaStream_t stream) {
  Impl& m = *impl_;
  m.check_usable();
  const int R = num_ranks();
  validate::tensor(topk_idx, "topk_idx", DType::kI64, {kAny, kAny});
  EPX_ARG_CHECK(topk_idx.stride[1] == 1 || topk_idx.shape[1] <= 1, "topk_idx: last dimension must be contiguous, got ",
                validate::describe(topk_idx));
  const int64_t N = topk_idx.shape[0];
  const int K = static_cast<int>(topk_idx.shape[1]);
  validate::in_range(K, "topk_idx.shape[1] (num_topk)", 1, kMaxTopk);
  validate::in_range(num_experts, "num_experts", R, R * kMaxLocalExperts);
  EPX_ARG_CHECK(num_experts % R == 0, "num_experts: must be a multiple of the number of ranks (", R, "), got ",
                num_experts);
  validate::tensor(num_tokens_per_rank, "num_tokens_per_rank", DType::kI32, {R});
  validate::tensor(num_tokens_per_expert, "num_tokens_per_expert", DType::kI32, {num_experts});
  validate::tensor(is_token_in_rank, "is_token_in_rank", DType::kBool, {N, R});
  validate::contiguous(num_tokens_per_rank, "num_tokens_per_rank");
  validate::contiguous(num_tokens_per_expert, "num_tokens_per_expert");
  validate::contiguous(is_token_in_rank, "is_token_in_rank");
  const bool with_rdma = num_tokens_per_rdma_rank.data != nullptr;
  if (with_rdma) {
    validate::tensor(num_tokens_per_rdma_rank, "num_tokens_per_rdma_rank", DType::kI32, {m.topology.num_nodes()});
    validate::contiguous(num_tokens_per_rdma_rank, "num_tokens_per_rdma_rank");
  }

  kernels::LayoutParams p{};
  p.ctx = m.context(OpCode::kLayout);
  p.topk_idx = topk_idx.ptr<int64_t>();
  p.topk_stride = topk_idx.stride[0];
  p.num_tokens = static_cast<int>(N);
  p.num_topk = K;
  p.num_experts = num_experts;
  p.num_ranks = R;
  p.num_tokens_per_rank = num_tokens_per_rank.ptr<int>();
  p.num_tokens_per_expert = num_tokens_per_expert.ptr<int>();
  p.is_token_in_rank = is_token_in_rank.ptr<bool>();
  kernels::launch_layout(p, stream);
  if (with_rdma) {
    kernels::RdmaRankCountParams q{};
    q.is_token_in_rank = is_token_in_rank.ptr<bool>();
    q.num_tokens = static_cast<int>(N);
    q.num_ranks = R;
    q.node_size = m.topology.node_size;
    q.num_tokens_per_rdma_rank = num_tokens_per_rdma_rank.ptr<int>();
    kernels::launch_rdma_rank_counts(q, stream);
  }
  m.after_launch("get_dispatch_layout", stream);
}

// ---------------------------------------------------------------------------------------------
// Dispatch

DispatchHandle Buffer::make_handle(int num_tokens) const {
  validate::in_range(num_tokens, "num_tokens", 0, 1 << 30);
  const int R = num_ranks();
  DispatchHandle h;
  h.num_ranks = R;
  h.rank = rank();
  h.num_tokens = num_tokens;
  const size_t num_ints = static_cast<size_t>(host::handle_storage_layout(R, num_tokens).total);
  std::shared_ptr<DeviceArena> arena = impl_->arena;
  int* mem = static_cast<int*>(arena->alloc(num_ints * sizeof(int)));
  h.storage = std::shared_ptr<void>(mem, [arena](void* q) { arena->free(q); });
  EPX_CUDA_CHECK(cudaMemsetAsync(mem, 0, num_ints * sizeof(int), arena->stream()));
  host_wait_stream(arena->stream(), impl_->timeout_s() + 10, "Buffer::make_handle", rank());
  host::place_handle_arrays(h, mem);
  return h;
}

namespace {

struct XShape {
  int64_t num_tokens;
  int hidden;
  DType dtype;
  int num_topk;
  int num_scale_columns = 0;        // 32-bit scale words per row (fp8), 1 for 1-D scales
  int scale_ndim = 0;               // 1 or 2 (fp8)
  DType scale_dtype = DType::kF32;  // f32, or int32 (UE8M0-packed)
};

XShape validate_x(const DispatchInputs& in) {
  EPX_ARG_CHECK(in.x.defined(), "x: required");
  EPX_ARG_CHECK(in.x.dtype == DType::kBF16 || in.x.dtype == DType::kFP8E4M3,
                "x: expected dtype bfloat16 or float8_e4m3fn, got ", validate::describe(in.x));
  validate::tensor(in.x, "x", in.x.dtype, {kAny, kAny});
  validate::rows_16b_aligned(in.x, "x");
  XShape s{in.x.shape[0], static_cast<int>(in.x.shape[1]), in.x.dtype, 0};
  validate::in_range(s.hidden, "x.shape[1] (hidden)", 1, 1 << 16);
  if (s.dtype == DType::kFP8E4M3) {
    // Any number of f32 or int32 (UE8M0-packed) scales per row, [N] or [N, C]: moved as 32-bit words.
    EPX_ARG_CHECK(in.x_scales.defined(), "x_scales: required with fp8 x");
    EPX_ARG_CHECK(in.x_scales.dtype == DType::kF32 || in.x_scales.dtype == DType::kI32,
                  "x_scales: expected dtype float32 or int32 (UE8M0-packed), got ", validate::describe(in.x_scales));
    EPX_ARG_CHECK(in.x_scales.ndim == 1 || in.x_scales.ndim == 2, "x_scales: expected [N] or [N, C], got ",
                  validate::describe(in.x_scales));
    if (in.x_scales.ndim == 1) validate::tensor(in.x_scales, "x_scales", in.x_scales.dtype, {s.num_tokens});
    else validate::tensor(in.x_scales, "x_scales", in.x_scales.dtype, {s.num_tokens, kAny});
    s.scale_ndim = in.x_scales.ndim;
    s.scale_dtype = in.x_scales.dtype;
    s.num_scale_columns = in.x_scales.ndim == 1 ? 1 : static_cast<int>(in.x_scales.shape[1]);
    validate::in_range(s.num_scale_columns, "x_scales.shape[1] (scales per row)", 1, s.hidden);
  } else {
    EPX_ARG_CHECK(!in.x_scales.defined(), "x_scales: only allowed with fp8 x, got ", validate::describe(in.x_scales));
  }
  if (in.topk_idx.defined()) {
    validate::tensor(in.topk_idx, "topk_idx", DType::kI64, {s.num_tokens, kAny});
    s.num_topk = static_cast<int>(in.topk_idx.shape[1]);
    validate::in_range(s.num_topk, "topk_idx.shape[1] (num_topk)", 1, kMaxTopk);
    EPX_ARG_CHECK(in.topk_idx.stride[1] == 1 || s.num_topk == 1, "topk_idx: last dimension must be contiguous");
  }
  if (in.topk_weights.defined()) {
    EPX_ARG_CHECK(in.topk_idx.defined(), "topk_weights: given without topk_idx");
    validate::tensor(in.topk_weights, "topk_weights", DType::kF32, {s.num_tokens, s.num_topk});
    EPX_ARG_CHECK(in.topk_weights.stride[1] == 1 || s.num_topk == 1, "topk_weights: last dimension must be contiguous");
  }
  validate::in_range(in.expert_alignment, "expert_alignment", 1, 1 << 20);
  validate::in_range(in.num_worst_tokens, "num_worst_tokens", 0, 1 << 30);
  return s;
}

}  // namespace

namespace {

// The plan of a dispatch's rows (the row shape and the experts per rank every rank must agree on),
// the caller adding its protocol's fields.
plan::OpPlan dispatch_rows_plan(const Config& config, const RowLayout& rows, int experts_per_rank) {
  plan::OpPlan plan = plan::launch_plan(config);
  plan.row_bytes = rows.row_bytes;
  plan.num_scales = rows.num_scales;
  plan.num_topk_idx = rows.num_topk_idx;
  plan.num_topk_weights = rows.num_topk_weights;
  plan.experts_per_rank = experts_per_rank;
  return plan;
}

// The handle's forward records (DispatchHandle::forward_records) for at least `slots` slots: kept
// when large enough (a captured dispatch keeps its pointer), else made anew; then cleared on the
// op's stream (-1: no token), for the dispatch after this notify. A cached re-dispatch (same
// routing, no notify) writes the same keys over them.
void prepare_forward_records(Buffer::Impl& m, DispatchHandle& handle, int64_t slots, cudaStream_t stream) {
  slots = std::max<int64_t>(slots, 1);
  if (handle.forward_storage == nullptr || handle.forward_slots < slots) {
    std::shared_ptr<DeviceArena> arena = m.arena;
    const size_t bytes = sizeof(int) * kForwardRecordInts * static_cast<size_t>(slots);
    int* mem = static_cast<int*>(arena->alloc(bytes));
    handle.forward_storage = std::shared_ptr<void>(mem, [arena](void* p) { arena->free(p); });
    host_wait_stream(arena->stream(), m.timeout_s() + 10, "dispatch_notify (forward records)", m.comm->rank());
    handle.forward_records = mem;
    handle.forward_slots = slots;
  }
  EPX_CUDA_CHECK(cudaMemsetAsync(handle.forward_records, 0xff,
                                 sizeof(int) * kForwardRecordInts * static_cast<size_t>(handle.forward_slots), stream));
}

// Warps of a block across nodes that talk to the network (the dispatch's senders and forwarders,
// the combine's senders and receivers, each this many): one per remote node, at most a third of
// the block's warps but one, at least one.
int internode_net_warps(const Buffer::Impl& m, int threads) {
  return std::max(1, std::min(m.topology.num_nodes() - 1, (threads / 32 - 1) / 3));
}

// The combine kernel params that come from the op's inputs, outputs and handle: alike within a
// node and across nodes (the transport fields are each path's own).
kernels::CombineParams combine_io_params(Buffer::Impl& m, const CombineInputs& in, const DispatchHandle& handle,
                                         const CombineOutputs& out, const RowLayout& rows, int H, int K) {
  kernels::CombineParams p{};
  p.ctx = m.context(OpCode::kCombine);
  p.rows = rows;
  p.num_tokens = static_cast<int>(handle.num_tokens);
  p.hidden = H;
  p.num_topk = K;
  p.x = in.x.ptr<uint16_t>();
  p.x_stride = in.x.stride[0];
  p.topk_weights = K ? in.topk_weights.ptr<float>() : nullptr;
  p.weight_stride = K ? in.topk_weights.stride[0] : 0;
  p.bias_0 = in.bias_0.defined() ? in.bias_0.ptr<uint16_t>() : nullptr;
  p.bias_0_stride = in.bias_0.defined() ? in.bias_0.stride[0] : 0;
  p.bias_1 = in.bias_1.defined() ? in.bias_1.ptr<uint16_t>() : nullptr;
  p.bias_1_stride = in.bias_1.defined() ? in.bias_1.stride[0] : 0;
  p.count_matrix = handle.count_matrix;
  p.send_pos = handle.send_pos;
  p.num_recv = handle.num_recv_device;
  p.combined_x = out.combined_x.ptr<uint16_t>();
  p.out_stride = out.combined_x.stride[0];
  p.combined_topk_weights = K ? out.combined_topk_weights.ptr<float>() : nullptr;
  p.out_weight_stride = K ? out.combined_topk_weights.stride[0] : 0;
  return p;
}

// The RDMA rings of an op across nodes moving rows of `row_bytes` with `num_topk` weights: the
// layout every rank derives alike (an error on one is an error on all), one channel per SM.
RdmaLayout internode_rings(Buffer::Impl& m, int64_t row_bytes, int num_topk) {
  const plan::RdmaShape shape{m.comm->world(), m.topology.node_size, m.rdma_channels, m.rdma_chunk_tokens,
                              m.rdma_ring_slots, row_bytes, num_topk};
  RdmaLayout rdma = m.agreed([&] { return plan::rdma_layout(m.num_rdma_bytes, shape); });
  rdma.base = m.rdma_offset;
  EPX_CHECK(m.config.num_sms == m.rdma_channels, ErrorKind::kInvalidArgument, "Config.num_sms: ", m.config.num_sms,
            ", the RDMA rings have ", m.rdma_channels, " channels (fixed at construction)");
  return rdma;
}

// `plan` with the ring fields of `rdma` (the kernels read the ring geometry from the plan).
plan::OpPlan with_rings(plan::OpPlan plan, const RdmaLayout& rdma, int send_warps) {
  plan.ring_channels = rdma.num_channels;
  plan.ring_slots = rdma.ring_slots;
  plan.ring_chunk = rdma.chunk_tokens;
  plan.ring_send_warps = send_warps;
  return plan;
}

// The combine across nodes (kernels/internode.cu), with the handle of a dispatch across nodes.
void internode_combine(Buffer::Impl& m, const CombineInputs& in, const DispatchHandle& handle,
                       const CombineOutputs& out, int H, int K, cudaStream_t stream) {
  m.agreed([&] {
    EPX_ARG_CHECK(handle.forward_records != nullptr, "handle: has no forward records (a handle of a dispatch "
                  "across nodes on this Buffer is needed)");
    EPX_ARG_CHECK(H % 8 == 0, "x.shape[1] (hidden): a combine across nodes moves rows of a multiple of 16 bytes, "
                  "got ", H, " bf16 channels");
  });
  const RowLayout rows = plan::combine_rows(m.num_nvl_bytes, H, K);
  const RdmaLayout rdma = internode_rings(m, int64_t{2} * H, K);

  kernels::InternodeCombineParams<EmuNetView> q{};
  kernels::CombineParams& p = q.base;
  p = combine_io_params(m, in, handle, out, rows, H, K);
  q.topology = m.topology.view();
  q.net = m.emu_view(rdma.signals(), rdma.num_signals());
  q.rdma = rdma;
  q.forward_records = handle.forward_records;
  q.forward_slots = handle.forward_slots;
  const int threads = m.internode_threads();  // EmuNet: Config.num_threads
  q.send_warps = internode_net_warps(m, threads);
  q.recv_warps = q.send_warps;
  {
    plan::OpPlan plan = with_rings(plan::launch_plan(m.config), rdma, q.send_warps);
    plan.row_bytes = rows.row_bytes;
    plan.num_topk_weights = rows.num_topk_weights;
    plan::encode_plan(plan, p.ctx.plan);
  }
#if EPX_HAVE_GIN
  if (m.net == NetBackend::kGin) {
    kernels::InternodeCombineParams<GinNetView> g{q.base, q.topology,
                                                  m.gin_view(0, rdma.num_signals(), kMaxNetContexts), q.rdma,
                                                  q.forward_records, q.forward_slots, q.send_warps, q.recv_warps};
    kernels::launch_internode_combine(g, m.rdma_channels, threads, stream);
    m.after_launch("combine", stream);
    return;
  }
#endif
  kernels::launch_internode_combine(q, m.net_mode(), m.rdma_channels, m.config.num_threads, stream);
  m.after_launch("combine", stream);
}

// The dispatch kernel params that come from the op's inputs, outputs and handle: alike within a
// node and across nodes (the transport fields are each path's own).
kernels::DispatchParams dispatch_io_params(Buffer::Impl& m, const DispatchInputs& in, const DispatchHandle& handle,
                                           const DispatchOutputs& out, const XShape& xs, const RowLayout& rows,
                                           int64_t out_rows) {
  const int R = m.comm->world();
  const int S = xs.num_scale_columns;
  kernels::DispatchParams p{};
  p.ctx = m.context(OpCode::kDispatch);
  p.rows = rows;
  p.num_tokens = static_cast<int>(xs.num_tokens);
  p.num_topk = xs.num_topk;
  p.num_experts_per_rank = handle.num_experts / R;
  p.x = static_cast<const char*>(in.x.data);
  p.x_row_stride_bytes = in.x.stride[0] * static_cast<int64_t>(dtype_size(xs.dtype));
  p.x_scales = S > 0 ? in.x_scales.ptr<uint32_t>() : nullptr;
  p.scale_token_stride = S > 0 ? in.x_scales.stride[0] : 0;
  p.scale_hidden_stride = S > 0 && xs.scale_ndim == 2 ? in.x_scales.stride[1] : 0;
  p.topk_idx = in.topk_idx.defined() ? in.topk_idx.ptr<int64_t>() : nullptr;
  p.topk_stride = in.topk_idx.defined() ? in.topk_idx.stride[0] : 0;
  p.topk_weights = in.topk_weights.defined() ? in.topk_weights.ptr<float>() : nullptr;
  p.weight_stride = in.topk_weights.defined() ? in.topk_weights.stride[0] : 0;
  p.count_matrix = handle.count_matrix;
  p.send_pos = handle.send_pos;
  p.num_recv = handle.num_recv_device;
  p.out_rows = out_rows;
  p.recv_x = static_cast<char*>(out.recv_x.data);
  p.recv_x_scales = S > 0 ? out.recv_x_scales.ptr<uint32_t>() : nullptr;
  p.recv_topk_idx = out.recv_topk_idx.defined() ? out.recv_topk_idx.ptr<int64_t>() : nullptr;
  p.recv_topk_weights = out.recv_topk_weights.defined() ? out.recv_topk_weights.ptr<float>() : nullptr;
  p.recv_src_idx = out.recv_src_idx.defined() ? out.recv_src_idx.ptr<int>() : nullptr;
  return p;
}

// The dispatch across nodes (kernels/internode.cu): rows that fit every receiver's row region
// (host-synced, cached or worst-case sizing), the RDMA leg through the bounded rings of
// num_rdma_bytes.
void internode_dispatch(Buffer::Impl& m, const DispatchInputs& in, const DispatchHandle& handle,
                        const DispatchOutputs& out, const XShape& xs, const RowLayout& rows, int64_t out_rows,
                        cudaStream_t stream) {
  // Values every rank has (the shared count matrix, sizes, Config): every rank plans alike. Without
  // a host sync (num_worst_tokens) the kernel checks that the rows fit, on every rank alike.
  m.agreed([&] {
    EPX_ARG_CHECK(rows.row_bytes % 16 == 0, "x.shape[1] (hidden): a dispatch across nodes moves rows of a "
                  "multiple of 16 bytes, got ", rows.row_bytes, " bytes");
    EPX_CHECK(handle.max_recv_tokens <= rows.capacity, ErrorKind::kBufferTooSmall, "num_nvl_bytes: ",
              m.num_nvl_bytes, " holds ", rows.capacity, " rows of this shape, a rank receives ",
              handle.max_recv_tokens, "; a dispatch across nodes needs every received row in the row region (",
              plan::nvl_bytes_for_rows(handle.max_recv_tokens, xs.hidden, xs.dtype, xs.num_topk), " bytes)");
  });
  const RdmaLayout rdma = internode_rings(m, static_cast<int64_t>(rows.row_bytes), xs.num_topk);

  kernels::InternodeDispatchParams<EmuNetView> q{};
  kernels::DispatchParams& p = q.base;
  p = dispatch_io_params(m, in, handle, out, xs, rows, out_rows);
  q.topology = m.topology.view();
  q.net = m.emu_view(rdma.signals(), rdma.num_signals());
  q.rdma = rdma;
  const int threads = m.internode_threads();  // EmuNet: Config.num_threads
  q.send_warps = internode_net_warps(m, threads);
  q.forward_warps = q.send_warps;
  plan::encode_plan(with_rings(dispatch_rows_plan(m.config, rows, p.num_experts_per_rank), rdma, q.send_warps),
                    p.ctx.plan);
  q.forward_records = handle.forward_records;  // cleared by dispatch_notify
  q.forward_slots = handle.forward_slots;
#if EPX_HAVE_GIN
  if (m.net == NetBackend::kGin) {
    kernels::InternodeDispatchParams<GinNetView> g{q.base, q.topology,
                                                   m.gin_view(0, rdma.num_signals(), kMaxNetContexts), q.rdma,
                                                   q.send_warps, q.forward_warps, q.forward_records, q.forward_slots};
    kernels::launch_internode_dispatch(g, m.rdma_channels, threads, stream);
    m.after_launch("dispatch", stream);
    return;
  }
#endif
  kernels::launch_internode_dispatch(q, m.net_mode(), m.rdma_channels, m.config.num_threads, stream);
  m.after_launch("dispatch", stream);
}

}  // namespace

int Buffer::dispatch_notify(const DispatchInputs& in, DispatchHandle& handle, const View& num_recv_tokens_per_expert,
                            cudaStream_t stream) {
  Impl& m = *impl_;
  return m.collective(OpCode::kNotify, [&]() -> int {
    m.check_usable();
    const int R = num_ranks();
    const XShape xs = validate_x(in);
    validate::tensor(in.num_tokens_per_rank, "num_tokens_per_rank", DType::kI32, {R});
    validate::tensor(in.num_tokens_per_expert, "num_tokens_per_expert", DType::kI32, {kAny});
    validate::tensor(in.is_token_in_rank, "is_token_in_rank", DType::kBool, {xs.num_tokens, R});
    validate::contiguous(in.num_tokens_per_rank, "num_tokens_per_rank");
    validate::contiguous(in.num_tokens_per_expert, "num_tokens_per_expert");
    validate::contiguous(in.is_token_in_rank, "is_token_in_rank");
    const int64_t E = in.num_tokens_per_expert.shape[0];
    EPX_ARG_CHECK(E >= R && E % R == 0 && E / R <= kMaxLocalExperts, "num_tokens_per_expert: expected [E] with E a multiple of ",
                  R, " and E / ", R, " <= ", kMaxLocalExperts, ", got ", validate::describe(in.num_tokens_per_expert));
    const int E_loc = static_cast<int>(E / R);
    validate::optional(num_recv_tokens_per_expert, "num_recv_tokens_per_expert", DType::kI32, {E_loc});
    if (num_recv_tokens_per_expert.defined()) validate::contiguous(num_recv_tokens_per_expert, "num_recv_tokens_per_expert");
    EPX_ARG_CHECK(handle.storage != nullptr, "handle: not made by this Buffer's make_handle");
    check_handle_rank(handle, rank(), R);
    EPX_ARG_CHECK(handle.num_tokens == xs.num_tokens, "handle: made for ", handle.num_tokens, " tokens, x has ",
                  xs.num_tokens);
    // NOTE: no capacity check: rows that do not fit the row region take the bounded dispatch.

    kernels::NotifyParams p{};
    p.ctx = m.context(OpCode::kNotify);
    {
      plan::OpPlan plan;
      plan.experts_per_rank = E_loc;
      plan::encode_plan(plan, p.ctx.plan);
    }
    p.num_tokens = static_cast<int>(xs.num_tokens);
    p.num_experts_per_rank = E_loc;
    p.expert_alignment = in.expert_alignment;
    p.num_tokens_per_rank = in.num_tokens_per_rank.ptr<int>();
    p.num_tokens_per_expert = in.num_tokens_per_expert.ptr<int>();
    p.is_token_in_rank = in.is_token_in_rank.ptr<bool>();
    p.num_recv_tokens_per_expert = num_recv_tokens_per_expert.defined() ? num_recv_tokens_per_expert.ptr<int>() : nullptr;
    p.count_matrix = handle.count_matrix;
    p.rank_prefix_matrix = handle.rank_prefix_matrix;
    p.send_pos = handle.send_pos;
    p.num_recv = handle.num_recv_device;
    p.num_worst_tokens = in.num_worst_tokens;
    const bool host_sync = in.num_worst_tokens == 0;
    p.mailbox = host_sync ? m.mailbox_device : nullptr;
    handle.num_experts = static_cast<int>(E);
    handle.num_worst_tokens = in.num_worst_tokens;
    handle.num_recv_tokens = -1;
    handle.max_recv_tokens = -1;
    handle.max_sent_tokens = -1;
    if (m.internode) {
      kernels::InternodeNotifyParams<EmuNetView> q{};
      q.base = p;
      q.topology = m.topology.view();
      const InternodeCountLayout layout = m.count_layout();
      q.net = m.emu_view(layout.signals(), m.topology.num_nodes());
      q.layout = layout;
      q.num_experts = static_cast<int>(E);
      q.exchanges = m.exchanges;
#if EPX_HAVE_GIN
      if (m.net == NetBackend::kGin) {
        kernels::InternodeNotifyParams<GinNetView> g{q.base, q.topology,
                                                     m.gin_view(m.gin.count_signal_base, m.topology.num_nodes(), kMaxNetContexts),
                                                     q.layout, q.num_experts, q.exchanges};
        kernels::launch_internode_notify(g, stream);
      } else {
        kernels::launch_internode_notify(q, m.net_mode(), stream);
      }
#else
      kernels::launch_internode_notify(q, m.net_mode(), stream);
#endif
      // Without a host sync the records are sized for the most rows a node may get from its rail
      // peers: each of its ranks receives at most num_worst_tokens rows.
      if (!host_sync) prepare_forward_records(m, handle, int64_t{m.topology.node_size} * in.num_worst_tokens, stream);
    } else {
      kernels::launch_notify(p, stream);
    }
    m.after_launch("dispatch_notify", stream);
    handle.filled = true;
    if (!host_sync) return -1;

    host_wait_stream(stream, m.timeout_s() + 10, "dispatch (count exchange)", rank());
    m.raise_recorded_error();
    const volatile HostMailbox* mb = m.mailbox;
    handle.num_recv_tokens = mb->num_recv;
    handle.max_recv_tokens = mb->max_rows;
    handle.max_sent_tokens = mb->max_sent_rows;
    if (m.internode) prepare_forward_records(m, handle, mb->forward_slots, stream);
    return handle.num_recv_tokens;
  });
}

void Buffer::dispatch(const DispatchInputs& in, const DispatchHandle& handle, const DispatchOutputs& out,
                      cudaStream_t stream) {
  Impl& m = *impl_;
  return m.collective(OpCode::kDispatch, [&]() {
    m.check_usable();
    const int R = num_ranks();
    const XShape xs = validate_x(in);
    EPX_ARG_CHECK(handle.filled && handle.storage != nullptr, "handle: not filled by dispatch_notify on this Buffer");
    check_handle_rank(handle, rank(), R);
    EPX_ARG_CHECK(handle.num_tokens == xs.num_tokens, "handle: made for ", handle.num_tokens, " tokens, x has ",
                  xs.num_tokens);
    EPX_ARG_CHECK(handle.num_worst_tokens > 0 || handle.num_recv_tokens >= 0,
                  "handle: row count unknown on the host (not host-synced and no num_worst_tokens)");
    const int64_t out_rows = handle.num_worst_tokens > 0 ? handle.num_worst_tokens : handle.num_recv_tokens;
    const int S = xs.num_scale_columns;
    validate::tensor(out.recv_x, "recv_x", xs.dtype, {out_rows, xs.hidden});
    validate::contiguous(out.recv_x, "recv_x");
    validate::rows_16b_aligned(out.recv_x, "recv_x");
    if (S > 0) {
      if (xs.scale_ndim == 1) validate::tensor(out.recv_x_scales, "recv_x_scales", xs.scale_dtype, {out_rows});
      else validate::tensor(out.recv_x_scales, "recv_x_scales", xs.scale_dtype, {out_rows, S});
      validate::contiguous(out.recv_x_scales, "recv_x_scales");
    } else {
      EPX_ARG_CHECK(!out.recv_x_scales.defined(), "recv_x_scales: only with fp8 x");
    }
    if (out.recv_topk_idx.defined() || out.recv_topk_weights.defined())
      EPX_ARG_CHECK(in.topk_idx.defined(), "recv_topk_idx / recv_topk_weights: need topk_idx as input");
    validate::optional(out.recv_topk_idx, "recv_topk_idx", DType::kI64, {out_rows, xs.num_topk});
    validate::optional(out.recv_topk_weights, "recv_topk_weights", DType::kF32, {out_rows, xs.num_topk});
    validate::optional(out.recv_src_idx, "recv_src_idx", DType::kI32, {out_rows});
    for (const View* v : {&out.recv_topk_idx, &out.recv_topk_weights, &out.recv_src_idx})
      if (v->defined()) validate::contiguous(*v, "recv_topk_idx / recv_topk_weights / recv_src_idx");
    if (out.recv_topk_weights.defined())
      EPX_ARG_CHECK(in.topk_weights.defined(), "recv_topk_weights: needs topk_weights as input");

    const RowLayout rows = plan::dispatch_rows(m.num_nvl_bytes, xs.hidden, xs.dtype, xs.num_topk, xs.num_scale_columns);
    if (m.internode) return internode_dispatch(m, in, handle, out, xs, rows, out_rows, stream);
    // Bounded when the busiest receiver's rows (host-synced), else the worst-case rows, do not fit
    // the row region: values every rank has, so every rank plans alike.
    const int64_t max_rows = handle.max_recv_tokens >= 0 ? handle.max_recv_tokens : handle.num_worst_tokens;
    const plan::DispatchRing ring =
        max_rows > rows.capacity
            ? m.agreed([&] {
                return plan::dispatch_ring(m.config, m.tuning, R, m.num_nvl_bytes, xs.hidden, xs.dtype, xs.num_topk,
                                           xs.num_scale_columns);
              })
            : plan::DispatchRing{};

    kernels::DispatchParams p = dispatch_io_params(m, in, handle, out, xs, rows, out_rows);
    p.copy_warps = ring.slots > 0 ? ring.copy_warps : plan::dispatch_copy_warps(m.config, m.tuning, rows.row_bytes);
    p.ring_slots = ring.slots;
    {
      plan::OpPlan plan = dispatch_rows_plan(m.config, rows, p.num_experts_per_rank);
      plan.copy_warps = p.copy_warps;
      plan.ring_slots = p.ring_slots;
      plan::encode_plan(plan, p.ctx.plan);
    }
    kernels::launch_dispatch(p, m.config.num_sms, m.config.num_threads, stream);
    m.after_launch("dispatch", stream);
  });
}

// ---------------------------------------------------------------------------------------------
// Combine

void Buffer::combine(const CombineInputs& in, const DispatchHandle& handle, const CombineOutputs& out,
                     cudaStream_t stream) {
  Impl& m = *impl_;
  return m.collective(OpCode::kCombine, [&]() {
    m.check_usable();
    const int R = num_ranks();
    EPX_ARG_CHECK(handle.filled && handle.storage != nullptr, "handle: not filled by a dispatch on this Buffer");
    check_handle_rank(handle, rank(), R);
    EPX_ARG_CHECK(handle.num_worst_tokens > 0 || handle.num_recv_tokens >= 0,
                  "handle: row count unknown on the host (not host-synced and no num_worst_tokens)");
    const int64_t rows_in = handle.num_worst_tokens > 0 ? handle.num_worst_tokens : handle.num_recv_tokens;
    const int64_t N = handle.num_tokens;
    validate::tensor(in.x, "x", DType::kBF16, {rows_in, kAny});
    validate::rows_16b_aligned(in.x, "x");
    const int H = static_cast<int>(in.x.shape[1]);
    validate::in_range(H, "x.shape[1] (hidden)", 8, 1 << 16);
    int K = 0;
    if (in.topk_weights.defined()) {
      validate::tensor(in.topk_weights, "topk_weights", DType::kF32, {rows_in, kAny});
      K = static_cast<int>(in.topk_weights.shape[1]);
      validate::in_range(K, "topk_weights.shape[1] (num_topk)", 1, kMaxTopk);
      EPX_ARG_CHECK(in.topk_weights.stride[1] == 1 || K == 1, "topk_weights: last dimension must be contiguous");
      validate::tensor(out.combined_topk_weights, "combined_topk_weights", DType::kF32, {N, K});
      EPX_ARG_CHECK(out.combined_topk_weights.stride[1] == 1 || K == 1,
                    "combined_topk_weights: last dimension must be contiguous");
    } else {
      EPX_ARG_CHECK(!out.combined_topk_weights.defined(), "combined_topk_weights: given without topk_weights");
    }
    validate::optional(in.bias_0, "bias_0", DType::kBF16, {N, H});
    validate::optional(in.bias_1, "bias_1", DType::kBF16, {N, H});
    if (in.bias_0.defined()) validate::rows_16b_aligned(in.bias_0, "bias_0");
    if (in.bias_1.defined()) validate::rows_16b_aligned(in.bias_1, "bias_1");
    validate::tensor(out.combined_x, "combined_x", DType::kBF16, {N, H});
    validate::rows_16b_aligned(out.combined_x, "combined_x");
    if (m.internode) return internode_combine(m, in, handle, out, H, K, stream);

    const RowLayout rows = plan::combine_rows(m.num_nvl_bytes, H, K);
    // The ring combine, whatever the tuning, when the rows returned to the busiest rank (host-synced)
    // do not fit the row region; without a host sync, when num_worst_tokens rows do not, or when
    // the rows a rank may get back (at most num_worst_tokens from each receiver) may not and rings
    // fit. Values every rank has, so every rank plans alike.
    // NOTE: the row-region combine checks on the device, from the count matrix, that the rows fit
    // (at 1 rank no row travels: no rings).
    const int64_t worst = handle.num_worst_tokens;
    // The rings this row region holds at any rank count (channels = 0 when none fit).
    const plan::RingPlan rings = plan::ring_plan(m.config, m.tuning, R, rows.capacity, /*bounded=*/true);
    bool bounded = false;
    if (R > 1 && handle.max_sent_tokens >= 0) {
      bounded = handle.max_sent_tokens > rows.capacity;
    } else if (R > 1) {
      bounded = worst > rows.capacity || (worst * R > rows.capacity && rings.channels > 0);
    }
    kernels::CombineParams p = combine_io_params(m, in, handle, out, rows, H, K);
    plan::RingPlan ring = bounded || plan::rings_preferred(m.tuning, R) ? rings : plan::RingPlan{};
    // Bounded without rings: bounded_ring_plan's error names the num_nvl_bytes they need.
    if (bounded && ring.channels == 0)
      ring = m.agreed([&] { return plan::bounded_ring_plan(m.config, m.tuning, R, m.num_nvl_bytes, H, K); });
    {
      plan::OpPlan plan = plan::launch_plan(m.config);
      plan.ring_channels = ring.channels;  // all ring fields 0: the row-region combine
      plan.ring_slots = ring.slots;
      plan.ring_send_warps = ring.send_warps;
      plan.ring_chunk = ring.channels > 0 ? m.tuning.ring_chunk : 0;
      plan.row_bytes = rows.row_bytes;
      plan.num_topk_weights = rows.num_topk_weights;
      plan::encode_plan(plan, p.ctx.plan);
    }
    if (ring.channels > 0) {
      p.ring_channels = ring.channels;
      p.ring_slots = ring.slots;
      p.ring_chunk = m.tuning.ring_chunk;
      p.ring_send_warps = ring.send_warps;
      kernels::launch_combine_rings(p, m.config.num_sms, m.config.num_threads, stream);
    } else {
      kernels::launch_combine(p, m.config.num_sms, m.config.num_threads, stream);
    }
    m.after_launch("combine", stream);
  });
}

}  // namespace epx
