# ctest include file (tests/CMakeLists.txt): labels of the discovered GPU tests, gpu;sim for the
# simulated ones and gpu;real for the real ones (ctest -L sim, ctest -L real).
foreach(epx_test IN LISTS epx_gpu_sim_tests)
  set_tests_properties("${epx_test}" PROPERTIES LABELS "gpu;sim")
endforeach()
foreach(epx_test IN LISTS epx_gpu_real_tests)
  set_tests_properties("${epx_test}" PROPERTIES LABELS "gpu;real")
endforeach()
