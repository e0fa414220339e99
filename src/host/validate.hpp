// Argument validation shared by every public entry. Each check throws Error(kInvalidArgument) with
// a message that names the argument, the expected and the actual value.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <string>

#include "epx/types.hpp"

namespace epx::validate {

constexpr int64_t kAny = -1;

std::string describe(const View& v);  // "int64[4096, 8] strides [8, 1]"

// `v` must be defined, of `dtype`, with `shape.size()` dims matching `shape` (kAny = any size).
void tensor(const View& v, const char* name, DType dtype, std::initializer_list<int64_t> shape);
// Same, but an undefined view is accepted (optional argument).
void optional(const View& v, const char* name, DType dtype, std::initializer_list<int64_t> shape);
// Innermost dimension contiguous (stride 1), and rows 16-byte aligned (pointer and row stride).
void rows_16b_aligned(const View& v, const char* name);
// Fully contiguous.
void contiguous(const View& v, const char* name);
// lo <= value <= hi.
void in_range(int64_t value, const char* name, int64_t lo, int64_t hi);

}  // namespace epx::validate
