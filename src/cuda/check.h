// Error checking for CUDA runtime calls in host code: MOEKIT_CUDA_CHECK(call) throws
// moekit::Error with file:line, the call and the runtime's message.
#pragma once

#include <cuda_runtime_api.h>

#include "moekit/core/error.h"

#define MOEKIT_CUDA_CHECK(call)                                    \
  do {                                                             \
    const cudaError_t moekit_status_ = (call);                     \
    MOEKIT_CHECK(moekit_status_ == cudaSuccess, "CUDA: ", #call,   \
                 " failed: ", cudaGetErrorString(moekit_status_)); \
  } while (0)

// After a kernel launch: reports launch-configuration errors without synchronizing.
#define MOEKIT_CUDA_CHECK_LAUNCH() MOEKIT_CUDA_CHECK(cudaGetLastError())

namespace moekit::cuda {

inline cudaStream_t stream_of(void* s) {
  return static_cast<cudaStream_t>(s);
}

}  // namespace moekit::cuda
