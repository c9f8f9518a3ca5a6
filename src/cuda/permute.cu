// The element-wise stages of the grouped-GEMM experts: counting sort of (token, slot) pairs by
// local expert with the row gather, the activation between the GEMMs, and the unpermute that
// weights and reduces each token's rows. All sizes stay on the device.
#include <cub/block/block_scan.cuh>

#include "cuda/check.h"
#include "cuda/device.cuh"
#include "cuda/kernels.h"

namespace moekit::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kScanThreads = 1024;

__device__ __forceinline__ int32_t pair_id(const int32_t* ids, int64_t ids_stride, int k,
                                           int64_t p) {
  return ids[(p / k) * ids_stride + p % k];
}

__global__ void count_kernel(const int32_t* __restrict__ ids, int64_t ids_stride, int64_t pairs,
                             int k, int num_local, int32_t* __restrict__ counts) {
  const int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (p >= pairs) return;
  const int32_t e = pair_id(ids, ids_stride, k, p);
  if (e >= 0 && e < num_local) atomicAdd(&counts[e], 1);
}

// offsets = exclusive prefix sum of counts; cursor = 0. One block, any number of experts.
__global__ void scan_kernel(const int32_t* __restrict__ counts, int num_local,
                            int32_t* __restrict__ offsets, int32_t* __restrict__ cursor) {
  using Scan = cub::BlockScan<int32_t, kScanThreads>;
  __shared__ typename Scan::TempStorage tmp;
  int32_t running = 0;
  for (int base = 0; base < num_local; base += kScanThreads) {
    const int e = base + threadIdx.x;
    const int32_t c = e < num_local ? counts[e] : 0;
    int32_t offset = 0, total = 0;
    Scan(tmp).ExclusiveSum(c, offset, total);
    if (e < num_local) {
      offsets[e] = running + offset;
      cursor[e] = 0;
    }
    running += total;
    __syncthreads();
  }
}

// One warp per pair: claims a row of its expert, records it and copies the token's a1 row.
__global__ void scatter_kernel(const int32_t* __restrict__ ids, int64_t ids_stride, int64_t pairs,
                               int k, int num_local, const uint16_t* __restrict__ a1,
                               int64_t a1_stride, int64_t H, const int32_t* __restrict__ offsets,
                               int32_t* __restrict__ cursor, int32_t* __restrict__ pair_pos,
                               uint16_t* __restrict__ a_sorted) {
  const int64_t p = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (p >= pairs) return;
  const int32_t e = pair_id(ids, ids_stride, k, p);
  const bool valid = e >= 0 && e < num_local;
  int32_t pos = -1;
  if (lane == 0 && valid) pos = offsets[e] + atomicAdd(&cursor[e], 1);
  pos = __shfl_sync(0xffffffffu, pos, 0);
  if (lane == 0) pair_pos[p] = pos;
  if (!valid) return;
  const uint4* src = reinterpret_cast<const uint4*>(a1 + (p / k) * a1_stride);
  uint4* dst = reinterpret_cast<uint4*>(a_sorted + static_cast<int64_t>(pos) * H);
  for (int64_t c = lane; c < H / 8; c += kWarp) dst[c] = src[c];
}

// One block per sorted row; the row's expert by binary search over the offsets.
__global__ void activation_kernel(DeviceWeights w, const uint16_t* __restrict__ c1,
                                  const int32_t* __restrict__ counts,
                                  const int32_t* __restrict__ offsets, uint16_t* __restrict__ out) {
  const int64_t r = blockIdx.x;
  const int n = w.num_local;
  int lo = 0, hi = n - 1;  // last expert whose offset <= r
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= r)
      lo = mid;
    else
      hi = mid - 1;
  }
  if (r >= offsets[lo] + counts[lo]) return;  // past the last sorted row
  const Activation& act = w.activation;
  const int64_t I = w.intermediate, rows = act.w13_rows(I);
  const int64_t ex = w.index ? w.index[lo] : lo;
  const uint16_t* in = c1 + r * rows;
  const uint16_t* bias = w.b13 ? w.b13 + ex * w.b13_expert_stride : nullptr;
  for (int64_t j = threadIdx.x; j < I; j += blockDim.x) {
    const int64_t gr = act.gate_row(j, I);
    float g = bf16_bits_to_float(in[gr]) + (bias ? bf16_bits_to_float(bias[gr]) : 0.0f);
    float u = 0.0f;
    if (act.gated) {
      const int64_t ur = act.up_row(j, I);
      u = bf16_bits_to_float(in[ur]) + (bias ? bf16_bits_to_float(bias[ur]) : 0.0f);
    }
    out[r * I + j] = float_to_bf16_bits(apply_activation(act, g, u));
  }
}

// One block per token; slots in order 0..k-1, so the sum is deterministic. The token's rows,
// weights and bias rows are staged in shared memory so that the k loads per column are
// independent.
__global__ void unpermute_kernel(DeviceWeights w, const float* __restrict__ c2,
                                 const int32_t* __restrict__ pair_pos,
                                 const int32_t* __restrict__ ids, int64_t ids_stride,
                                 const float* __restrict__ weights, int64_t weights_stride, int k,
                                 float* __restrict__ y) {
  extern __shared__ int64_t slot[];  // [k] row of c2 (-1: skipped), then [k] bias row, [k] weight
  int64_t* bias_row = slot + k;
  float* slot_weight = reinterpret_cast<float*>(slot + 2 * k);
  const int64_t t = blockIdx.x, H = w.hidden;
  for (int s = threadIdx.x; s < k; s += blockDim.x) {
    slot[s] = pair_pos[t * k + s];
    const int32_t e = ids[t * ids_stride + s];
    bias_row[s] = slot[s] >= 0 && w.b2 ? (w.index ? w.index[e] : e) * w.b2_expert_stride : -1;
    slot_weight[s] = weights[t * weights_stride + s];
  }
  __syncthreads();
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    float acc = 0.0f;
    for (int s = 0; s < k; ++s) {
      if (slot[s] < 0) continue;
      float v = c2[slot[s] * H + h];
      if (bias_row[s] >= 0) v += bf16_bits_to_float(w.b2[bias_row[s] + h]);
      acc = fmaf(slot_weight[s], v, acc);
    }
    y[t * H + h] = acc;
  }
}

}  // namespace

void sort_by_expert(const int32_t* ids, int64_t ids_stride, int64_t M, int k, int num_local,
                    const uint16_t* a1, int64_t a1_stride, int64_t H, int32_t* counts,
                    int32_t* offsets, int32_t* cursor, int32_t* pair_pos, uint16_t* a_sorted,
                    cudaStream_t stream) {
  const int64_t pairs = M * k;
  if (pairs == 0 || num_local == 0) return;
  MOEKIT_CUDA_CHECK(cudaMemsetAsync(counts, 0, num_local * sizeof(int32_t), stream));
  count_kernel<<<blocks_for(pairs, kThreads), kThreads, 0, stream>>>(ids, ids_stride, pairs, k,
                                                                     num_local, counts);
  MOEKIT_CUDA_CHECK_LAUNCH();
  scan_kernel<<<1, kScanThreads, 0, stream>>>(counts, num_local, offsets, cursor);
  MOEKIT_CUDA_CHECK_LAUNCH();
  scatter_kernel<<<blocks_for(pairs * kWarp, kThreads), kThreads, 0, stream>>>(
      ids, ids_stride, pairs, k, num_local, a1, a1_stride, H, offsets, cursor, pair_pos, a_sorted);
  MOEKIT_CUDA_CHECK_LAUNCH();
}

void grouped_activation(const DeviceWeights& w, const uint16_t* c1, const int32_t* counts,
                        const int32_t* offsets, int64_t rows_bound, uint16_t* out,
                        cudaStream_t stream) {
  if (rows_bound == 0 || w.num_local == 0) return;
  activation_kernel<<<static_cast<unsigned>(rows_bound), kThreads, 0, stream>>>(w, c1, counts,
                                                                                offsets, out);
  MOEKIT_CUDA_CHECK_LAUNCH();
}

void unpermute_weight_reduce(const DeviceWeights& w, const float* c2, const int32_t* pair_pos,
                             const int32_t* ids, int64_t ids_stride, const float* weights,
                             int64_t weights_stride, int64_t M, int k, float* y,
                             cudaStream_t stream) {
  if (M == 0) return;
  const size_t smem = k * (2 * sizeof(int64_t) + sizeof(float));
  unpermute_kernel<<<static_cast<unsigned>(M), kThreads, smem, stream>>>(
      w, c2, pair_pos, ids, ids_stride, weights, weights_stride, k, y);
  MOEKIT_CUDA_CHECK_LAUNCH();
}

}  // namespace moekit::cuda
