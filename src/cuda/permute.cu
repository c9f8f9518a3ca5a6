// The element-wise stages of the grouped-GEMM experts: counting sort of (token, slot) pairs by
// local expert with the row gather (and per-token scale gather), the activation between the GEMMs
// (with the e4m3 requantization of its output), and the unpermute that weights and reduces each
// token's rows (also the gather of the batched prepare/finalize's finalize). All sizes stay on
// the device.
#include <algorithm>
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

// The bias the unpermute adds to a gathered row: b2 of the slot's local expert (b2 null: none).
struct SlotBias {
  const float* b2 = nullptr;  // [n, H] fp32, local expert e at row index[e] (index null: e)
  const int32_t* index = nullptr;
  const int32_t* ids = nullptr;  // [M, k] local ids, row stride ids_stride
  int64_t ids_stride = 0;
};

__device__ __forceinline__ int32_t pair_id(const int32_t* ids, int64_t ids_stride, int k,
                                           int64_t p) {
  return ids[(p / k) * ids_stride + p % k];
}

// counts[e] += the pairs of local expert e: a shared-memory histogram per block (counts of
// num_local ints), added to the global counts once per block and expert (one global atomic per
// pair, contended on the few counters: 8.1 us for 32 K pairs on an H200, now 2.9).
__global__ void count_kernel(const int32_t* __restrict__ ids, int64_t ids_stride, int64_t pairs,
                             int k, int num_local, int32_t* __restrict__ counts) {
  extern __shared__ int32_t block_counts[];
  for (int e = threadIdx.x; e < num_local; e += blockDim.x) block_counts[e] = 0;
  __syncthreads();
  const int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int32_t e = p < pairs ? pair_id(ids, ids_stride, k, p) : -1;
  if (e >= 0 && e < num_local) atomicAdd(&block_counts[e], 1);
  __syncthreads();
  for (int x = threadIdx.x; x < num_local; x += blockDim.x)
    if (block_counts[x] > 0) atomicAdd(&counts[x], block_counts[x]);
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

// Intermediate columns per thread step (I is a multiple of 8): 16-byte loads of a 16-bit c1,
// 16-byte stores of a 16-bit a2, 8-byte stores of e4m3 codes. Scalar accesses made this kernel
// instruction-bound at 27-34 % of DRAM bandwidth (ncu, H200, mixtral-8x7b and deepseek-v3).
constexpr int kActVec = 8;

// The gate and up inputs of intermediate columns j0 .. j0 + 7 from a row laid out like W13's
// rows (c1, or the bias b13). Non-gated: gate only, up 0.
template <typename T>
__device__ __forceinline__ void load_gate_up(const Activation& act, const T* row, int64_t I,
                                             int64_t j0, float (&g)[kActVec], float (&u)[kActVec]) {
  if (act.gated && act.layout == GateUpLayout::kInterleaved) {
    float a[kActVec], b[kActVec];  // pairs (gate, up) of columns j0 .. j0 + 3, then + 4 .. + 7
    load8(row + 2 * j0, a);
    load8(row + 2 * j0 + kActVec, b);
#pragma unroll
    for (int i = 0; i < kActVec / 2; ++i) {
      g[i] = a[2 * i], u[i] = a[2 * i + 1];
      g[i + kActVec / 2] = b[2 * i], u[i + kActVec / 2] = b[2 * i + 1];
    }
    return;
  }
  load8(row + act.gate_row(j0, I), g);
  if (act.gated) {
    load8(row + act.up_row(j0, I), u);
  } else {
#pragma unroll
    for (int i = 0; i < kActVec; ++i) u[i] = 0.0f;
  }
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
  // The function is dispatched once per row, not per element.
  with_activation_fn(act.fn, [&](auto fn) {
    auto value = [&](int64_t v, float(&vals)[kActVec]) {
      float g[kActVec], u[kActVec];
      load_gate_up(act, in, I, v * kActVec, g, u);
      if (bias) {
        float bg[kActVec], bu[kActVec];
        load_gate_up(act, bias, I, v * kActVec, bg, bu);
#pragma unroll
        for (int i = 0; i < kActVec; ++i) g[i] += bg[i], u[i] += bu[i];
      }
#pragma unroll
      for (int i = 0; i < kActVec; ++i)
        vals[i] = activation_of<decltype(fn)::value>(act, g[i], u[i]);
    };
    if constexpr (Q == RowQuant::kNone) {
      float vals[kActVec];
      for (int64_t v = threadIdx.x; v < I / kActVec; v += blockDim.x) {
        value(v, vals);
        store8(out + r * I + v * kActVec, vals);
      }
    } else {
      quantize_row<Q, kActVec>(value, I, r, q);
    }
  });
}

// Block (t, y): token t, columns [4 * (y * blockDim.x + threadIdx.x), + 4) (H a multiple of 4).
// The token's row offsets, bias rows and weights (null: 1) are staged in shared memory; then each
// batch of kSlotBatch slots' values is loaded before any is used, so the loads overlap instead of
// forming a chain of round trips (one scalar column at a time, this kernel ran at 34-48 % of
// DRAM bandwidth on an H200). Slots summed in order 0..k-1: deterministic.
template <typename In, typename T>
__global__ void unpermute_kernel(const In* __restrict__ rows, int64_t H,
                                 const int32_t* __restrict__ pair_pos, SlotBias bias,
                                 const float* __restrict__ weights, int64_t weights_stride, int k,
                                 T* __restrict__ y, int64_t y_stride) {
  // [kp] row offset (-1: skipped), [kp] bias offset (-1: none), [kp] weight, kp = k rounded up
  // to the batch (the unrolled batch reads every entry; the padding is skipped).
  extern __shared__ int64_t slot[];
  const int kp = padded_slots(k);
  int64_t* bias_at = slot + kp;
  float* slot_weight = reinterpret_cast<float*>(slot + 2 * kp);
  const int64_t t = blockIdx.x;
  for (int s = threadIdx.x; s < kp; s += blockDim.x) {
    const int32_t pos = s < k ? pair_pos[t * k + s] : -1;
    slot[s] = pos >= 0 ? pos * H : -1;
    bias_at[s] = -1;
    if (pos >= 0 && bias.b2) {
      const int32_t e = bias.ids[t * bias.ids_stride + s];
      bias_at[s] = (bias.index ? bias.index[e] : e) * H;
    }
    slot_weight[s] = s < k && weights ? weights[t * weights_stride + s] : 1.0f;
  }
  __syncthreads();
  const int64_t h = (blockIdx.y * int64_t(blockDim.x) + threadIdx.x) * 4;
  if (h >= H) return;
  const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  float4 acc = zero;
  for (int s0 = 0; s0 < k; s0 += kSlotBatch) {
    float4 v[kSlotBatch], b[kSlotBatch];
#pragma unroll
    for (int i = 0; i < kSlotBatch; ++i) {
      const int64_t at = slot[s0 + i], bat = bias_at[s0 + i];
      v[i] = at >= 0 ? load4(rows + at + h) : zero;
      b[i] = bat >= 0 ? load4(bias.b2 + bat + h) : zero;
    }
#pragma unroll
    for (int i = 0; i < kSlotBatch; ++i) {
      if (slot[s0 + i] < 0) continue;
      const float w = slot_weight[s0 + i];
      acc.x = fmaf(w, v[i].x + b[i].x, acc.x);
      acc.y = fmaf(w, v[i].y + b[i].y, acc.y);
      acc.z = fmaf(w, v[i].z + b[i].z, acc.z);
      acc.w = fmaf(w, v[i].w + b[i].w, acc.w);
    }
  }
  T* out = y + t * y_stride + h;
  store_float(out, 0, acc.x);
  store_float(out, 1, acc.y);
  store_float(out, 2, acc.z);
  store_float(out, 3, acc.w);
}

template <typename In, typename T>
void launch_unpermute(const In* rows, int64_t H, const int32_t* pair_pos, const SlotBias& bias,
                      const float* weights, int64_t weights_stride, int64_t M, int k, T* y,
                      int64_t y_stride, cudaStream_t stream) {
  if (M == 0) return;
  MOEKIT_CHECK(H % 4 == 0 && reinterpret_cast<uintptr_t>(rows) % (4 * sizeof(In)) == 0,
               "unpermute: rows need H (", H,
               ") a multiple of 4 and a start aligned to 4 elements");
  const size_t smem = padded_slots(k) * (2 * sizeof(int64_t) + sizeof(float));
  const dim3 grid(static_cast<unsigned>(M), blocks_for(H, kThreads * 4));
  unpermute_kernel<In, T><<<grid, kThreads, smem, stream>>>(rows, H, pair_pos, bias, weights,
                                                            weights_stride, k, y, y_stride);
  MOEKIT_CUDA_CHECK_LAUNCH();
}

}  // namespace

void sort_by_expert(const int32_t* ids, int64_t ids_stride, int64_t M, int k, int num_local,
                    const void* a1, int64_t a1_stride_bytes, int64_t row_bytes, RowScale a1_scale,
                    int32_t* counts, int32_t* offsets, int32_t* cursor, int32_t* pair_pos,
                    void* a_sorted, float* sorted_scale, cudaStream_t stream) {
  const int64_t pairs = M * k;
  if (pairs == 0 || num_local == 0) return;
  MOEKIT_CHECK(num_local <= kMaxSortExperts, "sort by expert: ", num_local,
               " local experts, at most ", kMaxSortExperts);
  MOEKIT_CUDA_CHECK(cudaMemsetAsync(counts, 0, num_local * sizeof(int32_t), stream));
  count_kernel<<<blocks_for(pairs, kThreads), kThreads, num_local * sizeof(int32_t), stream>>>(
      ids, ids_stride, pairs, k, num_local, counts);
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
  MOEKIT_CHECK(w.intermediate % kActVec == 0, "grouped activation: I = ", w.intermediate,
               " is not a multiple of ", kActVec);
  const unsigned blocks = static_cast<unsigned>(rows_bound);
  // Enough warps for a row's vectors, at most kThreads.
  const int threads = static_cast<int>(
      std::min<int64_t>(kThreads, (w.intermediate / kActVec + kWarp - 1) / kWarp * kWarp));
  with_compute_type(w.elem, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, __nv_fp8_e4m3>) {
      activation_kernel<T, T, RowQuant::kNone><<<blocks, threads, 0, stream>>>(
          w, static_cast<const T*>(c1), counts, offsets, static_cast<T*>(out), Fp8Rows{});
      MOEKIT_CUDA_CHECK_LAUNCH();
    } else {
      // GEMM1 wrote fp32 (the scales applied in its epilogue); a2 is requantized here.
      const Fp8Rows q{
          .q = static_cast<uint8_t*>(out), .kind = w.a2_scale, .scale = out_scale, .amax = amax};
      launch_quantized(q, stream, [&](auto mode) {
        activation_kernel<float, uint8_t, decltype(mode)::value><<<blocks, threads, 0, stream>>>(
            w, static_cast<const float*>(c1), counts, offsets, nullptr, q);
        MOEKIT_CUDA_CHECK_LAUNCH();
      });
    }
  });
}

void unpermute_weight_reduce(const DeviceWeights& w, const void* c2, DType c2_dtype,
                             const int32_t* pair_pos, const int32_t* ids, int64_t ids_stride,
                             const float* weights, int64_t weights_stride, int64_t M, int k,
                             float* y, cudaStream_t stream) {
  with_float_type(c2_dtype, [&](auto tag) {
    using In = decltype(tag);
    launch_unpermute(static_cast<const In*>(c2), w.hidden, pair_pos,
                     SlotBias{w.b2, w.index, ids, ids_stride}, weights, weights_stride, M, k, y,
                     w.hidden, stream);
  });
}

void gather_weight_reduce(const float* rows, int64_t H, const int32_t* pair_pos,
                          const float* weights, int64_t weights_stride, int64_t M, int k, void* y,
                          DType y_dtype, int64_t y_stride, cudaStream_t stream) {
  with_float_type(y_dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_unpermute(rows, H, pair_pos, SlotBias{}, weights, weights_stride, M, k,
                     static_cast<T*>(y), y_stride, stream);
  });
}

}  // namespace moekit::cuda
