// epx._C: the pybind11 module between the torch-facing package (python/epx) and the C++ API.
//
// The only file of epx that sees Python, and it sees no torch: tensors cross as descriptors
// `(data_ptr, dtype_code, shape, strides)` (strides in elements, 1 to 3 dims) or None for an
// absent optional argument, streams as `cudaStream_t` integers. The Buffer's operations take keywords
// only, named as the fields of the C++ API's structs (a misspelled one is a TypeError naming it), and
// return what the C++ call returns. Every epx::Error becomes the Python
// exception epx.EpxError (a RuntimeError) with the same message and `.kind`, `.message`, `.file`,
// `.line`. Calls that may block the host (collectives, host-synced dispatch, synchronize, reset,
// cleaning, destruction) release the GIL. Plain launches keep it for a real rank (cheaper than
// releasing, and nothing of this process waits for them) and release it for a simulated one: its
// peers are threads of this process, and a launch that waits for the device (a full launch queue,
// a grid waiting for room) waits for peer kernels that finish only once those threads, which need
// the GIL, have launched their part.
#include <cuda_runtime_api.h>
#include <nccl.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>

#include "epx/buffer.hpp"
#include "epx/communicator.hpp"
#include "epx/config.hpp"
#include "epx/error.hpp"
#include "epx/sim_world.hpp"
#include "epx/types.hpp"
#include "host/handle_storage.hpp"
#include "host/plan.hpp"

namespace py = pybind11;

namespace {

using epx::DType;
using epx::ErrorKind;
using epx::View;

// epx.EpxError, created at import; owned by the module (a strong reference kept in its dict).
PyObject* g_error_type = nullptr;

// ---- Descriptors -> View ----------------------------------------------------------------------

int64_t to_i64(PyObject* o, const char* name, const char* what) {
  const long long v = PyLong_AsLongLong(o);
  if (v == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    EPX_FAIL(ErrorKind::kInvalidArgument, name, ": ", what, " must be an int");
  }
  return v;
}

// Reads a tuple/list of ints (torch.Size, tensor.stride()) into `out`; returns its length.
int read_dims(PyObject* seq, const char* name, const char* what, int64_t out[3]) {
  PyObject* fast = PySequence_Fast(seq, "shape/strides must be a sequence");
  if (fast == nullptr) {
    PyErr_Clear();
    EPX_FAIL(ErrorKind::kInvalidArgument, name, ": ", what, " must be a sequence of ints");
  }
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
  if (n < 1 || n > 3) {
    Py_DECREF(fast);
    EPX_FAIL(ErrorKind::kInvalidArgument, name, ": expected 1 to 3 dimensions, got ", n);
  }
  PyObject** items = PySequence_Fast_ITEMS(fast);
  try {
    for (Py_ssize_t i = 0; i < n; ++i) out[i] = to_i64(items[i], name, what);
  } catch (...) {
    Py_DECREF(fast);
    throw;
  }
  Py_DECREF(fast);
  return static_cast<int>(n);
}

// None -> undefined View (absent optional argument); (ptr, dtype, shape, strides) -> View.
View to_view(py::handle desc, const char* name) {
  if (desc.is_none()) return View{};
  PyObject* d = desc.ptr();
  if (!PyTuple_Check(d) || PyTuple_GET_SIZE(d) != 4)
    EPX_FAIL(ErrorKind::kInvalidArgument, name, ": expected a descriptor (data_ptr, dtype, shape, strides) or None");
  const unsigned long long ptr = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(d, 0));
  if (PyErr_Occurred()) {
    PyErr_Clear();
    EPX_FAIL(ErrorKind::kInvalidArgument, name, ": data_ptr must be a non-negative int");
  }
  const int64_t code = to_i64(PyTuple_GET_ITEM(d, 1), name, "dtype code");
  if (code < static_cast<int>(DType::kBF16) || code > static_cast<int>(DType::kBool))
    EPX_FAIL(ErrorKind::kInvalidArgument, name, ": unknown dtype code ", code);
  int64_t shape[3] = {0, 0, 0}, stride[3] = {0, 0, 0};
  const int ndim = read_dims(PyTuple_GET_ITEM(d, 2), name, "shape", shape);
  const int nst = read_dims(PyTuple_GET_ITEM(d, 3), name, "strides", stride);
  if (ndim != nst) EPX_FAIL(ErrorKind::kInvalidArgument, name, ": shape has ", ndim, " dims, strides ", nst);
  void* p = reinterpret_cast<void*>(static_cast<uintptr_t>(ptr));
  const DType dt = static_cast<DType>(code);
  switch (ndim) {
    case 1: return View::strided(p, dt, {shape[0]}, {stride[0]});
    case 2: return View::strided(p, dt, {shape[0], shape[1]}, {stride[0], stride[1]});
    default: return View::strided(p, dt, {shape[0], shape[1], shape[2]}, {stride[0], stride[1], stride[2]});
  }
}

cudaStream_t to_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

py::tuple view_to_tuple(const View& v) {
  py::tuple shape(v.ndim), stride(v.ndim);
  for (int d = 0; d < v.ndim; ++d) {
    shape[d] = py::int_(v.shape[d]);
    stride[d] = py::int_(v.stride[d]);
  }
  return py::make_tuple(reinterpret_cast<uintptr_t>(v.data), static_cast<int>(v.dtype), shape, stride);
}

epx::Config make_config(int num_sms, int num_threads, double timeout_s) {
  epx::Config c;
  c.num_sms = num_sms;
  c.num_threads = num_threads;
  c.timeout_s = timeout_s;
  return c;
}

py::tuple config_to_tuple(const epx::Config& c) { return py::make_tuple(c.num_sms, c.num_threads, c.timeout_s); }

// ---- Owning wrappers ----------------------------------------------------------------------------

// Destruction of a Communicator or Buffer is collective (barriers): never hold the GIL while a
// peer may still be on its way, except while the interpreter is finalizing.
bool interpreter_finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing() != 0;
#else
  return _Py_IsFinalizing() != 0;
#endif
}

template <typename T>
void release_without_gil(std::unique_ptr<T>& p) {
  if (!p) return;
  if (Py_IsInitialized() && !interpreter_finalizing() && PyGILState_Check()) {
    py::gil_scoped_release nogil;
    p.reset();
  } else {
    p.reset();
  }
}

inline const char* owned_name(const epx::Buffer*) { return "Buffer"; }
inline const char* owned_name(const epx::SimWorld*) { return "SimWorld"; }

// A core object owned by a Python object: released without the GIL (its teardown may wait on the
// peers), and refused with a clear error once destroy() released it.
template <class T>
struct Owned {
  std::unique_ptr<T> ptr;
  ~Owned() { release_without_gil(ptr); }
  T& get() {
    EPX_CHECK(ptr != nullptr, ErrorKind::kState, owned_name(static_cast<const T*>(nullptr)), " was destroyed");
    return *ptr;
  }
};
using PySimWorld = Owned<epx::SimWorld>;  // never released early: its Communicators are borrowed

// A real Communicator is owned here; a simulated one belongs to its SimWorld (the Python
// SimWorld.comm(rank) object keeps the world alive, and a Buffer keeps its communicator alive).
struct PyCommunicator {
  std::unique_ptr<epx::Communicator> owned;
  epx::Communicator* borrowed = nullptr;
  ~PyCommunicator() { release_without_gil(owned); }
  epx::Communicator& get() {
    epx::Communicator* c = owned ? owned.get() : borrowed;
    EPX_CHECK(c != nullptr, ErrorKind::kState, "Communicator was destroyed");
    return *c;
  }
  bool destroyed() const { return owned == nullptr && borrowed == nullptr; }
  // Real: destroys the NCCL communicator (collective). Simulated: lets go of it (the world frees it).
  void destroy() {
    release_without_gil(owned);
    borrowed = nullptr;
  }
};

// A Buffer and whether its launches release the GIL (a simulated rank's do, see the top).
struct PyBuffer : Owned<epx::Buffer> {
  bool simulated = false;
};

// Releases the GIL for a scope when `release` (a simulated rank's launch). Construct it after the
// last use of a Python object in the call.
class GilReleaseIf {
 public:
  explicit GilReleaseIf(bool release) {
    if (release) nogil_.emplace();
  }

 private:
  std::optional<py::gil_scoped_release> nogil_;
};

// A CUDA stream of its own (not one of torch's pooled streams, which repeat after 32: two
// simulated ranks on one stream would wait for each other's queued kernels). Destroyed with the
// object; CUDA frees it once its queued work is done.
struct OwnedStream {
  cudaStream_t stream = nullptr;
  int device = 0;
  OwnedStream(int device_index, int priority) : device(device_index) {
    int current = 0;
    cudaError_t st = cudaGetDevice(&current);
    if (st == cudaSuccess) st = cudaSetDevice(device);
    if (st == cudaSuccess) {
      st = cudaStreamCreateWithPriority(&stream, cudaStreamNonBlocking, priority);
      (void)cudaSetDevice(current);
    }
    EPX_CHECK(st == cudaSuccess, ErrorKind::kCuda, "Stream: cudaStreamCreateWithPriority on device ", device,
              " failed: ", cudaGetErrorString(st));
  }
  OwnedStream(const OwnedStream&) = delete;
  OwnedStream& operator=(const OwnedStream&) = delete;
  ~OwnedStream() {
    if (stream != nullptr) (void)cudaStreamDestroy(stream);  // may fail once the CUDA runtime is unloading
  }
};

// "Stream `dst` waits for the work queued on `src` so far" with one reusable event (torch's
// Stream.wait_stream creates, records and destroys a torch.cuda.Event per call, through several
// Python frames). Reusing the event is safe: cudaStreamWaitEvent waits for the record that precedes
// it, and the record and the wait happen in one call by the one thread that uses the join (a
// Buffer's: under the GIL, or without it for a simulated rank). Works under CUDA-graph capture
// the same way (a fork or join of the capture). The event belongs to the device that was current at
// construction; both streams must be on it.
struct StreamJoin {
  cudaEvent_t event = nullptr;
  bool simulated = false;  // release the GIL around the record and wait (see the top)
  explicit StreamJoin(bool simulated_rank = false) : simulated(simulated_rank) {
    const cudaError_t st = cudaEventCreateWithFlags(&event, cudaEventDisableTiming);
    EPX_CHECK(st == cudaSuccess, ErrorKind::kCuda, "stream join: cudaEventCreateWithFlags failed: ",
              cudaGetErrorString(st));
  }
  StreamJoin(const StreamJoin&) = delete;
  StreamJoin& operator=(const StreamJoin&) = delete;
  ~StreamJoin() {
    if (event != nullptr) (void)cudaEventDestroy(event);  // may fail once the CUDA runtime is unloading
  }
  void wait(uintptr_t dst, uintptr_t src) {
    GilReleaseIf nogil(simulated);
    cudaError_t st = cudaEventRecord(event, to_stream(src));
    EPX_CHECK(st == cudaSuccess, ErrorKind::kCuda, "stream join: cudaEventRecord on stream ", src,
              " failed: ", cudaGetErrorString(st));
    st = cudaStreamWaitEvent(to_stream(dst), event, 0);
    EPX_CHECK(st == cudaSuccess, ErrorKind::kCuda, "stream join: cudaStreamWaitEvent on stream ", dst,
              " failed: ", cudaGetErrorString(st));
  }
};

// A DispatchHandle whose device arrays live in one int32 tensor the Python side allocated (torch's
// caching allocator: no cudaMalloc/cudaFree per dispatch, CUDA-graph friendly), placed by
// host::handle_storage_layout (exported as DispatchHandle.storage_layout). `storage` keeps that tensor
// alive as long as the handle.
struct PyDispatchHandle {
  epx::DispatchHandle handle;
  py::object storage;
};

std::unique_ptr<PyDispatchHandle> make_dispatch_handle(uintptr_t storage_ptr, int64_t storage_numel, int num_ranks,
                                                       int rank, int64_t num_tokens, py::object storage) {
  EPX_ARG_CHECK(num_ranks >= 1 && num_ranks <= epx::kMaxRanks, "num_ranks: expected [1, ", epx::kMaxRanks, "], got ",
                num_ranks);
  EPX_ARG_CHECK(num_tokens >= 0 && num_tokens <= (int64_t{1} << 30), "num_tokens: expected [0, 2^30], got ",
                num_tokens);
  const epx::host::HandleStorageLayout l = epx::host::handle_storage_layout(num_ranks, num_tokens);
  EPX_ARG_CHECK(storage_ptr != 0 && storage_numel >= l.total, "handle storage: expected ", l.total,
                " int32 elements, got ", storage_numel);
  auto h = std::make_unique<PyDispatchHandle>();
  h->handle.num_ranks = num_ranks;
  h->handle.rank = rank;
  h->handle.num_tokens = static_cast<int>(num_tokens);
  int* base = reinterpret_cast<int*>(storage_ptr);
  epx::host::place_handle_arrays(h->handle, base);
  // Non-null marker (the C++ API checks it); the memory is owned by `storage`.
  h->handle.storage = std::shared_ptr<void>(base, [](void*) {});
  h->storage = std::move(storage);
  return h;
}

void translate_error(const epx::Error& e) {
  py::object type = py::reinterpret_borrow<py::object>(g_error_type);
  py::object exc = type(e.what());
  exc.attr("kind") = epx::error_kind_name(e.kind());
  exc.attr("message") = e.message();
  exc.attr("file") = e.file() != nullptr ? e.file() : "";
  exc.attr("line") = e.line();
  PyErr_SetObject(g_error_type, exc.ptr());
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "epx C++ core binding (no torch). Use the package `epx`, not this module.";

  // ---- Errors ---------------------------------------------------------------------------------
  {
    py::dict attrs;
    attrs["kind"] = py::none();
    attrs["message"] = py::none();
    attrs["file"] = py::none();
    attrs["line"] = py::none();
    g_error_type = PyErr_NewExceptionWithDoc(
        "epx.EpxError",
        "Error raised by epx. `kind` names the category (InvalidArgument, BufferTooSmall, Cuda, Nccl, Timeout, "
        "State, Unsupported, Aborted); `message` is the text without the prefix and location.",
        PyExc_RuntimeError, attrs.ptr());
    if (g_error_type == nullptr) throw py::error_already_set();
    m.add_object("EpxError", py::reinterpret_steal<py::object>(g_error_type));
  }
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const epx::Error& e) {
      translate_error(e);
    }
  });
  {
    const ErrorKind all[] = {ErrorKind::kInvalidArgument, ErrorKind::kBufferTooSmall, ErrorKind::kCuda,
                             ErrorKind::kNccl, ErrorKind::kTimeout, ErrorKind::kState, ErrorKind::kUnsupported,
                             ErrorKind::kAborted};
    constexpr int kNumKinds = sizeof(all) / sizeof(all[0]);
    py::tuple kinds(kNumKinds);
    for (int i = 0; i < kNumKinds; ++i) kinds[i] = epx::error_kind_name(all[i]);
    m.attr("ERROR_KINDS") = kinds;
  }

  // ---- Constants ------------------------------------------------------------------------------
  m.attr("DTYPE_BF16") = static_cast<int>(DType::kBF16);
  m.attr("DTYPE_FP8E4M3") = static_cast<int>(DType::kFP8E4M3);
  m.attr("DTYPE_F32") = static_cast<int>(DType::kF32);
  m.attr("DTYPE_I32") = static_cast<int>(DType::kI32);
  m.attr("DTYPE_I64") = static_cast<int>(DType::kI64);
  m.attr("DTYPE_BOOL") = static_cast<int>(DType::kBool);
  m.attr("MAX_RANKS") = epx::kMaxRanks;
  m.attr("MAX_LOCAL_EXPERTS") = epx::kMaxLocalExperts;
  m.attr("MAX_TOPK") = epx::kMaxTopk;
  m.attr("MAX_NODES") = epx::kMaxNodes;
  m.attr("MAX_WORLD_RANKS") = epx::kMaxWorldRanks;
  m.attr("RDMA_ALIGN") = static_cast<int>(epx::kRdmaAlign);
  // Protocol bytes at the start of the high-throughput part / the low-latency region (Buffer::flag_bytes).
  m.attr("NVL_FLAG_BYTES") = epx::Buffer::flag_bytes(false);
  m.attr("LL_FLAG_BYTES") = epx::Buffer::flag_bytes(true);
  m.attr("LL_MAX_TOPK") = epx::kMaxLlTopk;
  m.attr("UNIQUE_ID_BYTES") = static_cast<int>(sizeof(ncclUniqueId));

  m.def("nccl_version", [] {
    int v = 0;
    const ncclResult_t r = ncclGetVersion(&v);
    EPX_CHECK(r == ncclSuccess, ErrorKind::kNccl, "ncclGetVersion failed: ", ncclGetErrorString(r));
    return v;
  }, "NCCL version code of the library epx runs against (e.g. 22809).");

  m.def("dtype_size", [](int code) {
    EPX_ARG_CHECK(code >= 0 && code <= static_cast<int>(DType::kBool), "dtype: unknown code ", code);
    return epx::dtype_size(static_cast<DType>(code));
  });

  // ---- Config ---------------------------------------------------------------------------------
  m.def("default_config", [](int num_ranks) { return config_to_tuple(epx::Config::defaults(num_ranks)); },
        py::arg("num_ranks"), "(num_sms, num_threads, timeout_s) of epx::Config::defaults(num_ranks).");
  m.def("validate_config",
        [](int num_sms, int num_threads, double timeout_s, int num_device_sms) {
          make_config(num_sms, num_threads, timeout_s).validate(num_device_sms);
        },
        py::arg("num_sms"), py::arg("num_threads"), py::arg("timeout_s"), py::arg("num_device_sms") = 0,
        "Raises EpxError(InvalidArgument) naming the field out of range (no device needed when "
        "num_device_sms <= 0).");

  // ---- Size hints (static, no GPU) ------------------------------------------------------------
  m.def("nvl_buffer_size_hint",
        [](int64_t max_rows, int hidden, int dtype, int num_topk, int num_ranks) {
          EPX_ARG_CHECK(dtype >= 0 && dtype <= static_cast<int>(DType::kBool), "x_dtype: unknown code ", dtype);
          return epx::Buffer::get_nvl_buffer_size_hint(max_rows, hidden, static_cast<DType>(dtype), num_topk,
                                                       num_ranks);
        },
        py::arg("max_rows"), py::arg("hidden"), py::arg("dtype"), py::arg("num_topk"), py::arg("num_ranks"));
  m.def("rdma_buffer_size_hint",
        [](int num_ranks, int node_size, int num_channels, int chunk_tokens, int ring_slots, int64_t hidden_bytes,
           int num_topk) {
          return epx::plan::rdma_bytes_for(epx::plan::RdmaShape{num_ranks, node_size, num_channels, chunk_tokens,
                                                                ring_slots, hidden_bytes, num_topk});
        },
        py::arg("num_ranks"), py::arg("node_size"), py::arg("num_channels"), py::arg("chunk_tokens"),
        py::arg("ring_slots"), py::arg("hidden_bytes"), py::arg("num_topk"),
        "num_rdma_bytes of the RDMA rings (plan::rdma_bytes_for, common/rdma_layout.hpp); 0 for one node.");
  m.def("nvl_ring_buffer_size_hint",
        [](int num_sms, int num_threads, int64_t hidden_bytes, int num_ranks, int64_t rows_per_ring) {
          EPX_ARG_CHECK(hidden_bytes >= 1, "hidden_bytes: expected >= 1, got ", hidden_bytes);
          epx::Config c;
          c.num_sms = num_sms;
          c.num_threads = num_threads;
          // Config.ring_slots' range; below it every ring's minimum applies anyway.
          c.ring_slots = static_cast<int>(std::min<int64_t>(std::max<int64_t>(rows_per_ring, 64), 4096));
          return c.get_nvl_buffer_size_hint(static_cast<size_t>(hidden_bytes), num_ranks);
        },
        py::arg("num_sms"), py::arg("num_threads"), py::arg("hidden_bytes"), py::arg("num_ranks"),
        py::arg("rows_per_ring"),
        "num_nvl_bytes serving any batch: num_ranks x num_sms rings of rows_per_ring rows (within [64, 4096]), at "
        "least every ring's minimum.");
  m.def("bounded_ring_rows",
        [](int num_sms, int num_threads, size_t num_nvl_bytes, int hidden, int dtype, int num_topk, int num_ranks) {
          EPX_ARG_CHECK(dtype >= 0 && dtype <= static_cast<int>(DType::kBool), "x_dtype: unknown code ", dtype);
          epx::Config c;
          c.num_sms = num_sms;
          c.num_threads = num_threads;
          c.validate();
          const epx::Tuning t;  // a Buffer's own (Python never changes it)
          const epx::plan::DispatchRing d = epx::plan::dispatch_ring(c, t, num_ranks, num_nvl_bytes, hidden,
                                                                     static_cast<DType>(dtype), num_topk);
          const epx::plan::RingPlan r = epx::plan::bounded_ring_plan(c, t, num_ranks, num_nvl_bytes, hidden, num_topk);
          return py::make_tuple(d.slots, r.slots);
        },
        py::arg("num_sms"), py::arg("num_threads"), py::arg("num_nvl_bytes"), py::arg("hidden"), py::arg("dtype"),
        py::arg("num_topk"), py::arg("num_ranks"),
        "(dispatch, combine) rows per ring of a call whose rows do not fit the row region; EpxError(BufferTooSmall) "
        "naming the minimum num_nvl_bytes when the rings would be too small.");
  m.def("low_latency_size_hint", &epx::Buffer::low_latency_size_hint, py::arg("num_max_dispatch_tokens_per_rank"),
        py::arg("hidden"), py::arg("num_ranks"), py::arg("num_experts"), py::arg("num_topk"),
        py::arg("zero_copy") = false);
  py::enum_<epx::LlZeroCopy>(m, "LlZeroCopy", "BufferOptions::ll_zero_copy: the zero-copy combine buffers")
      .value("kOff", epx::LlZeroCopy::kOff)
      .value("kOn", epx::LlZeroCopy::kOn)
      .value("kIfRoom", epx::LlZeroCopy::kIfRoom);
  py::enum_<epx::LowLatencyScale>(m, "LowLatencyScale", "LowLatencyDispatchArgs::scale_format: the fp8 scales")
      .value("kFloat", epx::LowLatencyScale::kFloat)
      .value("kUE8M0", epx::LowLatencyScale::kUE8M0);

  // ---- CUDA helpers ---------------------------------------------------------------------------
  m.def("host_device_pointer", [](uintptr_t host_ptr) {
    void* dev = nullptr;
    const cudaError_t st = cudaHostGetDevicePointer(&dev, reinterpret_cast<void*>(host_ptr), 0);
    EPX_CHECK(st == cudaSuccess, ErrorKind::kCuda, "cudaHostGetDevicePointer failed: ", cudaGetErrorString(st),
              " (is the tensor in pinned host memory?)");
    return reinterpret_cast<uintptr_t>(dev);
  }, py::arg("host_ptr"), "Device address of pinned host memory (for kernels that write to the host).");

  m.def("memset_async", [](uintptr_t ptr, int value, size_t num_bytes, uintptr_t stream) {
    const cudaError_t st = cudaMemsetAsync(reinterpret_cast<void*>(ptr), value, num_bytes, to_stream(stream));
    EPX_CHECK(st == cudaSuccess, ErrorKind::kCuda, "cudaMemsetAsync failed: ", cudaGetErrorString(st));
  }, py::arg("ptr"), py::arg("value"), py::arg("num_bytes"), py::arg("stream"));

  py::class_<StreamJoin>(m, "StreamJoin",
                         "A reusable CUDA event (made on the current device) for stream-to-stream waits.")
      .def(py::init<bool>(), py::arg("simulated") = false,
           "simulated: the join of a simulated rank's Buffer (its waits release the GIL).")
      .def("wait", &StreamJoin::wait, py::arg("dst"), py::arg("src"),
           "Stream `dst` (a cudaStream_t int) waits for the work queued on stream `src` so far (no host sync).");

  py::class_<OwnedStream>(m, "Stream",
                          "A non-blocking CUDA stream of its own on `device` (torch.cuda.ExternalStream wraps "
                          "its handle); destroyed with this object.")
      .def(py::init<int, int>(), py::arg("device"), py::arg("priority") = 0)
      .def_property_readonly("handle", [](const OwnedStream& s) { return reinterpret_cast<uintptr_t>(s.stream); })
      .def_property_readonly("device", [](const OwnedStream& s) { return s.device; });

  // ---- Communicator ---------------------------------------------------------------------------
  m.def("get_unique_id", [] {
    const ncclUniqueId id = epx::Communicator::make_unique_id();
    return py::bytes(id.internal, sizeof(id.internal));
  }, "A fresh ncclUniqueId as bytes (rank 0 makes it and shares it with the others).");

  py::class_<PyCommunicator>(m, "Communicator")
      .def(py::init([](const py::bytes& unique_id, int rank, int world, int device) {
             const std::string id_bytes = unique_id;
             EPX_ARG_CHECK(id_bytes.size() == sizeof(ncclUniqueId), "unique_id: expected ", sizeof(ncclUniqueId),
                           " bytes (from get_unique_id), got ", id_bytes.size());
             ncclUniqueId id;
             std::memcpy(id.internal, id_bytes.data(), sizeof(id.internal));
             auto c = std::make_unique<PyCommunicator>();
             py::gil_scoped_release nogil;
             c->owned = std::make_unique<epx::Communicator>(id, rank, world, device);
             return c;
           }),
           py::arg("unique_id"), py::arg("rank"), py::arg("world"), py::arg("device"),
           "Collective over `world` processes: ncclCommInitRank on `device`.")
      .def_property_readonly("rank", [](PyCommunicator& c) { return c.get().rank(); })
      .def_property_readonly("world", [](PyCommunicator& c) { return c.get().world(); })
      .def_property_readonly("local_rank", [](PyCommunicator& c) { return c.get().local_rank(); })
      .def_property_readonly("local_size", [](PyCommunicator& c) { return c.get().local_size(); })
      .def_property_readonly("device", [](PyCommunicator& c) { return c.get().device(); })
      .def_property_readonly("num_device_sms", [](PyCommunicator& c) { return c.get().num_device_sms(); })
      .def_property_readonly("simulated", [](PyCommunicator& c) { return c.get().simulated(); })
      .def("barrier", [](PyCommunicator& c, double timeout_s) {
             epx::Communicator& comm = c.get();
             py::gil_scoped_release nogil;
             comm.barrier(timeout_s);
           }, py::arg("timeout_s") = 100.0)
      .def("destroy", &PyCommunicator::destroy,
           "Real: destroys the NCCL communicator now (collective). Simulated: lets go of it (its SimWorld frees "
           "it). Later calls raise EpxError(State).")
      .def_property_readonly("destroyed", &PyCommunicator::destroyed);

  // ---- SimWorld (design.md 3) -----------------------------------------------------------------
  py::class_<PySimWorld>(m, "SimWorld",
                         "R simulated ranks on one GPU: their Communicators, host collectives and symmetric "
                         "memory. The ranks run on threads of this process (epx.sim makes them).")
      .def(py::init([](int world, int device, double timeout_s) {
             auto w = std::make_unique<PySimWorld>();
             w->ptr = std::make_unique<epx::SimWorld>(world, device, timeout_s);
             return w;
           }),
           py::arg("world"), py::arg("device") = 0, py::arg("timeout_s") = 0.0,
           "world in [2, max_world(device)]; timeout_s bounds every host collective (0 = EPX_TIMEOUT_S).")
      .def_static("max_world", &epx::SimWorld::max_world, py::arg("device") = 0,
                  "Largest number of simulated ranks on `device` (its SMs / SimWorld's minimum share).")
      .def_static("sms_per_rank", &epx::SimWorld::sms_per_rank, py::arg("world"), py::arg("device") = 0,
                  "SMs each of `world` ranks would own on `device`, without making a world.")
      .def_property_readonly("world", [](PySimWorld& w) { return w.get().world(); })
      .def_property_readonly("device", [](PySimWorld& w) { return w.get().device(); })
      .def_property_readonly("num_sms_per_rank", [](PySimWorld& w) { return w.get().num_sms_per_rank(); })
      .def("comm", [](PySimWorld& w, int rank) {
             auto c = std::make_unique<PyCommunicator>();
             c->borrowed = &w.get().comm(rank);
             return c;
           }, py::arg("rank"), py::keep_alive<0, 1>(),
           "The Communicator of `rank` (owned by the world, which it keeps alive); use it from that rank's "
           "thread only.")
      .def("leave", [](PySimWorld& w, int rank, const std::string& reason) {
             epx::SimWorld& world = w.get();
             py::gil_scoped_release nogil;
             world.leave(rank, reason);
           }, py::arg("rank"), py::arg("reason"),
           "`rank` failed and takes no further part: its peers' host collectives fail at once naming it.");
  // NOTE: no destroy(): the world is freed (without the GIL) when the last reference goes, and every
  // Communicator handle of it holds one, so no Buffer can outlive it.

  // ---- Dispatch handle ------------------------------------------------------------------------
  py::class_<PyDispatchHandle>(m, "DispatchHandle")
      .def(py::init(&make_dispatch_handle), py::kw_only(), py::arg("storage_ptr"), py::arg("storage_numel"), py::arg("num_ranks"),
           py::arg("rank"), py::arg("num_tokens"), py::arg("storage"))
      .def_static("storage_layout", [](int num_ranks, int64_t num_tokens) {
             const epx::host::HandleStorageLayout l = epx::host::handle_storage_layout(num_ranks, num_tokens);
             return py::make_tuple(l.total, l.rank_prefix_matrix, l.count_matrix, l.send_pos, l.num_recv);
           }, py::arg("num_ranks"), py::arg("num_tokens"),
           "(total, rank_prefix_matrix, count_matrix, send_pos, num_recv): int32 offsets in the storage.")
      .def_property_readonly("num_ranks", [](const PyDispatchHandle& h) { return h.handle.num_ranks; })
      .def_property_readonly("rank", [](const PyDispatchHandle& h) { return h.handle.rank; })
      .def_property_readonly("num_tokens", [](const PyDispatchHandle& h) { return h.handle.num_tokens; })
      .def_property_readonly("num_experts", [](const PyDispatchHandle& h) { return h.handle.num_experts; })
      .def_property_readonly("num_recv_tokens", [](const PyDispatchHandle& h) { return h.handle.num_recv_tokens; })
      .def_property_readonly("max_recv_tokens", [](const PyDispatchHandle& h) { return h.handle.max_recv_tokens; })
      .def_property_readonly("max_sent_tokens", [](const PyDispatchHandle& h) { return h.handle.max_sent_tokens; })
      .def_property_readonly("num_worst_tokens", [](const PyDispatchHandle& h) { return h.handle.num_worst_tokens; })
      .def_property_readonly("filled", [](const PyDispatchHandle& h) { return h.handle.filled; })
      .def_property_readonly("storage", [](const PyDispatchHandle& h) { return h.storage; })
      .def("__repr__", [](const PyDispatchHandle& h) {
        return epx::detail::concat("<epx DispatchHandle rank ", h.handle.rank, "/", h.handle.num_ranks, ", ",
                                   h.handle.num_tokens, " tokens, ", h.handle.num_recv_tokens, " received, worst ",
                                   h.handle.num_worst_tokens, h.handle.filled ? "" : ", not filled", ">");
      });

  // ---- Low-latency handle -----------------------------------------------------------------------
  // What Buffer.low_latency_dispatch returns (epx::LowLatencyHandle); its views point into the
  // dispatch's output tensors, which the Python handle tuple keeps alive.
  py::class_<epx::LowLatencyHandle>(m, "LowLatencyHandle")
      .def(py::init([](int T, int hidden, int num_experts, int num_topk, int buffer_idx, py::handle src_info,
                       py::handle layout_range, py::handle src_topk_slot) {
             epx::LowLatencyHandle h;
             h.num_max_dispatch_tokens_per_rank = T;
             h.hidden = hidden;
             h.num_experts = num_experts;
             h.num_topk = num_topk;
             h.buffer_idx = buffer_idx;
             h.src_info = to_view(src_info, "src_info");
             h.layout_range = to_view(layout_range, "layout_range");
             h.src_topk_slot = to_view(src_topk_slot, "src_topk_slot");
             return h;
           }),
           py::kw_only(), py::arg("num_max_dispatch_tokens_per_rank"), py::arg("hidden"), py::arg("num_experts"),
           py::arg("num_topk"), py::arg("buffer_idx"), py::arg("src_info"), py::arg("layout_range"),
           py::arg("src_topk_slot"))
      .def_readonly("num_max_dispatch_tokens_per_rank", &epx::LowLatencyHandle::num_max_dispatch_tokens_per_rank)
      .def_readonly("hidden", &epx::LowLatencyHandle::hidden)
      .def_readonly("num_experts", &epx::LowLatencyHandle::num_experts)
      .def_readonly("num_topk", &epx::LowLatencyHandle::num_topk)
      .def_readonly("buffer_idx", &epx::LowLatencyHandle::buffer_idx)
      .def("__repr__", [](const epx::LowLatencyHandle& h) {
        return epx::detail::concat("<epx LowLatencyHandle T ", h.num_max_dispatch_tokens_per_rank, ", hidden ",
                                   h.hidden, ", ", h.num_experts, " experts, top-", h.num_topk, ", buffer ",
                                   h.buffer_idx, ">");
      });

  // ---- Buffer ---------------------------------------------------------------------------------
  py::class_<PyBuffer>(m, "Buffer")
      .def(py::init([](PyCommunicator& comm, size_t num_nvl_bytes, size_t num_ll_bytes, int num_sms,
                       int num_threads, double timeout_s, bool enable_shrink, epx::LlZeroCopy ll_zero_copy,
                       int node_size) {
             epx::BufferOptions options;
             options.node_size = node_size;
             options.config = make_config(num_sms, num_threads, timeout_s);
             options.num_ll_bytes = num_ll_bytes;
             options.enable_shrink = enable_shrink;
             options.ll_zero_copy = ll_zero_copy;
             epx::Communicator& c = comm.get();
             auto b = std::make_unique<PyBuffer>();
             b->simulated = c.simulated();
             py::gil_scoped_release nogil;
             b->ptr = std::make_unique<epx::Buffer>(c, num_nvl_bytes, options);
             return b;
           }),
           py::arg("comm"), py::kw_only(), py::arg("num_nvl_bytes"), py::arg("num_ll_bytes"), py::arg("num_sms"),
           py::arg("num_threads"), py::arg("timeout_s"), py::arg("enable_shrink") = false,
           py::arg("ll_zero_copy") = epx::LlZeroCopy::kOff, py::arg("node_size") = 0, py::keep_alive<1, 2>(),
           "Collective: allocates the symmetric buffer (num_nvl_bytes + num_ll_bytes) on every rank.")
      .def_property_readonly("rank", [](PyBuffer& b) { return b.get().rank(); })
      .def_property_readonly("num_ranks", [](PyBuffer& b) { return b.get().num_ranks(); })
      .def_property_readonly("node_size", [](PyBuffer& b) { return b.get().node_size(); })
      .def_property_readonly("num_nodes", [](PyBuffer& b) { return b.get().num_nodes(); })
      .def_property_readonly("num_nvl_bytes", [](PyBuffer& b) { return b.get().num_nvl_bytes(); })
      .def_property_readonly("failed", [](PyBuffer& b) { return b.get().failed(); })
      .def_property_readonly("destroyed", [](PyBuffer& b) { return b.ptr == nullptr; })
      .def("config", [](PyBuffer& b) { return config_to_tuple(b.get().config()); })
      .def("set_config", [](PyBuffer& b, int num_sms, int num_threads, double timeout_s) {
             b.get().set_config(make_config(num_sms, num_threads, timeout_s));
           }, py::arg("num_sms"), py::arg("num_threads"), py::arg("timeout_s"))
      .def("row_capacity", [](PyBuffer& b, int hidden, int dtype, int num_topk) {
             EPX_ARG_CHECK(dtype >= 0 && dtype <= static_cast<int>(DType::kBool), "x_dtype: unknown code ", dtype);
             return b.get().row_capacity(hidden, static_cast<DType>(dtype), num_topk);
           }, py::arg("hidden"), py::arg("dtype"), py::arg("num_topk"))
      .def("peer_pointer", [](PyBuffer& b, int peer) { return reinterpret_cast<uintptr_t>(b.get().peer_pointer(peer)); },
           py::arg("peer"))

      // The operations take keywords only, named as the fields of the C++ API's structs
      // (epx/buffer.hpp: DispatchInputs, DispatchOutputs, CombineInputs, ...); an optional view
      // defaults to None (absent), a scalar to its C++ default. Each returns what its C++ call returns.

      // Layout (design.md 4.1)
      .def("get_dispatch_layout",
           [](PyBuffer& b, py::handle topk_idx, int num_experts, py::handle num_tokens_per_rank,
              py::handle num_tokens_per_expert, py::handle is_token_in_rank, uintptr_t stream) {
             epx::Buffer& buf = b.get();
             const View topk = to_view(topk_idx, "topk_idx");
             const View per_rank = to_view(num_tokens_per_rank, "num_tokens_per_rank");
             const View per_expert = to_view(num_tokens_per_expert, "num_tokens_per_expert");
             const View in_rank = to_view(is_token_in_rank, "is_token_in_rank");
             GilReleaseIf nogil(b.simulated);
             buf.get_dispatch_layout(topk, num_experts, per_rank, per_expert, in_rank, to_stream(stream));
           },
           py::kw_only(), py::arg("topk_idx"), py::arg("num_experts"), py::arg("num_tokens_per_rank"),
           py::arg("num_tokens_per_expert"), py::arg("is_token_in_rank"), py::arg("stream"))

      // High-throughput dispatch (design.md 4.2): notify (host-synced unless num_worst_tokens > 0)
      // then dispatch.
      .def("dispatch_notify",
           [](PyBuffer& b, PyDispatchHandle& h, py::handle x, py::handle x_scales, py::handle topk_idx,
              py::handle topk_weights, py::handle num_tokens_per_rank, py::handle is_token_in_rank,
              py::handle num_tokens_per_expert, int expert_alignment, int num_worst_tokens,
              py::handle num_recv_tokens_per_expert, uintptr_t stream) {
             epx::Buffer& buf = b.get();
             epx::DispatchInputs in;
             in.x = to_view(x, "x");
             in.x_scales = to_view(x_scales, "x_scales");
             in.topk_idx = to_view(topk_idx, "topk_idx");
             in.topk_weights = to_view(topk_weights, "topk_weights");
             in.num_tokens_per_rank = to_view(num_tokens_per_rank, "num_tokens_per_rank");
             in.is_token_in_rank = to_view(is_token_in_rank, "is_token_in_rank");
             in.num_tokens_per_expert = to_view(num_tokens_per_expert, "num_tokens_per_expert");
             in.expert_alignment = expert_alignment;
             in.num_worst_tokens = num_worst_tokens;
             const View counts = to_view(num_recv_tokens_per_expert, "num_recv_tokens_per_expert");
             py::gil_scoped_release nogil;
             return buf.dispatch_notify(in, h.handle, counts, to_stream(stream));
           },
           py::arg("handle"), py::kw_only(), py::arg("x"), py::arg("x_scales") = py::none(),
           py::arg("topk_idx") = py::none(), py::arg("topk_weights") = py::none(), py::arg("num_tokens_per_rank"),
           py::arg("is_token_in_rank"), py::arg("num_tokens_per_expert"), py::arg("expert_alignment") = 1,
           py::arg("num_worst_tokens") = 0, py::arg("num_recv_tokens_per_expert") = py::none(), py::arg("stream"),
           "Fills `handle` (host-synced: waits for the counts); returns the rows this rank receives, -1 with "
           "num_worst_tokens > 0.")
      .def("dispatch",
           [](PyBuffer& b, PyDispatchHandle& h, py::handle x, py::handle x_scales, py::handle topk_idx,
              py::handle topk_weights, int expert_alignment, int num_worst_tokens, py::handle recv_x,
              py::handle recv_x_scales, py::handle recv_topk_idx, py::handle recv_topk_weights,
              py::handle recv_src_idx, uintptr_t stream) {
             epx::DispatchInputs in;
             in.x = to_view(x, "x");
             in.x_scales = to_view(x_scales, "x_scales");
             in.topk_idx = to_view(topk_idx, "topk_idx");
             in.topk_weights = to_view(topk_weights, "topk_weights");
             in.expert_alignment = expert_alignment;
             in.num_worst_tokens = num_worst_tokens;
             epx::DispatchOutputs out;
             out.recv_x = to_view(recv_x, "recv_x");
             out.recv_x_scales = to_view(recv_x_scales, "recv_x_scales");
             out.recv_topk_idx = to_view(recv_topk_idx, "recv_topk_idx");
             out.recv_topk_weights = to_view(recv_topk_weights, "recv_topk_weights");
             out.recv_src_idx = to_view(recv_src_idx, "recv_src_idx");
             epx::Buffer& buf = b.get();
             GilReleaseIf nogil(b.simulated);
             buf.dispatch(in, h.handle, out, to_stream(stream));
           },
           py::arg("handle"), py::kw_only(), py::arg("x"), py::arg("x_scales") = py::none(),
           py::arg("topk_idx") = py::none(), py::arg("topk_weights") = py::none(), py::arg("expert_alignment") = 1,
           py::arg("num_worst_tokens") = 0, py::arg("recv_x"), py::arg("recv_x_scales") = py::none(),
           py::arg("recv_topk_idx") = py::none(), py::arg("recv_topk_weights") = py::none(),
           py::arg("recv_src_idx") = py::none(), py::arg("stream"))

      // High-throughput combine (design.md 4.3)
      .def("combine",
           [](PyBuffer& b, PyDispatchHandle& h, py::handle x, py::handle topk_weights, py::handle bias_0,
              py::handle bias_1, py::handle combined_x, py::handle combined_topk_weights, uintptr_t stream) {
             epx::CombineInputs in;
             in.x = to_view(x, "x");
             in.topk_weights = to_view(topk_weights, "topk_weights");
             in.bias_0 = to_view(bias_0, "bias_0");
             in.bias_1 = to_view(bias_1, "bias_1");
             epx::CombineOutputs out;
             out.combined_x = to_view(combined_x, "combined_x");
             out.combined_topk_weights = to_view(combined_topk_weights, "combined_topk_weights");
             epx::Buffer& buf = b.get();
             GilReleaseIf nogil(b.simulated);
             buf.combine(in, h.handle, out, to_stream(stream));
           },
           py::arg("handle"), py::kw_only(), py::arg("x"), py::arg("topk_weights") = py::none(),
           py::arg("bias_0") = py::none(), py::arg("bias_1") = py::none(), py::arg("combined_x"),
           py::arg("combined_topk_weights") = py::none(), py::arg("stream"))

      // Low-latency mode (design.md 4.4-4.5). The dispatch returns the C++ LowLatencyHandle (its views
      // point into the output tensors, which the Python handle tuple keeps alive).
      .def("low_latency_dispatch",
           [](PyBuffer& b, py::handle x, py::handle topk_idx, int T, int num_experts, bool use_fp8, bool round_scale,
              epx::LowLatencyScale scale_format, py::handle cumulative_local_expert_recv_stats,
              py::handle dispatch_wait_recv_cost_stats, bool return_recv_hook, py::handle recv_x,
              py::handle recv_scales, py::handle recv_count, py::handle src_info, py::handle layout_range,
              py::handle src_topk_slot, uintptr_t stream) {
             epx::LowLatencyDispatchArgs a;
             a.x = to_view(x, "x");
             a.topk_idx = to_view(topk_idx, "topk_idx");
             a.num_max_dispatch_tokens_per_rank = T;
             a.num_experts = num_experts;
             a.use_fp8 = use_fp8;
             a.round_scale = round_scale;
             a.scale_format = scale_format;
             a.cumulative_local_expert_recv_stats =
                 to_view(cumulative_local_expert_recv_stats, "cumulative_local_expert_recv_stats");
             a.dispatch_wait_recv_cost_stats = to_view(dispatch_wait_recv_cost_stats, "dispatch_wait_recv_cost_stats");
             a.return_recv_hook = return_recv_hook;
             epx::LowLatencyDispatchOutputs out;
             out.recv_x = to_view(recv_x, "recv_x");
             out.recv_scales = to_view(recv_scales, "recv_scales");
             out.recv_count = to_view(recv_count, "recv_count");
             out.src_info = to_view(src_info, "src_info");
             out.layout_range = to_view(layout_range, "layout_range");
             out.src_topk_slot = to_view(src_topk_slot, "src_topk_slot");
             epx::Buffer& buf = b.get();
             GilReleaseIf nogil(b.simulated);
             return buf.low_latency_dispatch(a, out, to_stream(stream));
           },
           py::kw_only(), py::arg("x"), py::arg("topk_idx"), py::arg("num_max_dispatch_tokens_per_rank"),
           py::arg("num_experts"), py::arg("use_fp8") = true, py::arg("round_scale") = false,
           py::arg("scale_format") = epx::LowLatencyScale::kFloat,
           py::arg("cumulative_local_expert_recv_stats") = py::none(),
           py::arg("dispatch_wait_recv_cost_stats") = py::none(), py::arg("return_recv_hook") = false,
           py::arg("recv_x"), py::arg("recv_scales") = py::none(), py::arg("recv_count"), py::arg("src_info"),
           py::arg("layout_range"), py::arg("src_topk_slot"), py::arg("stream"),
           "Returns the LowLatencyHandle (its buffer_idx: the low-latency buffer the dispatch used).")
      .def("low_latency_combine",
           [](PyBuffer& b, const epx::LowLatencyHandle& h, py::handle x, py::handle topk_idx, py::handle topk_weights,
              bool zero_copy, bool return_recv_hook, py::handle out, uintptr_t stream) {
             epx::LowLatencyCombineArgs a;
             a.x = to_view(x, "x");
             a.topk_idx = to_view(topk_idx, "topk_idx");
             a.topk_weights = to_view(topk_weights, "topk_weights");
             a.zero_copy = zero_copy;
             a.return_recv_hook = return_recv_hook;
             const View out_view = to_view(out, "out");
             epx::Buffer& buf = b.get();
             GilReleaseIf nogil(b.simulated);
             return buf.low_latency_combine(a, h, out_view, to_stream(stream));
           },
           py::arg("handle"), py::kw_only(), py::arg("x") = py::none(), py::arg("topk_idx"), py::arg("topk_weights"),
           py::arg("zero_copy") = false, py::arg("return_recv_hook") = false, py::arg("out"), py::arg("stream"),
           "Returns the index of the low-latency buffer the combine used (a hook-mode combine's receive takes it).")
      .def("low_latency_receive",
           [](PyBuffer& b, int buffer_idx, uintptr_t stream) {
             epx::Buffer& buf = b.get();
             GilReleaseIf nogil(b.simulated);
             buf.low_latency_receive(buffer_idx, to_stream(stream));
           },
           py::kw_only(), py::arg("buffer_idx"), py::arg("stream"))
      .def("next_combine_buffer",
           [](PyBuffer& b, const epx::LowLatencyHandle& h) { return view_to_tuple(b.get().next_combine_buffer(h)); },
           py::arg("handle"),
           "Descriptor (data_ptr, dtype, shape, strides) of the zero-copy combine buffer of the next low-latency op.")
      .def("next_low_latency_buffer", [](PyBuffer& b) { return b.get().next_low_latency_buffer(); })
      .def("clean_low_latency_buffer", [](PyBuffer& b) {
             epx::Buffer& buf = b.get();
             py::gil_scoped_release nogil;
             buf.clean_low_latency_buffer();
           })
      .def("low_latency_update_mask_buffer", [](PyBuffer& b, int rank_to_mask, bool mask) {
             epx::Buffer& buf = b.get();
             py::gil_scoped_release nogil;
             buf.low_latency_update_mask_buffer(rank_to_mask, mask);
           }, py::arg("rank_to_mask"), py::arg("mask"))
      .def("low_latency_query_mask_buffer", [](PyBuffer& b, py::handle mask_status, uintptr_t stream) {
             epx::Buffer& buf = b.get();
             const View status = to_view(mask_status, "mask_status");
             GilReleaseIf nogil(b.simulated);
             buf.low_latency_query_mask_buffer(status, to_stream(stream));
           }, py::kw_only(), py::arg("mask_status"), py::arg("stream"))
      .def("low_latency_clean_mask_buffer", [](PyBuffer& b) {
             epx::Buffer& buf = b.get();
             py::gil_scoped_release nogil;
             buf.low_latency_clean_mask_buffer();
           })

      // Errors and lifecycle
      .def("check", [](PyBuffer& b) { b.get().check(); })
      .def("synchronize", [](PyBuffer& b, uintptr_t stream) {
             epx::Buffer& buf = b.get();
             py::gil_scoped_release nogil;
             buf.synchronize(to_stream(stream));
           }, py::arg("stream"))
      .def("reset", [](PyBuffer& b) {
             epx::Buffer& buf = b.get();
             py::gil_scoped_release nogil;
             buf.reset();
           })
      .def("destroy", [](PyBuffer& b) { release_without_gil(b.ptr); },
           "Frees the symmetric memory now (collective); later calls raise EpxError(State).");
}
