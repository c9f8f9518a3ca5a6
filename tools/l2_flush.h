// The device side of `moekit bench --device cuda`'s L2 flush (L2Flusher, bench_cuda.cc): a kernel
// that reads a buffer through L2 with plain loads. Built only with MOEKIT_CUDA.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace moekit::cli {

// Enqueues on `stream`, as `blocks` blocks of 256 threads, a read of all `bytes` at `data`
// (16-byte aligned, bytes a multiple of 16) with plain 16-byte global loads (ld.global: cached in
// L2, never the read-only .nc path). The buffer must hold one byte value repeated (a cudaMemset):
// the xor of each 16 bytes' four words is then 0, and `sink` (a device word) is written only if
// it is not, which never happens but keeps the compiler from dropping the loads. Returns the
// launch's status (cudaGetLastError).
cudaError_t launch_l2_read(const void* data, int64_t bytes, uint32_t* sink, int blocks,
                           cudaStream_t stream);

// Threads per block of launch_l2_read.
inline constexpr int kL2ReadThreads = 256;

}  // namespace moekit::cli
