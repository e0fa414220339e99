# Finds the one NCCL the build uses (headers with the device API + libnccl.so.2, both from the same
# installation) and defines the imported target epx::nccl, NCCL_INCLUDE_DIR, NCCL_LIBRARY,
# NCCL_VERSION (e.g. 2.28.9) and NCCL_VERSION_CODE (e.g. 22809).
#
# epx compiles NCCL's device API (inline code tied to the library's internals), so it must run
# with the very NCCL it was compiled against. Where NCCL comes from, first match wins:
#   1. NCCL_ROOT (CMake or environment variable): that installation, or an error;
#   2. with the Python binding (EPX_NCCL_PYTHON, the interpreter it is built for): the NCCL that
#      interpreter's torch loads, the nvidia-nccl-cu13 package next to it;
#   3. the CUDA toolkit.
# With the binding, torch's NCCL version must equal the one chosen, or configuring fails naming both
# (torch loads its libnccl.so.2 first and epx's module then runs on it).
include(${CMAKE_CURRENT_LIST_DIR}/epxNccl.cmake)

set(_epx_nccl_roots)
set(_epx_torch_nccl "")
if(DEFINED NCCL_ROOT)
  list(APPEND _epx_nccl_roots "${NCCL_ROOT}")
elseif(DEFINED ENV{NCCL_ROOT})
  list(APPEND _epx_nccl_roots "$ENV{NCCL_ROOT}")
endif()
if(EPX_NCCL_PYTHON)
  # -I (isolated mode) first: the interpreter's own environment, where the package will run. Under
  # pip's build isolation, which works through PYTHONPATH, that environment is otherwise hidden.
  # Then the plain view (the build environment of an isolated build; PYTHONPATH setups).
  set(_epx_py_nccl_dir "")
  foreach(_epx_py_flags "-I" "")
    execute_process(COMMAND ${EPX_NCCL_PYTHON} ${_epx_py_flags} ${CMAKE_CURRENT_LIST_DIR}/torch_nccl.py
                    OUTPUT_VARIABLE _epx_probe OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET
                    RESULT_VARIABLE _epx_probe_rc)
    if(NOT _epx_probe_rc EQUAL 0)
      continue()
    endif()
    string(REGEX MATCH "^([^;]*);(.*)$" _epx_probe_ok "${_epx_probe}")
    if(NOT _epx_probe_ok)
      continue()
    endif()
    set(_epx_probe_torch "${CMAKE_MATCH_1}")
    set(_epx_probe_dir "${CMAKE_MATCH_2}")
    if(NOT _epx_py_nccl_dir)
      set(_epx_py_nccl_dir "${_epx_probe_dir}")
    endif()
    if(_epx_probe_torch)
      set(_epx_torch_nccl "${_epx_probe_torch}")
      set(_epx_py_nccl_dir "${_epx_probe_dir}")
      break()
    endif()
  endforeach()
  if(_epx_py_nccl_dir AND NOT _epx_nccl_roots)
    list(APPEND _epx_nccl_roots "${_epx_py_nccl_dir}")
  endif()
endif()
if(NOT _epx_nccl_roots)
  list(APPEND _epx_nccl_roots "${CUDAToolkit_LIBRARY_ROOT}" "${CUDAToolkit_TARGET_DIR}" /usr/local/cuda)
endif()
list(REMOVE_DUPLICATES _epx_nccl_roots)

set(_epx_nccl_tried "")
foreach(_epx_root ${_epx_nccl_roots})
  epx_nccl_at("${_epx_root}" _epx_nccl)
  if(_epx_nccl_FOUND)
    break()
  endif()
  string(APPEND _epx_nccl_tried "\n  ${_epx_nccl_WHY}")
endforeach()
if(NOT _epx_nccl_FOUND)
  message(FATAL_ERROR "epx: NCCL not found:${_epx_nccl_tried}\nSet NCCL_ROOT to an NCCL >= 2.28 installation "
                      "(include/nccl.h and lib/libnccl.so.2), install nvidia-nccl-cu13, or use a CUDA toolkit with NCCL")
endif()
set(NCCL_INCLUDE_DIR "${_epx_nccl_INCLUDE_DIR}")
set(NCCL_LIBRARY "${_epx_nccl_LIBRARY}")
set(NCCL_VERSION "${_epx_nccl_VERSION}")
set(NCCL_VERSION_CODE "${_epx_nccl_VERSION_CODE}")
message(STATUS "epx: NCCL ${NCCL_VERSION}: headers ${NCCL_INCLUDE_DIR}, library ${NCCL_LIBRARY}")

if(_epx_torch_nccl AND NOT _epx_torch_nccl STREQUAL NCCL_VERSION)
  message(FATAL_ERROR
    "epx: the torch of ${EPX_NCCL_PYTHON} runs NCCL ${_epx_torch_nccl}, but epx would be compiled against "
    "NCCL ${NCCL_VERSION} (${NCCL_INCLUDE_DIR}). epx's module runs on the NCCL torch loads, and epx only "
    "runs with the NCCL it was compiled against. Set NCCL_ROOT to an NCCL ${_epx_torch_nccl} installation "
    "(headers and library), or install nvidia-nccl-cu13==${_epx_torch_nccl} for that Python.")
endif()
if(EPX_NCCL_PYTHON AND NOT _epx_torch_nccl)
  message(STATUS "epx: no torch found for ${EPX_NCCL_PYTHON}: the binding needs a torch that runs NCCL "
                 "${NCCL_VERSION} (checked when a Communicator is made)")
endif()

if(NOT TARGET epx::nccl)
  epx_nccl_target("${NCCL_INCLUDE_DIR}" "${NCCL_LIBRARY}")
endif()
