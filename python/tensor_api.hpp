// The C functions epx._aten lends epx._C (a capsule, `_aten.tensor_api`, handed over once at the
// package's import): how the binding, which sees no torch, reads a tensor argument into an epx::View
// and makes an operation's output tensors without a Python-level call per tensor. Both modules
// are built from this header by one build; `abi` guards against a mismatched pair.
#pragma once
#include <Python.h>

#include <cstdint>

#include "epx/types.hpp"

namespace epx::python {

constexpr uint32_t kTensorApiAbi = 1u << 16 | static_cast<uint32_t>(sizeof(View));
constexpr const char* kTensorApiName = "epx._aten.tensor_api";
constexpr int kAnyDevice = -1;

struct TensorApi {
  uint32_t abi;  // kTensorApiAbi
  // 1 and `*out` when `t` is a tensor on CUDA device `device` (kAnyDevice: any device) of a dtype
  // whose bit is set in `mask` (bit i: epx::DType i) with `ndim` dimensions (0: any of 1 to 3);
  // 0 otherwise (no Python error set: the package words the refusal).
  int (*describe)(PyObject* t, int device, uint32_t mask, int ndim, View* out);
  // The tensors of an _aten plan (`plan`: the capsule `_aten.plan` made) on like's device: new
  // references into `tensors` and their views into `views` (room for `capacity`). Returns the number of
  // views, or -1 with a Python error set.
  int (*empty_plan)(PyObject* like, PyObject* plan, int capacity, PyObject** tensors, View* views);
  // A contiguous tensor of `dtype` shaped `shape[0..ndim)` on like's device: a new reference and its
  // view, or nullptr with a Python error set.
  PyObject* (*empty)(PyObject* like, const int64_t* shape, int ndim, DType dtype, View* view);
};

}  // namespace epx::python
