// Quantizers (quant/quantize.h): codes bit for bit against the scalar encoders of
// quant/encodings.h, scales against their documented formulas, quantize -> dequantize error
// within a bound derived per code, exact round trips on the grid, ties, saturation, NaN and
// infinities, zero and ragged groups, zero points, static and ue8m0 scales, and bad input.
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

// ---- element codes ------------------------------------------------------------------------

// The quantizers' fast fp8 encoding is bit-identical to encode(): a static scale of 1 makes
// the codes those of the values themselves.
TEST(QuantizeCodes, Fp8MatchesScalarEncoderAtEveryEdge) {
  for (auto [dtype, f] :
       {std::pair{DType::kF8E4M3, MiniFloat::kE4M3}, std::pair{DType::kF8E5M2, MiniFloat::kE5M2}}) {
    const Tensor x = row_of(edge_values(f, 200000));
    const Tensor q = quantize_static(x, dtype, 1.0f);
    for (int64_t i = 0; i < x.numel(); ++i)
      ASSERT_EQ(q.data<uint8_t>()[i], encode(f, x.data<float>()[i]))
          << name(dtype) << " of " << x.data<float>()[i];
  }
}

// e2m1 through mxfp4: every 32-group holds a 6, so its ue8m0 scale is 2^0 (6 / 6 rounded up).
TEST(QuantizeCodes, Fp4MatchesScalarEncoderAtEveryEdge) {
  std::vector<float> values;
  for (float x : edge_values(MiniFloat::kE2M1, 0))
    if (!std::isnan(x) && !(std::fabs(x) > 6 && std::isfinite(x))) values.push_back(x);
  const int64_t groups = int64_t(values.size() + 30) / 31, K = groups * 32;
  Tensor w = Tensor::zeros(DType::kF32, {1, 1, K});
  for (size_t i = 0; i < values.size(); ++i)
    w.data<float>()[(i / 31) * 32 + 1 + i % 31] = values[i];
  for (int64_t g = 0; g < groups; ++g) w.data<float>()[g * 32] = 6;
  const QuantizedWeight q = quantize_weight(w, QuantScheme::parse("mxfp4"));
  for (int64_t g = 0; g < groups; ++g) ASSERT_EQ(q.scale.data<uint8_t>()[g], 127) << g;
  for (int64_t i = 0; i < K; ++i)
    ASSERT_EQ(uint8_t(q.data.data<uint8_t>()[i / 2] >> (4 * (i % 2)) & 0xF),
              encode(MiniFloat::kE2M1, w.data<float>()[i]))
        << w.data<float>()[i];
}

TEST(QuantizeCodes, IntegersRoundTiesToEvenAndSaturateSymmetrically) {
  const Tensor x = row_of({0.5f, 1.5f, 2.5f, -0.5f, -1.5f, -2.5f, 126.5f, 127.5f, 300, -300, kInf,
                           -kInf, NAN, 0.49999997f});
  const Tensor q = quantize_static(x, DType::kI8, 1.0f);
  const std::vector<int> want = {0, 2, 2, 0, -2, -2, 126, 127, 127, -127, 127, -127, 0, 0};
  for (size_t i = 0; i < want.size(); ++i)
    EXPECT_EQ(int(q.data<int8_t>()[i]), want[i]) << x.data<float>()[i];

  // int4 weights: the group's 7 makes the bf16 scale exactly 1 (7 / 7).
  Tensor w = Tensor::zeros(DType::kF32, {1, 1, 10});
  const float wv[] = {7, 0.5f, 1.5f, 2.5f, -0.5f, -2.5f, -3.5f, kInf, -kInf, NAN};
  std::memcpy(w.data<float>(), wv, sizeof wv);
  const QuantizedWeight qw = quantize_weight(w, QuantScheme::parse("w4a16:ch"));
  EXPECT_EQ(at(qw.scale, 0), 1.0f);
  const int want4[] = {7, 0, 2, 2, 0, -2, -4, 7, -7, 0};
  for (int i = 0; i < 10; ++i) EXPECT_EQ(at(qw.data, i), want4[i]) << wv[i];
}

// ---- activations --------------------------------------------------------------------------

struct ActCase {
  DType dtype;
  ScaleKind kind;
  int64_t group;
  DType scale_dtype;
};

// x [M, H] with H ragged over the block group, a zero row, values spanning 2^-12..2^4.
Tensor activation_input(int64_t M, int64_t H, DType dtype) {
  Tensor x = test::random_tensor(DType::kF32, {M, H}, 11, -1.0, 1.0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t h = 0; h < H; ++h) {
      float& v = x.data<float>()[m * H + h];
      v = m == 3 ? 0.0f : std::ldexp(v, int((m * 7 + h) % 17) - 12);
    }
  if (dtype == DType::kF32) return x;
  Tensor y(dtype, {M, H});
  for (int64_t i = 0; i < x.numel(); ++i)
    store_from_float(y.data<void>(), dtype, i, x.data<float>()[i]);
  return y;
}

// Dynamic scales equal amax / largest code over each row or group (ue8m0: rounded up, zero
// groups: 1); codes equal the reference encoding of x / scale; dequantizing gives decode(q) *
// scale exactly and stays within error_bound of x.
TEST(QuantizeActivations, DynamicScalesCodesAndErrorBound) {
  const int64_t M = 7, H = 200;
  const ActCase cases[] = {
      {DType::kF8E4M3, ScaleKind::kTensor, 0, DType::kF32},
      {DType::kF8E4M3, ScaleKind::kToken, 0, DType::kF32},
      {DType::kF8E4M3, ScaleKind::kBlock, 128, DType::kF32},
      {DType::kF8E4M3, ScaleKind::kBlock, 64, DType::kUE8M0},
      {DType::kF8E5M2, ScaleKind::kBlock, 32, DType::kF32},
      {DType::kI8, ScaleKind::kToken, 0, DType::kF32},
      {DType::kI8, ScaleKind::kTensor, 0, DType::kF32},
  };
  for (DType xt : {DType::kBF16, DType::kF32, DType::kF16})
    for (const ActCase& c : cases) {
      SCOPED_TRACE(std::string(name(c.dtype)) + " " + std::string(name(c.kind)) + " g" +
                   std::to_string(c.group) + " " + std::string(name(c.scale_dtype)) + " x " +
                   std::string(name(xt)));
      const Tensor x = activation_input(M, H, xt);
      const ActivationSpec spec = act_spec(c.dtype, c.kind, c.group, c.scale_dtype);
      Tensor q(c.dtype, {M, H});
      Tensor scale = scale_tensor(spec, M, H);
      quantize_activations(x, spec, q, scale);
      Tensor out(DType::kF32, {M, H});
      dequantize_activations(q, {c.kind, c.group, scale}, out);

      const int64_t g = c.kind == ScaleKind::kBlock ? c.group : H;
      const int64_t groups = (H + g - 1) / g;
      float tensor_amax = 0;
      for (int64_t i = 0; i < M * H; ++i) tensor_amax = std::max(tensor_amax, std::fabs(at(x, i)));
      EXPECT_EQ(activation_amax(x), tensor_amax);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t j = 0; j < groups; ++j) {
          float amax = 0;
          for (int64_t h = j * g; h < std::min(H, (j + 1) * g); ++h)
            amax = std::max(amax, std::fabs(at(x, m * H + h)));
          if (c.kind == ScaleKind::kTensor) amax = tensor_amax;
          const int64_t si = c.kind == ScaleKind::kTensor ? 0 : m * groups + j;
          const float s = at(scale, si);
          ASSERT_EQ(s, stored_scale(c.scale_dtype, amax / largest_code(c.dtype))) << m << "," << j;
          if (m == 3 && c.kind != ScaleKind::kTensor) {
            ASSERT_EQ(s, 1.0f) << "zero row";
          }
          for (int64_t h = j * g; h < std::min(H, (j + 1) * g); ++h) {
            const float xv = at(x, m * H + h), qv = at(q, m * H + h);
            ASSERT_EQ(qv, reference_code(c.dtype, xv / s)) << m << "," << h;
            ASSERT_EQ(at(out, m * H + h), qv * s);
            ASSERT_LE(std::fabs(at(out, m * H + h) - xv), error_bound(c.dtype, xv, s))
                << m << "," << h;
          }
        }
      if (c.kind == ScaleKind::kTensor) {
        EXPECT_EQ(at(scale, 0), tensor_scale_of_amax(activation_amax(x), c.dtype));
      }
    }
}

TEST(QuantizeActivations, Ue8m0BlockScalesArePowersOfTwoThatNeverSaturate) {
  const int64_t M = 5, H = 300;
  const Tensor x = activation_input(M, H, DType::kF32);
  const ActivationSpec spec = act_spec(DType::kF8E4M3, ScaleKind::kBlock, 128, DType::kUE8M0);
  Tensor q(DType::kF8E4M3, {M, H}), scale = scale_tensor(spec, M, H);
  quantize_activations(x, spec, q, scale);
  for (int64_t i = 0; i < scale.numel(); ++i) {
    int e;
    EXPECT_EQ(std::frexp(at(scale, i), &e), 0.5f) << "a power of two";
  }
  for (int64_t i = 0; i < M * H; ++i) {
    const float s = at(scale, (i / H) * 3 + (i % H) / 128);
    EXPECT_LT(std::fabs(at(x, i)) / s, 448.0f * 1.0001f) << "no value beyond the largest code";
    EXPECT_LE(std::fabs(at(x, i)) / s, 2 * 448.0f);
  }
  // The smallest such power: half of it would make some value of the group saturate.
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < 3; ++j) {
      float amax = 0;
      for (int64_t h = j * 128; h < std::min<int64_t>(H, (j + 1) * 128); ++h)
        amax = std::max(amax, std::fabs(at(x, m * H + h)));
      if (amax > 0) {
        EXPECT_GT(amax / (at(scale, m * 3 + j) / 2), 448.0f);
      }
    }
}

TEST(QuantizeActivations, StaticScaleSaturatesAndIsCopied) {
  const float s = 0.03125f;
  const Tensor x = row_of({1.0f, -3.0f, 448 * s, 1000.0f, -kInf, NAN, 0.0f, 1e-6f});
  for (DType code : {DType::kF8E4M3, DType::kI8}) {
    const Tensor q = quantize_static(x, code, s);
    for (int64_t i = 0; i < x.numel(); ++i) {
      const float want = reference_code(code, x.data<float>()[i] / s);
      if (std::isnan(want))
        EXPECT_TRUE(std::isnan(at(q, i))) << "NaN stays NaN in fp8";
      else
        EXPECT_EQ(at(q, i), want) << name(code) << " of " << x.data<float>()[i];
    }
    EXPECT_EQ(at(q, 3), largest_code(code)) << "1000 / s saturates";
    EXPECT_EQ(at(q, 4), -largest_code(code)) << "-inf saturates";
  }
}

TEST(QuantizeActivations, NanAndInfinityInDynamicScales) {
  // amax ignores NaN and +-inf: the scale comes from the finite values, inf saturates, NaN stays
  // NaN in fp8 and becomes 0 in int8.
  const Tensor x = row_of({2.0f, -kInf, NAN, -4.0f, kInf});
  EXPECT_EQ(activation_amax(x), 4.0f);
  for (DType code : {DType::kF8E4M3, DType::kI8}) {
    const ActivationSpec spec = act_spec(code, ScaleKind::kToken);
    Tensor q(code, {1, 5}), scale(DType::kF32, {1});
    quantize_activations(x, spec, q, scale);
    EXPECT_EQ(at(scale, 0), 4.0f / largest_code(code));
    EXPECT_EQ(at(q, 1), -largest_code(code));
    EXPECT_EQ(at(q, 4), largest_code(code));
    EXPECT_EQ(at(q, 3), -largest_code(code));
    if (code == DType::kI8)
      EXPECT_EQ(at(q, 2), 0.0f);
    else
      EXPECT_TRUE(std::isnan(at(q, 2)));
  }
}

TEST(QuantizeActivations, EmptyZeroAndStridedInputs) {
  // No rows: a dynamic per-tensor scale of 1; a zero matrix: scale 1 and zero codes.
  for (int64_t M : {0, 4}) {
    const Tensor x = Tensor::zeros(DType::kBF16, {M, 6});
    Tensor q(DType::kF8E4M3, {M, 6}), scale(DType::kF32, {1});
    quantize_activations(x, act_spec(DType::kF8E4M3, ScaleKind::kTensor), q, scale);
    EXPECT_EQ(at(scale, 0), 1.0f);
    for (int64_t i = 0; i < q.numel(); ++i) EXPECT_EQ(q.data<uint8_t>()[i], 0);
  }
  // Rows with a stride give the codes of their contiguous copy.
  const Tensor x = activation_input(5, 40, DType::kBF16);
  const test::Strided xs = test::strided_copy(x, 3);
  Tensor q0(DType::kI8, {5, 40}), s0(DType::kF32, {5});
  const test::Strided q1 = test::strided_copy(q0, 5);
  Tensor s1(DType::kF32, {5});
  const ActivationSpec spec = act_spec(DType::kI8, ScaleKind::kToken);
  quantize_activations(x, spec, q0, s0);
  quantize_activations(xs.view, spec, q1.view, s1);
  EXPECT_EQ(std::memcmp(s1.data<float>(), s0.data<float>(), 5 * sizeof(float)), 0);
  for (int64_t m = 0; m < 5; ++m)
    EXPECT_EQ(std::memcmp(q1.view.row<int8_t>(m), q0.data<int8_t>() + m * 40, 40), 0) << m;
}

TEST(QuantizeActivations, FloatSpecConvertsAndDequantizesBack) {
  const Tensor x = activation_input(3, 10, DType::kF32);
  Tensor q(DType::kBF16, {3, 10}), out(DType::kF32, {3, 10});
  quantize_activations(x, act_spec(DType::kBF16, ScaleKind::kNone), q, {});
  dequantize_activations(q, {}, out);
  for (int64_t i = 0; i < x.numel(); ++i) {
    EXPECT_EQ(q.data<uint16_t>()[i], float_to_bf16(at(x, i)));
    EXPECT_EQ(at(out, i), at(q, i));
  }
}

TEST(QuantizeActivations, BadInputThrowsAndWritesNothing) {
  const Tensor x = activation_input(4, 64, DType::kBF16), xf = activation_input(4, 64, DType::kF32);
  const ActivationSpec token = act_spec(DType::kF8E4M3, ScaleKind::kToken);
  const Tensor q = test::sentinel_tensor(DType::kF8E4M3, {4, 64});
  const Tensor scale = test::sentinel_tensor(DType::kF32, {4});
  const Tensor one = test::sentinel_tensor(DType::kF32, {1});
  const Tensor i8q = test::sentinel_tensor(DType::kI8, {4, 64});
  const Tensor u8q = test::sentinel_tensor(DType::kU8, {4, 64});
  const Tensor short_q = test::sentinel_tensor(DType::kF8E4M3, {4, 63});
  const Tensor short_scale = test::sentinel_tensor(DType::kF32, {3});
  const Tensor bf16_scale = test::sentinel_tensor(DType::kBF16, {4});
  const Tensor ints = test::sentinel_tensor(DType::kI32, {4, 64});
  Tensor neg(DType::kF32, {1});
  *neg.data<float>() = -1;
  ActivationSpec static_token = token, static_neg = act_spec(DType::kF8E4M3, ScaleKind::kTensor);
  static_token.static_scale = static_neg.static_scale = neg;
  const TensorView q_on_x(xf.data<void>(), DType::kF8E4M3, {4, 64});
  const struct {
    TensorView x;
    ActivationSpec spec;
    TensorView q, scale;
    const char* needle;
  } cases[] = {
      {x, token, i8q, scale, "dtype"},
      {x, token, short_q, scale, "q: expected shape [4, 64]"},
      {x, token, q, short_scale, "scale: expected shape [4]"},
      {x, token, q, bf16_scale, "scale"},
      {ints, act_spec(DType::kI32, ScaleKind::kToken), ints, scale, "x must be"},
      {q, token, q, scale, "x must be"},
      {x, act_spec(DType::kF8E4M3, ScaleKind::kToken, 0, DType::kUE8M0), q, scale, "fp32"},
      {x, act_spec(DType::kF8E4M3, ScaleKind::kBlock, 0), q, scale, "group > 0"},
      {x, static_token, q, scale, "per-tensor"},
      {x, static_neg, q, one, "positive"},
      {x, act_spec(DType::kF8E4M3, ScaleKind::kNone), q, scale, "scale kind"},
      {x, act_spec(DType::kU8, ScaleKind::kToken), u8q, scale, "not supported"},
      {xf, token, q_on_x, scale, "overlaps"},
  };
  for (const auto& c : cases) {
    const test::Snapshot q_before(c.q), scale_before(c.scale);
    EXPECT_TRUE(
        test::error_mentions([&] { quantize_activations(c.x, c.spec, c.q, c.scale); }, c.needle));
    EXPECT_TRUE(q_before.unchanged()) << c.needle;
    EXPECT_TRUE(scale_before.unchanged()) << c.needle;
  }

  const Tensor out = test::sentinel_tensor(DType::kF32, {4, 64});
  const struct {
    TensorView q;
    ActivationScale scale;
    TensorView out;
    const char* needle;
  } dequantize_cases[] = {
      {q, {ScaleKind::kToken, 0, short_scale}, out, "scale: expected shape [4]"},
      {q, {ScaleKind::kBlock, 32, scale}, out, "scale: expected shape [4, 2]"},
      {q, {ScaleKind::kToken, 0, bf16_scale}, out, "fp32"},
      {q, {}, out, "need a scale"},
      {q, {ScaleKind::kToken, 0, scale}, i8q, "out must be"},
  };
  for (const auto& c : dequantize_cases) {
    const test::Snapshot out_before(c.out);
    EXPECT_TRUE(
        test::error_mentions([&] { dequantize_activations(c.q, c.scale, c.out); }, c.needle));
    EXPECT_TRUE(out_before.unchanged()) << c.needle;
  }
  EXPECT_TRUE(
      test::error_mentions([] { tensor_scale_of_amax(1.0f, DType::kBF16); }, "not a quantized"));
  EXPECT_TRUE(test::error_mentions(
      [] { activation_scale_shape(act_spec(DType::kI8, ScaleKind::kBlock), 2, 8); }, "group"));
}

// ---- weights ------------------------------------------------------------------------------

// The scale grid of quant/format.h, written from its comment: a scale covers `rows` x `cols`
// elements of one expert's [R, K]; `shape` is the scale tensor's.
struct Layout {
  int64_t rows, cols, nr, nc;
  std::vector<int64_t> shape;
  int64_t index(int64_t e, int64_t r, int64_t k) const {  // flat scale index of element (r, k)
    return (e * nr + r / rows) * nc + k / cols;
  }
};

Layout layout_of(const QuantScheme& q, int64_t n, int64_t R, int64_t K) {
  const auto up = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  const int64_t B = q.traits().block;
  switch (q.traits().scale_layout) {
    case WeightScaleLayout::kTensor:
      return {R, K, 1, 1, {n}};
    case WeightScaleLayout::kChannel:
      return {1, K, R, 1, {n, R}};
    case WeightScaleLayout::kBlock:
      return {B, B, up(R, B), up(K, B), {n, up(R, B), up(K, B)}};
    default: {
      const int64_t g = q.group < 0 ? K : q.group > 0 ? q.group : B;
      return {1, g, R, up(K, g), {n, R, up(K, g)}};
    }
  }
}

// The largest |q * scale| of a format with a global scale (quant/quantize.h).
float global_target(const QuantScheme& q) {
  return q.format == Format::kNVFP4 ? 6.0f * 448.0f : 448.0f;
}

std::vector<int64_t> shape_of(const TensorView& t) {
  return std::vector<int64_t>(t.shape.begin(), t.shape.begin() + t.ndim);
}

// Everything quantize_weight promises about q of w [n, R, K]: shapes and dtypes, the scale,
// zero point and global of every cell from their formulas, codes equal to the reference
// encoding of w / (scale * global) (+ zero), dequantize_weight_row equal to (q - zero) *
// scale * global, and every value within error_bound; *worst: the largest error / bound.
void check_quantized(const TensorView& w, const QuantScheme& q, const QuantizedWeight& out,
                     double* worst = nullptr) {
  const int64_t n = w.size(0), R = w.size(1), K = w.size(2);
  const Layout L = layout_of(q, n, R, K);
  const DType wt = q.weight_dtype();
  EXPECT_EQ(shape_of(out.data), (std::vector<int64_t>{n, R, K}));
  EXPECT_EQ(out.data.dtype(), wt);
  EXPECT_EQ(shape_of(out.scale), L.shape);
  EXPECT_EQ(out.scale.dtype(), q.scale_dtype());
  EXPECT_EQ(out.zero.view().present(), q.zero_point);
  if (q.zero_point) {
    EXPECT_EQ(shape_of(out.zero), (std::vector<int64_t>{n, R, L.nc}));
  }
  EXPECT_EQ(out.global.view().present(), q.traits().global_scale);
  const bool global = q.traits().global_scale;
  const float top = largest_code(wt);

  // Statistics of every cell over the finite values: amax, min, max, NaN seen.
  const int64_t cells = n * L.nr * L.nc;
  std::vector<float> amax(cells, 0), lo(cells, 0), hi(cells, 0), expert_amax(n, 0);
  std::vector<bool> nan(cells, false);
  for (int64_t e = 0; e < n; ++e)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t k = 0; k < K; ++k) {
        const float x = at(w, (e * R + r) * K + k);
        const int64_t c = L.index(e, r, k);
        if (std::isnan(x)) nan[c] = true;
        if (!std::isfinite(x)) continue;
        amax[c] = std::max(amax[c], std::fabs(x));
        lo[c] = std::min(lo[c], x);
        hi[c] = std::max(hi[c], x);
        expert_amax[e] = std::max(expert_amax[e], std::fabs(x));
      }

  std::vector<float> row(K);
  for (int64_t e = 0; e < n; ++e) {
    const float g = global ? stored_scale(DType::kF32, expert_amax[e] / global_target(q)) : 1;
    if (global) {
      EXPECT_EQ(at(out.global, e), g) << "global of expert " << e;
    }
    for (int64_t r = 0; r < R; ++r) {
      dequantize_weight_row(out.data, out.scales(), q, e, r, row.data());
      for (int64_t k = 0; k < K; ++k) {
        const int64_t c = L.index(e, r, k), i = (e * R + r) * K + k;
        float want_s;
        int z = 0;
        if (q.zero_point) {
          want_s = stored_scale(q.scale_dtype(), (hi[c] - lo[c]) / top, /*round_up=*/true);
          z = int(std::nearbyint(-lo[c] / want_s));
          EXPECT_EQ(at(out.zero, c), z) << "zero of cell " << c;
        } else {
          const bool nan_scale = wt == DType::kF4E2M1 && nan[c];
          want_s = stored_scale(q.scale_dtype(), nan_scale ? NAN : amax[c] / top / g);
        }
        const float s = at(out.scale, c), x = at(w, i), code = at(out.data, i);
        if (std::isnan(want_s)) {
          ASSERT_TRUE(std::isnan(s)) << "a NaN in an e2m1 group makes its scale NaN";
          ASSERT_TRUE(std::isnan(row[k]));
          continue;
        }
        ASSERT_EQ(s, want_s) << "scale of cell " << c;
        const float S = s * g, want_code = reference_code(wt, x / S, z);
        if (std::isnan(want_code)) {
          ASSERT_TRUE(std::isnan(code) && std::isnan(row[k])) << "NaN stays NaN in fp8";
          continue;
        }
        ASSERT_EQ(code, want_code) << "code of " << x << " at " << e << "," << r << "," << k;
        ASSERT_EQ(row[k], (code - float(z)) * s * g) << "dequantize_weight_row formula";
        if (!std::isfinite(x)) continue;
        const double bound = error_bound(wt, x, S, z);
        ASSERT_LE(std::fabs(row[k] - x), bound) << x << " at " << e << "," << r << "," << k;
        if (worst) *worst = std::max(*worst, std::fabs(row[k] - x) / bound);
        // Only e4m3 group scales (nvfp4), rounded to nearest with 4 bits, let values reach
        // beyond the codes by more than rounding.
        if (q.scale_dtype() != DType::kF8E4M3) {
          ASSERT_LE(x / S, code_hi(wt, z) + 0.5 + 1e-5) << "saturated: " << x;
        }
      }
    }
  }
}

const char* const kSchemes[] = {
    "fp8-tensor", "fp8-token",   "fp8-block", "fp8-block:ue8m0", "int8",
    "w4a16",      "w4a16:g32",   "w4a16:ch",  "w4a16:zp",        "w4a16:g64:zp",
    "w8a16:g32",  "w8a16:ch:zp", "w4a8",      "mxfp4",           "nvfp4",
};

class QuantizeWeight : public ::testing::TestWithParam<const char*> {};

// Random bf16 weights [3, 130, 200] (R and K ragged over every group and block) whose experts
// and rows span magnitudes 2^-9..2^8, with an all-zero row.
TEST_P(QuantizeWeight, ScalesCodesAndErrorBound) {
  const QuantScheme q = QuantScheme::parse(GetParam());
  const int64_t n = 3, R = 130, K = 200;
  Tensor w = test::random_tensor(DType::kF32, {n, R, K}, 5, -1.0, 1.0);
  Tensor wb(DType::kBF16, {n, R, K});
  for (int64_t i = 0; i < w.numel(); ++i) {
    const int64_t e = i / (R * K), r = i / K % R;
    const float v = r == 7 ? 0.0f : std::ldexp(w.data<float>()[i], int(e * 3 + r % 5) - 9);
    wb.data<uint16_t>()[i] = float_to_bf16(v);
  }
  const QuantizedWeight out = quantize_weight(wb, q);
  EXPECT_EQ(out.scheme, q);
  double worst = 0;
  check_quantized(wb, q, out, &worst);
  EXPECT_GT(worst, 0.2) << "the bound is not loose by orders of magnitude";
}

// NaN and infinities in weights: +-inf saturate, NaN is NaN in fp8, 0 in integers (the zero
// point with one) and makes an e2m1 group's scale NaN (check_quantized tells each apart).
TEST_P(QuantizeWeight, NanAndInfinity) {
  const QuantScheme q = QuantScheme::parse(GetParam());
  Tensor w = test::random_tensor(DType::kF32, {2, 4, 64}, 9, -2.0, 2.0);
  for (int64_t i : {40, 70, 300}) w.data<float>()[i] = NAN;  // not in element 5's e2m1 group
  w.data<float>()[5] = kInf;
  w.data<float>()[200] = -kInf;
  const QuantizedWeight out = quantize_weight(w, q);
  check_quantized(w, q, out);
  EXPECT_EQ(at(out.data, 5), largest_code(q.weight_dtype())) << "+inf saturates";
}

// All-zero groups and experts: scale 1 (ue8m0 2^0, e4m3 1.0), global 1, codes of 0.
TEST_P(QuantizeWeight, ZeroGroupsAndExperts) {
  const QuantScheme q = QuantScheme::parse(GetParam());
  Tensor w = test::random_tensor(DType::kF32, {2, 3, 160}, 3);
  for (int64_t k = 0; k < 160; ++k) w.data<float>()[160 + k] = 0;  // expert 0, row 1
  for (int64_t i = 480; i < 960; ++i) w.data<float>()[i] = 0;      // expert 1
  const QuantizedWeight out = quantize_weight(w, q);
  check_quantized(w, q, out);
  const Layout L = layout_of(q, 2, 3, 160);
  for (int64_t c = L.index(1, 0, 0); c < out.scale.numel(); ++c) EXPECT_EQ(at(out.scale, c), 1.0f);
  if (q.traits().global_scale) {
    EXPECT_EQ(at(out.global, 1), 1.0f);
  }
  std::vector<float> row(160);
  dequantize_weight_row(out.data, out.scales(), q, 1, 2, row.data());
  for (float v : row) EXPECT_EQ(v, 0.0f);
}

// Values already on the grid of their scales survive exactly: each cell holds its largest code
// (and, with a zero point, its smallest), so the dynamic scale is exactly the one chosen.
TEST_P(QuantizeWeight, ValuesOnTheGridRoundTripExactly) {
  const QuantScheme q = QuantScheme::parse(GetParam());
  const int64_t n = 2, R = 130, K = 200;
  const Layout L = layout_of(q, n, R, K);
  const DType wt = q.weight_dtype();
  const bool global = q.traits().global_scale;
  const float top = largest_code(wt), G = global ? 0x1p-4f : 1.0f;
  std::mt19937 rng(3);
  // A code value drawn from the grid (all codes of 4-bit types, bytes of fp8 and int8).
  auto random_code = [&] {
    for (;;) {
      const uint8_t b = uint8_t(rng() & (is_packed(wt) ? 0xF : 0xFF));
      const float v = load_as_float(&b, wt, 0);
      if (std::isfinite(v) && (!is_int_code(wt) || std::fabs(v) <= top)) return v;
    }
  };
  Tensor w(DType::kF32, {n, R, K});
  const int z0 = 5;  // zero point of every cell (unsigned codes)
  for (int64_t e = 0; e < n; ++e)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t k = 0; k < K; ++k) {
        const int64_t c = L.index(e, r, k) - L.index(e, 0, 0);
        // Cell scales 2^-(c % 5); with a global, cell 0 takes the largest (target / top), so
        // that the expert's amax is target * G.
        const float s = global && c == 0 ? global_target(q) / top : std::ldexp(1.0f, -int(c % 5));
        const bool first = r % L.rows == 0 && k % L.cols == 0,
                   second = k % L.cols == 1 && r % L.rows == 0;
        float code = first ? top : random_code();
        if (q.zero_point) code = (first ? 0.0f : second ? top : code) - float(z0);
        w.data<float>()[(e * R + r) * K + k] = code * s * G;
      }
  const QuantizedWeight out = quantize_weight(w, q);
  check_quantized(w, q, out);
  std::vector<float> row(K);
  for (int64_t e = 0; e < n; ++e)
    for (int64_t r = 0; r < R; ++r) {
      dequantize_weight_row(out.data, out.scales(), q, e, r, row.data());
      ASSERT_EQ(std::memcmp(row.data(), w.data<float>() + (e * R + r) * K, K * sizeof(float)), 0)
          << "row " << e << "," << r;
    }
}

INSTANTIATE_TEST_SUITE_P(Formats, QuantizeWeight, ::testing::ValuesIn(kSchemes),
                         [](const auto& info) { return test::test_name(info.param); });

TEST(QuantizeWeights, ZeroPointUsesTheWholeRange) {
  // One group in [-1, 3]: scale 4/15 (bf16, rounded up), zero round(1 / scale) = 4; -1 and 3 are
  // codes 0 and 15 with values within scale / 2.
  Tensor w(DType::kF32, {1, 1, 32});
  for (int k = 0; k < 32; ++k) w.data<float>()[k] = -1.0f + 4.0f * float(k) / 31.0f;
  const QuantScheme q = QuantScheme::parse("w4a16:g32:zp");
  const QuantizedWeight out = quantize_weight(w, q);
  const float s = at(out.scale, 0);
  EXPECT_GE(s * 15, 4.0f);
  EXPECT_EQ(s, bf16_to_float(float_to_bf16(s)));
  EXPECT_EQ(at(out.zero, 0), 4);
  EXPECT_EQ(at(out.data, 0), 0);
  EXPECT_EQ(at(out.data, 31), 15);
  check_quantized(w, q, out);
}

TEST(QuantizeWeights, ExpertWeightsViewValidates) {
  const int64_t E = 4, H = 64, I = 32;
  Tensor w13 = test::random_tensor(DType::kBF16, {E, 2 * I, H}, 1);
  Tensor w2 = test::random_tensor(DType::kBF16, {E, H, I}, 2);
  Tensor b13 = test::random_tensor(DType::kBF16, {E, 2 * I}, 3);
  ExpertWeights w;
  w.w13 = w13, w.w2 = w2, w.b13 = b13;
  const Activation act = parse_activation("silu");
  for (const char* f : {"w4a16:g32:zp", "nvfp4", "fp8-block:ue8m0", "int8"}) {
    const QuantScheme q = QuantScheme::parse(f);
    const QuantizedExpertWeights qw = quantize_expert_weights(w, q);
    const ExpertWeights v = qw.view();
    EXPECT_EQ(validate_weights(v, act).value_or("valid"), "valid") << f;
    EXPECT_EQ(v.quant, q);
    EXPECT_EQ(v.b13.data, b13.data<void>()) << "biases stay the source's float views";
    EXPECT_FALSE(v.b2.present());
    EXPECT_EQ(v.w2.data, qw.w2.data.data<void>());
    EXPECT_EQ(v.s13.scale.data, qw.w13.scale.data<void>());
  }
  ExpertWeights local = w;
  local.source = std::vector<int32_t>{1, 2};
  const QuantScheme q = QuantScheme::parse("int8");
  EXPECT_TRUE(test::error_mentions([&] { quantize_expert_weights(local, q); }, "source table"));
  const QuantizedExpertWeights qw = quantize_expert_weights(w, q);
  EXPECT_TRUE(test::error_mentions([&] { quantize_expert_weights(qw.view(), q); }, "already"));
  const Tensor w2_bad_h = test::random_tensor(DType::kBF16, {E, H + 1, I}, 2);
  ExpertWeights bad = w;
  bad.w2 = w2_bad_h;
  EXPECT_TRUE(test::error_mentions([&] { quantize_expert_weights(bad, q); }, "are not"));
}

TEST(QuantizeWeights, BadInputThrows) {
  const Tensor w = test::random_tensor(DType::kBF16, {2, 4, 64}, 1);
  const Tensor odd = test::random_tensor(DType::kBF16, {2, 4, 63}, 1);
  const Tensor flat = test::random_tensor(DType::kBF16, {4, 64}, 1);
  const Tensor ints = Tensor::zeros(DType::kI8, {2, 4, 64});
  const Tensor empty(DType::kBF16, {0, 4, 64});
  QuantScheme g48 = QuantScheme::parse("w4a16");
  g48.group = 48;
  const QuantScheme i8 = QuantScheme::parse("int8");
  const struct {
    TensorView w;
    QuantScheme scheme;
    const char* needle;
  } cases[] = {
      {w, QuantScheme::parse("bf16"), "float format"},
      {w, g48, "must be 32, 64, 128"},
      {flat, i8, "3 dimensions"},
      {ints, i8, "fp32/fp16/bf16"},
      {odd, QuantScheme::parse("mxfp4"), "even"},
      {empty, i8, "empty"},
  };
  for (const auto& c : cases)
    EXPECT_TRUE(test::error_mentions([&] { quantize_weight(c.w, c.scheme); }, c.needle));
  EXPECT_NO_THROW(quantize_weight(odd, QuantScheme::parse("fp8-block")));  // bytes: any K

  const QuantScheme zp = QuantScheme::parse("w4a16:zp");
  const QuantizedWeight q = quantize_weight(w, zp);
  WeightScales no_zero = q.scales(), extra_global = q.scales(), short_scale = q.scales();
  no_zero.zero = {};
  extra_global.global = q.scale;
  short_scale.scale.shape[1] = 3;
  const struct {
    TensorView data;
    WeightScales scales;
    QuantScheme scheme;
    int64_t e, r;
    const char* needle;
  } rows[] = {
      {q.data, q.scales(), zp, 2, 0, "is not in"},
      {q.data, q.scales(), zp, 0, 4, "is not in"},
      {q.data, no_zero, zp, 0, 0, "zero missing"},
      {q.data, extra_global, zp, 0, 0, "global given"},
      {q.data, short_scale, zp, 0, 0, "scale: expected shape [2, 4, 1]"},
      {q.data, q.scales(), QuantScheme::parse("nvfp4"), 0, 0, "data: expected dtype fp4_e2m1"},
      {w, q.scales(), QuantScheme::parse("bf16"), 0, 0, "float format"},
  };
  std::vector<float> out(64, 7.0f);
  for (const auto& c : rows)
    EXPECT_TRUE(test::error_mentions(
        [&] { dequantize_weight_row(c.data, c.scales, c.scheme, c.e, c.r, out.data()); },
        c.needle));
  for (float v : out) EXPECT_EQ(v, 7.0f) << "out untouched";
}

}  // namespace
}  // namespace moekit
