# CUDA backend (src/cuda/, include/moekit/cuda.h): on by default when a CUDA compiler is found.
# Targets Hopper (sm_90a: wgmma, TMA) with CUTLASS 4.2 headers and the toolkit's CCCL.
#
#   -DMOEKIT_CUDA=OFF             CPU only
#   -DMOEKIT_CUTLASS_DIR=<dir>    CUTLASS include dir (default: .deps/cutlass/include, filled by
#                                 scripts/gather_deps.sh, else the pip package nvidia-cutlass)
include(CheckLanguage)
check_language(CUDA)
set(_moekit_cuda_default OFF)
if(CMAKE_CUDA_COMPILER)
  set(_moekit_cuda_default ON)
endif()
option(MOEKIT_CUDA "Build the CUDA backend" ${_moekit_cuda_default})
if(NOT MOEKIT_CUDA)
  return()
endif()

if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
  # sm_90a is written as -gencode below; CMake must not add its own arch flags.
  set(CMAKE_CUDA_ARCHITECTURES OFF)
endif()
enable_language(CUDA)
find_package(CUDAToolkit 12.4 REQUIRED)
# CMake before 3.27 knows no C++20 flag for nvcc (and takes CUDA's dialect from CXX_STANDARD).
if(NOT CMAKE_CUDA20_STANDARD_COMPILE_OPTION)
  set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
  set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
endif()
set(CMAKE_CUDA_STANDARD 20)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
set(MOEKIT_CUDA_FLAGS -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -lineinfo
    -Xcompiler=-Wall,-Wextra)

if(NOT MOEKIT_CUTLASS_DIR)
  if(EXISTS ${PROJECT_SOURCE_DIR}/.deps/cutlass/include/cutlass/cutlass.h)
    set(_cutlass ${PROJECT_SOURCE_DIR}/.deps/cutlass/include)
  else()
    find_package(Python3 COMPONENTS Interpreter)
    if(Python3_FOUND)
      execute_process(
        COMMAND ${Python3_EXECUTABLE} -c
          "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))"
        OUTPUT_VARIABLE _cutlass OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
    endif()
  endif()
  set(MOEKIT_CUTLASS_DIR "${_cutlass}" CACHE PATH "CUTLASS include directory")
endif()
if(NOT EXISTS ${MOEKIT_CUTLASS_DIR}/cutlass/cutlass.h)
  message(FATAL_ERROR "moekit: CUTLASS headers not found (MOEKIT_CUTLASS_DIR='${MOEKIT_CUTLASS_DIR}'). "
                      "Run scripts/gather_deps.sh, pip install nvidia-cutlass==4.2.0.0, "
                      "or configure with -DMOEKIT_CUDA=OFF.")
endif()
message(STATUS "moekit: CUDA backend on (CUTLASS ${MOEKIT_CUTLASS_DIR})")

# One kernel configuration per .cu file, so CI compiles them in parallel and a change rebuilds one.
# The CUDA sources form an object library folded into moekit: it keeps moekit's host-only flags
# (-Wall to g++) away from nvcc, and CUTLASS's include directory private to the backend.
file(GLOB MOEKIT_CUDA_SOURCES CONFIGURE_DEPENDS src/cuda/*.cc src/cuda/*.cu)
add_library(moekit_cuda OBJECT ${MOEKIT_CUDA_SOURCES})
target_include_directories(moekit_cuda PRIVATE ${PROJECT_SOURCE_DIR}/include ${PROJECT_SOURCE_DIR}/src)
target_include_directories(moekit_cuda SYSTEM PRIVATE ${MOEKIT_CUTLASS_DIR})
target_link_libraries(moekit_cuda PRIVATE CUDA::cudart)
target_compile_options(moekit_cuda PRIVATE
  "$<$<COMPILE_LANGUAGE:CXX>:-Wall;-Wextra>"
  "$<$<COMPILE_LANGUAGE:CUDA>:${MOEKIT_CUDA_FLAGS}>")

# NCCL communicator (src/dist/*_nccl.*) when the toolkit ships NCCL.
find_path(MOEKIT_NCCL_INCLUDE_DIR nccl.h HINTS ${CUDAToolkit_INCLUDE_DIRS})
find_library(MOEKIT_NCCL_LIBRARY nccl HINTS ${CUDAToolkit_LIBRARY_DIR})
if(MOEKIT_NCCL_INCLUDE_DIR AND MOEKIT_NCCL_LIBRARY)
  file(GLOB MOEKIT_NCCL_SOURCES CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/src/dist/*_nccl.cc
       ${PROJECT_SOURCE_DIR}/src/dist/*_nccl_*.cu)
  target_sources(moekit_cuda PRIVATE ${MOEKIT_NCCL_SOURCES})
  target_include_directories(moekit_cuda SYSTEM PRIVATE ${MOEKIT_NCCL_INCLUDE_DIR})
  target_compile_definitions(moekit PRIVATE MOEKIT_HAVE_NCCL=1)
  target_link_libraries(moekit PUBLIC $<BUILD_INTERFACE:${MOEKIT_NCCL_LIBRARY}>
                                      $<INSTALL_INTERFACE:${MOEKIT_NCCL_LIBRARY}>)
  set(MOEKIT_HAVE_NCCL ON)
  message(STATUS "moekit: NCCL communicator on (${MOEKIT_NCCL_LIBRARY})")
endif()
target_sources(moekit PRIVATE $<TARGET_OBJECTS:moekit_cuda>)
target_compile_definitions(moekit PUBLIC MOEKIT_HAS_CUDA=1)
target_compile_definitions(moekit_cuda PRIVATE MOEKIT_HAS_CUDA=1)
# The installed package names the runtime library by path, so that find_package(moekit) needs no
# find_package(CUDAToolkit) of its own.
target_link_libraries(moekit PUBLIC $<BUILD_INTERFACE:CUDA::cudart>
                                    $<INSTALL_INTERFACE:${CUDA_cudart_LIBRARY}>)

