#include "host/tuning.hpp"

#include "epx/error.hpp"
#include "host/validate.hpp"

namespace epx {

void Tuning::validate(const Config& config) const {
  const int warps = config.num_threads / 32;
  validate::in_range(ring_chunk, "Tuning.ring_chunk", 0, 16);
  validate::in_range(ring_send_warps, "Tuning.ring_send_warps", 0, warps - 1);
  validate::in_range(dispatch_copy_warps, "Tuning.dispatch_copy_warps", 0, warps - 1);
  // A ring must hold a receiver batch (one token per warp) and, beyond it, a chunk of every sender
  // warp of a peer but one row, or the two sides could wait for each other (docs/protocol.md).
  EPX_ARG_CHECK(config.ring_slots >= ring_chunk * warps, "Tuning.ring_chunk: ", ring_chunk, " rows x ", warps,
                " warps exceeds Config.ring_slots = ", config.ring_slots, " (a ring holds a chunk of every warp)");
}

}  // namespace epx
