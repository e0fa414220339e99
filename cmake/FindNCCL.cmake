# Finds NCCL (headers with the device API + libnccl.so.2) and defines the imported target `nccl`.
# Search order: NCCL_ROOT (cache or env), the Python package nvidia-nccl-cu13, the CUDA toolkit.
set(_epx_nccl_hints)
if(DEFINED NCCL_ROOT)
  list(APPEND _epx_nccl_hints ${NCCL_ROOT})
endif()
if(DEFINED ENV{NCCL_ROOT})
  list(APPEND _epx_nccl_hints $ENV{NCCL_ROOT})
endif()
find_package(Python3 COMPONENTS Interpreter QUIET)
if(Python3_Interpreter_FOUND)
  execute_process(
    COMMAND ${Python3_EXECUTABLE} -c "import nvidia.nccl as m; print(list(m.__path__)[0])"
    OUTPUT_VARIABLE _epx_py_nccl OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE _rc)
  if(_rc EQUAL 0 AND EXISTS "${_epx_py_nccl}/include/nccl.h")
    list(APPEND _epx_nccl_hints ${_epx_py_nccl})
  endif()
endif()
list(APPEND _epx_nccl_hints ${CUDAToolkit_LIBRARY_ROOT} /usr/local/cuda)

find_path(NCCL_INCLUDE_DIR nccl.h HINTS ${_epx_nccl_hints} PATH_SUFFIXES include NO_DEFAULT_PATH)
find_library(NCCL_LIBRARY NAMES nccl libnccl.so.2 HINTS ${_epx_nccl_hints}
             PATH_SUFFIXES lib lib64 NO_DEFAULT_PATH)
if(NOT NCCL_INCLUDE_DIR OR NOT NCCL_LIBRARY)
  message(FATAL_ERROR "NCCL not found: set NCCL_ROOT, install nvidia-nccl-cu13, or install NCCL in the CUDA toolkit")
endif()
if(NOT EXISTS "${NCCL_INCLUDE_DIR}/nccl_device.h")
  message(FATAL_ERROR "NCCL at ${NCCL_INCLUDE_DIR} has no device API (nccl_device.h); epx needs NCCL >= 2.28")
endif()
message(STATUS "epx: NCCL headers ${NCCL_INCLUDE_DIR}, library ${NCCL_LIBRARY}")
add_library(nccl SHARED IMPORTED)
set_target_properties(nccl PROPERTIES IMPORTED_LOCATION ${NCCL_LIBRARY}
                      INTERFACE_INCLUDE_DIRECTORIES ${NCCL_INCLUDE_DIR})
