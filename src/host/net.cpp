#include "host/net.hpp"

#include "common/gin_support.hpp"
#include "epx/error.hpp"
#include "epx/version.hpp"

namespace epx {

bool net_gin_compiled() { return EPX_HAVE_GIN != 0; }

void check_gin_usable() {
  const int compiled = nccl_compiled_version();
  EPX_CHECK(net_gin_compiled(), ErrorKind::kUnsupported, "scale-out over NCCL GIN: epx was compiled against NCCL ",
            compiled / 10000, ".", compiled / 100 % 100, ".", compiled % 100,
            " whose headers have no GIN (nccl_device/gin.h, NCCL >= 2.28.9)");
  check_nccl_version();
}

}  // namespace epx
