#include "epx/version.hpp"

#include <nccl.h>

#include <string>

#include "epx/error.hpp"
#include "host/checks.hpp"

namespace epx {
namespace {

std::string nccl_version_string(int code) {
  return detail::concat(code / 10000, ".", code / 100 % 100, ".", code % 100);
}

}  // namespace

const char* version() { return EPX_VERSION; }

int nccl_compiled_version() { return NCCL_VERSION_CODE; }

int nccl_loaded_version() {
  int code = 0;
  EPX_NCCL_CHECK(ncclGetVersion(&code));
  return code;
}

void check_nccl_version() {
  const int loaded = nccl_loaded_version();
  EPX_CHECK(loaded == NCCL_VERSION_CODE, ErrorKind::kNccl, "epx was compiled against NCCL ",
            nccl_version_string(NCCL_VERSION_CODE), " but this process runs NCCL ", nccl_version_string(loaded),
            "; epx compiles NCCL's device API and works only with the NCCL it was compiled against: "
            "rebuild it against NCCL ", nccl_version_string(loaded),
            " (NCCL_ROOT; for Python, build with the interpreter whose torch runs)");
}

}  // namespace epx
