// Quantizers (quant/quantize.h), codes and activations: codes bit for bit against the scalar
// encoders of quant/encodings.h, activation scales against their documented formulas, errors
// within a bound derived per code, ties, saturation, NaN and infinities, static and ue8m0
// scales, and bad input. Weights: test_quantize_weights.cc.
#include "quant_reference.h"

namespace moekit {
namespace {

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

}  // namespace
}  // namespace moekit
