// Where a call runs: the stream of a device call (forward, route) and nothing else.
#pragma once

namespace moekit {

struct ExecContext {
  void* stream = nullptr;  // cudaStream_t on CUDA (null: the legacy default stream); unused on CPU
};

}  // namespace moekit
