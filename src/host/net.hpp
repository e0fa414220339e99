// Host side of the scale-out transport (device/net*.cuh).
#pragma once

namespace epx {

// Whether this build has GinNet (the NCCL headers it compiled against have GIN).
bool net_gin_compiled();
// Throws Error(kUnsupported) when this build has no GinNet (naming the NCCL it was compiled
// against), and Error(kNccl) naming both versions when the NCCL this process runs is not the one
// GinNet was compiled against (GIN's device code is inline and tied to the library's internals).
void check_gin_usable();

}  // namespace epx
