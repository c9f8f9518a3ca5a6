// Reference definitions of the quantizers' codes, scales and error bounds, written from
// quant/quantize.h and quant/format.h independently of src/quant; shared by test_quantize.cc
// (codes, activations) and test_quantize_weights.cc. Internal to each test (unnamed namespace).
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "moekit/quant/encodings.h"
#include "moekit/quant/quantize.h"
#include "support/test_support.h"

namespace moekit {
namespace {


constexpr float kInf = std::numeric_limits<float>::infinity();

// ---- reference definitions, written independently of src/quant ---------------------------

// Per code: its largest value, and half its spacing around v = x / S (the rounding error in
// units of S) as max(rel * |v|, abs), derived from the code's values:
//   e4m3: 3 mantissa bits, spacing 2^(e-3) in [2^e, 2^(e+1)), so half of it <= |v| 2^-4; below
//         the smallest normal 2^-6 the spacing is 2^-9, half 2^-10.
//   e5m2: 2 mantissa bits: |v| 2^-3; subnormal spacing 2^-16: 2^-17.
//   e2m1: values 0, .5, 1, 1.5, 2, 3, 4, 6: half spacing .25 below 2, then <= |v| / 4.
//   integers: the spacing is one code, half of it 1/2.
struct RefCode {
  DType dtype;
  float largest;
  bool is_int, is_unsigned;
  double rel, abs;
};
constexpr RefCode kRefCodes[] = {
    {DType::kF8E4M3, 448, false, false, 0x1p-4, 0x1p-10},
    {DType::kF8E5M2, 57344, false, false, 0x1p-3, 0x1p-17},
    {DType::kF4E2M1, 6, false, false, 0.25, 0.25},
    {DType::kI8, 127, true, false, 0, 0.5},
    {DType::kI4, 7, true, false, 0, 0.5},
    {DType::kU8, 255, true, true, 0, 0.5},
    {DType::kU4, 15, true, true, 0, 0.5},
};
const RefCode& ref_code(DType t) {
  for (const RefCode& c : kRefCodes)
    if (c.dtype == t) return c;
  ADD_FAILURE() << "no code " << name(t);
  return kRefCodes[0];
}
float largest_code(DType t) {
  return ref_code(t).largest;
}
bool is_int_code(DType t) {
  return ref_code(t).is_int;
}
// The range of v = x / S that codes cover (with zero point z for unsigned codes).
double code_lo(DType t, int z) {
  return ref_code(t).is_unsigned ? -z : -largest_code(t);
}
double code_hi(DType t, int z) {
  return ref_code(t).is_unsigned ? largest_code(t) - z : largest_code(t);
}

// The code of v (already divided by its scale) as an unscaled value; zero: the zero point of
// an unsigned code, added after rounding (exact, unlike rounding v + zero in fp32).
float reference_code(DType t, float v, int zero = 0) {
  if (is_int_code(t)) {
    if (std::isnan(v)) v = 0;
    const float hi = largest_code(t), lo = ref_code(t).is_unsigned ? 0 : -hi;
    return std::nearbyint(std::clamp(v, lo - zero, hi - zero)) + zero;
  }
  const MiniFloat f = t == DType::kF8E4M3   ? MiniFloat::kE4M3
                      : t == DType::kF8E5M2 ? MiniFloat::kE5M2
                                            : MiniFloat::kE2M1;
  return decode(f, encode(f, v));
}

// A scale as stored in dtype t (zero stores as 1; ue8m0 rounds up; round_up: bf16 up).
float stored_scale(DType t, float s, bool round_up = false) {
  if (s == 0) return 1;
  float v;
  if (t == DType::kUE8M0) {
    v = decode_ue8m0(encode_ue8m0(s, ScaleRounding::kUp));
  } else if (t == DType::kF8E4M3) {
    v = decode(MiniFloat::kE4M3, encode(MiniFloat::kE4M3, s));
  } else if (t == DType::kBF16) {
    v = bf16_to_float(float_to_bf16(s));
    if (round_up && v < s) v = bf16_to_float(uint16_t(float_to_bf16(s) + 1));
  } else {
    v = s;
  }
  return v == 0 ? 1 : v;
}

// Largest |error| of one value x quantized under scale S (scale * global) into code t with zero
// point z: inside the codes' range, half the code spacing (RefCode); beyond it the value
// saturates to the largest code, an error of exactly how far beyond it lies; plus fp32 slack
// (x / S and the dequantizing products: a few 2^-24 relative).
double error_bound(DType t, double x, double S, int z = 0) {
  const RefCode& c = ref_code(t);
  const double half = std::max(c.rel * std::fabs(x / S), c.abs);
  const double beyond = std::max({0.0, x / S - code_hi(t, z), code_lo(t, z) - x / S});
  return std::max(half, beyond) * S + (std::fabs(x) + S) * 0x1p-20;
}

// Value of element i of a contiguous tensor (its code for quantized dtypes).
float at(const TensorView& t, int64_t i) {
  return load_as_float(t.data, t.dtype, i);
}

ActivationSpec act_spec(DType dtype, ScaleKind kind, int64_t group = 0,
                        DType scale_dtype = DType::kF32) {
  ActivationSpec s;
  s.dtype = dtype;
  s.scale = kind;
  s.group = group;
  s.scale_dtype = scale_dtype;
  return s;
}

Tensor scale_tensor(const ActivationSpec& spec, int64_t M, int64_t H) {
  const std::vector<int64_t> s = activation_scale_shape(spec, M, H);
  return s.size() == 1 ? test::sentinel_tensor(spec.scale_dtype, {s[0]})
                       : test::sentinel_tensor(spec.scale_dtype, {s[0], s[1]});
}

// fp32 [1, n] of `values`.
Tensor row_of(const std::vector<float>& values) {
  Tensor t(DType::kF32, {1, int64_t(values.size())});
  std::memcpy(t.data<float>(), values.data(), values.size() * sizeof(float));
  return t;
}

// q = quantize_activations(x) under a static scale s, per-tensor.
Tensor quantize_static(const TensorView& x, DType code, float s) {
  Tensor st(DType::kF32, {1});
  *st.data<float>() = s;
  ActivationSpec spec = act_spec(code, ScaleKind::kTensor);
  spec.static_scale = st;
  Tensor q(code, {x.size(0), x.size(1)}), scale(DType::kF32, {1});
  quantize_activations(x, spec, q, scale);
  EXPECT_EQ(*scale.data<float>(), s) << "the static scale is copied";
  return q;
}

// Every code's value, the midpoints between neighbours and their fp32 neighbours (the rounding
// edges and ties), beyond the largest code, zeros, infinities, NaN, and random bit patterns.
std::vector<float> edge_values(MiniFloat f, int random_count) {
  const int codes = f == MiniFloat::kE2M1 ? 8 : 0x7F;
  std::vector<float> v;
  for (int c = 0; c + 1 < codes; ++c) {
    const float lo = decode(f, uint8_t(c)), hi = decode(f, uint8_t(c + 1));
    if (std::isnan(hi) || std::isinf(hi)) break;
    const float mid = (lo + hi) / 2;  // exact: a few significant bits
    for (float x : {lo, mid, std::nextafter(mid, 0.0f), std::nextafter(mid, kInf)})
      v.insert(v.end(), {x, -x});
  }
  const float top = traits(f).max_finite;
  v.insert(v.end(), {top, std::nextafter(top, kInf), top * 1.5f, 1e30f, kInf, -kInf, -top * 9,
                     -0.0f, 1e-40f, -1e-45f, NAN, -NAN});
  std::mt19937 rng(7);
  while (int(v.size()) < random_count) {
    const uint32_t u = rng();
    float x;
    std::memcpy(&x, &u, 4);
    if (std::isfinite(x)) v.push_back(x);
  }
  return v;
}

}  // namespace
}  // namespace moekit
