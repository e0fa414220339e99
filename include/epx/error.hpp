// epx::Error: the one error type of the library. Every public entry validates its arguments and
// throws Error (the process is never terminated, nothing is silently clamped). Device-side failures (timeouts, bad expert ids
// seen by a kernel) are recorded on the device and raised as Error at the next host check point.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace epx {

enum class ErrorKind {
  kInvalidArgument,  // shape, dtype, stride, range or size violation by the caller
  kBufferTooSmall,   // the symmetric buffer cannot hold what an operation needs
  kCuda,             // a CUDA runtime call failed
  kNccl,             // an NCCL call failed
  kTimeout,          // a bounded device or host wait expired (names op, phase, rank, peer)
  kState,            // the object is in a state that refuses the call (e.g. failed Buffer)
  kUnsupported,      // valid request that this build/topology cannot serve
  kAborted,          // a peer's operation failed and told this rank (names the peer, op, phase)
};

const char* error_kind_name(ErrorKind kind);

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message, const char* file, int line);
  ErrorKind kind() const { return kind_; }
  const std::string& message() const { return message_; }
  const char* file() const { return file_; }
  int line() const { return line_; }

 private:
  ErrorKind kind_;
  std::string message_;
  const char* file_;
  int line_;
};

namespace detail {
template <typename... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

}  // namespace epx

// EPX_CHECK(cond, kind, message parts...): throw epx::Error(kind, "<parts>") when cond is false.
#define EPX_CHECK(cond, kind, ...)                                                            \
  do {                                                                                        \
    if (!(cond)) throw ::epx::Error((kind), ::epx::detail::concat(__VA_ARGS__), __FILE__, __LINE__); \
  } while (0)
#define EPX_FAIL(kind, ...) throw ::epx::Error((kind), ::epx::detail::concat(__VA_ARGS__), __FILE__, __LINE__)
#define EPX_ARG_CHECK(cond, ...) EPX_CHECK(cond, ::epx::ErrorKind::kInvalidArgument, __VA_ARGS__)
