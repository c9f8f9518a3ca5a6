// Kernels of the CUDA PrepareFinalize and WeightAndReduce: id mapping, input conversion between
// float dtypes and the deterministic weight-and-reduce.
#include "cuda/check.h"
#include "cuda/device.cuh"
#include "cuda/kernels.h"

namespace moekit::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void map_ids_kernel(const int32_t* __restrict__ global_ids, int64_t ids_stride,
                               const float* __restrict__ weights, int64_t weights_stride, int64_t M,
                               int k, const ExpertRoute* __restrict__ routes, int E,
                               int64_t token_key_offset, bool weight_on_input,
                               int32_t* __restrict__ local_ids, float* __restrict__ local_weights,
                               int32_t* __restrict__ bad_count) {
  grid_dependency_wait();
  launch_dependents();  // the experts' first kernel may start (it waits for these ids)
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= M * k) return;
  const int64_t t = i / k;
  const int s = static_cast<int>(i % k);
  const int32_t id = global_ids[t * ids_stride + s];
  int32_t local = -1;
  if (id >= 0 && id < E) {
    const ExpertRoute r = routes[id];
    if (r.slot >= 0) {
      const int64_t key = token_key_offset + t;
      const int64_t n = r.num_replicas;
      local = (((key % n) + n) % n) == r.replica_index ? r.slot : -1;
    }
  } else if (id != -1) {
    atomicAdd(bad_count, 1);
  }
  local_ids[i] = local;
  local_weights[i] = weight_on_input ? 1.0f : weights[t * weights_stride + s];
}

template <typename T, typename Out>
__global__ void convert_rows_kernel(const T* __restrict__ x, int64_t x_stride, int64_t H,
                                    const float* __restrict__ row_scale, int64_t scale_stride,
                                    Out* __restrict__ out) {
  const int64_t t = blockIdx.x;
  const float scale = row_scale ? row_scale[t * scale_stride] : 1.0f;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x)
    store_float(out, t * H + h, load_float(x, t * x_stride + h) * scale);
}

// Block (t, y): token t, columns [y * kThreads * kCols, ...) with kCols consecutive columns per
// thread. Each batch of kSlotBatch slots' values is loaded before any is used (and the first
// batch before the token's ids and weights are staged in shared memory), so the loads of a
// token's slots overlap instead of forming a chain of round trips -- at decode, with the rows
// in L2, that chain was most of this kernel's time. Slots summed in order 0..k-1:
// deterministic.
constexpr int kCols = 4;

template <typename T>
__global__ void weight_and_reduce_kernel(const float* __restrict__ fused, int k, int64_t H,
                                         bool reduced, const int32_t* __restrict__ ids,
                                         int64_t ids_stride, const float* __restrict__ weights,
                                         int64_t weights_stride, bool apply_weights,
                                         T* __restrict__ y, int64_t y_stride) {
  // [k rounded up to kSlotBatch]; NaN marks a skipped slot (and the padding). The padding keeps
  // the unrolled batch's reads in bounds: the compiler reads slot_weight[s0 .. s0 + 7] as wide
  // shared loads before the per-slot exits (memcheck: 16-byte reads past [k]).
  extern __shared__ float slot_weight[];
  grid_dependency_wait();  // fused comes from the kernel just before
  launch_dependents();
  const int64_t t = blockIdx.x;
  const int64_t h0 = (blockIdx.y * int64_t(blockDim.x) + threadIdx.x) * kCols;
  const int slots = reduced ? 1 : k;
  // Rows of a multiple of kCols floats from a 16-byte aligned start: one float4 per slot.
  static_assert(kCols == 4);
  const bool vec_rows = H % kCols == 0 && reinterpret_cast<uintptr_t>(fused) % 16 == 0;
  float acc[kCols] = {};
  for (int s0 = 0; s0 < slots; s0 += kSlotBatch) {
    // Rows of skipped slots are read too (they exist) and ignored below.
    float v[kSlotBatch][kCols];
#pragma unroll
    for (int i = 0; i < kSlotBatch; ++i) {
      const float* row = fused + (reduced ? t : t * k + s0 + i) * H;
      if (vec_rows && s0 + i < slots && h0 < H) {
        const float4 q = *reinterpret_cast<const float4*>(row + h0);
        v[i][0] = q.x, v[i][1] = q.y, v[i][2] = q.z, v[i][3] = q.w;
        continue;
      }
#pragma unroll
      for (int c = 0; c < kCols; ++c) v[i][c] = s0 + i < slots && h0 + c < H ? row[h0 + c] : 0.0f;
    }
    if (s0 == 0 && !reduced) {
      for (int s = threadIdx.x; s < padded_slots(k); s += blockDim.x)
        slot_weight[s] = s >= k || ids[t * ids_stride + s] < 0 ? __int_as_float(0x7fffffff)
                         : apply_weights                       ? weights[t * weights_stride + s]
                                                               : 1.0f;
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < kSlotBatch; ++i) {
      if (s0 + i >= slots) break;
      const float w = reduced ? 1.0f : slot_weight[s0 + i];
      if (isnan(w) && !reduced) continue;
#pragma unroll
      for (int c = 0; c < kCols; ++c) acc[c] = fmaf(w, v[i][c], acc[c]);
    }
  }
#pragma unroll
  for (int c = 0; c < kCols; ++c)
    if (h0 + c < H) store_float(y, t * y_stride + h0 + c, acc[c]);
}

}  // namespace

void map_ids(const int32_t* global_ids, int64_t ids_stride, const float* weights,
             int64_t weights_stride, int64_t M, int k, const ExpertRoute* routes, int E,
             int64_t token_key_offset, bool weight_on_input, int32_t* local_ids,
             float* local_weights, int32_t* bad_count, cudaStream_t stream) {
  if (M == 0) return;
  map_ids_kernel<<<blocks_for(M * k, kThreads), kThreads, 0, stream>>>(
      global_ids, ids_stride, weights, weights_stride, M, k, routes, E, token_key_offset,
      weight_on_input, local_ids, local_weights, bad_count);
  MOEKIT_CUDA_CHECK_LAUNCH();
}

void convert_rows(const void* x, DType x_dtype, int64_t x_stride, int64_t M, int64_t H,
                  const float* row_scale, int64_t scale_stride, void* out, DType out_dtype,
                  cudaStream_t stream) {
  if (M == 0) return;
  with_float_type(x_dtype, [&](auto in_tag) {
    using T = decltype(in_tag);
    with_float_type(out_dtype, [&](auto out_tag) {
      using Out = decltype(out_tag);
      convert_rows_kernel<T, Out><<<static_cast<unsigned>(M), kThreads, 0, stream>>>(
          static_cast<const T*>(x), x_stride, H, row_scale, scale_stride, static_cast<Out*>(out));
    });
  });
  MOEKIT_CUDA_CHECK_LAUNCH();
}

void weight_and_reduce(const float* fused, int64_t M, int k, int64_t H, bool reduced,
                       const int32_t* ids, int64_t ids_stride, const float* weights,
                       int64_t weights_stride, bool apply_weights, void* y, DType y_dtype,
                       int64_t y_stride, cudaStream_t stream) {
  if (M == 0) return;
  with_float_type(y_dtype, [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(static_cast<unsigned>(M), blocks_for(H, kThreads * kCols));
    // Chained: its launch overlaps the tail of the kernel that writes `fused`.
    launch_chained(weight_and_reduce_kernel<T>, grid, kThreads, padded_slots(k) * sizeof(float),
                   stream, fused, k, H, reduced, ids, ids_stride, weights, weights_stride,
                   apply_weights, static_cast<T*>(y), y_stride);
  });
}

}  // namespace moekit::cuda
