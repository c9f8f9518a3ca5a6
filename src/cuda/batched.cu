// The element-wise stages of the batched-format experts (batched_experts.cc): the batched layout
// a1 [E_local, N, H] read as grouped-GEMM groups (counts and offsets) or as top-1 rows for the
// small-batch experts, and the end of GEMM2 (b2 on valid rows, zeros past the counts). Counts
// stay on the device; a count outside [0, N] is clamped into it, the same way by every stage.
#include "cuda/check.h"
#include "cuda/device.cuh"
#include "cuda/kernels.h"

namespace moekit::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ int64_t clamped_count(const int32_t* expert_num_tokens, int64_t e,
                                                 int64_t N) {
  return min(max(static_cast<int64_t>(expert_num_tokens[e]), int64_t{0}), N);
}

__global__ void groups_kernel(const int32_t* __restrict__ expert_num_tokens, int num_local,
                              int64_t N, int32_t* __restrict__ counts,
                              int32_t* __restrict__ offsets) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= num_local) return;
  counts[e] = static_cast<int32_t>(clamped_count(expert_num_tokens, e, N));
  offsets[e] = static_cast<int32_t>(e * N);
}

__global__ void top1_ids_kernel(const int32_t* __restrict__ expert_num_tokens, int64_t rows,
                                int64_t N, int32_t* __restrict__ ids, float* __restrict__ weights) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (r >= rows) return;
  const int64_t e = r / N;
  ids[r] = r % N < clamped_count(expert_num_tokens, e, N) ? static_cast<int32_t>(e) : -1;
  weights[r] = 1.0f;
}

// One block per row r = e * N + j of out [E_local * N, H]; H is a multiple of 4 (16-byte rows).
__global__ void bias_and_padding_kernel(DeviceWeights w, const int32_t* __restrict__ counts,
                                        int64_t N, float4* __restrict__ out) {
  const int64_t r = blockIdx.x, e = r / N, H4 = w.hidden / 4;
  const bool valid = r % N < counts[e];
  if (valid && !w.b2) return;
  float4* row = out + r * H4;
  if (!valid) {
    for (int64_t h = threadIdx.x; h < H4; h += blockDim.x) row[h] = make_float4(0, 0, 0, 0);
    return;
  }
  const float4* bias =
      reinterpret_cast<const float4*>(w.b2 + (w.index ? w.index[e] : e) * w.hidden);
  for (int64_t h = threadIdx.x; h < H4; h += blockDim.x) {
    float4 v = row[h];
    const float4 b = bias[h];
    v.x += b.x;
    v.y += b.y;
    v.z += b.z;
    v.w += b.w;
    row[h] = v;
  }
}

}  // namespace

void batched_groups(const int32_t* expert_num_tokens, int num_local, int64_t N, int32_t* counts,
                    int32_t* offsets, cudaStream_t stream) {
  if (num_local == 0) return;
  groups_kernel<<<blocks_for(num_local, kThreads), kThreads, 0, stream>>>(
      expert_num_tokens, num_local, N, counts, offsets);
  MOEKIT_CUDA_CHECK_LAUNCH();
}

void batched_top1_ids(const int32_t* expert_num_tokens, int num_local, int64_t N, int32_t* ids,
                      float* weights, cudaStream_t stream) {
  const int64_t rows = num_local * N;
  if (rows == 0) return;
  top1_ids_kernel<<<blocks_for(rows, kThreads), kThreads, 0, stream>>>(expert_num_tokens, rows, N,
                                                                       ids, weights);
  MOEKIT_CUDA_CHECK_LAUNCH();
}

void batched_bias_and_padding(const DeviceWeights& w, const int32_t* counts, int64_t N, float* out,
                              cudaStream_t stream) {
  const int64_t rows = w.num_local * N;
  if (rows == 0) return;
  bias_and_padding_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      w, counts, N, reinterpret_cast<float4*>(out));
  MOEKIT_CUDA_CHECK_LAUNCH();
}

}  // namespace moekit::cuda
