# Targets of native/: the CUDA library and the CPU test library.
#
# CUDA: architectures default to 87 (Jetson Orin); pass -DCMAKE_CUDA_ARCHITECTURES=72 (Xavier, JetPack 5's
# CUDA 11.4), 89 or 90. Warnings are errors, in host and device code, and ptxas warns on register
# spills and local memory, which -Werror turns into a failed build: a kernel that spills does not ship.
# The runtime is linked statically: the .so needs only the driver (libcuda) at run time.
if(NOT CMAKE_BUILD_TYPE)
  set(CMAKE_BUILD_TYPE Release)
endif()
set(EAWQ_NATIVE_DIR "${CMAKE_CURRENT_SOURCE_DIR}/native")

if(EAWQ_CUDA)
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES 87)
  endif()
  enable_language(CXX)
  enable_language(CUDA)
  add_library(edge_awq_cuda SHARED
    "${EAWQ_NATIVE_DIR}/src/runtime.cu"
    "${EAWQ_NATIVE_DIR}/src/kernels.cu")
  target_include_directories(edge_awq_cuda PRIVATE "${EAWQ_NATIVE_DIR}/include" "${EAWQ_NATIVE_DIR}/src")
  set_target_properties(edge_awq_cuda PROPERTIES
    CUDA_STANDARD 17
    CUDA_RUNTIME_LIBRARY Static
    CUDA_SEPARABLE_COMPILATION OFF
    POSITION_INDEPENDENT_CODE ON)
  target_compile_options(edge_awq_cuda PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:-Werror=all-warnings -Xcompiler=-Wall,-Wextra,-Werror
      -Xptxas=-v,-warn-spills,-warn-lmem-usage,-Werror --resource-usage>)
  install(TARGETS edge_awq_cuda LIBRARY DESTINATION lib)
  install(FILES "${EAWQ_NATIVE_DIR}/include/edge_awq_cuda.h" DESTINATION include)
endif()

if(EAWQ_CPU_ARITH)
  add_library(edge_awq_arith_cpu SHARED "${EAWQ_NATIVE_DIR}/src/arith_cpu.c")
  target_include_directories(edge_awq_arith_cpu PRIVATE "${EAWQ_NATIVE_DIR}/include")
  set_target_properties(edge_awq_arith_cpu PROPERTIES C_STANDARD 11 POSITION_INDEPENDENT_CODE ON)
  # no -ffast-math and no contraction beyond the explicit fmaf: the order of the sums is the point
  target_compile_options(edge_awq_arith_cpu PRIVATE -O2 -Wall -Wextra -Werror -ffp-contract=off)
  target_link_libraries(edge_awq_arith_cpu PRIVATE m)
endif()
