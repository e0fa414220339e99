#include "epx/types.hpp"

#include "epx/error.hpp"

namespace epx {

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kBF16: return 2;
    case DType::kFP8E4M3: return 1;
    case DType::kF32: return 4;
    case DType::kI32: return 4;
    case DType::kI64: return 8;
    case DType::kBool: return 1;
  }
  EPX_FAIL(ErrorKind::kInvalidArgument, "unknown dtype ", static_cast<int>(dtype));
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kBF16: return "bfloat16";
    case DType::kFP8E4M3: return "float8_e4m3fn";
    case DType::kF32: return "float32";
    case DType::kI32: return "int32";
    case DType::kI64: return "int64";
    case DType::kBool: return "bool";
  }
  return "unknown";
}

View View::of(void* data, DType dtype, std::initializer_list<int64_t> shape) {
  View v;
  v.data = data;
  v.dtype = dtype;
  EPX_ARG_CHECK(shape.size() >= 1 && shape.size() <= 3, "View::of: 1 to 3 dims, got ", shape.size());
  v.ndim = static_cast<int>(shape.size());
  int i = 0;
  for (int64_t s : shape) v.shape[i++] = s;
  int64_t st = 1;
  for (int d = v.ndim - 1; d >= 0; --d) {
    v.stride[d] = st;
    st *= v.shape[d] > 0 ? v.shape[d] : 1;
  }
  return v;
}

View View::strided(void* data, DType dtype, std::initializer_list<int64_t> shape,
                   std::initializer_list<int64_t> stride) {
  EPX_ARG_CHECK(shape.size() == stride.size(), "View::strided: shape and stride ranks differ");
  View v = of(data, dtype, shape);
  int i = 0;
  for (int64_t s : stride) v.stride[i++] = s;
  return v;
}

int64_t View::numel() const {
  if (ndim == 0) return 0;
  int64_t n = 1;
  for (int d = 0; d < ndim; ++d) n *= shape[d];
  return n;
}

bool View::is_contiguous() const {
  int64_t st = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    if (shape[d] != 1 && stride[d] != st) return false;
    st *= shape[d];
  }
  return true;
}

}  // namespace epx
