// epx._C: the pybind11 module between the torch-facing package (python/epx) and the C++ API.
//
// With aten.cpp (epx._aten, which makes the operations' output tensors) the only C++ of epx that
// sees Python, and it sees no torch: tensors cross as descriptors
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
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "epx/buffer.hpp"
#include "epx/communicator.hpp"
#include "epx/config.hpp"
#include "epx/error.hpp"
#include "epx/sim_world.hpp"
#include "epx/types.hpp"
#include "host/handle_storage.hpp"
#include "host/plan.hpp"
#include "py_refs.hpp"
#include "tensor_api.hpp"

namespace py = pybind11;

namespace {

using epx::DType;
using epx::ErrorKind;
using epx::View;
using epx::python::Ref;

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
  StreamJoin() {
    const cudaError_t st = cudaEventCreateWithFlags(&event, cudaEventDisableTiming);
    EPX_CHECK(st == cudaSuccess, ErrorKind::kCuda, "stream join: cudaEventCreateWithFlags failed: ",
              cudaGetErrorString(st));
  }
  StreamJoin(const StreamJoin&) = delete;
  StreamJoin& operator=(const StreamJoin&) = delete;
  ~StreamJoin() {
    if (event != nullptr) (void)cudaEventDestroy(event);  // may fail once the CUDA runtime is unloading
  }
  // Stream `dst` waits for the work queued on `src` so far (no host sync).
  void order(cudaStream_t dst, cudaStream_t src) {
    cudaError_t st = cudaEventRecord(event, src);
    EPX_CHECK(st == cudaSuccess, ErrorKind::kCuda, "stream join: cudaEventRecord on stream ",
              reinterpret_cast<uintptr_t>(src), " failed: ", cudaGetErrorString(st));
    st = cudaStreamWaitEvent(dst, event, 0);
    EPX_CHECK(st == cudaSuccess, ErrorKind::kCuda, "stream join: cudaStreamWaitEvent on stream ",
              reinterpret_cast<uintptr_t>(dst), " failed: ", cudaGetErrorString(st));
  }
};

// The stream order of one operation (DeepEP's, which the package keeps): before the launch, the
// launch stream waits for the work queued on `wait` so far; after it, `join` waits for the launch
// stream. Either may be absent (the package then waited for an event, or returns one).
struct StreamOrder {
  std::optional<cudaStream_t> wait, join;
};

// A Buffer, whether its launches release the GIL (a simulated rank's do, see the top), and the
// one event of its stream waits (made at the first, on the Buffer's device, which the package
// checks is current).
struct PyBuffer : Owned<epx::Buffer> {
  bool simulated = false;
  std::unique_ptr<StreamJoin> join_;
  // Set by attach_package (the package's Buffer, once made): its CUDA device, its communication
  // stream (the torch.cuda.Stream and its cudaStream_t), and the low-latency dispatch's output
  // plans (_aten plans) of the geometries it last saw.
  int device = -1;
  cudaStream_t comm = nullptr;
  py::object comm_stream;
  struct LlPlan {
    int T = 0, E = 0, H = 0;
    bool fp8 = false, ue8m0 = false;
    py::object plan;
  };
  LlPlan ll_plans[4];
  int next_ll_plan = 0;
  // The config the core has, as last given (construction, set_config), and the value of
  // g_config_defaults_epoch when the package marked it as its default (mark_default_config; -1: not
  // marked since). The package's high-throughput calls read both (config_is_applied).
  epx::Config applied;
  int default_epoch = -1;

  StreamJoin& join() {
    if (!join_) join_ = std::make_unique<StreamJoin>();
    return *join_;
  }
  // Runs `launch` (a launch on `stream`) between the stream waits `o` asks for.
  template <class Launch>
  auto ordered(const StreamOrder& o, cudaStream_t stream, Launch&& launch) -> decltype(launch()) {
    if (o.wait) join().order(stream, *o.wait);
    if constexpr (std::is_void_v<decltype(launch())>) {
      launch();
      if (o.join) join().order(*o.join, stream);
    } else {
      auto result = launch();
      if (o.join) join().order(*o.join, stream);
      return result;
    }
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
  EPX_ARG_CHECK(num_ranks >= 1 && num_ranks <= epx::kMaxWorldRanks, "num_ranks: expected [1, ", epx::kMaxWorldRanks,
                "], got ", num_ranks);
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


// ---- The Buffer's operations: keyword-only vectorcall methods ----------------------------------
// Each operation is a METH_FASTCALL | METH_KEYWORDS method of _C.Buffer whose arguments are matched
// by keyword against names interned once (a pointer compare per keyword; pybind11's matching
// interns every parameter name on every call, about 0.1 us each). The names are the fields of the
// C++ API's structs; a misspelled, missing or positional argument is a TypeError naming it.
// The launching ones also take `wait_stream` and `join_stream` (StreamOrder): the stream waits of
// DeepEP's semantics, made here with the Buffer's one event instead of two more calls.

struct Param {
  const char* name;
  const char* absent;  // what an absent argument means (its default, for the docstring); nullptr: required
  bool required() const { return absent == nullptr; }
};
constexpr const char* kRequired = nullptr;

// One operation's parameters: `num_positional` leading ones may be passed by position (the
// handle), the rest by keyword only.
struct OpSpec {
  const char* name;
  std::vector<Param> params;
  int num_positional;
  const char* returns;  // for the signature line of the docstring
  const char* summary;
  std::vector<PyObject*> interned;  // made on first use (under the GIL), never freed
  std::string doc;

  const char* make_doc() {
    doc = std::string(name) + "(self";
    for (int i = 0; i < static_cast<int>(params.size()); ++i) {
      if (i == num_positional) doc += ", *";
      doc += std::string(", ") + params[i].name + (params[i].required() ? "" : std::string("=") + params[i].absent);
    }
    doc += std::string(") -> ") + returns + "\n\n" + summary;
    return doc.c_str();
  }
};

constexpr int kMaxParams = 20;

// The arguments of one call, by parameter index (nullptr: not given).
class CallArgs {
 public:
  CallArgs(OpSpec& op, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) : op_(op) {
    const int n = static_cast<int>(op.params.size());
    if (op.interned.empty()) {
      for (const Param& p : op.params) op.interned.push_back(PyUnicode_InternFromString(p.name));
    }
    if (nargs > op.num_positional) {
      throw py::type_error(epx::detail::concat("Buffer.", op.name, "(): takes ", op.num_positional,
                                               " positional argument(s) (then keywords only), got ", nargs));
    }
    for (Py_ssize_t i = 0; i < nargs; ++i) values_[i] = args[i];
    const Py_ssize_t nkw = kwnames == nullptr ? 0 : PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t k = 0; k < nkw; ++k) {
      PyObject* key = PyTuple_GET_ITEM(kwnames, k);
      int found = -1;
      for (int i = 0; i < n && found < 0; ++i) {
        if (op.interned[i] == key) found = i;
      }
      for (int i = 0; i < n && found < 0; ++i) {  // a name that was not interned
        if (PyUnicode_Compare(op.interned[i], key) == 0) found = i;
      }
      if (found < 0) {
        PyErr_Clear();
        throw py::type_error(epx::detail::concat("Buffer.", op.name, "(): unexpected keyword argument '",
                                                 py::str(key).cast<std::string>(), "'"));
      }
      if (values_[found] != nullptr) {
        throw py::type_error(epx::detail::concat("Buffer.", op.name, "(): got multiple values for argument '",
                                                 op.params[found].name, "'"));
      }
      values_[found] = args[nargs + k];
    }
    for (int i = 0; i < n; ++i) {
      if (op.params[i].required() && values_[i] == nullptr) {
        throw py::type_error(epx::detail::concat("Buffer.", op.name, "(): missing required argument '",
                                                 op.params[i].name, "'"));
      }
    }
  }

  const char* name(int i) const { return op_.params[i].name; }
  bool given(int i) const { return values_[i] != nullptr && values_[i] != Py_None; }
  py::handle get(int i) const { return py::handle(values_[i] != nullptr ? values_[i] : Py_None); }
  View view(int i) const { return to_view(get(i), name(i)); }
  int integer(int i, int absent) const {
    if (!given(i)) return absent;
    const int64_t v = to_i64(values_[i], name(i), "the value");
    EPX_ARG_CHECK(v >= std::numeric_limits<int>::min() && v <= std::numeric_limits<int>::max(), name(i),
                  ": ", v, " is out of the int range");
    return static_cast<int>(v);
  }
  bool boolean(int i, bool absent) const {
    if (!given(i)) return absent;
    const int v = PyObject_IsTrue(values_[i]);
    if (v < 0) throw py::error_already_set();
    return v != 0;
  }
  cudaStream_t stream(int i) const {
    const unsigned long long s = PyLong_AsUnsignedLongLong(values_[i]);
    if (PyErr_Occurred()) {
      PyErr_Clear();
      EPX_FAIL(ErrorKind::kInvalidArgument, name(i), ": expected a cudaStream_t (a non-negative int)");
    }
    return to_stream(static_cast<uintptr_t>(s));
  }
  // The parameters `wait_stream` and `join_stream` at `i` and `i + 1` (None: absent).
  StreamOrder order(int i) const {
    StreamOrder o;
    if (given(i)) o.wait = stream(i);
    if (given(i + 1)) o.join = stream(i + 1);
    return o;
  }
  template <class T>
  T& object(int i, const char* expected) const {
    py::handle h = get(i);
    if (!py::isinstance<T>(h)) {
      throw py::type_error(epx::detail::concat("Buffer.", op_.name, "(): ", name(i), ": expected ", expected,
                                               ", got ", Py_TYPE(h.ptr())->tp_name));
    }
    return h.cast<T&>();
  }
  template <class T>
  T enumerator(int i, const char* expected) const {  // a py::enum_ value, by value
    py::handle h = get(i);
    if (!py::isinstance<T>(h)) {
      throw py::type_error(epx::detail::concat("Buffer.", op_.name, "(): ", name(i), ": expected ", expected,
                                               ", got ", Py_TYPE(h.ptr())->tp_name));
    }
    return h.cast<T>();
  }

 private:
  OpSpec& op_;
  PyObject* values_[kMaxParams] = {};
};

// Runs an operation's body, turning C++ exceptions into Python ones (a raw method is outside
// pybind11's own translation).
template <class Body>
PyObject* guarded(Body&& body) {
  try {
    return body();
  } catch (const epx::Error& e) {
    translate_error(e);
  } catch (py::error_already_set& e) {
    e.restore();
  } catch (const py::builtin_exception& e) {
    e.set_error();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

PyBuffer& self_buffer(PyObject* self) { return py::handle(self).cast<PyBuffer&>(); }

// A launching operation's parameters: `params`, then the launch stream and its StreamOrder.
std::vector<Param> launching(std::vector<Param> params) {
  params.insert(params.end(), {{"stream", kRequired}, {"wait_stream", "None"}, {"join_stream", "None"}});
  return params;
}

OpSpec g_get_dispatch_layout{
    "get_dispatch_layout",
    launching({{"topk_idx", kRequired}, {"num_experts", kRequired}, {"num_tokens_per_rank", kRequired},
               {"num_tokens_per_rdma_rank", "None"}, {"num_tokens_per_expert", kRequired},
               {"is_token_in_rank", kRequired}}),
    0, "None", "Buffer::get_dispatch_layout (design.md 4.1); num_tokens_per_rdma_rank [num_nodes] int32 or None.",
    {}, {}};

PyObject* op_get_dispatch_layout(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  return guarded([&]() -> PyObject* {
    const CallArgs a(g_get_dispatch_layout, args, nargs, kwnames);
    PyBuffer& b = self_buffer(self);
    epx::Buffer& buf = b.get();
    const View topk = a.view(0);
    const int num_experts = a.integer(1, 0);
    const View per_rank = a.view(2), per_rdma_rank = a.view(3), per_expert = a.view(4), in_rank = a.view(5);
    const cudaStream_t stream = a.stream(6);
    const StreamOrder order = a.order(7);
    {
      GilReleaseIf nogil(b.simulated);
      b.ordered(order, stream, [&] {
        buf.get_dispatch_layout(topk, num_experts, per_rank, per_rdma_rank, per_expert, in_rank, stream);
      });
    }
    Py_RETURN_NONE;
  });
}

// DispatchInputs' fields, in order, after the handle (parameters 1..9 of dispatch_notify and dispatch).
std::vector<Param> with_dispatch_inputs(std::vector<Param> after) {
  std::vector<Param> p = {{"handle", kRequired},
                          {"x", kRequired},
                          {"x_scales", "None"},
                          {"topk_idx", "None"},
                          {"topk_weights", "None"},
                          {"num_tokens_per_rank", "None"},
                          {"is_token_in_rank", "None"},
                          {"num_tokens_per_expert", "None"},
                          {"expert_alignment", "1"},
                          {"num_worst_tokens", "0"}};
  p.insert(p.end(), after.begin(), after.end());
  return p;
}

epx::DispatchInputs dispatch_inputs(const CallArgs& a) {
  epx::DispatchInputs in;
  in.x = a.view(1);
  in.x_scales = a.view(2);
  in.topk_idx = a.view(3);
  in.topk_weights = a.view(4);
  in.num_tokens_per_rank = a.view(5);
  in.is_token_in_rank = a.view(6);
  in.num_tokens_per_expert = a.view(7);
  in.expert_alignment = a.integer(8, 1);
  in.num_worst_tokens = a.integer(9, 0);
  return in;
}

OpSpec g_dispatch_notify{
    "dispatch_notify",
    launching(with_dispatch_inputs({{"num_recv_tokens_per_expert", "None"}})),
    1, "int",
    "Buffer::dispatch_notify: fills `handle` (host-synced: waits for the counts); returns the rows this rank "
    "receives, -1 with num_worst_tokens > 0.",
    {}, {}};

PyObject* op_dispatch_notify(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  return guarded([&]() -> PyObject* {
    const CallArgs a(g_dispatch_notify, args, nargs, kwnames);
    PyBuffer& b = self_buffer(self);
    epx::Buffer& buf = b.get();
    PyDispatchHandle& h = a.object<PyDispatchHandle>(0, "an epx._C.DispatchHandle");
    const epx::DispatchInputs in = dispatch_inputs(a);
    const View counts = a.view(10);
    const cudaStream_t stream = a.stream(11);
    const StreamOrder order = a.order(12);
    int rows = 0;
    {
      py::gil_scoped_release nogil;  // host-synced: waits for the peers
      rows = b.ordered(order, stream, [&] { return buf.dispatch_notify(in, h.handle, counts, stream); });
    }
    return PyLong_FromLong(rows);
  });
}

OpSpec g_dispatch{
    "dispatch",
    launching(with_dispatch_inputs({{"recv_x", kRequired},
                                    {"recv_x_scales", "None"},
                                    {"recv_topk_idx", "None"},
                                    {"recv_topk_weights", "None"},
                                    {"recv_src_idx", "None"}})),
    1, "None",
    "Buffer::dispatch: moves the rows (a handle from dispatch_notify, or a filled one: cached; the layout "
    "inputs are then not read).",
    {}, {}};

PyObject* op_dispatch(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  return guarded([&]() -> PyObject* {
    const CallArgs a(g_dispatch, args, nargs, kwnames);
    PyBuffer& b = self_buffer(self);
    epx::Buffer& buf = b.get();
    PyDispatchHandle& h = a.object<PyDispatchHandle>(0, "an epx._C.DispatchHandle");
    const epx::DispatchInputs in = dispatch_inputs(a);
    epx::DispatchOutputs out;
    out.recv_x = a.view(10);
    out.recv_x_scales = a.view(11);
    out.recv_topk_idx = a.view(12);
    out.recv_topk_weights = a.view(13);
    out.recv_src_idx = a.view(14);
    const cudaStream_t stream = a.stream(15);
    const StreamOrder order = a.order(16);
    {
      GilReleaseIf nogil(b.simulated);
      b.ordered(order, stream, [&] { buf.dispatch(in, h.handle, out, stream); });
    }
    Py_RETURN_NONE;
  });
}

OpSpec g_combine{
    "combine",
    launching({{"handle", kRequired}, {"x", kRequired}, {"topk_weights", "None"}, {"bias_0", "None"},
               {"bias_1", "None"}, {"combined_x", kRequired}, {"combined_topk_weights", "None"}}),
    1, "None", "Buffer::combine (design.md 4.3).", {}, {}};

PyObject* op_combine(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  return guarded([&]() -> PyObject* {
    const CallArgs a(g_combine, args, nargs, kwnames);
    PyBuffer& b = self_buffer(self);
    epx::Buffer& buf = b.get();
    PyDispatchHandle& h = a.object<PyDispatchHandle>(0, "an epx._C.DispatchHandle");
    epx::CombineInputs in;
    in.x = a.view(1);
    in.topk_weights = a.view(2);
    in.bias_0 = a.view(3);
    in.bias_1 = a.view(4);
    epx::CombineOutputs out;
    out.combined_x = a.view(5);
    out.combined_topk_weights = a.view(6);
    const cudaStream_t stream = a.stream(7);
    const StreamOrder order = a.order(8);
    {
      GilReleaseIf nogil(b.simulated);
      b.ordered(order, stream, [&] { buf.combine(in, h.handle, out, stream); });
    }
    Py_RETURN_NONE;
  });
}

OpSpec g_low_latency_dispatch{
    "low_latency_dispatch",
    launching({{"x", kRequired}, {"topk_idx", kRequired}, {"num_max_dispatch_tokens_per_rank", kRequired},
               {"num_experts", kRequired},
               {"use_fp8", "True"}, {"round_scale", "False"}, {"scale_format", "LowLatencyScale.kFloat"},
               {"cumulative_local_expert_recv_stats", "None"}, {"dispatch_wait_recv_cost_stats", "None"},
               {"return_recv_hook", "False"}, {"recv_x", kRequired}, {"recv_scales", "None"},
               {"recv_count", kRequired}, {"src_info", kRequired}, {"layout_range", kRequired},
               {"src_topk_slot", kRequired}}),
    0, "LowLatencyHandle",
    "Buffer::low_latency_dispatch: returns its LowLatencyHandle (buffer_idx: the low-latency buffer it used; "
    "its views are the given src_info, layout_range and src_topk_slot).",
    {}, {}};

PyObject* op_low_latency_dispatch(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  return guarded([&]() -> PyObject* {
    const CallArgs a(g_low_latency_dispatch, args, nargs, kwnames);
    PyBuffer& b = self_buffer(self);
    epx::Buffer& buf = b.get();
    epx::LowLatencyDispatchArgs d;
    d.x = a.view(0);
    d.topk_idx = a.view(1);
    d.num_max_dispatch_tokens_per_rank = a.integer(2, 0);
    d.num_experts = a.integer(3, 0);
    d.use_fp8 = a.boolean(4, true);
    d.round_scale = a.boolean(5, false);
    if (a.given(6)) d.scale_format = a.enumerator<epx::LowLatencyScale>(6, "an epx._C.LowLatencyScale");
    d.cumulative_local_expert_recv_stats = a.view(7);
    d.dispatch_wait_recv_cost_stats = a.view(8);
    d.return_recv_hook = a.boolean(9, false);
    epx::LowLatencyDispatchOutputs out;
    out.recv_x = a.view(10);
    out.recv_scales = a.view(11);
    out.recv_count = a.view(12);
    out.src_info = a.view(13);
    out.layout_range = a.view(14);
    out.src_topk_slot = a.view(15);
    const cudaStream_t stream = a.stream(16);
    const StreamOrder order = a.order(17);
    epx::LowLatencyHandle h;
    {
      GilReleaseIf nogil(b.simulated);
      h = b.ordered(order, stream, [&] { return buf.low_latency_dispatch(d, out, stream); });
    }
    return py::cast(std::move(h)).release().ptr();
  });
}

OpSpec g_low_latency_combine{
    "low_latency_combine",
    launching({{"handle", kRequired}, {"x", "None"}, {"topk_idx", kRequired}, {"topk_weights", kRequired},
               {"zero_copy", "False"}, {"return_recv_hook", "False"}, {"out", kRequired}}),
    1, "int",
    "Buffer::low_latency_combine with the dispatch's LowLatencyHandle: returns the index of the low-latency "
    "buffer it used (a hook-mode combine's receive takes it).",
    {}, {}};

PyObject* op_low_latency_combine(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  return guarded([&]() -> PyObject* {
    const CallArgs a(g_low_latency_combine, args, nargs, kwnames);
    PyBuffer& b = self_buffer(self);
    epx::Buffer& buf = b.get();
    const epx::LowLatencyHandle& h = a.object<epx::LowLatencyHandle>(0, "an epx._C.LowLatencyHandle");
    epx::LowLatencyCombineArgs c;
    c.x = a.view(1);
    c.topk_idx = a.view(2);
    c.topk_weights = a.view(3);
    c.zero_copy = a.boolean(4, false);
    c.return_recv_hook = a.boolean(5, false);
    const View out = a.view(6);
    const cudaStream_t stream = a.stream(7);
    const StreamOrder order = a.order(8);
    int used = 0;
    {
      GilReleaseIf nogil(b.simulated);
      used = b.ordered(order, stream, [&] { return buf.low_latency_combine(c, h, out, stream); });
    }
    return PyLong_FromLong(used);
  });
}

OpSpec g_low_latency_receive{
    "low_latency_receive", {{"buffer_idx", kRequired}, {"stream", kRequired}}, 0, "None",
    "Buffer::low_latency_receive: the receive half of the hook-mode op on `buffer_idx`.", {}, {}};

PyObject* op_low_latency_receive(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  return guarded([&]() -> PyObject* {
    const CallArgs a(g_low_latency_receive, args, nargs, kwnames);
    PyBuffer& b = self_buffer(self);
    epx::Buffer& buf = b.get();
    const int buffer_idx = a.integer(0, 0);
    const cudaStream_t stream = a.stream(1);
    {
      GilReleaseIf nogil(b.simulated);
      buf.low_latency_receive(buffer_idx, stream);
    }
    Py_RETURN_NONE;
  });
}

OpSpec g_low_latency_query_mask_buffer{
    "low_latency_query_mask_buffer", {{"mask_status", kRequired}, {"stream", kRequired}}, 0, "None",
    "Buffer::low_latency_query_mask_buffer: this rank's view of the masked ranks into mask_status.", {}, {}};

PyObject* op_low_latency_query_mask_buffer(PyObject* self, PyObject* const* args, Py_ssize_t nargs,
                                           PyObject* kwnames) {
  return guarded([&]() -> PyObject* {
    const CallArgs a(g_low_latency_query_mask_buffer, args, nargs, kwnames);
    PyBuffer& b = self_buffer(self);
    epx::Buffer& buf = b.get();
    const View status = a.view(0);
    const cudaStream_t stream = a.stream(1);
    {
      GilReleaseIf nogil(b.simulated);
      buf.low_latency_query_mask_buffer(status, stream);
    }
    Py_RETURN_NONE;
  });
}

// ---- The package's low-latency calls ------------------------------------------------------------
// Buffer.low_latency_dispatch / low_latency_combine of the package whole, in one call each (a
// Python-level step costs more host time than the launch, docs/performance.md "Host overhead"):
// the arguments as the package method takes them (positional), DeepEP's result back. Tensors are
// read and the outputs made through epx._aten's TensorApi (python/tensor_api.hpp), so this module
// still sees no torch. Anything the package would refuse (a wrong type, device, dtype or rank of a
// tensor, a bad flag or int) returns None before anything happens, and the package then words the
// error; the core's own checks raise as in every operation.

// The package's helpers, handed over by `_use_package` at its import (strong references).
struct Package {
  const epx::python::TensorApi* tensors = nullptr;
  PyObject* ll_plan = nullptr;         // _ll._ll_plan(num_ranks, num_experts, T, hidden, use_fp8, use_ue8m0)
  PyObject* current_stream = nullptr;  // device index -> the current stream's cudaStream_t int
  PyObject* ll_finish = nullptr;       // _streams._ll_finish(comm_stream, rt, compute, async_finish, hook, buffer_idx, keep)
  PyObject* event_overlap = nullptr;   // utils.EventOverlap
  PyObject* config_type = nullptr;     // utils.Config
} g_package;

constexpr uint32_t bit(DType d) { return 1u << static_cast<int>(d); }

// Python truth of a flag; throws (its Python error set) when it has none.
bool truth(PyObject* o) {
  const int v = PyObject_IsTrue(o);
  if (v < 0) throw py::error_already_set();
  return v != 0;
}

// An int (not a bool) in [lo, INT_MAX] into `out`; false otherwise.
bool int_at_least(PyObject* o, int lo, int& out) {
  if (!PyLong_Check(o) || PyBool_Check(o)) return false;
  const long long v = PyLong_AsLongLong(o);
  if (v == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  if (v < lo || v > std::numeric_limits<int>::max()) return false;
  out = static_cast<int>(v);
  return true;
}

// Describes a required tensor argument (false: refused) or an optional one (None: undefined View).
bool tensor_arg(PyObject* t, int device, uint32_t mask, int ndim, View& v) {
  return g_package.tensors->describe(t, device, mask, ndim, &v) == 1;
}
bool optional_tensor_arg(PyObject* t, int device, uint32_t mask, View& v, int ndim = 0) {
  return t == Py_None || tensor_arg(t, device, mask, ndim, v);
}

// The package's buffer attached and current, or nullptr (the package then says which is wrong).
PyBuffer* package_buffer(PyObject* self) {
  PyBuffer& b = self_buffer(self);
  EPX_CHECK(g_package.tensors != nullptr && b.device >= 0, ErrorKind::kState,
            "Buffer: not attached to the package (epx.Buffer makes its runtime and attaches it)");
  int current = -1;
  if (cudaGetDevice(&current) != cudaSuccess) {
    cudaGetLastError();
    return nullptr;
  }
  return current == b.device ? &b : nullptr;
}

cudaStream_t current_stream(int device) {
  Ref index(PyLong_FromLong(device));
  if (index.p == nullptr) throw py::error_already_set();
  Ref s(PyObject_CallOneArg(g_package.current_stream, index.p));
  if (s.p == nullptr) throw py::error_already_set();
  const unsigned long long v = PyLong_AsUnsignedLongLong(s.p);
  if (PyErr_Occurred()) throw py::error_already_set();
  return to_stream(static_cast<uintptr_t>(v));
}

// The low-latency dispatch's output plan of a geometry (made by the package once, then kept).
PyObject* ll_plan(PyBuffer& b, int R, int E, int T, int H, bool fp8, bool ue8m0) {
  for (const PyBuffer::LlPlan& p : b.ll_plans) {
    if (p.plan && p.T == T && p.E == E && p.H == H && p.fp8 == fp8 && p.ue8m0 == ue8m0) return p.plan.ptr();
  }
  PyObject* made = PyObject_CallFunction(g_package.ll_plan, "iiiiOO", R, E, T, H, fp8 ? Py_True : Py_False,
                                         ue8m0 ? Py_True : Py_False);
  if (made == nullptr) throw py::error_already_set();
  PyBuffer::LlPlan& slot = b.ll_plans[b.next_ll_plan];
  b.next_ll_plan = (b.next_ll_plan + 1) % 4;
  slot = PyBuffer::LlPlan{T, E, H, fp8, ue8m0, py::reinterpret_steal<py::object>(made)};
  return slot.plan.ptr();
}

// The streams of a low-latency op (_streams.py): with the hook it runs on the current stream;
// else on the communication stream, which first waits for the current one, and the current one
// waits for it after the launch unless async_finish.
struct LlStreams {
  cudaStream_t compute, launch;
  StreamOrder order;
};
LlStreams ll_streams(const PyBuffer& b, bool async_finish, bool hook) {
  LlStreams s;
  s.compute = current_stream(b.device);
  s.launch = hook ? s.compute : b.comm;
  if (!hook) s.order.wait = s.compute;
  if (!hook && !async_finish) s.order.join = s.compute;
  return s;
}

// (event, hook) of the op through the package (only with async_finish or the hook), then the
// EventOverlap; returns (EventOverlap, hook) as two new references.
std::pair<PyObject*, PyObject*> ll_event_and_hook(PyObject* self, const PyBuffer& b, const LlStreams& s,
                                                  bool async_finish, bool hook, int buffer_idx, PyObject* keep) {
  if (!async_finish && !hook) {
    PyObject* overlap = PyObject_CallNoArgs(g_package.event_overlap);
    if (overlap == nullptr) throw py::error_already_set();
    Py_INCREF(Py_None);
    return {overlap, Py_None};
  }
  Ref pair(PyObject_CallFunction(g_package.ll_finish, "OOKOOiO", b.comm_stream.ptr(), self,
                                   static_cast<unsigned long long>(reinterpret_cast<uintptr_t>(s.compute)),
                                   async_finish ? Py_True : Py_False, hook ? Py_True : Py_False, buffer_idx, keep));
  if (pair.p == nullptr) throw py::error_already_set();
  PyObject* event = PyTuple_GET_ITEM(pair.p, 0);
  PyObject* overlap = PyObject_CallFunctionObjArgs(g_package.event_overlap, event, async_finish ? keep : Py_None,
                                                   nullptr);
  if (overlap == nullptr) throw py::error_already_set();
  PyObject* hook_fn = PyTuple_GET_ITEM(pair.p, 1);
  Py_INCREF(hook_fn);
  return {overlap, hook_fn};
}

// tuple_of (py_refs.hpp) that throws, its Python error set, when it made no tuple.
PyObject* tuple_stealing(std::initializer_list<PyObject*> items) {
  PyObject* t = epx::python::tuple_of(items);
  if (t == nullptr) throw py::error_already_set();
  return t;
}
PyObject* ref(PyObject* o) { return epx::python::new_ref(o); }

// low_latency_dispatch_call(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
//   cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats, use_fp8, round_scale, use_ue8m0,
//   async_finish, return_recv_hook) -> (recv_x, recv_count, handle, EventOverlap, hook) or None.
PyObject* op_ll_dispatch_call(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  return guarded([&]() -> PyObject* {
    if (nargs != 11) throw py::type_error("Buffer.low_latency_dispatch_call(): expected 11 arguments");
    PyBuffer* pb = package_buffer(self);
    if (pb == nullptr) Py_RETURN_NONE;
    PyBuffer& b = *pb;
    epx::Buffer& buf = b.get();
    const bool use_fp8 = truth(args[6]), round_scale = truth(args[7]), ue8m0 = truth(args[8]);
    const bool async_finish = truth(args[9]), hook = truth(args[10]);
    if ((async_finish && hook) || (ue8m0 && !round_scale) || (!use_fp8 && round_scale)) Py_RETURN_NONE;
    epx::LowLatencyDispatchArgs d;
    if (!tensor_arg(args[0], b.device, bit(DType::kBF16), 2, d.x) ||
        !tensor_arg(args[1], b.device, bit(DType::kI64), 2, d.topk_idx) ||
        !optional_tensor_arg(args[4], b.device, bit(DType::kI32), d.cumulative_local_expert_recv_stats) ||
        !optional_tensor_arg(args[5], b.device, bit(DType::kI64), d.dispatch_wait_recv_cost_stats)) {
      Py_RETURN_NONE;
    }
    int T = 0, E = 0;
    if (!int_at_least(args[2], 1, T) || !int_at_least(args[3], 1, E)) Py_RETURN_NONE;
    d.num_max_dispatch_tokens_per_rank = T;
    d.num_experts = E;
    d.use_fp8 = use_fp8;
    d.round_scale = round_scale;
    d.scale_format = ue8m0 ? epx::LowLatencyScale::kUE8M0 : epx::LowLatencyScale::kFloat;
    d.return_recv_hook = hook;
    const int H = static_cast<int>(d.x.shape[1]), K = static_cast<int>(d.topk_idx.shape[1]);
    PyObject* plan = ll_plan(b, buf.num_ranks(), E, T, H, use_fp8, ue8m0);
    const LlStreams s = ll_streams(b, async_finish, hook);

    // recv_x, recv_scales (fp8 only), recv_count, src_info, layout_range, src_topk_slot.
    PyObject* made[8] = {};
    View views[8];
    const int n = g_package.tensors->empty_plan(args[0], plan, 8, made, views);
    if (n < 0) throw py::error_already_set();
    Ref t[8];
    for (int i = 0; i < n; ++i) t[i + (use_fp8 || i == 0 ? 0 : 1)].p = made[i];
    EPX_CHECK(n == (use_fp8 ? 6 : 5), ErrorKind::kState, "low_latency_dispatch: the output plan has ", n, " views");
    epx::LowLatencyDispatchOutputs out;
    out.recv_x = views[0];
    if (use_fp8) out.recv_scales = views[1];
    out.recv_count = views[n - 4];
    out.src_info = views[n - 3];
    out.layout_range = views[n - 2];
    out.src_topk_slot = views[n - 1];
    epx::LowLatencyHandle h;
    {
      GilReleaseIf nogil(b.simulated);
      h = b.ordered(s.order, s.launch, [&] { return buf.low_latency_dispatch(d, out, s.launch); });
    }
    const int buffer_idx = h.buffer_idx;
    PyObject* scales = use_fp8 ? t[1].p : Py_None;
    Ref keep(async_finish || hook
                   ? tuple_stealing({ref(args[0]), ref(args[1]), ref(t[0].p), ref(scales), ref(t[2].p), ref(t[3].p),
                                     ref(t[4].p), ref(t[5].p), ref(args[4]), ref(args[5])})
                   : ref(Py_None));
    const auto [overlap, hook_fn] = ll_event_and_hook(self, b, s, async_finish, hook, buffer_idx, keep.p);
    Ref overlap_ref(overlap), hook_ref(hook_fn);
    PyObject* core = py::cast(std::move(h)).release().ptr();
    PyObject* handle = tuple_stealing({ref(t[3].p), ref(t[4].p), PyLong_FromLong(T), PyLong_FromLong(H),
                                       PyLong_FromLong(E), ref(t[5].p), PyLong_FromLong(K), PyLong_FromLong(buffer_idx),
                                       core});
    PyObject* recv = use_fp8 ? tuple_stealing({ref(t[0].p), ref(t[1].p)}) : ref(t[0].p);
    return tuple_stealing({recv, ref(t[2].p), handle, overlap_ref.take(), hook_ref.take()});
  });
}

// The handle tuple of low_latency_dispatch: 9 elements, the core's LowLatencyHandle last; else nullptr.
const epx::LowLatencyHandle* ll_handle_of(PyObject* handle) {
  if (!PyTuple_Check(handle) || PyTuple_GET_SIZE(handle) != 9) return nullptr;
  py::handle core(PyTuple_GET_ITEM(handle, 8));
  if (!py::isinstance<epx::LowLatencyHandle>(core)) return nullptr;
  return &core.cast<const epx::LowLatencyHandle&>();
}

// low_latency_combine_call(x, topk_idx, topk_weights, handle, zero_copy, async_finish, return_recv_hook, out)
//   -> (combined_x, EventOverlap, hook) or None.
PyObject* op_ll_combine_call(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  return guarded([&]() -> PyObject* {
    if (nargs != 8) throw py::type_error("Buffer.low_latency_combine_call(): expected 8 arguments");
    PyBuffer* pb = package_buffer(self);
    if (pb == nullptr) Py_RETURN_NONE;
    PyBuffer& b = *pb;
    epx::Buffer& buf = b.get();
    const bool zero_copy = truth(args[4]), async_finish = truth(args[5]), hook = truth(args[6]);
    const epx::LowLatencyHandle* h = ll_handle_of(args[3]);
    if ((async_finish && hook) || h == nullptr) Py_RETURN_NONE;
    epx::LowLatencyCombineArgs c;
    View out_view;
    // With zero_copy, x is not read (the core checks its shape): a bf16 tensor anywhere.
    if (!tensor_arg(args[0], zero_copy ? epx::python::kAnyDevice : b.device, bit(DType::kBF16), zero_copy ? 0 : 3,
                    c.x) ||
        !tensor_arg(args[1], b.device, bit(DType::kI64), 2, c.topk_idx) ||
        !tensor_arg(args[2], b.device, bit(DType::kF32), 2, c.topk_weights) ||
        (args[7] != Py_None && !tensor_arg(args[7], b.device, bit(DType::kBF16), 2, out_view))) {
      Py_RETURN_NONE;
    }
    c.zero_copy = zero_copy;
    c.return_recv_hook = hook;
    const LlStreams s = ll_streams(b, async_finish, hook);
    Ref out(ref(args[7]));
    if (args[7] == Py_None) {
      const int64_t shape[2] = {c.topk_idx.shape[0], h->hidden};
      Py_DECREF(out.take());
      out.p = g_package.tensors->empty(args[2], shape, 2, DType::kBF16, &out_view);
      if (out.p == nullptr) throw py::error_already_set();
    }
    int used = 0;
    {
      GilReleaseIf nogil(b.simulated);
      used = b.ordered(s.order, s.launch, [&] { return buf.low_latency_combine(c, *h, out_view, s.launch); });
    }
    PyObject* handle = args[3];
    Ref keep(async_finish || hook
                   ? tuple_stealing({ref(args[0]), ref(args[1]), ref(args[2]), ref(PyTuple_GET_ITEM(handle, 0)),
                                     ref(PyTuple_GET_ITEM(handle, 1)), ref(PyTuple_GET_ITEM(handle, 5)), ref(out.p)})
                   : ref(Py_None));
    const auto [overlap, hook_fn] = ll_event_and_hook(self, b, s, async_finish, hook, used, keep.p);
    return tuple_stealing({out.take(), overlap, hook_fn});
  });
}

// ---- The package's high-throughput calls -------------------------------------------------------
// Buffer.dispatch with a handle (the cached dispatch) and Buffer.combine of the package whole, for
// the calls in DeepEP's default stream order (no previous_event, async_finish or
// allocate_on_comm_stream: the communication stream waits for the current one, the current one for
// it) with the config the core has (config=None while that is the package's default, or an
// epx.Config of the same fields). Any other call, and any argument the package would refuse,
// returns None before anything runs: the package then takes its general path (_ht.py), which runs
// every other case and words the errors.

// Bumped by Buffer.set_num_sms (config_defaults_changed): the package's default config may differ
// since, so a buffer's mark of it (PyBuffer::default_epoch) no longer holds.
int g_config_defaults_epoch = 0;

// True when `config` (None: the package's default) is the config the core has.
bool config_is_applied(const PyBuffer& b, PyObject* config) {
  if (config == Py_None) return b.default_epoch == g_config_defaults_epoch;
  if (g_package.config_type == nullptr ||
      !PyObject_TypeCheck(config, reinterpret_cast<PyTypeObject*>(g_package.config_type))) {
    return false;
  }
  static PyObject* const names[3] = {PyUnicode_InternFromString("num_sms"), PyUnicode_InternFromString("num_threads"),
                                     PyUnicode_InternFromString("timeout_s")};
  int ints[2] = {};
  for (int i = 0; i < 2; ++i) {
    Ref v(PyObject_GetAttr(config, names[i]));
    if (v.p == nullptr) {
      PyErr_Clear();
      return false;
    }
    if (!int_at_least(v.p, std::numeric_limits<int>::min(), ints[i])) return false;
  }
  Ref timeout(PyObject_GetAttr(config, names[2]));
  if (timeout.p == nullptr) {
    PyErr_Clear();
    return false;
  }
  if (PyBool_Check(timeout.p) || !(PyFloat_Check(timeout.p) || PyLong_Check(timeout.p))) return false;
  const double timeout_s = PyFloat_AsDouble(timeout.p);
  if (timeout_s == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  return ints[0] == b.applied.num_sms && ints[1] == b.applied.num_threads && timeout_s == b.applied.timeout_s;
}

// DeepEP's default stream order: no previous_event, neither async_finish nor allocate_on_comm_stream.
bool default_order(PyObject* previous_event, PyObject* async_finish, PyObject* allocate_on_comm_stream) {
  return previous_event == Py_None && !truth(async_finish) && !truth(allocate_on_comm_stream);
}

// The core handle of a dispatch's handle tuple (6 elements within one node, DeepEP's internode 10
// across nodes, the core's last), else nullptr.
PyDispatchHandle* ht_handle_of(PyObject* handle, int num_nodes) {
  const Py_ssize_t length = num_nodes > 1 ? 10 : 6;
  if (!PyTuple_Check(handle) || PyTuple_GET_SIZE(handle) != length) return nullptr;
  py::handle core(PyTuple_GET_ITEM(handle, length - 1));
  if (!py::isinstance<PyDispatchHandle>(core)) return nullptr;
  return &core.cast<PyDispatchHandle&>();
}

// A contiguous output tensor on like's device (a new reference) and its view; throws on failure.
PyObject* empty_output(PyObject* like, std::initializer_list<int64_t> shape, DType dtype, View& view) {
  PyObject* t = g_package.tensors->empty(like, shape.begin(), static_cast<int>(shape.size()), dtype, &view);
  if (t == nullptr) throw py::error_already_set();
  return t;
}

// Runs `launch` on the communication stream in DeepEP's default stream order, then returns the
// EventOverlap without an event the operation returns (a new reference).
template <class Launch>
PyObject* launch_in_default_order(PyBuffer& b, Launch&& launch) {
  const cudaStream_t compute = current_stream(b.device);
  StreamOrder order;
  order.wait = compute;
  order.join = compute;
  {
    GilReleaseIf nogil(b.simulated);
    b.ordered(order, b.comm, launch);
  }
  PyObject* overlap = PyObject_CallNoArgs(g_package.event_overlap);
  if (overlap == nullptr) throw py::error_already_set();
  return overlap;
}

// cached_dispatch_call(x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
//   num_tokens_per_expert, topk_idx, topk_weights, expert_alignment, num_worst_tokens, config,
//   previous_event, async_finish, allocate_on_comm_stream)
//   -> (recv_x, None, None, None, None, EventOverlap) or None.
PyObject* op_cached_dispatch_call(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  return guarded([&]() -> PyObject* {
    if (nargs != 14) throw py::type_error("Buffer.cached_dispatch_call(): expected 14 arguments");
    PyBuffer* pb = package_buffer(self);
    if (pb == nullptr || !default_order(args[11], args[12], args[13])) Py_RETURN_NONE;
    for (int i = 2; i < 8; ++i) {  // the routing inputs of a fresh dispatch
      if (args[i] != Py_None) Py_RETURN_NONE;
    }
    PyBuffer& b = *pb;
    epx::Buffer& buf = b.get();
    PyDispatchHandle* h = ht_handle_of(args[1], buf.num_nodes());
    int alignment = 0, worst = 0;
    if (h == nullptr || !config_is_applied(b, args[10]) || !int_at_least(args[8], 1, alignment) ||
        !int_at_least(args[9], 0, worst) || (worst != 0 && worst != h->handle.num_worst_tokens)) {
      Py_RETURN_NONE;
    }
    epx::DispatchInputs in;
    PyObject* x = args[0];
    PyObject* scales = nullptr;
    if (PyTuple_Check(x)) {  // (fp8 tensor, scales: float32 or UE8M0-packed int32, [N] or [N, C])
      if (PyTuple_GET_SIZE(x) != 2) Py_RETURN_NONE;
      scales = PyTuple_GET_ITEM(x, 1);
      x = PyTuple_GET_ITEM(x, 0);
      if (!tensor_arg(x, b.device, bit(DType::kFP8E4M3), 2, in.x) ||
          !tensor_arg(scales, b.device, bit(DType::kF32) | bit(DType::kI32), 0, in.x_scales) ||
          in.x_scales.ndim > 2) {
        Py_RETURN_NONE;
      }
    } else if (!tensor_arg(x, b.device, bit(DType::kBF16), 2, in.x)) {  // (fp8 without scales: refused)
      Py_RETURN_NONE;
    }
    in.expert_alignment = alignment;
    in.num_worst_tokens = h->handle.num_worst_tokens;
    const int64_t rows = std::max<int64_t>(in.num_worst_tokens > 0 ? in.num_worst_tokens : h->handle.num_recv_tokens, 0);
    epx::DispatchOutputs out;
    Ref recv_x(empty_output(x, {rows, in.x.shape[1]}, in.x.dtype, out.recv_x));
    Ref recv_scales;
    if (scales != nullptr) {
      recv_scales.p = in.x_scales.ndim == 2
                          ? empty_output(x, {rows, in.x_scales.shape[1]}, in.x_scales.dtype, out.recv_x_scales)
                          : empty_output(x, {rows}, in.x_scales.dtype, out.recv_x_scales);
    }
    Ref overlap(launch_in_default_order(b, [&] { buf.dispatch(in, h->handle, out, b.comm); }));
    PyObject* recv = scales != nullptr ? tuple_stealing({recv_x.take(), recv_scales.take()}) : recv_x.take();
    return tuple_stealing({recv, ref(Py_None), ref(Py_None), ref(Py_None), ref(Py_None), overlap.take()});
  });
}

// combine_call(x, handle, topk_weights, bias, config, previous_event, async_finish, allocate_on_comm_stream)
//   -> (combined_x, combined_topk_weights, EventOverlap) or None.
PyObject* op_combine_call(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  return guarded([&]() -> PyObject* {
    if (nargs != 8) throw py::type_error("Buffer.combine_call(): expected 8 arguments");
    PyBuffer* pb = package_buffer(self);
    if (pb == nullptr || !default_order(args[5], args[6], args[7])) Py_RETURN_NONE;
    PyBuffer& b = *pb;
    epx::Buffer& buf = b.get();
    PyDispatchHandle* h = ht_handle_of(args[1], buf.num_nodes());
    if (h == nullptr || !config_is_applied(b, args[4])) Py_RETURN_NONE;
    epx::CombineInputs in;
    if (!tensor_arg(args[0], b.device, bit(DType::kBF16), 2, in.x) ||
        !optional_tensor_arg(args[2], b.device, bit(DType::kF32), in.topk_weights, 2)) {
      Py_RETURN_NONE;
    }
    PyObject* bias = args[3];  // None, a tensor, or a tuple of two (each a tensor or None)
    if (PyTuple_Check(bias)) {
      if (PyTuple_GET_SIZE(bias) != 2 ||
          !optional_tensor_arg(PyTuple_GET_ITEM(bias, 0), b.device, bit(DType::kBF16), in.bias_0) ||
          !optional_tensor_arg(PyTuple_GET_ITEM(bias, 1), b.device, bit(DType::kBF16), in.bias_1)) {
        Py_RETURN_NONE;
      }
    } else if (!optional_tensor_arg(bias, b.device, bit(DType::kBF16), in.bias_0)) {
      Py_RETURN_NONE;
    }
    const int64_t num_tokens = h->handle.num_tokens;
    epx::CombineOutputs out;
    Ref combined(empty_output(args[0], {num_tokens, in.x.shape[1]}, DType::kBF16, out.combined_x));
    Ref weights(in.topk_weights.defined()
                    ? empty_output(args[0], {num_tokens, in.topk_weights.shape[1]}, DType::kF32,
                                   out.combined_topk_weights)
                    : ref(Py_None));
    Ref overlap(launch_in_default_order(b, [&] { buf.combine(in, h->handle, out, b.comm); }));
    return tuple_stealing({combined.take(), weights.take(), overlap.take()});
  });
}

using FastMethod = PyObject* (*)(PyObject*, PyObject* const*, Py_ssize_t, PyObject*);

// Adds the operations to _C.Buffer as method descriptors (their PyMethodDefs live as long as the process).
void add_operations(py::handle buffer_type) {
  static std::pair<OpSpec*, FastMethod> ops[] = {
      {&g_get_dispatch_layout, op_get_dispatch_layout},
      {&g_dispatch_notify, op_dispatch_notify},
      {&g_dispatch, op_dispatch},
      {&g_combine, op_combine},
      {&g_low_latency_dispatch, op_low_latency_dispatch},
      {&g_low_latency_combine, op_low_latency_combine},
      {&g_low_latency_receive, op_low_latency_receive},
      {&g_low_latency_query_mask_buffer, op_low_latency_query_mask_buffer},
  };
  using PackageCall = PyObject* (*)(PyObject*, PyObject* const*, Py_ssize_t);
  static std::pair<const char*, PackageCall> calls[] = {
      {"low_latency_dispatch_call", op_ll_dispatch_call},
      {"low_latency_combine_call", op_ll_combine_call},
      {"cached_dispatch_call", op_cached_dispatch_call},
      {"combine_call", op_combine_call},
  };
  constexpr size_t kNumOps = sizeof(ops) / sizeof(ops[0]), kNumCalls = sizeof(calls) / sizeof(calls[0]);
  static PyMethodDef defs[kNumOps + kNumCalls];
  for (size_t i = 0; i < kNumOps; ++i) {
    OpSpec& op = *ops[i].first;
    EPX_CHECK(static_cast<int>(op.params.size()) <= kMaxParams, ErrorKind::kState, op.name, ": too many parameters");
    defs[i] = PyMethodDef{op.name, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(ops[i].second)),
                          METH_FASTCALL | METH_KEYWORDS, op.make_doc()};
  }
  for (size_t i = 0; i < kNumCalls; ++i) {
    defs[kNumOps + i] = PyMethodDef{
        calls[i].first, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(calls[i].second)),
        METH_FASTCALL, "A Buffer method of the package, whole (binding.cpp); None: the package's own path runs."};
  }
  for (PyMethodDef& def : defs) {
    PyObject* descr = PyDescr_NewMethod(reinterpret_cast<PyTypeObject*>(buffer_type.ptr()), &def);
    if (descr == nullptr) throw py::error_already_set();
    const int st = PyObject_SetAttrString(buffer_type.ptr(), def.ml_name, descr);
    Py_DECREF(descr);
    if (st != 0) throw py::error_already_set();
  }
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
  // The RDMA rings a Buffer across nodes is made with (BufferOptions' defaults, which Python keeps).
  m.attr("RDMA_CHUNK_TOKENS") = epx::BufferOptions{}.rdma_chunk_tokens;
  m.attr("RDMA_RING_SLOTS") = epx::BufferOptions{}.rdma_ring_slots;
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
        py::kw_only(), py::arg("num_sms"), py::arg("num_threads"), py::arg("timeout_s"), py::arg("num_device_sms") = 0,
        "Raises EpxError(InvalidArgument) naming the field out of range (no device needed when "
        "num_device_sms <= 0).");

  // ---- Size hints (static, no GPU; keyword arguments only, named as the C++ parameters) ------------
  m.def("nvl_buffer_size_hint",
        [](int64_t max_rows, int hidden, int dtype, int num_topk, int num_ranks) {
          EPX_ARG_CHECK(dtype >= 0 && dtype <= static_cast<int>(DType::kBool), "x_dtype: unknown code ", dtype);
          return epx::Buffer::get_nvl_buffer_size_hint(max_rows, hidden, static_cast<DType>(dtype), num_topk,
                                                       num_ranks);
        },
        py::kw_only(), py::arg("max_rows"), py::arg("hidden"), py::arg("dtype"), py::arg("num_topk"), py::arg("num_ranks"));
  m.def("rdma_buffer_size_hint",
        [](int num_ranks, int node_size, int num_channels, int chunk_tokens, int ring_slots, int64_t hidden_bytes,
           int num_topk) {
          return epx::plan::rdma_bytes_for(epx::plan::RdmaShape{num_ranks, node_size, num_channels, chunk_tokens,
                                                                ring_slots, hidden_bytes, num_topk});
        },
        py::kw_only(), py::arg("num_ranks"), py::arg("node_size"), py::arg("num_channels"), py::arg("chunk_tokens"),
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
        py::kw_only(), py::arg("num_sms"), py::arg("num_threads"), py::arg("hidden_bytes"), py::arg("num_ranks"),
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
        py::kw_only(), py::arg("num_sms"), py::arg("num_threads"), py::arg("num_nvl_bytes"), py::arg("hidden"), py::arg("dtype"),
        py::arg("num_topk"), py::arg("num_ranks"),
        "(dispatch, combine) rows per ring of a call whose rows do not fit the row region; EpxError(BufferTooSmall) "
        "naming the minimum num_nvl_bytes when the rings would be too small.");
  m.def("low_latency_size_hint", &epx::Buffer::low_latency_size_hint, py::kw_only(), py::arg("num_max_dispatch_tokens_per_rank"),
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
      .def(py::init(&make_dispatch_handle), py::kw_only(), py::arg("storage_ptr"), py::arg("storage_numel"),
           py::arg("num_ranks"),
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
      .def_property_readonly("forward_slots", [](const PyDispatchHandle& h) { return h.handle.forward_slots; })
      .def_property_readonly("storage", [](const PyDispatchHandle& h) { return h.storage; })
      .def("__repr__", [](const PyDispatchHandle& h) {
        return epx::detail::concat("<epx DispatchHandle rank ", h.handle.rank, "/", h.handle.num_ranks, ", ",
                                   h.handle.num_tokens, " tokens, ", h.handle.num_recv_tokens, " received, worst ",
                                   h.handle.num_worst_tokens, h.handle.filled ? "" : ", not filled", ">");
      });

  m.def("config_defaults_changed", [] { ++g_config_defaults_epoch; },
        "The package's default config changed (Buffer.set_num_sms): every buffer's mark_default_config is void.");
  m.def("_use_package", [](py::capsule tensor_api, py::object ll_plan, py::object current_stream,
                           py::object ll_finish, py::object event_overlap, py::object config_type) {
        auto* api = static_cast<const epx::python::TensorApi*>(
            PyCapsule_GetPointer(tensor_api.ptr(), epx::python::kTensorApiName));
        if (api == nullptr) throw py::error_already_set();
        EPX_CHECK(api->abi == epx::python::kTensorApiAbi, ErrorKind::kState, "epx._aten and epx._C are from "
                  "different builds (tensor API ", api->abi, ", expected ", epx::python::kTensorApiAbi, ")");
        EPX_CHECK(PyType_Check(config_type.ptr()), ErrorKind::kInvalidArgument, "config_type: expected a type");
        for (PyObject* held : {g_package.ll_plan, g_package.current_stream, g_package.ll_finish,
                               g_package.event_overlap, g_package.config_type}) {
          Py_XDECREF(held);
        }
        g_package = Package{api, ll_plan.release().ptr(), current_stream.release().ptr(), ll_finish.release().ptr(),
                            event_overlap.release().ptr(), config_type.release().ptr()};
      }, py::arg("tensor_api"), py::arg("ll_plan"), py::arg("current_stream"), py::arg("ll_finish"),
      py::arg("event_overlap"), py::arg("config_type"),
      "Hands the package's helpers to its whole calls (once, at the package's import; see binding.cpp).");

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
                       int node_size, size_t num_rdma_bytes, int rdma_chunk_tokens, int rdma_ring_slots) {
             epx::BufferOptions options;
             options.node_size = node_size;
             options.num_rdma_bytes = num_rdma_bytes;
             options.rdma_chunk_tokens = rdma_chunk_tokens;
             options.rdma_ring_slots = rdma_ring_slots;
             options.config = make_config(num_sms, num_threads, timeout_s);
             options.num_ll_bytes = num_ll_bytes;
             options.enable_shrink = enable_shrink;
             options.ll_zero_copy = ll_zero_copy;
             epx::Communicator& c = comm.get();
             auto b = std::make_unique<PyBuffer>();
             b->simulated = c.simulated();
             b->applied = options.config;
             py::gil_scoped_release nogil;
             b->ptr = std::make_unique<epx::Buffer>(c, num_nvl_bytes, options);
             return b;
           }),
           py::arg("comm"), py::kw_only(), py::arg("num_nvl_bytes"), py::arg("num_ll_bytes"), py::arg("num_sms"),
           py::arg("num_threads"), py::arg("timeout_s"), py::arg("enable_shrink") = false,
           py::arg("ll_zero_copy") = epx::LlZeroCopy::kOff, py::arg("node_size") = 0,
           py::arg("num_rdma_bytes") = 0, py::arg("rdma_chunk_tokens") = epx::BufferOptions{}.rdma_chunk_tokens,
           py::arg("rdma_ring_slots") = epx::BufferOptions{}.rdma_ring_slots, py::keep_alive<1, 2>(),
           "Collective: allocates the symmetric buffer (num_nvl_bytes + num_rdma_bytes + num_ll_bytes) on every "
           "rank; across (virtual) nodes num_rdma_bytes > 0 holds the RDMA rings (BufferOptions).")
      .def_property_readonly("rank", [](PyBuffer& b) { return b.get().rank(); })
      .def_property_readonly("num_ranks", [](PyBuffer& b) { return b.get().num_ranks(); })
      .def_property_readonly("node_size", [](PyBuffer& b) { return b.get().node_size(); })
      .def_property_readonly("num_nodes", [](PyBuffer& b) { return b.get().num_nodes(); })
      .def_property_readonly("num_nvl_bytes", [](PyBuffer& b) { return b.get().num_nvl_bytes(); })
      .def_property_readonly("failed", [](PyBuffer& b) { return b.get().failed(); })
      .def_property_readonly("destroyed", [](PyBuffer& b) { return b.ptr == nullptr; })
      .def("config", [](PyBuffer& b) { return config_to_tuple(b.get().config()); })
      .def("set_config", [](PyBuffer& b, int num_sms, int num_threads, double timeout_s) {
             const epx::Config c = make_config(num_sms, num_threads, timeout_s);
             b.get().set_config(c);
             b.applied = c;
             b.default_epoch = -1;
           }, py::arg("num_sms"), py::arg("num_threads"), py::arg("timeout_s"))
      .def("mark_default_config", [](PyBuffer& b) { b.default_epoch = g_config_defaults_epoch; },
           "The config the core has is the package's default (config=None) until set_config or "
           "config_defaults_changed; cached_dispatch_call / combine_call take config=None only then.")
      .def("row_capacity", [](PyBuffer& b, int hidden, int dtype, int num_topk) {
             EPX_ARG_CHECK(dtype >= 0 && dtype <= static_cast<int>(DType::kBool), "x_dtype: unknown code ", dtype);
             return b.get().row_capacity(hidden, static_cast<DType>(dtype), num_topk);
           }, py::arg("hidden"), py::arg("dtype"), py::arg("num_topk"))
      .def("peer_pointer", [](PyBuffer& b, int peer) { return reinterpret_cast<uintptr_t>(b.get().peer_pointer(peer)); },
           py::arg("peer"))
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
      .def("low_latency_clean_mask_buffer", [](PyBuffer& b) {
             epx::Buffer& buf = b.get();
             py::gil_scoped_release nogil;
             buf.low_latency_clean_mask_buffer();
           })

      .def("attach_package", [](PyBuffer& b, int device, py::object comm_stream) {
             const unsigned long long raw = comm_stream.attr("cuda_stream").cast<unsigned long long>();
             b.device = device;
             b.comm = to_stream(static_cast<uintptr_t>(raw));
             b.comm_stream = std::move(comm_stream);
           }, py::arg("device"), py::arg("comm_stream"),
           "The package's Buffer: its CUDA device index and communication stream (a torch.cuda.Stream), which "
           "low_latency_dispatch_call / low_latency_combine_call use.")

      // Errors and lifecycle
      .def("check", [](PyBuffer& b) { b.get().check(); })
      .def("stream_wait", [](PyBuffer& b, uintptr_t dst, uintptr_t src) {
             GilReleaseIf nogil(b.simulated);
             b.join().order(to_stream(dst), to_stream(src));
           }, py::arg("dst"), py::arg("src"),
           "Stream `dst` (a cudaStream_t int) waits for the work queued on stream `src` so far (no host sync), "
           "with the event of the operations' wait_stream / join_stream.")
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
  // The operations (keyword-only vectorcall methods, see add_operations).
  add_operations(m.attr("Buffer"));
}
