// Launchers of the CUDA backend's kernels: raw device pointers, sizes and strides (in elements),
// a stream; no validation (the host layer in *_experts.cc / parts.cc validates first). Every
// launcher enqueues on `stream` only and never synchronizes.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "moekit/activation.h"
#include "moekit/core/dtype.h"

namespace moekit::cuda {

// ---- prepare ------------------------------------------------------------------------------

// Per global expert, how this rank serves it: local slot (-1: not held), and for replicated
// maps the number of replicas and this rank's position among them (the replica serving token
// key t is the one at position t mod num_replicas).
struct ExpertRoute {
  int32_t slot;
  int32_t num_replicas;
  int32_t replica_index;
};

// local_ids[t, s] = this rank's slot for global_ids[t, s] or -1; local_weights[t, s] = weight
// (1 when weight_on_input). Ids outside [-1, E) become -1 and add one to *bad_count.
// global_ids, weights: [M, k] with row strides; local_ids, local_weights: [M, k] contiguous.
void map_ids(const int32_t* global_ids, int64_t ids_stride, const float* weights,
             int64_t weights_stride, int64_t M, int k, const ExpertRoute* routes, int E,
             int64_t token_key_offset, bool weight_on_input, int32_t* local_ids,
             float* local_weights, int32_t* bad_count, cudaStream_t stream);

// out[t, :] = x[t, :] * (row_scale ? row_scale[t * scale_stride] : 1), converted to bf16.
// x: [M, H] of dtype x_dtype (fp32, fp16 or bf16) with row stride x_stride; out: [M, H].
void convert_rows_to_bf16(const void* x, DType x_dtype, int64_t x_stride, int64_t M, int64_t H,
                          const float* row_scale, int64_t scale_stride, uint16_t* out,
                          cudaStream_t stream);

// ---- finalize -----------------------------------------------------------------------------

// reduced == false: y[t] = sum over s = 0..k-1 with ids[t, s] >= 0 of
//   (apply_weights ? weights[t, s] : 1) * fused[t, s]      (fused: [M, k, H] fp32)
// reduced == true:  y[t] = fused[t]                         (fused: [M, H] fp32)
// y: [M, H] of dtype y_dtype with row stride y_stride. Slots summed in order: deterministic.
void weight_and_reduce(const float* fused, int64_t M, int k, int64_t H, bool reduced,
                       const int32_t* ids, int64_t ids_stride, const float* weights,
                       int64_t weights_stride, bool apply_weights, void* y, DType y_dtype,
                       int64_t y_stride, cudaStream_t stream);

// ---- shared by the experts ----------------------------------------------------------------

// Experts' weights on the device: expert e (local slot) is at base + index[e] * expert_stride
// (index null: identity); rows of `row_stride` elements. Biases may be null (bf16 like weights).
struct DeviceWeights {
  const uint16_t* w13;
  const uint16_t* w2;
  const uint16_t* b13;
  const uint16_t* b2;
  int64_t w13_expert_stride, w13_row_stride;
  int64_t w2_expert_stride, w2_row_stride;
  int64_t b13_expert_stride, b2_expert_stride;
  const int32_t* index;  // [E_local] or null
  int num_local;         // E_local
  int64_t hidden, intermediate;
  Activation activation;
};

// ---- small-batch (decode) experts ---------------------------------------------------------

// Pairs the small-batch kernels take per launch (their ids live in shared memory); larger
// batches run in token chunks of this many pairs.
inline constexpr int64_t kSmallBatchMaxPairs = 4096;

// fused_out[t, s, :] = W2[e] . act(W13[e] . a1[t] + b13[e]) + b2[e] for e = ids[t, s] >= 0, and
// zeros for ids -1 (and ids >= E_local); h: workspace [M * k, I] bf16. a1: [M, H] bf16 (row stride
// a1_stride); ids: [M, k] (row stride ids_stride); fused_out: [M, k, H] fp32 contiguous.
void small_batch_experts(const DeviceWeights& w, const uint16_t* a1, int64_t a1_stride,
                         const int32_t* ids, int64_t ids_stride, int64_t M, int k, uint16_t* h,
                         float* fused_out, cudaStream_t stream);

// ---- grouped-GEMM experts: sorting by expert and the element-wise stages --------------------

// Counting sort of the M * k (token, slot) pairs by local expert (pairs with id -1 dropped).
// counts, offsets: [E_local] int32; pair_pos: [M * k] row of each pair in sorted order (-1:
// dropped); a_sorted: [M * k, H] bf16, row r = a1 of the token of the pair at r. cursor:
// [E_local] int32 scratch. Positions inside one expert's rows are not ordered (atomics); every
// row's result is independent of its position, so outputs stay deterministic.
void sort_by_expert(const int32_t* ids, int64_t ids_stride, int64_t M, int k, int num_local,
                    const uint16_t* a1, int64_t a1_stride, int64_t H, int32_t* counts,
                    int32_t* offsets, int32_t* cursor, int32_t* pair_pos, uint16_t* a_sorted,
                    cudaStream_t stream);

// out[r, j] = bf16(act(c1[r, gate j] + b13, c1[r, up j] + b13)) for the rows r < rows_bound
// that belong to an expert (offsets/counts); c1: [rows, w13_rows] bf16, out: [rows, I] bf16.
// The expert of row r is found from offsets; rows past the last expert's are left alone.
void grouped_activation(const DeviceWeights& w, const uint16_t* c1, const int32_t* counts,
                        const int32_t* offsets, int64_t rows_bound, uint16_t* out,
                        cudaStream_t stream);

// y[t] = sum over s in order with pos = pair_pos[t * k + s] >= 0 of
//   weights[t, s] * (c2[pos] + b2[ids[t, s]])            (y: [M, H] fp32, c2: [rows, H] fp32)
void unpermute_weight_reduce(const DeviceWeights& w, const float* c2, const int32_t* pair_pos,
                             const int32_t* ids, int64_t ids_stride, const float* weights,
                             int64_t weights_stride, int64_t M, int k, float* y,
                             cudaStream_t stream);

}  // namespace moekit::cuda
