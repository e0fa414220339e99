// Python object references for the C++ of the Python layer (binding.cpp, aten.cpp): a scope-owned
// new reference, a new reference to a borrowed object, a tuple made from new references.
#pragma once
#include <Python.h>

#include <initializer_list>
#include <utility>

namespace epx::python {

// A new reference released at the end of the scope unless taken.
struct Ref {
  PyObject* p = nullptr;
  Ref() = default;
  explicit Ref(PyObject* o) : p(o) {}
  Ref(const Ref&) = delete;
  Ref& operator=(const Ref&) = delete;
  ~Ref() { Py_XDECREF(p); }
  PyObject* take() { return std::exchange(p, nullptr); }
};

inline PyObject* new_ref(PyObject* o) {
  Py_INCREF(o);
  return o;
}

// A tuple of `items`, new references it steals; nullptr (and every item released) if one of them
// is nullptr (a failed creation, its Python error set) or the tuple cannot be made.
inline PyObject* tuple_of(std::initializer_list<PyObject*> items) {
  PyObject* t = nullptr;
  bool complete = true;
  for (PyObject* item : items) complete = complete && item != nullptr;
  if (complete) t = PyTuple_New(static_cast<Py_ssize_t>(items.size()));
  Py_ssize_t i = 0;
  for (PyObject* item : items) {
    if (t != nullptr) {
      PyTuple_SET_ITEM(t, i++, item);
    } else {
      Py_XDECREF(item);
    }
  }
  return t;
}

}  // namespace epx::python
