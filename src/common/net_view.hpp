// The plain-data views of the scale-out backends (device/net*.cuh), built on the host and passed
// in kernel params: no device code here, so host files can fill them.
#pragma once
#include <cstddef>
#include <cstdint>

#include "common/gin_support.hpp"
#if EPX_HAVE_GIN
#include <nccl_device.h>
#endif

namespace epx {

// EmuNet (device/net_emu.cuh): every rank's window as mapped here, and where the emulated signal
// words live in each window.
struct EmuNetView {
  char* const* windows = nullptr;  // [num_ranks] device array: every rank's window as mapped here
  int rank = 0;
  int num_ranks = 0;
  size_t signal_offset = 0;  // uint64_t signal[num_signals] at this offset of every window
  int num_signals = 0;
};

enum class EmuMode { kDirect, kAdversarial };

#if EPX_HAVE_GIN
// GinNet (device/net_gin.cuh): the communicator's devComm with GIN resources and its window.
struct GinNetView {
  ncclDevComm comm;        // made with ginContextCount >= 1 and ginSignalCount >= num_signals
  ncclWindow_t window;     // the symmetric window: puts read and write at offsets into it
  int rank = 0;
  int num_ranks = 0;
  int num_contexts = 1;    // contexts this op uses, <= kMaxNetContexts
  int num_signals = 0;     // signal ids [0, num_signals) of the op, NCCL-owned (not words in the window)
  int signal_base = 0;     // the op's signal id sig is the devComm's id signal_base + sig
};
#endif

}  // namespace epx
