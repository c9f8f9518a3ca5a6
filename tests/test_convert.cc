// Checkpoint importers (moekit/quant/convert.h): each convention's tensors are built here from
// known codes and scales with a packing written out independently of the library, converted,
// and every element of the result (read back with load_as_float and format.h's formula) must
// equal the checkpoint's own dequantized value exactly. Also: GPTQ act-order on down_proj
// (absorbed by one consistent reordering of I) and on gate/up (refused), the AWQ nibble order
// against a hand-packed word, ragged groups and blocks, and bad input.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>
#include <random>

#include "moekit/quant/convert.h"
#include "moekit/quant/encodings.h"
#include "support/test_support.h"

namespace moekit {
namespace {

using test::error_mentions;

// ---- reading moekit's output -------------------------------------------------------------------

// Element (e, r, k) of a quantized weight [n, R, K]: (q - zero) * scale * global.
float dequant(const QuantizedWeight& w, int64_t e, int64_t r, int64_t k) {
  const QuantScheme& s = w.scheme;
  const int64_t R = w.data.size(1), K = w.data.size(2);
  const float q = load_as_float(w.data.data<void>(), w.data.dtype(), (e * R + r) * K + k);
  int64_t at = 0;
  if (s.traits().scale_layout == WeightScaleLayout::kBlock) {
    const int64_t b = s.traits().block;
    at = (e * w.scale.size(1) + r / b) * w.scale.size(2) + k / b;
  } else {
    EXPECT_EQ(s.traits().scale_layout, WeightScaleLayout::kGroup);
    at = (e * R + r) * w.scale.size(2) + k / s.group_size(K);
  }
  const float scale = load_as_float(w.scale.data<void>(), w.scale.dtype(), at);
  const float zero = s.zero_point ? float(w.zero.data<uint8_t>()[at]) : 0.0f;
  const float global = s.traits().global_scale ? w.global.data<float>()[e] : 1.0f;
  return (q - zero) * scale * global;
}

using Want = std::function<float(int64_t e, int64_t r, int64_t k)>;

// Every element of w against want(e, r, k), bit for bit, read both with the formula above and
// with moekit's dequantizer (quant/quantize.h).
::testing::AssertionResult matches(const QuantizedWeight& w, const Want& want) {
  const WeightScales scales{w.scale.view(), w.zero.view(), w.global.view()};
  std::vector<float> row(size_t(w.data.size(2)));
  for (int64_t e = 0; e < w.data.size(0); ++e)
    for (int64_t r = 0; r < w.data.size(1); ++r) {
      dequantize_weight_row(w.data, scales, w.scheme, e, r, row.data());
      for (int64_t k = 0; k < w.data.size(2); ++k) {
        const float got = dequant(w, e, r, k), expected = want(e, r, k);
        if (!(got == expected && row[k] == expected))
          return ::testing::AssertionFailure()
                 << "expert " << e << " row " << r << " col " << k << ": got " << got
                 << " (dequantize_weight_row: " << row[k] << "), want " << expected;
      }
    }
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult valid_for(const ConvertedExperts& c, Activation act) {
  act.layout = c.layout;
  if (auto why = validate_weights(c.view(), act)) return ::testing::AssertionFailure() << *why;
  return ::testing::AssertionSuccess();
}

// ---- building checkpoints ----------------------------------------------------------------------

struct Store {
  std::vector<Tensor> tensors;
  TensorView keep(Tensor t) {
    tensors.push_back(std::move(t));
    return tensors.back().view();
  }
};

float to_f16(float x) {
  return f16_to_float(float_to_f16(x));
}

// One integer-coded linear W [n, k] as its checkpoint means it: codes 0..15, the true zero point
// and the scale per (group, output), and the group of every input.
struct IntLinear {
  int64_t n = 0, k = 0, groups = 0;
  std::vector<uint8_t> code;  // [n][k]
  std::vector<int> zero;      // [groups][n]
  std::vector<float> scale;   // [groups][n], fp16 values
  std::vector<int32_t> gidx;  // [k]
  std::vector<float> bias;    // [n] bf16 values, or empty
  float value(int64_t i, int64_t j) const {
    const int64_t c = gidx[j];
    return float(int(code[i * k + j]) - zero[c * n + i]) * scale[c * n + i];
  }
};

enum class Zeros { kEight, kRandom, kMinusOneRange };  // 8; 0..15; 1..16 (v1's stored zero - 1)

IntLinear make_int_linear(std::mt19937& rng, int64_t n, int64_t k, int64_t group, Zeros zeros,
                          bool act_order, bool bias) {
  IntLinear l;
  l.n = n, l.k = k, l.groups = group < 0 ? 1 : (k + group - 1) / group;
  std::uniform_int_distribution<int> code(0, 15),
      z(zeros == Zeros::kMinusOneRange ? 1 : 0, zeros == Zeros::kMinusOneRange ? 16 : 15);
  std::uniform_real_distribution<float> scale(0.001f, 0.05f), b(-1.0f, 1.0f);
  for (int64_t i = 0; i < n * k; ++i) l.code.push_back(uint8_t(code(rng)));
  for (int64_t i = 0; i < l.groups * n; ++i) {
    l.zero.push_back(zeros == Zeros::kEight ? 8 : z(rng));
    l.scale.push_back(to_f16(scale(rng)));
  }
  std::vector<int64_t> order(k);  // act-order: input order[i] is the i-th quantized
  std::iota(order.begin(), order.end(), 0);
  if (act_order) std::shuffle(order.begin(), order.end(), rng);
  l.gidx.resize(k);
  for (int64_t i = 0; i < k; ++i) l.gidx[order[i]] = group < 0 ? 0 : int32_t(i / group);
  for (int64_t i = 0; bias && i < n; ++i) l.bias.push_back(bf16_to_float(float_to_bf16(b(rng))));
  return l;
}

TensorView f16_tensor(Store& s, const std::vector<float>& v, int64_t rows, int64_t cols) {
  Tensor t(DType::kF16, {rows, cols});
  for (size_t i = 0; i < v.size(); ++i) t.data<uint16_t>()[i] = float_to_f16(v[i]);
  return s.keep(std::move(t));
}
TensorView bias_tensor(Store& s, const std::vector<float>& v) {
  if (v.empty()) return {};
  Tensor t(DType::kBF16, {int64_t(v.size())});
  for (size_t i = 0; i < v.size(); ++i) t.data<uint16_t>()[i] = float_to_bf16(v[i]);
  return s.keep(std::move(t));
}

// GPTQ: qweight [k/8, n], input 8r + j in bits 4j of row r; qzeros [G, n/8] likewise along n.
GptqLinear pack_gptq(Store& s, const IntLinear& l, bool zeros_minus_one, bool with_gidx) {
  Tensor qw = Tensor::zeros(DType::kI32, {l.k / 8, l.n});
  Tensor qz = Tensor::zeros(DType::kI32, {l.groups, (l.n + 7) / 8});
  auto* w = qw.data<uint32_t>();
  auto* z = qz.data<uint32_t>();
  for (int64_t i = 0; i < l.n; ++i)
    for (int64_t j = 0; j < l.k; ++j)
      w[(j / 8) * l.n + i] |= uint32_t(l.code[i * l.k + j]) << (4 * (j % 8));
  for (int64_t c = 0; c < l.groups; ++c)
    for (int64_t i = 0; i < l.n; ++i) {
      const uint32_t stored = uint32_t(l.zero[c * l.n + i] - (zeros_minus_one ? 1 : 0)) & 0xF;
      z[c * ((l.n + 7) / 8) + i / 8] |= stored << (4 * (i % 8));
    }
  GptqLinear g;
  g.qweight = s.keep(std::move(qw));
  g.qzeros = s.keep(std::move(qz));
  g.scales = f16_tensor(s, l.scale, l.groups, l.n);
  if (with_gidx) {
    Tensor gi(DType::kI32, {l.k});
    std::copy(l.gidx.begin(), l.gidx.end(), gi.data<int32_t>());
    g.g_idx = s.keep(std::move(gi));
  }
  g.bias = bias_tensor(s, l.bias);
  return g;
}

// AWQ: qweight [k, n/8] packed along n, nibble i of word c holding column 8c + order[i].
constexpr int kAwqOrder[8] = {0, 2, 4, 6, 1, 3, 5, 7};
Tensor pack_awq_rows(const std::vector<int>& v, int64_t rows, int64_t n) {  // v [rows][n]
  Tensor t = Tensor::zeros(DType::kI32, {rows, (n + 7) / 8});
  auto* p = t.data<uint32_t>();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < (n + 7) / 8; ++c)
      for (int i = 0; i < 8; ++i)
        if (8 * c + kAwqOrder[i] < n)  // a part word at the end leaves the other nibbles 0
          p[r * ((n + 7) / 8) + c] |= uint32_t(v[r * n + 8 * c + kAwqOrder[i]] & 0xF) << (4 * i);
  return t;
}
AwqLinear pack_awq(Store& s, const IntLinear& l) {
  std::vector<int> codes_kn(l.k * l.n);  // transposed: [k][n]
  for (int64_t i = 0; i < l.n; ++i)
    for (int64_t j = 0; j < l.k; ++j) codes_kn[j * l.n + i] = l.code[i * l.k + j];
  AwqLinear a;
  a.qweight = s.keep(pack_awq_rows(codes_kn, l.k, l.n));
  a.qzeros = s.keep(pack_awq_rows(l.zero, l.groups, l.n));
  a.scales = f16_tensor(s, l.scale, l.groups, l.n);
  a.bias = bias_tensor(s, l.bias);
  return a;
}

// A layer of integer experts: lin[e][p] for p = gate, up, down.
struct IntLayer {
  int64_t E, H, I;
  std::vector<std::array<IntLinear, 3>> lin;
};
IntLayer make_int_layer(uint32_t seed, int64_t E, int64_t H, int64_t I, int64_t group, Zeros zeros,
                        bool act_order_down, bool bias) {
  std::mt19937 rng(seed);
  IntLayer L{E, H, I, {}};
  for (int64_t e = 0; e < E; ++e)
    L.lin.push_back({make_int_linear(rng, I, H, group, zeros, false, bias),
                     make_int_linear(rng, I, H, group, zeros, false, bias),
                     make_int_linear(rng, H, I, group, zeros, act_order_down, bias)});
  return L;
}
std::vector<GptqExpert> pack_gptq_layer(Store& s, const IntLayer& L, bool zeros_minus_one,
                                        bool with_gidx) {
  std::vector<GptqExpert> out;
  for (const auto& x : L.lin)
    out.push_back({pack_gptq(s, x[0], zeros_minus_one, with_gidx),
                   pack_gptq(s, x[1], zeros_minus_one, with_gidx),
                   pack_gptq(s, x[2], zeros_minus_one, with_gidx)});
  return out;
}

// Checks a converted integer layer: w13 row j is gate row order[e][j] and row I + j up row
// order[e][j]; w2 column j is down column order[e][j]; biases follow the same rows.
void expect_int_layer(const ConvertedExperts& c, const IntLayer& L,
                      const std::vector<std::vector<int64_t>>& order) {
  const int64_t I = L.I;
  EXPECT_TRUE(matches(c.w13, [&](int64_t e, int64_t r, int64_t k) {
    return L.lin[e][r < I ? 0 : 1].value(order[e][r % I], k);
  }));
  EXPECT_TRUE(matches(
      c.w2, [&](int64_t e, int64_t h, int64_t j) { return L.lin[e][2].value(h, order[e][j]); }));
  if (L.lin[0][0].bias.empty()) {
    EXPECT_FALSE(c.b13.view().present());
    return;
  }
  ASSERT_EQ(c.b13.dtype(), DType::kBF16);
  for (int64_t e = 0; e < L.E; ++e) {
    for (int64_t r = 0; r < 2 * I; ++r)
      EXPECT_EQ(load_as_float(c.b13.data<void>(), DType::kBF16, e * 2 * I + r),
                L.lin[e][r < I ? 0 : 1].bias[order[e][r % I]]);
    for (int64_t h = 0; h < L.H; ++h)
      EXPECT_EQ(load_as_float(c.b2.data<void>(), DType::kBF16, e * L.H + h), L.lin[e][2].bias[h]);
  }
}

std::vector<std::vector<int64_t>> identity_orders(int64_t E, int64_t I) {
  std::vector<int64_t> id(I);
  std::iota(id.begin(), id.end(), 0);
  return std::vector<std::vector<int64_t>>(E, id);
}

// ---- GPTQ --------------------------------------------------------------------------------------

TEST(ConvertGptq, SymmetricBecomesSignedInt4) {
  // v1 stores 7 (zero - 1), v2 stores 8: both mean zero point 8 everywhere. H and I ragged.
  for (bool v1 : {true, false}) {
    SCOPED_TRACE(v1 ? "gptq v1" : "gptq_v2");
    const IntLayer L = make_int_layer(1, 3, 80, 72, 32, Zeros::kEight, false, false);
    Store s;
    const auto experts = pack_gptq_layer(s, L, v1, false);
    const ConvertedExperts c = convert_gptq(experts, {.group_size = 32, .zeros_minus_one = v1});
    EXPECT_EQ(c.w13.scheme.str(), "w4a16:g32");
    EXPECT_EQ(c.w13.data.dtype(), DType::kI4);
    EXPECT_EQ(c.w13.scale.dtype(), DType::kF16);
    EXPECT_FALSE(c.w13.zero.view().present());
    EXPECT_EQ(c.layout, GateUpLayout::kSplit);
    expect_int_layer(c, L, identity_orders(L.E, L.I));
    EXPECT_TRUE(valid_for(c, Activation{}));
  }
}

TEST(ConvertGptq, AsymmetricKeepsZeroPoints) {
  // v1 with stored zero - 1 (a stored 15 is zero 16, as the v1 dequantizers read it), biases, a
  // ragged last group (I = 96 with groups of 64).
  const IntLayer L = make_int_layer(2, 2, 128, 96, 64, Zeros::kMinusOneRange, false, true);
  Store s;
  const ConvertedExperts c = convert_gptq(pack_gptq_layer(s, L, true, true), {.group_size = 64});
  EXPECT_EQ(c.w13.scheme.str(), "w4a16:g64:zp");
  EXPECT_EQ(c.w2.data.dtype(), DType::kU4);
  EXPECT_EQ(c.w2.zero.dtype(), DType::kU8);
  EXPECT_EQ(c.w2.scale.size(2), 2);
  expect_int_layer(c, L, identity_orders(L.E, L.I));
  EXPECT_TRUE(valid_for(c, Activation{}));

  // gptq_v2 stores zeros 0..15 as they are.
  const IntLayer L2 = make_int_layer(3, 2, 64, 48, 32, Zeros::kRandom, false, false);
  Store s2;
  const ConvertedExperts c2 = convert_gptq(pack_gptq_layer(s2, L2, false, false),
                                           {.group_size = 32, .zeros_minus_one = false});
  EXPECT_TRUE(c2.w13.scheme.zero_point);
  expect_int_layer(c2, L2, identity_orders(L2.E, L2.I));
}

TEST(ConvertGptq, LargeGroupsAndPerChannel) {
  // Groups of 256 become w4a16 groups of 128 holding each scale twice; -1 stays per channel.
  const IntLayer L = make_int_layer(4, 1, 512, 256, 256, Zeros::kRandom, false, false);
  Store s;
  const ConvertedExperts c = convert_gptq(pack_gptq_layer(s, L, false, false),
                                          {.group_size = 256, .zeros_minus_one = false});
  EXPECT_EQ(c.w13.scheme.group, 128);
  EXPECT_EQ(c.w13.scale.size(2), 4);
  expect_int_layer(c, L, identity_orders(1, L.I));

  const IntLayer P = make_int_layer(5, 2, 64, 40, -1, Zeros::kRandom, false, false);
  Store s2;
  const ConvertedExperts p = convert_gptq(pack_gptq_layer(s2, P, false, true),
                                          {.group_size = -1, .zeros_minus_one = false});
  EXPECT_EQ(p.w13.scheme.str(), "w4a16:ch:zp");
  EXPECT_EQ(p.w2.scale.size(2), 1);
  expect_int_layer(p, P, identity_orders(2, P.I));
  EXPECT_TRUE(valid_for(p, Activation{}));
}

TEST(ConvertGptq, ActOrderOnDownIsAbsorbedByReorderingI) {
  const int64_t E = 2, H = 64, I = 96;
  const IntLayer L = make_int_layer(6, E, H, I, 32, Zeros::kRandom, true, true);
  Store s;
  const ConvertedExperts c = convert_gptq(pack_gptq_layer(s, L, false, true),
                                          {.group_size = 32, .zeros_minus_one = false});
  // Recover each expert's order of I from w2's columns (H random codes make columns distinct),
  // then require w13's rows, b13 and w2 to follow that one order.
  std::vector<std::vector<int64_t>> order(E);
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t j = 0; j < I; ++j)
      for (int64_t m = 0; m < I; ++m) {
        bool same = true;
        for (int64_t h = 0; h < H && same; ++h)
          same = dequant(c.w2, e, h, j) == L.lin[e][2].value(h, m);
        if (same) {
          order[e].push_back(m);
          break;
        }
      }
    ASSERT_EQ(int64_t(order[e].size()), I) << "a w2 column of expert " << e << " matches no input";
    std::vector<int64_t> sorted = order[e];
    std::sort(sorted.begin(), sorted.end());
    for (int64_t j = 0; j < I; ++j) ASSERT_EQ(sorted[j], j) << "not a permutation";
    EXPECT_FALSE(std::is_sorted(order[e].begin(), order[e].end())) << "act-order was not exercised";
  }
  expect_int_layer(c, L, order);
  EXPECT_TRUE(valid_for(c, Activation{}));
}

TEST(ConvertGptq, ActOrderOnGateOrUpIsRefused) {
  for (int p : {0, 1}) {
    std::mt19937 rng(7);
    IntLayer L = make_int_layer(7, 1, 64, 32, 32, Zeros::kRandom, false, false);
    L.lin[0][p] = make_int_linear(rng, 32, 64, 32, Zeros::kRandom, true, false);
    Store s;
    const auto experts = pack_gptq_layer(s, L, false, true);
    EXPECT_TRUE(error_mentions([&] { convert_gptq(experts, {.group_size = 32}); },
                               p == 0 ? "gate_proj.g_idx" : "up_proj.g_idx"));
    EXPECT_TRUE(error_mentions([&] { convert_gptq(experts, {.group_size = 32}); }, "act-order"));
  }
}

TEST(ConvertGptq, BadInput) {
  const IntLayer L = make_int_layer(8, 2, 64, 32, 32, Zeros::kRandom, false, true);
  Store s;
  const auto good = pack_gptq_layer(s, L, true, true);
  const GptqOptions opt{.group_size = 32};
  auto with = [&](const std::function<void(std::vector<GptqExpert>&)>& edit) {
    std::vector<GptqExpert> x = good;
    edit(x);
    return [x, opt] { convert_gptq(x, opt); };
  };
  EXPECT_TRUE(error_mentions([&] { convert_gptq({}, opt); }, "no experts"));
  EXPECT_TRUE(error_mentions([&] { convert_gptq(good, {.group_size = 48}); }, "no exact w4a16"));
  EXPECT_TRUE(error_mentions([&] { convert_gptq(good, {.group_size = 0}); }, "group_size 0"));
  // A group size that does not match the tensors: scales have the wrong number of groups.
  EXPECT_TRUE(error_mentions([&] { convert_gptq(good, {.group_size = 64}); },
                             "gptq expert 0 gate_proj.qzeros: expected shape [1, 4]"));
  Tensor i32(DType::kI32, {8, 32});
  EXPECT_TRUE(error_mentions(with([&](auto& x) { x[1].down.qweight = i32.view(); }),
                             "gptq expert 1 down_proj.qweight: expected shape [4, 64]"));
  Tensor f32(DType::kF32, {4, 64});
  EXPECT_TRUE(error_mentions(with([&](auto& x) { x[1].down.qweight = f32.view(); }),
                             "expected dtype int32"));
  EXPECT_TRUE(error_mentions(with([&](auto& x) { x[1].up = x[1].down; }), "gptq expert 1 up_proj"));
  EXPECT_TRUE(error_mentions(with([&](auto& x) { x[0].up.bias = {}; }),
                             "gptq expert 0 up_proj.bias: missing"));
  Tensor bad_gidx(DType::kI32, {32});
  for (int i = 0; i < 32; ++i) bad_gidx.data<int32_t>()[i] = i == 5 ? 1 : 0;  // 1 of 1 group
  EXPECT_TRUE(error_mentions(with([&](auto& x) { x[0].down.g_idx = bad_gidx.view(); }),
                             "down_proj.g_idx[5] = 1 is not a group"));
  Tensor bf16_scales(DType::kBF16, {2, 32});
  EXPECT_TRUE(error_mentions(with([&](auto& x) { x[1].gate.scales = bf16_scales.view(); }),
                             "differs from the fp16 of expert 0"));
  EXPECT_TRUE(error_mentions(with([&](auto& x) {
                               x[1].gate.scales.device = {DeviceType::kCUDA, 0};
                             }),
                             "host tensor"));
  EXPECT_TRUE(
      error_mentions(with([&](auto& x) { x[0].gate.scales.stride[0] = 64; }), "contiguous"));
}

// ---- AWQ ---------------------------------------------------------------------------------------

TEST(ConvertAwq, NibbleOrderOfAHandPackedWord) {
  // Column j of every word holds code j: nibbles (high to low) 7 5 3 1 6 4 2 0.
  const int32_t word = 0x75316420;
  const int64_t H = 32, I = 8;
  auto linear = [](Store& s, int64_t n, int64_t k, int32_t w) {
    Tensor qw(DType::kI32, {k, n / 8}), qz = Tensor::zeros(DType::kI32, {1, n / 8});
    std::fill_n(qw.data<int32_t>(), qw.numel(), w);
    Tensor sc(DType::kF16, {1, n});
    std::fill_n(sc.data<uint16_t>(), n, float_to_f16(1.0f));
    return AwqLinear{s.keep(std::move(qw)), s.keep(std::move(qz)), s.keep(std::move(sc)), {}};
  };
  Store s;
  const AwqExpert x{linear(s, I, H, word), linear(s, I, H, word), linear(s, H, I, word)};
  const ConvertedExperts c = convert_awq(std::span(&x, 1), 32);
  EXPECT_EQ(c.w13.scheme.str(), "w4a16:g32:zp");
  EXPECT_TRUE(matches(c.w13, [&](int64_t, int64_t r, int64_t) { return float(r % I); }));
  EXPECT_TRUE(matches(c.w2, [&](int64_t, int64_t h, int64_t) { return float(h % 8); }));
}

TEST(ConvertAwq, RoundTrip) {
  // Ragged: H = 80 with groups of 32, I = 36 (a part word along N and a ragged group along K).
  const IntLayer L = make_int_layer(9, 2, 80, 36, 32, Zeros::kRandom, false, true);
  Store s;
  std::vector<AwqExpert> experts;
  for (const auto& x : L.lin)
    experts.push_back({pack_awq(s, x[0]), pack_awq(s, x[1]), pack_awq(s, x[2])});
  const ConvertedExperts c = convert_awq(experts, 32);
  EXPECT_TRUE(c.w13.scheme.zero_point);
  expect_int_layer(c, L, identity_orders(L.E, L.I));
  EXPECT_TRUE(valid_for(c, Activation{}));

  // Zeros of 8 still keep the zero point (AWQ is asymmetric by construction).
  const IntLayer S = make_int_layer(10, 1, 64, 32, 64, Zeros::kEight, false, false);
  Store s2;
  std::vector<AwqExpert> sym;
  for (const auto& x : S.lin)
    sym.push_back({pack_awq(s2, x[0]), pack_awq(s2, x[1]), pack_awq(s2, x[2])});
  EXPECT_TRUE(convert_awq(sym, 64).w13.scheme.zero_point);

  EXPECT_TRUE(error_mentions([&] { convert_awq(experts, 64); }, "awq expert 0 gate_proj.qzeros"));
  std::vector<AwqExpert> odd = experts;
  Tensor qz(DType::kF16, {3, 5});
  odd[1].down.qzeros = qz.view();
  EXPECT_TRUE(error_mentions([&] { convert_awq(odd, 32); }, "awq expert 1 down_proj.qzeros"));
}

// ---- fp8 block ---------------------------------------------------------------------------------

struct Fp8Linear {
  std::vector<uint8_t> code;  // [n][k] e4m3
  std::vector<float> scale;   // [ceil(n/128)][ceil(k/128)]
  int64_t n, k;
  float value(int64_t i, int64_t j) const {
    return decode(MiniFloat::kE4M3, code[i * k + j]) *
           scale[(i / 128) * ((k + 127) / 128) + j / 128];
  }
};
Fp8Linear make_fp8(std::mt19937& rng, int64_t n, int64_t k) {
  Fp8Linear l{{}, {}, n, k};
  std::uniform_int_distribution<int> code(0, 255);
  std::uniform_real_distribution<float> sc(1e-4f, 1e-2f);
  for (int64_t i = 0; i < n * k; ++i) {
    const int c = code(rng);
    l.code.push_back(uint8_t((c & 0x7F) == 0x7F ? c - 1 : c));  // no NaN codes
  }
  for (int64_t i = 0; i < (n + 127) / 128 * ((k + 127) / 128); ++i) l.scale.push_back(sc(rng));
  return l;
}
Fp8BlockLinear pack_fp8(Store& s, const Fp8Linear& l, DType scale_dtype) {
  Tensor w(DType::kF8E4M3, {l.n, l.k});
  std::copy(l.code.begin(), l.code.end(), w.data<uint8_t>());
  Tensor sc(scale_dtype, {(l.n + 127) / 128, (l.k + 127) / 128});
  for (size_t i = 0; i < l.scale.size(); ++i)
    store_from_float(sc.data<void>(), scale_dtype, i, l.scale[i]);
  return {s.keep(std::move(w)), s.keep(std::move(sc))};
}

TEST(ConvertFp8Block, RoundTripWithRaggedBlocks) {
  const int64_t E = 2, H = 200, I = 128;  // H ragged: rows of w2 and columns of w13
  std::mt19937 rng(11);
  std::vector<std::array<Fp8Linear, 3>> lin;
  Store s;
  std::vector<Fp8BlockExpert> experts;
  for (int64_t e = 0; e < E; ++e) {
    lin.push_back({make_fp8(rng, I, H), make_fp8(rng, I, H), make_fp8(rng, H, I)});
    const DType sd = e == 0 ? DType::kF32 : DType::kBF16;  // bf16 scale_inv widens exactly
    if (sd == DType::kBF16)
      for (auto& l : lin.back())
        for (float& v : l.scale) v = bf16_to_float(float_to_bf16(v));
    experts.push_back(
        {pack_fp8(s, lin[e][0], sd), pack_fp8(s, lin[e][1], sd), pack_fp8(s, lin[e][2], sd)});
  }
  const ConvertedExperts c = convert_fp8_block(experts);
  EXPECT_EQ(c.w13.scheme.str(), "fp8-block");
  EXPECT_EQ(c.w13.scale.dtype(), DType::kF32);
  EXPECT_EQ(c.w2.scale.size(1), 2);
  EXPECT_TRUE(matches(c.w13, [&](int64_t e, int64_t r, int64_t k) {
    return lin[e][r < I ? 0 : 1].value(r % I, k);
  }));
  EXPECT_TRUE(
      matches(c.w2, [&](int64_t e, int64_t h, int64_t j) { return lin[e][2].value(h, j); }));
  EXPECT_TRUE(valid_for(c, Activation{}));

  // I not a multiple of 128: a w13 block would hold gate and up rows.
  std::mt19937 rng2(12);
  const Fp8Linear g = make_fp8(rng2, 100, 64), d = make_fp8(rng2, 64, 100);
  const Fp8BlockExpert ragged{pack_fp8(s, g, DType::kF32), pack_fp8(s, g, DType::kF32),
                              pack_fp8(s, d, DType::kF32)};
  EXPECT_TRUE(error_mentions([&] { convert_fp8_block(std::span(&ragged, 1)); },
                             "I = 100 is not a multiple of 128"));
  std::vector<Fp8BlockExpert> bad = experts;
  bad[1].down.weight_scale_inv = bad[1].up.weight_scale_inv;
  EXPECT_TRUE(
      error_mentions([&] { convert_fp8_block(bad); },
                     "fp8-block expert 1 down_proj.weight_scale_inv: expected shape [2, 1]"));
  bad = experts;
  bad[0].gate.weight.dtype = DType::kU8;
  EXPECT_TRUE(error_mentions([&] { convert_fp8_block(bad); }, "expected dtype fp8_e4m3"));
}

// ---- fp4: gpt-oss mxfp4 and ModelOpt nvfp4 -----------------------------------------------------

// e2m1 codes by hand: sign bit 3, magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6.
float e2m1(int code) {
  constexpr float kMag[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  return (code & 8 ? -1.0f : 1.0f) * kMag[code & 7];
}
// Code k of a row of packed bytes: the low nibble holds the even element.
int fp4_code(const uint8_t* row, int64_t k) {
  return k % 2 ? row[k / 2] >> 4 : row[k / 2] & 0xF;
}

Tensor random_bytes(std::mt19937& rng, DType dtype, std::initializer_list<int64_t> shape, int lo,
                    int hi) {
  Tensor t(dtype, shape);
  std::uniform_int_distribution<int> d(lo, hi);
  for (int64_t i = 0; i < t.view().nbytes(); ++i) t.data<uint8_t>()[i] = uint8_t(d(rng));
  return t;
}

TEST(ConvertGptOss, Mxfp4KeepsInterleavedRows) {
  const int64_t E = 2, I = 64, H = 96;
  std::mt19937 rng(13);
  Store s;
  GptOssMxfp4Layer layer;
  layer.gate_up_blocks = s.keep(random_bytes(rng, DType::kU8, {E, 2 * I, H / 32, 16}, 0, 255));
  layer.gate_up_scales = s.keep(random_bytes(rng, DType::kU8, {E, 2 * I, H / 32}, 118, 133));
  layer.down_blocks = s.keep(random_bytes(rng, DType::kU8, {E, H, I / 32, 16}, 0, 255));
  layer.down_scales = s.keep(random_bytes(rng, DType::kU8, {E, H, I / 32}, 118, 133));
  layer.gate_up_bias = s.keep(test::random_tensor(DType::kBF16, {E, 2 * I}, 1));
  layer.down_bias = s.keep(test::random_tensor(DType::kBF16, {E, H}, 2));
  // The checkpoint's value: e2m1(code) * 2^(scale - 127), row r of gate_up as stored.
  auto want = [](const TensorView& blocks, const TensorView& scales) {
    return [=](int64_t e, int64_t r, int64_t k) {
      const int64_t R = blocks.size(1), K = blocks.size(2) * 32;
      const auto* row = blocks.ptr<const uint8_t>() + (e * R + r) * (K / 2);
      const int s = scales.ptr<const uint8_t>()[(e * R + r) * (K / 32) + k / 32];
      return e2m1(fp4_code(row, k)) * std::ldexp(1.0f, s - 127);
    };
  };
  const ConvertedExperts c = convert_gpt_oss_mxfp4(layer);
  EXPECT_EQ(c.layout, GateUpLayout::kInterleaved);
  EXPECT_EQ(c.w13.scheme.str(), "mxfp4");
  EXPECT_TRUE(matches(c.w13, want(layer.gate_up_blocks, layer.gate_up_scales)));
  EXPECT_TRUE(matches(c.w2, want(layer.down_blocks, layer.down_scales)));
  EXPECT_TRUE(test::bits_equal(c.b13, layer.gate_up_bias));
  EXPECT_TRUE(test::bits_equal(c.b2, layer.down_bias));
  EXPECT_TRUE(valid_for(c, parse_activation("swiglu_oai")));

  GptOssMxfp4Layer bad = layer;
  bad.down_scales = layer.gate_up_scales;
  EXPECT_TRUE(error_mentions([&] { convert_gpt_oss_mxfp4(bad); },
                             "gpt-oss down_proj_scales: expected shape [2, 96, 2]"));
  bad = layer;
  bad.gate_up_bias = layer.down_bias;
  EXPECT_TRUE(error_mentions([&] { convert_gpt_oss_mxfp4(bad); }, "gate_up_proj_bias"));
  bad = layer;
  bad.gate_up_blocks.dtype = DType::kI8;
  EXPECT_TRUE(error_mentions([&] { convert_gpt_oss_mxfp4(bad); }, "expected dtype uint8"));
}

// One nvfp4 linear [n, k] of the checkpoint.
struct NvLinear {
  Tensor weight, scale;  // uint8 [n, k/2], e4m3 [n, ceil(k/16)]
  float global;
  float value(int64_t i, int64_t j) const {
    const int64_t k = weight.size(1) * 2, groups = scale.size(1);
    const float s = decode(MiniFloat::kE4M3, scale.data<uint8_t>()[i * groups + j / 16]);
    return e2m1(fp4_code(weight.data<uint8_t>() + i * (k / 2), j)) * s * global;
  }
};
NvLinear make_nv(std::mt19937& rng, int64_t n, int64_t k, float global) {
  // Block scale codes 0x20..0x60: normal e4m3 values 2^-3 .. 2^5, no NaN.
  return {random_bytes(rng, DType::kU8, {n, k / 2}, 0, 255),
          random_bytes(rng, DType::kF8E4M3, {n, (k + 15) / 16}, 0x20, 0x60), global};
}

TEST(ConvertNvFp4, RoundTripWithRaggedGroups) {
  const int64_t E = 2, H = 40, I = 24;  // 40 and 24 inputs: ragged last groups of 16
  std::mt19937 rng(14);
  std::vector<std::array<NvLinear, 3>> lin;
  Tensor globals(DType::kF32, {E, 3});
  Store s;
  std::vector<NvFp4Expert> experts;
  for (int64_t e = 0; e < E; ++e) {
    const float g13 = 0.0123f * float(e + 1), g2 = 0.0456f * float(e + 1);
    lin.push_back({make_nv(rng, I, H, g13), make_nv(rng, I, H, g13), make_nv(rng, H, I, g2)});
    NvFp4Expert x;
    for (int p = 0; p < 3; ++p) {
      float* g = globals.data<float>() + e * 3 + p;
      *g = lin[e][p].global;
      TensorView scalar(g, DType::kF32, {1});
      if (p == 1) scalar.ndim = 0;  // a 0-d scalar as DLPack hands it over
      NvFp4Linear& l = p == 0 ? x.gate : p == 1 ? x.up : x.down;
      l = {lin[e][p].weight.view(), lin[e][p].scale.view(), scalar};
    }
    experts.push_back(x);
  }
  const ConvertedExperts c = convert_modelopt_nvfp4(experts);
  EXPECT_EQ(c.w13.scheme.str(), "nvfp4");
  EXPECT_EQ(c.w13.scale.size(2), 3);
  EXPECT_EQ(c.w2.scale.size(2), 2);
  EXPECT_TRUE(matches(c.w13, [&](int64_t e, int64_t r, int64_t k) {
    return lin[e][r < I ? 0 : 1].value(r % I, k);
  }));
  EXPECT_TRUE(
      matches(c.w2, [&](int64_t e, int64_t h, int64_t j) { return lin[e][2].value(h, j); }));
  EXPECT_TRUE(valid_for(c, Activation{}));

  // gate and up with different globals: refused, or (opt-in) moved onto the larger one.
  std::vector<NvFp4Expert> mixed = experts;
  float up_global = lin[1][1].global * 0.3f;
  mixed[1].up.weight_scale_2 = TensorView(&up_global, DType::kF32, {1});
  EXPECT_TRUE(error_mentions([&] { convert_modelopt_nvfp4(mixed); },
                             "nvfp4 expert 1: gate_proj.weight_scale_2"));
  const ConvertedExperts r = convert_modelopt_nvfp4(mixed, {.requantize_gate_up_global = true});
  EXPECT_EQ(r.w13.global.data<float>()[1], lin[1][0].global);
  EXPECT_TRUE(matches(r.w13, [&](int64_t e, int64_t row, int64_t k) {  // gate and expert 0 exact
    return e == 1 && row >= I ? dequant(r.w13, e, row, k)
                              : lin[e][row < I ? 0 : 1].value(row % I, k);
  }));
  for (int64_t row = I; row < 2 * I; ++row)
    for (int64_t k = 0; k < H; ++k) {
      const float want = lin[1][1].value(row - I, k) / lin[1][1].global * up_global;
      EXPECT_NEAR(dequant(r.w13, 1, row, k), want, std::abs(want) / 16 + 1e-7) << row << " " << k;
    }

  std::vector<NvFp4Expert> bad = experts;
  bad[0].down.weight_scale = bad[0].gate.weight_scale;
  EXPECT_TRUE(error_mentions([&] { convert_modelopt_nvfp4(bad); },
                             "nvfp4 expert 0 down_proj.weight_scale: expected shape [40, 2]"));
  bad = experts;
  float zero = 0.0f;
  bad[1].down.weight_scale_2 = TensorView(&zero, DType::kF32, {1});
  EXPECT_TRUE(error_mentions([&] { convert_modelopt_nvfp4(bad); }, "not a positive finite scale"));
  bad = experts;
  bad[0].gate.weight_scale_2 = TensorView(globals.data<float>(), DType::kF32, {2});
  EXPECT_TRUE(error_mentions([&] { convert_modelopt_nvfp4(bad); }, "expected a scalar"));
  bad = experts;
  bad[0].up.weight_scale.dtype = DType::kU8;
  EXPECT_TRUE(error_mentions([&] { convert_modelopt_nvfp4(bad); }, "expected dtype fp8_e4m3"));
}

}  // namespace
}  // namespace moekit
