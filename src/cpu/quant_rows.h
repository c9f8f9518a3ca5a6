// A rows of the quantized GEMMs (the records of kernels.h): GEMM1's built from the dispatched
// a1 of each activation dtype, GEMM2's from GEMM1's fp32 output, requantized the way the
// format quantizes activations (quant/quantize.h: dynamic scale amax / largest code over the
// finite values, fp32 division, round to nearest even, saturation; a zero scale becomes 1,
// ue8m0 block scales round up to a power of two). Host code shared by every ISA family, so the
// families see the same A rows.
#pragma once

#include <cstdint>

#include "cpu/pack.h"
#include "moekit/modular.h"

namespace moekit::cpu {

// Where the values and the meta of one GEMM's A records live (kernels.h).
struct RowLayout {
  int64_t k = 0;      // values per row
  int64_t kp = 0;     // k padded to the weights' unit (zeros past k)
  int64_t group = 0;  // the weights' scale groups along k
  int64_t groups = 0;
  int64_t meta = 0;    // floats from a record's start to its meta
  int64_t stride = 0;  // floats between records (whole 64-byte lines)
  bool codes = false;  // kInt8Dot: int8 codes (kp bytes) instead of fp32 values
  // Records for the quantized GEMM g whose values take `value_floats` floats (at least kp, or
  // kp / 4 for int8 codes).
  static RowLayout of(const PackedGemm& g, int64_t value_floats);
};

// GEMM1 records of tokens [t0, t1): a1 [M, H] bf16 (widened; with zero-point weights, group
// sums), e4m3 (decoded, the row scale or block scales from `scale`), or int8 (copied, the
// row scale and 128 * sum of codes). Shapes and dtypes are checked by the caller.
void build_a1_rows(const TensorView& a1, const ActivationScale& scale, const RowLayout& l,
                   bool zero_point, int64_t t0, int64_t t1, float* rows);

// GEMM2 records in place from GEMM1's fp32 output in the record's values:
//   bf16 activations: values are bf16 already (GEMM1 rounds); group sums for zero points;
//   e4m3: values become e4m3 values under a dynamic scale per row (kToken), per group of
//   l.group (kBlock, fp32 or ue8m0 scales), or `tensor_scale` (kTensor).
// meta[0] (the row scale) is written in every case.
void finish_a2_row(float* row, const RowLayout& l, const ActivationSpec& spec, bool zero_point,
                   float tensor_scale);

// The largest finite |x| of n values, and the dynamic scale of an amax for codes up to `max`.
float finite_amax(const float* x, int64_t n);
float dynamic_scale(float amax, float max, DType scale_dtype);

// The e4m3 value nearest to v (ties to even), saturating to +-448, NaN kept: the value of
// decode(encode(v)) (quant/encodings.h), by fp32 bit arithmetic.
float round_e4m3(float v);

}  // namespace moekit::cpu
