// epx._aten: the operations' output tensors and the inputs' descriptors, made with ATen in C++.
//
// DeepEP's API returns fresh tensors from every call (two results may be alive at once), and
// making them from Python costs more host time than the launch: a CUDA `torch.empty` ~5 us, each
// `as_strided` or dtype view ~2-3 us, reading an input's dtype, device, shape and strides ~2 us
// (docs/performance.md, "Host overhead"). Here one call makes an operation's outputs and their
// descriptors `(data_ptr, dtype code, shape, strides)` for the binding epx._C, which sees no
// torch, and one call checks and describes an input. The module reads no epx state and launches
// nothing: it allocates through torch's caching allocator on the current stream of the device of
// `like` (as `like.new_empty` would), so `torch.cuda.stream(...)` contexts (allocate_on_comm_stream)
// apply.
//
//   describe(t, device, mask, ndim) -> the descriptor of an input, or None when `t` is not a tensor
//                                 on `device` of a dtype in `mask` (bit i: epx dtype code i) with
//                                 `ndim` dimensions (0: any of 1 to 3); the package then says what is wrong.
//   empty(like, shape, dtype)  -> (tensor, descriptor): one contiguous tensor.
//   plan(alloc_bytes, views)   -> a plan (capsule) of views into allocations, made once per geometry;
//                                 views: (alloc index, torch dtype, shape, strides, byte offset).
//   empty_plan(like, plan)     -> (tensors, descriptors): the plan's allocations and views; views of
//                                 one allocation share its storage (freed when the last is).
//   tensor_api                 -> a capsule of these as C functions (python/tensor_api.hpp), which
//                                 the package hands to epx._C: the low-latency operations read their
//                                 tensors and make their outputs through it, without a Python call each.
//
// Built against one torch (EPX_TORCH_VERSION: its torch.__version__, set by python/CMakeLists.txt);
// `torch_version` names it and the package refuses to run against another (its C++ ABI differs).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/TensorImpl.h>
#include <torch/csrc/Device.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <Python.h>

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "epx/types.hpp"
#include "py_refs.hpp"
#include "tensor_api.hpp"

#ifndef EPX_TORCH_VERSION
#error "EPX_TORCH_VERSION: the torch.__version__ this module is compiled against (python/CMakeLists.txt sets it)"
#endif

namespace {

using epx::python::new_ref;
using epx::python::Ref;
using epx::python::tuple_of;

// The binding's dtype code of a torch dtype (epx::DType), -1 for one the core does not take.
int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return static_cast<int>(epx::DType::kBF16);
    case at::kFloat8_e4m3fn: return static_cast<int>(epx::DType::kFP8E4M3);
    case at::kFloat: return static_cast<int>(epx::DType::kF32);
    case at::kInt: return static_cast<int>(epx::DType::kI32);
    case at::kLong: return static_cast<int>(epx::DType::kI64);
    case at::kBool: return static_cast<int>(epx::DType::kBool);
    default: return -1;
  }
}

// The scalar type of a torch.dtype object and its epx code (-1: not one epx takes); false if `o`
// is not a torch.dtype.
bool read_dtype(PyObject* o, at::ScalarType& st, int& code) {
  if (!THPDtype_Check(o)) return false;
  st = reinterpret_cast<THPDtype*>(o)->scalar_type;
  code = dtype_code(st);
  return true;
}

// Sets a TypeError naming the argument; returns nullptr for `return fail(...)`.
template <class T = PyObject>
T* fail(const std::string& message) {
  PyErr_SetString(PyExc_TypeError, message.c_str());
  return nullptr;
}

bool read_dims(PyObject* seq, const char* what, std::vector<int64_t>& out) {
  PyObject* fast = PySequence_Fast(seq, what);
  if (fast == nullptr) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
  out.resize(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    out[i] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(fast, i));
    if (out[i] == -1 && PyErr_Occurred()) {
      Py_DECREF(fast);
      return false;
    }
  }
  Py_DECREF(fast);
  return true;
}

PyObject* int_tuple(const std::vector<int64_t>& v) {
  PyObject* t = PyTuple_New(static_cast<Py_ssize_t>(v.size()));
  if (t == nullptr) return nullptr;
  for (size_t i = 0; i < v.size(); ++i) {
    PyObject* item = PyLong_FromLongLong(v[i]);
    if (item == nullptr) {
      Py_DECREF(t);
      return nullptr;
    }
    PyTuple_SET_ITEM(t, static_cast<Py_ssize_t>(i), item);
  }
  return t;
}

// (data_ptr, code, shape, strides) of `t` with the plan's cached code, shape and stride objects.
PyObject* descriptor(const at::Tensor& t, PyObject* code, PyObject* shape, PyObject* strides) {
  return tuple_of({PyLong_FromVoidPtr(t.data_ptr()), new_ref(code), new_ref(shape), new_ref(strides)});
}

// (data_ptr, code, shape, strides) of `t`, made from it.
PyObject* descriptor(const at::Tensor& t, int code) {
  const std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end()), strides(t.strides().begin(), t.strides().end());
  return tuple_of({PyLong_FromVoidPtr(t.data_ptr()), PyLong_FromLong(code), int_tuple(shape), int_tuple(strides)});
}

const at::Tensor* like_tensor(PyObject* like) {
  if (!THPVariable_Check(like)) {
    return fail<const at::Tensor>(std::string("like: expected a torch.Tensor, got ") + Py_TYPE(like)->tp_name);
  }
  return &THPVariable_Unpack(like);
}

// The tensor `o` if it is one of a dtype in `mask` with `ndim` dimensions (0: any of 1 to 3, the
// dimensions a descriptor holds), else nullptr; `code`: its epx dtype code.
const at::Tensor* accepted(PyObject* o, long mask, long ndim, int& code) {
  if (!THPVariable_Check(o)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(o);
  code = dtype_code(t.scalar_type());
  const int64_t dims = t.dim();
  if (code < 0 || ((mask >> code) & 1) == 0 || dims < 1 || dims > 3 || (ndim > 0 && dims != ndim)) return nullptr;
  return &t;
}

// describe(t, device, mask, ndim): see the top. The checks of the package's `_desc`, without its
// attribute lookups; None (not an error) for anything refused, whose error the package words.
PyObject* describe(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 4) return fail("describe(t, device, mask, ndim): expected 4 arguments");
  if (!THPDevice_Check(args[1])) return fail(std::string("device: expected a torch.device, got ") + Py_TYPE(args[1])->tp_name);
  const long mask = PyLong_AsLong(args[2]);
  const long ndim = PyLong_AsLong(args[3]);
  if (PyErr_Occurred()) return nullptr;
  int code = -1;
  const at::Tensor* t = accepted(args[0], mask, ndim, code);
  if (t == nullptr || t->device() != reinterpret_cast<THPDevice*>(args[1])->device) Py_RETURN_NONE;
  return descriptor(*t, code);
  END_HANDLE_TH_ERRORS
}

// The epx::View of `t` (1 to 3 dimensions).
epx::View view_of(const at::Tensor& t, int code) {
  epx::View v;
  v.data = t.data_ptr();
  v.dtype = static_cast<epx::DType>(code);
  v.ndim = static_cast<int>(t.dim());
  for (int d = 0; d < v.ndim; ++d) {
    v.shape[d] = t.size(d);
    v.stride[d] = t.stride(d);
  }
  return v;
}

// TensorApi::describe (tensor_api.hpp): what `describe` checks, the device as a CUDA index.
int api_describe(PyObject* o, int device, uint32_t mask, int ndim, epx::View* out) {
  int code = -1;
  const at::Tensor* t = accepted(o, static_cast<long>(mask), ndim, code);
  if (t == nullptr) return 0;
  if (device != epx::python::kAnyDevice && !(t->is_cuda() && t->get_device() == device)) return 0;
  *out = view_of(*t, code);
  return 1;
}

// On CUDA, outputs come straight from torch's caching allocator on like's device (what at::empty
// reaches, on the current stream, without the dispatcher's ~1 us per call); elsewhere (CPU, meta)
// through at::empty. nullptr: not CUDA (or no CUDA allocator registered).
c10::Allocator* cuda_allocator(const at::Tensor& like) {
  return like.is_cuda() ? c10::GetAllocator(c10::DeviceType::CUDA) : nullptr;
}

// `bytes` of memory from the CUDA allocator on the device that is current (DeviceGuard).
c10::Storage cuda_storage(c10::Allocator* cuda, size_t bytes) {
  return c10::Storage(c10::Storage::use_byte_size_t(), bytes, cuda->allocate(bytes), cuda, /*resizable=*/false);
}

// A fresh tensor on `storage` with the keys of its backend (the constructor adds autograd's).
at::Tensor on_storage(const c10::Storage& storage, c10::DispatchKeySet keys, caffe2::TypeMeta meta) {
  return at::Tensor(c10::make_intrusive<c10::TensorImpl>(c10::Storage(storage), keys, meta));
}

// A contiguous tensor shaped `shape` of torch dtype `st` on like's device.
at::Tensor empty_like_device(const at::Tensor& like, c10::IntArrayRef shape, at::ScalarType st) {
  c10::Allocator* cuda = cuda_allocator(like);
  if (cuda == nullptr) return at::empty(shape, at::TensorOptions().dtype(st).device(like.device()));
  int64_t numel = 1;
  for (int64_t d : shape) {
    TORCH_CHECK(d >= 0, "shape: negative dimension ", d);
    numel *= d;
  }
  const caffe2::TypeMeta meta = caffe2::TypeMeta::fromScalarType(st);
  const c10::DeviceGuard guard(like.device());
  at::Tensor t = on_storage(cuda_storage(cuda, static_cast<size_t>(numel) * meta.itemsize()),
                            c10::DispatchKeySet(c10::DispatchKey::CUDA), meta);
  t.unsafeGetTensorImpl()->set_sizes_contiguous(shape);
  return t;
}

// empty(like, shape, dtype): a contiguous tensor on like's device, and its descriptor.
PyObject* empty(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 3) return fail("empty(like, shape, dtype): expected 3 arguments");
  const at::Tensor* like = like_tensor(args[0]);
  if (like == nullptr) return nullptr;
  at::ScalarType st;
  int code = -1;
  if (!read_dtype(args[2], st, code)) return fail(std::string("dtype: expected a torch.dtype, got ") + Py_TYPE(args[2])->tp_name);
  if (code < 0) return fail("dtype: not one epx takes (bfloat16, float8_e4m3fn, float32, int32, int64, bool)");
  std::vector<int64_t> shape;
  if (!read_dims(args[1], "shape: expected a sequence of ints", shape)) return nullptr;
  at::Tensor t = empty_like_device(*like, shape, st);
  PyObject* desc = descriptor(t, code);
  return tuple_of({desc != nullptr ? THPVariable_Wrap(std::move(t)) : nullptr, desc});
  END_HANDLE_TH_ERRORS
}

// The torch scalar type of an epx dtype.
at::ScalarType scalar_type(epx::DType d) {
  switch (d) {
    case epx::DType::kBF16: return at::kBFloat16;
    case epx::DType::kFP8E4M3: return at::kFloat8_e4m3fn;
    case epx::DType::kF32: return at::kFloat;
    case epx::DType::kI32: return at::kInt;
    case epx::DType::kI64: return at::kLong;
    case epx::DType::kBool: break;
  }
  return at::kBool;
}

// TensorApi::empty (tensor_api.hpp).
PyObject* api_empty(PyObject* like_obj, const int64_t* shape, int ndim, epx::DType dtype, epx::View* view) {
  HANDLE_TH_ERRORS
  const at::Tensor* like = like_tensor(like_obj);
  if (like == nullptr) return nullptr;
  at::Tensor t = empty_like_device(*like, c10::IntArrayRef(shape, static_cast<size_t>(ndim)), scalar_type(dtype));
  *view = view_of(t, static_cast<int>(dtype));
  return THPVariable_Wrap(std::move(t));
  END_HANDLE_TH_ERRORS
}

// ---- Plans ------------------------------------------------------------------------------------

struct PlanView {
  int alloc = 0;
  caffe2::TypeMeta meta;
  std::vector<int64_t> shape, strides;
  int64_t offset = 0;  // in elements of the view's dtype
  int dtype = -1;      // its epx code
  PyObject* code = nullptr;
  PyObject* py_shape = nullptr;
  PyObject* py_strides = nullptr;
};

struct Plan {
  std::vector<int64_t> alloc_bytes;
  std::vector<PlanView> views;
  ~Plan() {
    for (PlanView& v : views) {
      Py_XDECREF(v.code);
      Py_XDECREF(v.py_shape);
      Py_XDECREF(v.py_strides);
    }
  }
};

constexpr const char* kPlanName = "epx._aten.plan";
constexpr size_t kMaxPlanAllocs = 4;
constexpr Py_ssize_t kMaxPlanViews = 8;

void free_plan(PyObject* capsule) { delete static_cast<Plan*>(PyCapsule_GetPointer(capsule, kPlanName)); }

// plan(alloc_bytes, views): checks that every view lies inside its allocation, aligned.
PyObject* make_plan(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 2) return fail("plan(alloc_bytes, views): expected 2 arguments");
  auto plan = std::make_unique<Plan>();
  if (!read_dims(args[0], "alloc_bytes: expected a sequence of ints", plan->alloc_bytes)) return nullptr;
  if (plan->alloc_bytes.size() > kMaxPlanAllocs) return fail("alloc_bytes: at most 4 allocations");
  for (int64_t b : plan->alloc_bytes) {
    if (b < 0) return fail("alloc_bytes: negative");
  }
  const Ref views{PySequence_Fast(args[1], "views: expected a sequence")};
  if (views.p == nullptr) return nullptr;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(views.p);
  if (n > kMaxPlanViews) return fail("views: at most 8 views");
  plan->views.resize(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* spec = PySequence_Fast_GET_ITEM(views.p, i);
    PlanView& v = plan->views[i];
    long long alloc = 0, offset_bytes = 0;
    PyObject *dtype = nullptr, *shape = nullptr, *strides = nullptr;
    if (!PyTuple_Check(spec) || !PyArg_ParseTuple(spec, "LOOOL", &alloc, &dtype, &shape, &strides, &offset_bytes)) {
      if (!PyErr_Occurred()) fail("views: expected (alloc, dtype, shape, strides, byte_offset) tuples");
      return nullptr;
    }
    at::ScalarType st;
    int code = -1;
    if (!read_dtype(dtype, st, code)) return fail("views: dtype must be a torch.dtype");
    if (!read_dims(shape, "views: shape must be a sequence of ints", v.shape) ||
        !read_dims(strides, "views: strides must be a sequence of ints", v.strides)) {
      return nullptr;
    }
    const std::string where = "views[" + std::to_string(i) + "]: ";
    bool well_formed = code >= 0 && v.strides.size() == v.shape.size() && !v.shape.empty();
    for (size_t d = 0; well_formed && d < v.shape.size(); ++d) well_formed = v.shape[d] >= 0 && v.strides[d] >= 0;
    if (!well_formed) return fail(where + "expected an epx dtype and as many non-negative strides as sizes");
    v.meta = caffe2::TypeMeta::fromScalarType(st);
    const int64_t item = static_cast<int64_t>(v.meta.itemsize());
    int64_t span = 1;  // elements from the first to the last one addressed, plus one (0 if empty)
    for (size_t d = 0; d < v.shape.size(); ++d) {
      span = v.shape[d] == 0 || span == 0 ? 0 : span + (v.shape[d] - 1) * v.strides[d];
    }
    if (alloc < 0 || alloc >= static_cast<long long>(plan->alloc_bytes.size()) || offset_bytes < 0 ||
        offset_bytes % 16 != 0 || offset_bytes + span * item > plan->alloc_bytes[alloc]) {
      return fail(where + "not inside its allocation at a 16-byte aligned offset");
    }
    v.alloc = static_cast<int>(alloc);
    v.offset = offset_bytes / item;
    v.dtype = code;
    v.code = PyLong_FromLong(code);
    v.py_shape = int_tuple(v.shape);
    v.py_strides = int_tuple(v.strides);
    if (v.code == nullptr || v.py_shape == nullptr || v.py_strides == nullptr) return nullptr;
  }
  PyObject* capsule = PyCapsule_New(plan.get(), kPlanName, free_plan);
  if (capsule != nullptr) plan.release();
  return capsule;
  END_HANDLE_TH_ERRORS
}

// The plan's allocations (bytes, on like's device), then each view: a tensor on its allocation's
// storage (what Tensor.view(dtype).as_strided makes, without the dispatcher) into `tensors`.
void make_plan_tensors(const at::Tensor& like, const Plan& plan, at::Tensor* tensors) {
  c10::Storage storages[kMaxPlanAllocs];
  c10::DispatchKeySet keys;
  c10::Allocator* cuda = cuda_allocator(like);
  if (cuda != nullptr) {
    const c10::DeviceGuard guard(like.device());
    for (size_t a = 0; a < plan.alloc_bytes.size(); ++a) storages[a] = cuda_storage(cuda, plan.alloc_bytes[a]);
    keys = c10::DispatchKeySet(c10::DispatchKey::CUDA);
  } else {
    const at::TensorOptions bytes = at::TensorOptions().dtype(at::kByte).device(like.device());
    for (size_t a = 0; a < plan.alloc_bytes.size(); ++a) {
      const at::Tensor base = at::empty({plan.alloc_bytes[a]}, bytes);
      storages[a] = base.storage();
      keys = base.key_set();
    }
  }
  for (size_t i = 0; i < plan.views.size(); ++i) {
    const PlanView& v = plan.views[i];
    tensors[i] = on_storage(storages[v.alloc], keys, v.meta);
    tensors[i].unsafeGetTensorImpl()->set_sizes_and_strides(v.shape, v.strides, v.offset);
  }
}

const Plan* plan_of(PyObject* capsule) { return static_cast<const Plan*>(PyCapsule_GetPointer(capsule, kPlanName)); }

// empty_plan(like, plan): the plan's tensors and their descriptors.
PyObject* empty_plan(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 2) return fail("empty_plan(like, plan): expected 2 arguments");
  const at::Tensor* like = like_tensor(args[0]);
  if (like == nullptr) return nullptr;
  const Plan* plan = plan_of(args[1]);
  if (plan == nullptr) return nullptr;
  std::vector<at::Tensor> tensors(plan->views.size());
  make_plan_tensors(*like, *plan, tensors.data());
  const Py_ssize_t n = static_cast<Py_ssize_t>(plan->views.size());
  PyObject* result = tuple_of({PyTuple_New(n), PyTuple_New(n)});  // (tensors, descriptors)
  if (result == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < n; ++i) {
    const PlanView& v = plan->views[i];
    PyObject* desc = descriptor(tensors[i], v.code, v.py_shape, v.py_strides);
    PyObject* wrapped = desc != nullptr ? THPVariable_Wrap(std::move(tensors[i])) : nullptr;
    if (wrapped == nullptr) {
      Py_XDECREF(desc);
      Py_DECREF(result);  // its tuples' unset items are NULL, which tuple deallocation skips
      return nullptr;
    }
    PyTuple_SET_ITEM(PyTuple_GET_ITEM(result, 0), i, wrapped);
    PyTuple_SET_ITEM(PyTuple_GET_ITEM(result, 1), i, desc);
  }
  return result;
  END_HANDLE_TH_ERRORS
}

// TensorApi::empty_plan (tensor_api.hpp).
int api_empty_plan(PyObject* like_obj, PyObject* capsule, int capacity, PyObject** out, epx::View* views) {
  HANDLE_TH_ERRORS
  const at::Tensor* like = like_tensor(like_obj);
  const Plan* plan = like != nullptr ? plan_of(capsule) : nullptr;
  if (plan == nullptr) return -1;
  const int n = static_cast<int>(plan->views.size());
  if (n > capacity) {
    fail("empty_plan: the plan has more views than the caller has room for");
    return -1;
  }
  at::Tensor tensors[kMaxPlanViews];
  make_plan_tensors(*like, *plan, tensors);
  for (int i = 0; i < n; ++i) {
    views[i] = view_of(tensors[i], plan->views[i].dtype);
    out[i] = THPVariable_Wrap(std::move(tensors[i]));
    if (out[i] == nullptr) {
      for (int j = 0; j < i; ++j) Py_DECREF(out[j]);
      return -1;
    }
  }
  return n;
  END_HANDLE_TH_ERRORS_RET(-1)
}

const epx::python::TensorApi g_tensor_api{epx::python::kTensorApiAbi, api_describe, api_empty_plan, api_empty};

using Fast = PyObject* (*)(PyObject*, PyObject* const*, Py_ssize_t);
PyCFunction fast(Fast f) { return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(f)); }

PyMethodDef g_methods[] = {
    {"describe", fast(describe), METH_FASTCALL,
     "describe(t, device, mask, ndim) -> (data_ptr, dtype code, shape, strides), or None when t is not a tensor "
     "on device of a dtype in mask (bit i: dtype code i) with ndim dimensions (0: any of 1 to 3)."},
    {"empty", fast(empty), METH_FASTCALL,
     "empty(like, shape, dtype) -> (tensor, (data_ptr, dtype code, shape, strides)): a contiguous tensor on "
     "like's device (torch's caching allocator, current stream)."},
    {"plan", fast(make_plan), METH_FASTCALL,
     "plan(alloc_bytes, views) -> plan: views (alloc index, torch dtype, shape, strides, byte offset) into "
     "allocations of alloc_bytes bytes; checked once."},
    {"empty_plan", fast(empty_plan), METH_FASTCALL,
     "empty_plan(like, plan) -> (tensors, descriptors): the plan's allocations on like's device and its views "
     "of them."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef g_module = {PyModuleDef_HEAD_INIT, "_aten",
                        "epx's output tensors made with ATen (see python/aten.cpp). Used by the package epx.", -1,
                        g_methods, nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__aten() {
  PyObject* m = PyModule_Create(&g_module);
  if (m == nullptr) return nullptr;
  PyObject* api = PyCapsule_New(const_cast<epx::python::TensorApi*>(&g_tensor_api), epx::python::kTensorApiName,
                                nullptr);
  if (PyModule_AddStringConstant(m, "torch_version", EPX_TORCH_VERSION) != 0 || api == nullptr ||
      PyModule_AddObject(m, "tensor_api", api) != 0) {
    Py_XDECREF(api);
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
