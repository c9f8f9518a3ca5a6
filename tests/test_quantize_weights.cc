// Weight quantizers (quant/quantize.h): scales, zero points and globals against the formulas of
// quant/format.h for every scheme on ragged shapes, codes against the reference encoders, the
// quantize -> dequantize error within a bound derived per code, NaN and infinities, zero groups
// and experts, exact round trips on the grid, zero points, and bad input.
#include "quant_reference.h"

namespace moekit {
namespace {

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
