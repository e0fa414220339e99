// Versions: of epx, and of the NCCL it was compiled against and runs with.
#pragma once

namespace epx {

// epx's version, "major.minor.patch".
const char* version();

// NCCL_VERSION_CODE of the NCCL headers epx was compiled with (e.g. 22809 for 2.28.9).
int nccl_compiled_version();
// ncclGetVersion() of the NCCL library this process runs (no GPU needed).
int nccl_loaded_version();

// Throws Error(kNccl) naming both versions when they differ. epx compiles NCCL's device API,
// inline code tied to the library's internals, so it runs only with the NCCL it was compiled
// against. Every NCCL Communicator checks this when it is made.
void check_nccl_version();

}  // namespace epx
