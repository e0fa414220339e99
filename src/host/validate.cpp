#include "host/validate.hpp"

#include <sstream>

#include "epx/error.hpp"

namespace epx::validate {

std::string describe(const View& v) {
  if (!v.defined()) return "undefined";
  std::ostringstream os;
  os << dtype_name(v.dtype) << "[";
  for (int d = 0; d < v.ndim; ++d) os << (d ? ", " : "") << v.shape[d];
  os << "] strides [";
  for (int d = 0; d < v.ndim; ++d) os << (d ? ", " : "") << v.stride[d];
  os << "]";
  return os.str();
}

static std::string describe_shape(std::initializer_list<int64_t> shape) {
  std::ostringstream os;
  os << "[";
  int i = 0;
  for (int64_t s : shape) {
    os << (i++ ? ", " : "");
    if (s == kAny) os << "*"; else os << s;
  }
  os << "]";
  return os.str();
}

void tensor(const View& v, const char* name, DType dtype, std::initializer_list<int64_t> shape) {
  EPX_ARG_CHECK(v.defined(), name, ": required, got an undefined tensor");
  EPX_ARG_CHECK(v.dtype == dtype, name, ": expected dtype ", dtype_name(dtype), ", got ", describe(v));
  EPX_ARG_CHECK(v.ndim == static_cast<int>(shape.size()), name, ": expected shape ", describe_shape(shape),
                ", got ", describe(v));
  int d = 0;
  for (int64_t s : shape) {
    EPX_ARG_CHECK(s == kAny || v.shape[d] == s, name, ": expected shape ", describe_shape(shape), ", got ",
                  describe(v));
    EPX_ARG_CHECK(v.shape[d] >= 0, name, ": negative size in ", describe(v));
    ++d;
  }
  EPX_ARG_CHECK(v.data != nullptr || v.numel() == 0, name, ": null data pointer for ", describe(v));
}

void optional(const View& v, const char* name, DType dtype, std::initializer_list<int64_t> shape) {
  if (v.defined()) tensor(v, name, dtype, shape);
}

void rows_16b_aligned(const View& v, const char* name) {
  const size_t es = dtype_size(v.dtype);
  EPX_ARG_CHECK(v.stride[v.ndim - 1] == 1 || v.shape[v.ndim - 1] <= 1, name,
                ": the last dimension must be contiguous (stride 1), got ", describe(v));
  EPX_ARG_CHECK(v.shape[v.ndim - 1] * es % 16 == 0, name, ": row bytes (", v.shape[v.ndim - 1] * es,
                ") must be a multiple of 16, got ", describe(v));
  if (v.numel() == 0) return;
  EPX_ARG_CHECK(reinterpret_cast<uintptr_t>(v.data) % 16 == 0, name, ": data must be 16-byte aligned");
  if (v.ndim >= 2)
    EPX_ARG_CHECK(v.stride[v.ndim - 2] * es % 16 == 0, name, ": row stride (", v.stride[v.ndim - 2] * es,
                  " bytes) must be a multiple of 16, got ", describe(v));
}

void contiguous(const View& v, const char* name) {
  EPX_ARG_CHECK(v.is_contiguous(), name, ": must be contiguous, got ", describe(v));
}

void in_range(int64_t value, const char* name, int64_t lo, int64_t hi) {
  EPX_ARG_CHECK(value >= lo && value <= hi, name, ": expected a value in [", lo, ", ", hi, "], got ", value);
}

}  // namespace epx::validate
