// Launchers of the CUDA backend's kernels: raw device pointers, sizes and strides (in elements),
// a stream; no validation (the host layer in *_experts.cc / parts.cc validates first). Every
// launcher enqueues on `stream` only and never synchronizes.
//
// Element types: the experts compute in one element type T for weights and activations, named by
// its DType: kBF16, kF16, or kF8E4M3 (fp8 formats: e4m3 weights with fp32 per-row scales and e4m3
// activations with a typed scale, quant/format.h).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "moekit/activation.h"
#include "moekit/core/dtype.h"
#include "moekit/quant/format.h"

namespace moekit::cuda {

// The scale of row r of a quantized activation is scale[r * stride]: stride 1 per token (or per
// sorted row), stride 0 one scale for the tensor. scale null: unscaled (float activations).
struct RowScale {
  const float* scale = nullptr;
  int64_t stride = 0;
};

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

// out[t, :] = x[t, :] * (row_scale ? row_scale[t * scale_stride] : 1), converted to out_dtype.
// x: [M, H] of a float dtype with row stride x_stride; out: [M, H] contiguous, a float dtype.
void convert_rows(const void* x, DType x_dtype, int64_t x_stride, int64_t M, int64_t H,
                  const float* row_scale, int64_t scale_stride, void* out, DType out_dtype,
                  cudaStream_t stream);

// ---- fp8 e4m3 activation quantizer (quantize.cu) --------------------------------------------

// Where quantized rows go and how they are scaled. Codes are x / scale rounded to nearest even,
// saturated to +-448; a dynamic scale is amax / 448 over the finite values it covers (1 when
// that is 0), the host quantizer's rule (quant/quantize.h).
struct Fp8Rows {
  uint8_t* q = nullptr;                 // [M, H] contiguous e4m3 codes
  ScaleKind kind = ScaleKind::kToken;   // kTensor or kToken
  float* scale = nullptr;               // written: kTensor [1], kToken [M]
  const float* static_scale = nullptr;  // kTensor: a device [1] scale used as is; null: dynamic
  uint32_t* amax = nullptr;             // kTensor dynamic: device scratch [1]
};
// q[t, :] = e4m3(x[t, :] * row_scale(t) / scale): a per-tensor dynamic scale is reduced on the
// device over all M rows (an amax pass, then the quantize pass: no host synchronisation).
// x: [M, H] of a float dtype with row stride x_stride.
void quantize_rows_fp8(const void* x, DType x_dtype, int64_t x_stride, int64_t M, int64_t H,
                       const float* row_scale, int64_t scale_stride, const Fp8Rows& out,
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
// (index null: identity); rows of `row_stride` elements of dtype `elem`. Biases and weight scales
// are fp32 copies indexed like the weights, contiguous: b13, s13 [n, w13_rows], b2, s2 [n, H]
// (null: no bias; unscaled float weights). A per-tensor weight scale is stored expanded to every
// row, so the kernels see one layout.
struct DeviceWeights {
  const void* w13;
  const void* w2;
  const float* b13;
  const float* b2;
  const float* s13;
  const float* s2;
  DType elem;          // kBF16, kF16 or kF8E4M3
  ScaleKind a2_scale;  // e4m3: how the intermediate is requantized (intermediate_spec)
  int64_t w13_expert_stride, w13_row_stride;
  int64_t w2_expert_stride, w2_row_stride;
  const int32_t* index;  // [E_local] or null
  int num_local;         // E_local
  int64_t hidden, intermediate;
  Activation activation;
};

// ---- small-batch (decode) experts ---------------------------------------------------------

// Pairs the small-batch kernels take per launch (their ids live in shared memory); larger
// batches run in token chunks of this many pairs.
inline constexpr int64_t kSmallBatchMaxPairs = 4096;

// The intermediate of the small-batch experts, P = M * k pair rows of I:
//   float formats: h [P, I] elem;
//   e4m3: h [P, I] fp32, requantized into h8 [P, I] with h_scale (kToken [P], kTensor [1]) and
//   amax [1] scratch.
struct SmallBatchBuffers {
  void* h = nullptr;
  uint8_t* h8 = nullptr;
  float* h_scale = nullptr;
  uint32_t* amax = nullptr;
};

// fused_out[t, s, :] = W2[e] . act(W13[e] . a1[t] + b13[e]) + b2[e] for e = ids[t, s] >= 0, and
// zeros for ids -1 (and ids >= E_local); weights and activations dequantized with their scales.
// a1: [M, H] elem (row stride a1_stride) with a1_scale; ids: [M, k] (row stride ids_stride);
// fused_out: [M, k, H] fp32 contiguous.
void small_batch_experts(const DeviceWeights& w, const void* a1, int64_t a1_stride,
                         RowScale a1_scale, const int32_t* ids, int64_t ids_stride, int64_t M,
                         int k, const SmallBatchBuffers& buf, float* fused_out,
                         cudaStream_t stream);

// ---- grouped-GEMM experts: sorting by expert and the element-wise stages --------------------

// The most local experts sort_by_expert takes (its count kernel keeps a shared-memory histogram
// of one int per local expert, in the 48 KB a block gets without opting in).
constexpr int64_t kMaxSortExperts = 48 * 1024 / 4;

// Counting sort of the M * k (token, slot) pairs by local expert (pairs with id -1 dropped).
// counts, offsets: [E_local] int32; pair_pos: [M * k] row of each pair in sorted order (-1:
// dropped); a_sorted: [M * k, row_bytes] bytes, row r = a1 row of the token of the pair at r
// (a1 rows of row_bytes, a multiple of 16, a1_stride_bytes apart); sorted_scale (when a1_scale
// is per token): [M * k], the scale of row r. cursor: [E_local] int32 scratch. Positions inside
// one expert's rows are not ordered (atomics); every row's result is independent of its
// position, so outputs stay deterministic.
void sort_by_expert(const int32_t* ids, int64_t ids_stride, int64_t M, int k, int num_local,
                    const void* a1, int64_t a1_stride_bytes, int64_t row_bytes, RowScale a1_scale,
                    int32_t* counts, int32_t* offsets, int32_t* cursor, int32_t* pair_pos,
                    void* a_sorted, float* sorted_scale, cudaStream_t stream);

// The activation between the GEMMs on the sorted rows r < rows_bound that belong to an expert
// (offsets/counts; the rest are left alone): v[r, j] = act(c1[r, gate j] + b13, c1[r, up j] +
// b13) with c1: [rows, w13_rows] (elem for float formats, fp32 already scaled for e4m3). Float
// formats: out [rows, I] elem. e4m3: out [rows, I] codes requantized as w.a2_scale says, with
// out_scale [rows] (kToken) or [1] (kTensor: a dynamic scale over every sorted row, amax [1]
// scratch).
void grouped_activation(const DeviceWeights& w, const void* c1, const int32_t* counts,
                        const int32_t* offsets, int64_t rows_bound, void* out, float* out_scale,
                        uint32_t* amax, cudaStream_t stream);

// y[t] = sum over s in order with pos = pair_pos[t * k + s] >= 0 of
//   weights[t, s] * (c2[pos] + b2[ids[t, s]])    (y: [M, H] fp32, c2: [rows, H] of c2_dtype, a
// float dtype), in fp32.
void unpermute_weight_reduce(const DeviceWeights& w, const void* c2, DType c2_dtype,
                             const int32_t* pair_pos, const int32_t* ids, int64_t ids_stride,
                             const float* weights, int64_t weights_stride, int64_t M, int k,
                             float* y, cudaStream_t stream);

// The same gather without biases, into y of a float dtype: y[t] = sum over s in order with
// pos = pair_pos[t * k + s] >= 0 of (weights ? weights[t, s] : 1) * rows[pos], in fp32 (fmaf,
// the arithmetic of weight_and_reduce), then cast to y_dtype. rows: [*, H] fp32 contiguous;
// pair_pos: [M * k]; y: [M, H] with row stride y_stride.
void gather_weight_reduce(const float* rows, int64_t H, const int32_t* pair_pos,
                          const float* weights, int64_t weights_stride, int64_t M, int k, void* y,
                          DType y_dtype, int64_t y_stride, cudaStream_t stream);

// ---- batched prepare (batched_dispatch.cu) --------------------------------------------------

// Places the P (token, slot) pairs in the batched layout [E_local, N, ...]: pair p (= t * k + s)
// with ids[p] = e in [0, E_local) gets row pair_row[p] = e * N + j, where j counts the pairs
// before p with the same expert (deterministic: (token, slot) order, no atomics). Pairs with
// other ids get -1, and so do pairs with j >= N, which add one each to *dropped (only a token
// naming one expert in several slots can overflow N >= M rows). counts[e] = min(pairs of e, N).
// ids: [P] int32 contiguous; pair_row: [P]; counts: [E_local]; E_local * N must fit int32.
void batched_place(const int32_t* ids, int64_t pairs, int num_local, int64_t N, int32_t* pair_row,
                   int32_t* counts, int32_t* dropped, cudaStream_t stream);

// Copies the rows of the placed pairs: a1 row pair_row[p] = src row p / k (row_bytes bytes;
// src rows src_stride_bytes apart, a1 rows contiguous) and, when src_scale is given (per-token
// scales), a1_scale[pair_row[p]] = src_scale[p / k]. Pairs with pair_row -1 copy nothing.
void batched_scatter_rows(const int32_t* pair_row, int64_t pairs, int k, const void* src,
                          int64_t src_stride_bytes, int64_t row_bytes, const float* src_scale,
                          void* a1, float* a1_scale, cudaStream_t stream);

// ---- batched-format experts (batched.cu) ----------------------------------------------------

// The batched layout [E_local, N, H] (rows e * N + j) needs no sort: expert e's rows are the
// first count[e] of its N, where count[e] = expert_num_tokens[e] clamped into [0, N] by every
// launcher here. expert_num_tokens: [E_local] int32, device.

// Its grouped-GEMM groups: counts[e] = count[e], offsets[e] = e * N ([E_local] int32 each;
// E_local * N must fit int32).
void batched_groups(const int32_t* expert_num_tokens, int num_local, int64_t N, int32_t* counts,
                    int32_t* offsets, cudaStream_t stream);

// Its rows as top-1 standard rows: ids[e * N + j] = e for j < count[e], else -1, and
// weights[e * N + j] = 1 (ids, weights: [E_local * N]).
void batched_top1_ids(const int32_t* expert_num_tokens, int num_local, int64_t N, int32_t* ids,
                      float* weights, cudaStream_t stream);

// The end of the grouped GEMM2 written in place into out [w.num_local * N, H] fp32 (16-byte
// aligned): valid rows (j < counts[e], the clamped counts of batched_groups) get
// b2[index[e]] added (w.b2 null: left alone), rows j >= counts[e] become +0.
void batched_bias_and_padding(const DeviceWeights& w, const int32_t* counts, int64_t N, float* out,
                              cudaStream_t stream);

}  // namespace moekit::cuda
