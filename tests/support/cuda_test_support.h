// Shared helpers of the GPU tests (tests/test_cuda_*.cc): the loud skip without a CUDA device, and
// a CUDA graph captured from a forward and replayed (the "no host synchronisation, replays on new
// inputs" contract). Header-only, so the support library itself needs no CUDA.
#pragma once

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <functional>

#include "moekit/core/error.h"
#include "moekit/cuda.h"

#define SKIP_WITHOUT_CUDA() \
  if (::moekit::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device: CUDA tests skipped"

namespace moekit::test {

// What `enqueue` puts on a new non-blocking stream, captured into a CUDA graph in global mode
// (where a synchronising call fails the capture) and instantiated. A failure -- an Error thrown
// while enqueueing or a failing CUDA call -- is reported as a test failure and leaves ok() false.
class CapturedGraph {
 public:
  explicit CapturedGraph(const std::function<void(cudaStream_t)>& enqueue) {
    if (!succeeded(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "stream")) return;
    if (!succeeded(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeGlobal), "begin capture"))
      return;
    try {
      enqueue(stream_);
    } catch (const Error& e) {
      ADD_FAILURE() << "enqueueing during the capture: " << e.what();
    }
    if (!succeeded(cudaStreamEndCapture(stream_, &graph_), "end capture")) return;
    ok_ = succeeded(cudaGraphInstantiate(&exec_, graph_, 0), "instantiate");
  }
  ~CapturedGraph() {
    if (exec_) cudaGraphExecDestroy(exec_);
    if (graph_) cudaGraphDestroy(graph_);
    if (stream_) cudaStreamDestroy(stream_);
  }
  CapturedGraph(const CapturedGraph&) = delete;
  CapturedGraph& operator=(const CapturedGraph&) = delete;

  bool ok() const { return ok_; }
  cudaStream_t stream() const { return stream_; }
  // Waits for the device (the caller's new inputs and poisoned outputs, written with cudaMemset
  // or copies on the legacy stream, which a non-blocking stream does not wait for), launches the
  // graph and waits for it; false (with a test failure) when a step fails.
  bool replay() {
    return ok_ && succeeded(cudaDeviceSynchronize(), "synchronize before") &&
           succeeded(cudaGraphLaunch(exec_, stream_), "launch") &&
           succeeded(cudaStreamSynchronize(stream_), "synchronize");
  }

 private:
  static bool succeeded(cudaError_t e, const char* what) {
    if (e == cudaSuccess) return true;
    ADD_FAILURE() << "CUDA graph, " << what << ": " << cudaGetErrorString(e);
    return false;
  }

  cudaStream_t stream_ = nullptr;
  cudaGraph_t graph_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
  bool ok_ = false;
};

}  // namespace moekit::test
