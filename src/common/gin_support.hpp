// EPX_HAVE_GIN: 1 when the NCCL headers epx compiles against have GIN (NCCL's GPU-initiated
// networking, nccl_device/gin.h, NCCL >= 2.28.9), else 0. GinNet (device/net_gin.cuh) is built
// only then; host code asks through net_gin_compiled() (host/net.hpp).
#pragma once
#include <nccl.h>

#if defined(__has_include)
#if __has_include(<nccl_device/gin.h>) && defined(NCCL_VERSION_CODE) && NCCL_VERSION_CODE >= 22809
#define EPX_HAVE_GIN 1
#endif
#endif
#ifndef EPX_HAVE_GIN
#define EPX_HAVE_GIN 0
#endif
