// The element-wise stages of the grouped-GEMM experts: counting sort of (token, slot) pairs by
// local expert with the row gather (and per-token scale gather), the activation between the GEMMs
// (with the e4m3 requantization of its output), and the unpermute that weights and reduces each
// token's rows. All sizes stay on the device.
#include <cub/block/block_scan.cuh>
#include <type_traits>

#include "cuda/check.h"
#include "cuda/device.cuh"
#include "cuda/kernels.h"
#include "cuda/quant.cuh"

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

// One warp per pair: claims a row of its expert, records it and copies the token's a1 row (and
// its per-token scale).
__global__ void scatter_kernel(const int32_t* __restrict__ ids, int64_t ids_stride, int64_t pairs,
                               int k, int num_local, const char* __restrict__ a1,
                               int64_t a1_stride_bytes, int64_t row_bytes, RowScale a1_scale,
                               const int32_t* __restrict__ offsets, int32_t* __restrict__ cursor,
                               int32_t* __restrict__ pair_pos, char* __restrict__ a_sorted,
                               float* __restrict__ sorted_scale) {
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
  const int64_t t = p / k;
  if (lane == 0 && sorted_scale) sorted_scale[pos] = a1_scale.scale[t * a1_scale.stride];
  const uint4* src = reinterpret_cast<const uint4*>(a1 + t * a1_stride_bytes);
  uint4* dst = reinterpret_cast<uint4*>(a_sorted + static_cast<int64_t>(pos) * row_bytes);
  for (int64_t c = lane; c < row_bytes / 16; c += kWarp) dst[c] = src[c];
}

// The local expert of sorted row r (the last whose offset <= r), or -1 past the last sorted row.
__device__ __forceinline__ int expert_of_row(int64_t r, const int32_t* __restrict__ counts,
                                             const int32_t* __restrict__ offsets, int n) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= r)
      lo = mid;
    else
      hi = mid - 1;
  }
  return r < offsets[lo] + counts[lo] ? lo : -1;
}

// One block per sorted row: v[j] = act(gate j, up j) from c1 (In: the GEMM1 output type) with
// the fp32 bias, stored as Out (Q kNone) or as e4m3 codes of `q` (Q: RowQuant).
template <typename In, typename Out, RowQuant Q>
__global__ void activation_kernel(DeviceWeights w, const In* __restrict__ c1,
                                  const int32_t* __restrict__ counts,
                                  const int32_t* __restrict__ offsets, Out* __restrict__ out,
                                  Fp8Rows q) {
  const int64_t r = blockIdx.x;
  const int e = expert_of_row(r, counts, offsets, w.num_local);
  if (e < 0) {
    // Row 0 is no expert's when the rows have gaps (the batched layout with expert 0 empty).
    if constexpr (Q == RowQuant::kTensorApply) publish_tensor_scale(r, q);
    return;
  }
  const Activation& act = w.activation;
  const int64_t I = w.intermediate, rows13 = act.w13_rows(I);
  const int64_t ex = w.index ? w.index[e] : e;
  const In* in = c1 + r * rows13;
  const float* bias = w.b13 ? w.b13 + ex * rows13 : nullptr;
  auto value = [&](int64_t j) {
    const int64_t gr = act.gate_row(j, I);
    const float g = load_float(in, gr) + (bias ? bias[gr] : 0.0f);
    float u = 0.0f;
    if (act.gated) {
      const int64_t ur = act.up_row(j, I);
      u = load_float(in, ur) + (bias ? bias[ur] : 0.0f);
    }
    return apply_activation(act, g, u);
  };
  if constexpr (Q == RowQuant::kNone) {
    for (int64_t j = threadIdx.x; j < I; j += blockDim.x) store_float(out, r * I + j, value(j));
  } else {
    quantize_row<Q>(value, I, r, q);
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
    bias_row[s] = slot[s] >= 0 && w.b2 ? (w.index ? w.index[e] : e) * H : -1;
    slot_weight[s] = weights[t * weights_stride + s];
  }
  __syncthreads();
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    float acc = 0.0f;
    for (int s = 0; s < k; ++s) {
      if (slot[s] < 0) continue;
      float v = c2[slot[s] * H + h];
      if (bias_row[s] >= 0) v += w.b2[bias_row[s] + h];
      acc = fmaf(slot_weight[s], v, acc);
    }
    y[t * H + h] = acc;
  }
}

}  // namespace

void sort_by_expert(const int32_t* ids, int64_t ids_stride, int64_t M, int k, int num_local,
                    const void* a1, int64_t a1_stride_bytes, int64_t row_bytes, RowScale a1_scale,
                    int32_t* counts, int32_t* offsets, int32_t* cursor, int32_t* pair_pos,
                    void* a_sorted, float* sorted_scale, cudaStream_t stream) {
  const int64_t pairs = M * k;
  if (pairs == 0 || num_local == 0) return;
  MOEKIT_CUDA_CHECK(cudaMemsetAsync(counts, 0, num_local * sizeof(int32_t), stream));
  count_kernel<<<blocks_for(pairs, kThreads), kThreads, 0, stream>>>(ids, ids_stride, pairs, k,
                                                                     num_local, counts);
  MOEKIT_CUDA_CHECK_LAUNCH();
  scan_kernel<<<1, kScanThreads, 0, stream>>>(counts, num_local, offsets, cursor);
  MOEKIT_CUDA_CHECK_LAUNCH();
  scatter_kernel<<<blocks_for(pairs * kWarp, kThreads), kThreads, 0, stream>>>(
      ids, ids_stride, pairs, k, num_local, static_cast<const char*>(a1), a1_stride_bytes,
      row_bytes, a1_scale, offsets, cursor, pair_pos, static_cast<char*>(a_sorted), sorted_scale);
  MOEKIT_CUDA_CHECK_LAUNCH();
}

void grouped_activation(const DeviceWeights& w, const void* c1, const int32_t* counts,
                        const int32_t* offsets, int64_t rows_bound, void* out, float* out_scale,
                        uint32_t* amax, cudaStream_t stream) {
  if (rows_bound == 0 || w.num_local == 0) return;
  const unsigned blocks = static_cast<unsigned>(rows_bound);
  with_compute_type(w.elem, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, __nv_fp8_e4m3>) {
      activation_kernel<T, T, RowQuant::kNone><<<blocks, kThreads, 0, stream>>>(
          w, static_cast<const T*>(c1), counts, offsets, static_cast<T*>(out), Fp8Rows{});
      MOEKIT_CUDA_CHECK_LAUNCH();
    } else {
      // GEMM1 wrote fp32 (the scales applied in its epilogue); a2 is requantized here.
      const Fp8Rows q{
          .q = static_cast<uint8_t*>(out), .kind = w.a2_scale, .scale = out_scale, .amax = amax};
      launch_quantized(q, stream, [&](auto mode) {
        activation_kernel<float, uint8_t, decltype(mode)::value><<<blocks, kThreads, 0, stream>>>(
            w, static_cast<const float*>(c1), counts, offsets, nullptr, q);
        MOEKIT_CUDA_CHECK_LAUNCH();
      });
    }
  });
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
