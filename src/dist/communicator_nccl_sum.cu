// Rank-ordered sum of reduce_scatter blocks on the GPU: out[i] = blocks[0][i] + ... in order
// 0..ranks-1, so the result does not depend on timing.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>

namespace moekit::detail {

__global__ void sum_blocks_kernel(const float* __restrict__ blocks, int ranks, size_t n,
                                  float* __restrict__ out) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    float s = blocks[i];
    for (int r = 1; r < ranks; ++r) s += blocks[r * n + i];
    out[i] = s;
  }
}

cudaError_t launch_sum_blocks(const float* blocks, int ranks, size_t n, float* out,
                              cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(std::min<size_t>((n + 255) / 256, 4096));
  sum_blocks_kernel<<<grid, 256, 0, stream>>>(blocks, ranks, n, out);
  return cudaGetLastError();
}

}  // namespace moekit::detail
