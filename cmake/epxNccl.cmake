# NCCL from one installation: the headers (with the device API) and libnccl.so.2 of the same root.
# Used by the build (cmake/FindNCCL.cmake) and installed with epxConfig.cmake for consumers.
#
# epx_nccl_at(<root> <prefix>) sets, in the caller's scope:
#   <prefix>_FOUND        TRUE when <root> holds include/nccl.h, include/nccl_device.h and
#                         libnccl.so(.2) under lib, lib64 or lib/<arch>; else FALSE and
#   <prefix>_WHY          what is missing;
#   <prefix>_INCLUDE_DIR  <root>/include
#   <prefix>_LIBRARY      the shared library
#   <prefix>_VERSION      e.g. 2.28.9, and <prefix>_VERSION_CODE, e.g. 22809 (NCCL_VERSION_CODE)
function(epx_nccl_at root prefix)
  set(${prefix}_FOUND FALSE PARENT_SCOPE)
  set(header "${root}/include/nccl.h")
  if(NOT EXISTS "${header}")
    set(${prefix}_WHY "${root} has no include/nccl.h" PARENT_SCOPE)
    return()
  endif()
  if(NOT EXISTS "${root}/include/nccl_device.h")
    set(${prefix}_WHY "${root} has no device API (include/nccl_device.h): epx needs NCCL >= 2.28" PARENT_SCOPE)
    return()
  endif()
  set(library "")
  foreach(dir lib lib64 lib/${CMAKE_LIBRARY_ARCHITECTURE})
    foreach(name libnccl.so libnccl.so.2)
      if(NOT library AND EXISTS "${root}/${dir}/${name}")
        set(library "${root}/${dir}/${name}")
      endif()
    endforeach()
  endforeach()
  if(NOT library)
    set(${prefix}_WHY "${root} has nccl.h but no lib/libnccl.so.2 beside it" PARENT_SCOPE)
    return()
  endif()
  file(STRINGS "${header}" lines REGEX "^#define NCCL_(MAJOR|MINOR|PATCH) +[0-9]+")
  foreach(part MAJOR MINOR PATCH)
    string(REGEX MATCH "NCCL_${part} +([0-9]+)" _ "${lines}")
    set(${part} "${CMAKE_MATCH_1}")
  endforeach()
  if(MAJOR STREQUAL "" OR MINOR STREQUAL "" OR PATCH STREQUAL "")
    set(${prefix}_WHY "no NCCL_MAJOR/MINOR/PATCH in ${header}" PARENT_SCOPE)
    return()
  endif()
  math(EXPR code "${MAJOR} * 10000 + ${MINOR} * 100 + ${PATCH}")
  set(${prefix}_FOUND TRUE PARENT_SCOPE)
  set(${prefix}_INCLUDE_DIR "${root}/include" PARENT_SCOPE)
  set(${prefix}_LIBRARY "${library}" PARENT_SCOPE)
  set(${prefix}_VERSION "${MAJOR}.${MINOR}.${PATCH}" PARENT_SCOPE)
  set(${prefix}_VERSION_CODE "${code}" PARENT_SCOPE)
endfunction()

# epx_nccl_target(<include_dir> <library>): the imported target epx::nccl (global).
function(epx_nccl_target include_dir library)
  add_library(epx::nccl SHARED IMPORTED GLOBAL)
  set_target_properties(epx::nccl PROPERTIES IMPORTED_LOCATION "${library}"
                        INTERFACE_INCLUDE_DIRECTORIES "${include_dir}")
endfunction()
