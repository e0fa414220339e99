# Finds what the Python package needs: the Python 3 interpreter with its development headers
# (Development.Module), pybind11 (its CMake package, or the pip package's `--cmakedir`) for the
# binding epx._C, and torch (importable by that interpreter) for epx._aten, which is compiled
# against torch's headers and libraries (EPX_TORCH_DIR, EPX_TORCH_VERSION, EPX_TORCH_CXX11_ABI).
# Sets EPX_PYTHON_DEPS_FOUND (the default of EPX_BUILD_PYTHON) and, when something is missing,
# EPX_PYTHON_DEPS_MISSING (what, for the message).
set(EPX_PYTHON_DEPS_FOUND OFF)
set(EPX_PYTHON_DEPS_MISSING "")
find_package(Python3 COMPONENTS Interpreter Development.Module QUIET)
if(NOT Python3_Interpreter_FOUND)
  set(EPX_PYTHON_DEPS_MISSING "a Python 3 interpreter")
elseif(NOT Python3_Development.Module_FOUND)
  set(EPX_PYTHON_DEPS_MISSING "the Python ${Python3_VERSION} development headers (Python.h) for ${Python3_EXECUTABLE}")
else()
  if(NOT pybind11_FOUND)
    find_package(pybind11 CONFIG QUIET)
  endif()
  if(NOT pybind11_FOUND)
    execute_process(COMMAND ${Python3_EXECUTABLE} -m pybind11 --cmakedir OUTPUT_VARIABLE _epx_pybind11_dir
                    OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE _epx_pybind11_rc)
    if(_epx_pybind11_rc EQUAL 0 AND EXISTS "${_epx_pybind11_dir}")
      find_package(pybind11 CONFIG QUIET HINTS "${_epx_pybind11_dir}" NO_DEFAULT_PATH)
    endif()
  endif()
  execute_process(COMMAND ${Python3_EXECUTABLE} -c
                  "import os, torch; print(os.path.dirname(torch.__file__)); print(torch.__version__); print(int(torch._C._GLIBCXX_USE_CXX11_ABI))"
                  OUTPUT_VARIABLE _epx_torch OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE _epx_torch_rc)
  if(_epx_torch_rc EQUAL 0)
    string(REPLACE "\n" ";" _epx_torch "${_epx_torch}")
    list(GET _epx_torch 0 EPX_TORCH_DIR)
    list(GET _epx_torch 1 EPX_TORCH_VERSION)
    list(GET _epx_torch 2 EPX_TORCH_CXX11_ABI)
  endif()
  if(NOT pybind11_FOUND)
    set(EPX_PYTHON_DEPS_MISSING "pybind11 (pip install pybind11) for ${Python3_EXECUTABLE}")
  elseif(NOT _epx_torch_rc EQUAL 0 OR NOT EXISTS "${EPX_TORCH_DIR}/include/ATen/core/Tensor.h")
    set(EPX_PYTHON_DEPS_MISSING "torch with its C++ headers (pip install torch) for ${Python3_EXECUTABLE}")
  else()
    set(EPX_PYTHON_DEPS_FOUND ON)
  endif()
endif()
