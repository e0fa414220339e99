# ctest install_find_package: `cmake --install` of the build into a scratch prefix, then
# examples/cpp configured and built against it with find_package(epx), as a user of the installed
# package does. Compiles and links only (running the example needs GPUs).
#   cmake -DBUILD_DIR=... -DSOURCE_DIR=... -DGENERATOR=... -DCXX_COMPILER=... -DCUDA_COMPILER=...
#         -P cmake/check_install.cmake
set(scratch "${BUILD_DIR}/install-check")
file(REMOVE_RECURSE "${scratch}")

function(run_step what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${what} failed (${rc}):\n${out}")
  endif()
  message(STATUS "${what}: ok")
endfunction()

run_step("cmake --install ${BUILD_DIR} --prefix ${scratch}/prefix"
         ${CMAKE_COMMAND} --install "${BUILD_DIR}" --prefix "${scratch}/prefix")
foreach(file include/epx/buffer.hpp include/epx/version.hpp lib/cmake/epx/epxConfig.cmake
        lib/cmake/epx/epxConfigVersion.cmake)
  if(NOT EXISTS "${scratch}/prefix/${file}")
    message(FATAL_ERROR "cmake --install did not install ${file}")
  endif()
endforeach()
run_step("configure examples/cpp with find_package(epx)"
         ${CMAKE_COMMAND} -S "${SOURCE_DIR}/examples/cpp" -B "${scratch}/example" -G "${GENERATOR}"
         -DCMAKE_PREFIX_PATH=${scratch}/prefix -DCMAKE_CXX_COMPILER=${CXX_COMPILER}
         -DCMAKE_CUDA_COMPILER=${CUDA_COMPILER} -DCMAKE_BUILD_TYPE=Release)
run_step("build examples/cpp" ${CMAKE_COMMAND} --build "${scratch}/example")
