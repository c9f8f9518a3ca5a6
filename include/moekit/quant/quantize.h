// Quantizers of the formats of quant/format.h: weights offline, activations dynamic or static,
// and the dequantizers that the oracle and the tests read them back with. Host (CPU) tensors.
//
// Rounding is to nearest, ties to even; values beyond a code's range saturate to its largest
// finite value. Signed integer codes are symmetric: int8 [-127, 127], int4 [-7, 7]; unsigned
// ones (with a zero point) use [0, 2^bits - 1]. A dynamic scale is amax / (largest code) over
// the values it covers (fp32 division), rounded to its element before any value is divided by
// it, so the codes are what dequantizing with the stored scale targets: fp32 exact, bf16/fp16
// to nearest, e4m3 to nearest (saturating), ue8m0 UP to a power of two so no value saturates
// (the OCP MX rule floor(log2 amax) - emax would let the largest values clip). A scale that
// would store as zero (a group whose values are all zero) is 1 (ue8m0: 2^0), so dequantizing
// never divides by zero.
// NaN and infinities: amax is over the finite values only, so +-inf saturate to the largest
// code; NaN encodes as NaN in fp8, as 0 in an integer code (with a zero point: the zero point,
// value 0), and in e2m1, which has no NaN, makes the scale of its group NaN
// (quant/encodings.h).
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

// Quantizes float weights w [n, R, K] (fp32/fp16/bf16, last dim contiguous), each expert on
// its own (experts run in parallel on the shared CPU pool; the result does not depend on the
// threads). Group and block scales cover a ragged last group/block too. With a zero point:
// asymmetric, the group's [min(min, 0), max(max, 0)] onto [0, 2^bits - 1] with the scale
// rounded UP to its element (so the range still fits) and zero = round(-min / scale), so every
// value is within scale / 2. Formats with a global scale: global = amax(expert) / target and
// group scale = group amax / largest code / global, where target is the largest weight code
// times the largest scale code (nvfp4: 6 * 448, e4m3 group scales use their whole range) or,
// with a float scale element, the largest activation code (w4a8: 448, so int4 * group scale
// fits e4m3); codes are x / (scale * global). Packed 4-bit weights need an even K (rows start
// on whole bytes). Throws moekit::Error on a float or invalid scheme, bad shapes or dtypes.
QuantizedWeight quantize_weight(const TensorView& w, const QuantScheme& scheme);

// Row r of expert e of a quantized weight, dequantized: out[K] = (q - zero) * scale * global,
// in fp32, multiplied in that order. Checks the arguments (throws moekit::Error).
void dequantize_weight_row(const TensorView& data, const WeightScales& scales,
                           const QuantScheme& scheme, int64_t e, int64_t r, float* out);

// A layer's expert weights quantized into `scheme` (w13 and w2; the biases keep the float
// views of the source weights, which must outlive this). The weights must be float and global
// (no source table: quantize the global weights, then take ExpertWeights::local_view).
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

// x [M, H] float (last dim contiguous) -> q [M, H] spec.dtype (fp8 e4m3/e5m2 or int8) and
// scale (shape above, dtype spec.scale_dtype: fp32, or ue8m0 for kBlock). Static
// (spec.static_scale present: [1] fp32 on the host, positive, kTensor only): q = x / static
// scale and `scale` receives a copy of it. kNone: a plain float conversion (scale unused).
// Checks every argument before writing (throws moekit::Error; outputs untouched).
void quantize_activations(const TensorView& x, const ActivationSpec& spec, const TensorView& q,
                          const TensorView& scale);

// The amax a dynamic per-tensor scale comes from (distributed prepare/finalize take the max
// over ranks, so one scalar covers every rank's rows, and quantize with it as a static scale),
// and the scale of an amax: amax / largest code of `code`, 1 for amax 0. A dynamic kTensor
// quantize_activations uses exactly tensor_scale_of_amax(activation_amax(x), spec.dtype).
float activation_amax(const TensorView& x);
float tensor_scale_of_amax(float amax, DType code);

// q [M, H] with its typed scale -> out [M, H] float.
void dequantize_activations(const TensorView& q, const ActivationScale& scale,
                            const TensorView& out);

}  // namespace moekit
