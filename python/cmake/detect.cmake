# Finds what the Python binding needs: the Python 3 interpreter with its development headers
# (Development.Module) and pybind11 (its CMake package, or the pip package's `--cmakedir`).
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
  if(pybind11_FOUND)
    set(EPX_PYTHON_DEPS_FOUND ON)
  else()
    set(EPX_PYTHON_DEPS_MISSING "pybind11 (pip install pybind11) for ${Python3_EXECUTABLE}")
  endif()
endif()
