// Quantizers of the formats of quant/format.h: weights offline, activations dynamic or static,
// and the dequantizers that the oracle and the tests read them back with. Host (CPU) tensors.
//
// Rounding is to nearest, ties to even; values beyond a code's range saturate to its largest
// finite value; NaN and infinities follow quant/encodings.h (an integer code saturates +-inf and
// maps NaN to 0). A dynamic scale is amax / (largest code) over the values it covers (fp32
// division; ue8m0 scales round that up to a power of two so no value saturates); a group whose
// values are all zero gets scale 1 (ue8m0: 2^0) so that dequantizing never divides by zero.
#pragma once

#include "moekit/core/tensor.h"
#include "moekit/modular.h"
#include "moekit/quant/format.h"

namespace moekit {

// ---- weights ------------------------------------------------------------------------------

// One quantized weight [n, R, K] in `scheme`, laid out as quant/format.h says.
struct QuantizedWeight {
  QuantScheme scheme;
  Tensor data, scale, zero, global;  // zero/global empty where the scheme has none
  WeightScales scales() const;
};

// Quantizes float weights w [n, R, K] (fp32/fp16/bf16, last dim contiguous). Group and block
// scales cover a ragged last group/block too. With a zero point: asymmetric, the group's [min,
// max] onto [0, 2^bits - 1]. Throws moekit::Error on a float scheme, bad shapes or dtypes.
QuantizedWeight quantize_weight(const TensorView& w, const QuantScheme& scheme);

// Row r of expert e of a quantized weight, dequantized: out[K] = (q - zero) * scale * global.
void dequantize_weight_row(const TensorView& data, const WeightScales& scales,
                           const QuantScheme& scheme, int64_t e, int64_t r, float* out);

// A layer's expert weights quantized into `scheme` (w13 and w2; the biases keep the float
// views of the source weights, which must outlive this).
struct QuantizedExpertWeights {
  QuantizedWeight w13, w2;
  TensorView b13, b2;
  ExpertWeights view() const;  // quant set, no source table
};
QuantizedExpertWeights quantize_expert_weights(const ExpertWeights& w, const QuantScheme& scheme);

// ---- activations --------------------------------------------------------------------------

// Rows of scale a kind needs for M rows of H: kTensor {1}, kToken {M}, kBlock {M, ceil(H/g)}.
std::vector<int64_t> activation_scale_shape(const ActivationSpec& spec, int64_t rows,
                                            int64_t hidden);

// x [M, H] float (last dim contiguous) -> q [M, H] spec.dtype and scale (shape above, dtype
// spec.scale_dtype). Static (spec.static_scale present, kTensor only): q = x / static scale and
// `scale` receives a copy of it. kNone: a plain float conversion (scale unused).
void quantize_activations(const TensorView& x, const ActivationSpec& spec, const TensorView& q,
                          const TensorView& scale);

// The amax a dynamic per-tensor scale comes from (distributed prepare/finalize take the max
// over ranks, so one scalar covers every rank's rows), and the scale of an amax.
float activation_amax(const TensorView& x);
float tensor_scale_of_amax(float amax, DType code);

// q [M, H] with its typed scale -> out [M, H] float.
void dequantize_activations(const TensorView& q, const ActivationScale& scale,
                            const TensorView& out);

}  // namespace moekit
