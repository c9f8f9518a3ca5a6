#include "l2_flush.h"

namespace moekit::cli {
namespace {

// Grid-stride over n 16-byte words. The load is written in PTX so that it stays ld.global:
// from a const pointer the compiler may choose ld.global.nc, and lines that TMA bulk copies
// brought into L2 were seen to survive a flush through that path.
__global__ void __launch_bounds__(kL2ReadThreads)
    read_all(const uint4* p, int64_t n, uint32_t* sink) {
  uint32_t acc = 0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    uint32_t x, y, z, w;
    asm("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(x), "=r"(y), "=r"(z), "=r"(w)
        : "l"(p + i));
    acc ^= x ^ y ^ z ^ w;
  }
  if (acc != 0) *sink = acc;
}

}  // namespace

cudaError_t launch_l2_read(const void* data, int64_t bytes, uint32_t* sink, int blocks,
                           cudaStream_t stream) {
  read_all<<<blocks, kL2ReadThreads, 0, stream>>>(static_cast<const uint4*>(data), bytes / 16,
                                                  sink);
  return cudaGetLastError();
}

}  // namespace moekit::cli
