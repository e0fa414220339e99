// Non-owning tensor views passed across the epx C++ API (no torch dependency).
#pragma once
#include <cstddef>
#include <cstdint>
#include <initializer_list>

namespace epx {

enum class DType : int { kBF16, kFP8E4M3, kF32, kI32, kI64, kBool };

size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);

// A strided view of device (or host) memory with up to 3 dimensions. Strides are in elements.
// A default-constructed View is "undefined" (an absent optional argument); a View with a zero
// dimension is defined and empty (e.g. a rank with N = 0 tokens).
struct View {
  void* data = nullptr;
  DType dtype = DType::kBF16;
  int ndim = 0;
  int64_t shape[3] = {0, 0, 0};
  int64_t stride[3] = {0, 0, 0};

  // A contiguous (row-major) view.
  static View of(void* data, DType dtype, std::initializer_list<int64_t> shape);
  // A view with explicit strides (elements).
  static View strided(void* data, DType dtype, std::initializer_list<int64_t> shape,
                      std::initializer_list<int64_t> stride);

  bool defined() const { return ndim > 0; }
  int64_t numel() const;
  int64_t size(int dim) const { return shape[dim]; }
  bool is_contiguous() const;
  template <typename T>
  T* ptr() const { return static_cast<T*>(data); }
};

}  // namespace epx
