#include "epx/error.hpp"

namespace epx {

const char* error_kind_name(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::kInvalidArgument: return "InvalidArgument";
    case ErrorKind::kBufferTooSmall: return "BufferTooSmall";
    case ErrorKind::kCuda: return "Cuda";
    case ErrorKind::kNccl: return "Nccl";
    case ErrorKind::kTimeout: return "Timeout";
    case ErrorKind::kState: return "State";
    case ErrorKind::kUnsupported: return "Unsupported";
    case ErrorKind::kAborted: return "Aborted";
  }
  return "Unknown";
}

static std::string format_error(ErrorKind kind, const std::string& message, const char* file, int line) {
  return detail::concat("epx ", error_kind_name(kind), " error: ", message, " (", file, ":", line, ")");
}

Error::Error(ErrorKind kind, const std::string& message, const char* file, int line)
    : std::runtime_error(format_error(kind, message, file, line)),
      kind_(kind), message_(message), file_(file), line_(line) {}

}  // namespace epx
