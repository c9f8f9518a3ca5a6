// The CPU experts on quantized weights: every format of quant/format.h x every ISA family this
// CPU runs, against a double-precision oracle over dequantize_weight_row with a rigorous
// per-element bound (below); odd shapes and ragged scale groups; -1 ids giving exact zeros;
// bit-identical results across ISA families, thread counts, runs and batch compositions; bad
// weights and bad activations refused before anything is written.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "moekit/cpu.h"
#include "moekit/quant/encodings.h"
#include "moekit/quant/quantize.h"
#include "support/test_support.h"

namespace moekit {
namespace {

using test::gamma;
using test::kU;
using test::supported_isas;

// Every format with each of its options.
const std::vector<std::string>& all_formats() {
  static const std::vector<std::string> f = {
      "fp8-tensor", "fp8-token",    "fp8-block",    "fp8-block:ue8m0", "int8",     "w4a16",
      "w4a16:g32",  "w4a16:g64:zp", "w4a16:ch",     "w4a16:ch:zp",     "w4a16:zp", "w8a16",
      "w8a16:g32",  "w8a16:ch",     "w8a16:g64:zp", "w8a16:zp",        "w4a8",     "mxfp4",
      "nvfp4"};
  return f;
}

struct QCase {
  std::string format = "w4a16";
  int64_t E_global = 6, H = 130, I = 66, M = 7;
  int k = 2;
  Activation act;
  bool bias = true;
  std::vector<int32_t> source = {4, 1, 5, 0};  // local slot -> global expert
};

std::string label(const QCase& c) {
  return detail::concat(c.format, " ", c.act.str(), c.bias ? " bias" : "", " H=", c.H, " I=", c.I,
                        " M=", c.M, " k=", c.k);
}

// A quantized layer, its a1 (quantized like prepare does) and routing, and the oracle.
struct QProblem {
  QCase c;
  QuantScheme scheme;
  ActivationSpec spec;
  Tensor w13f, w2f, b13, b2, x, a1, a1_scale, ids;
  QuantizedExpertWeights qw;
  ExpertWeights w;  // the quantized local view

  QProblem(const QCase& cs, uint64_t seed) : c(cs), scheme(QuantScheme::parse(cs.format)) {
    spec = ActivationSpec::of(scheme);
    const int64_t rows = c.act.w13_rows(c.I);
    const double s1 = 2 / std::sqrt(double(c.H)), s2 = 2 / std::sqrt(double(c.I));
    w13f = test::random_tensor(DType::kBF16, {c.E_global, rows, c.H}, seed + 1, -s1, s1);
    w2f = test::random_tensor(DType::kBF16, {c.E_global, c.H, c.I}, seed + 2, -s2, s2);
    ExpertWeights fw;
    fw.w13 = w13f;
    fw.w2 = w2f;
    if (c.bias) {
      b13 = test::random_tensor(DType::kF32, {c.E_global, rows}, seed + 3, -0.5, 0.5);
      b2 = test::random_tensor(DType::kBF16, {c.E_global, c.H}, seed + 4, -0.5, 0.5);
      fw.b13 = b13;
      fw.b2 = b2;
    }
    qw = quantize_expert_weights(fw, scheme);
    w = qw.view();
    w.source = c.source;
    x = test::random_tensor(DType::kF32, {c.M, c.H}, seed + 5, -2, 2);
    a1 = Tensor(spec.dtype, {c.M, c.H});
    if (spec.scale != ScaleKind::kNone) {
      const std::vector<int64_t> sh = activation_scale_shape(spec, c.M, c.H);
      a1_scale = sh.size() == 1 ? Tensor(spec.scale_dtype, {sh[0]})
                                : Tensor(spec.scale_dtype, {sh[0], sh[1]});
    }
    quantize_activations(x, spec, a1, a1_scale.view());
    ids = Tensor(DType::kI32, {c.M, c.k});
    std::mt19937 rng{uint32_t(seed)};
    // Local slot 2 never gets tokens; about 1 in 6 pairs is -1.
    for (int64_t i = 0; i < c.M * c.k; ++i) {
      int32_t id = int32_t(rng() % uint32_t(c.source.size() + 1)) - 1;
      if (id == 2) id = 3;
      ids.data<int32_t>()[i] = id;
    }
  }

  ActivationScale scale() const {
    return {spec.scale, spec.scale == ScaleKind::kBlock ? spec.group : 0, a1_scale.view()};
  }
  DispatchedBatch batch() const {
    DispatchedBatch b;
    b.a1 = a1;
    b.a1_scale = scale();
    b.topk_ids = ids;
    return b;
  }

  // a1[t, h] as the value it stands for (code x scale, exact in double).
  double a_value(int64_t t, int64_t h) const {
    const double v = load_as_float(a1.view().data, a1.dtype(), t * c.H + h);
    const TensorView& s = a1_scale.view();
    switch (spec.scale) {
      case ScaleKind::kNone:
        return v;
      case ScaleKind::kTensor:
        return v * load_as_float(s.data, s.dtype, 0);
      case ScaleKind::kToken:
        return v * load_as_float(s.data, s.dtype, t);
      case ScaleKind::kBlock:
        return v * load_as_float(s.data, s.dtype, t * s.stride[0] + h / spec.group);
    }
    return 0;
  }

  // Dequantized rows of one weight, and where it has a zero point z * scale * global (how much
  // larger than |w| the kernels' partial sums of codes can be): [e][r][k].
  struct Dequant {
    std::vector<float> w, zp;
    int64_t R = 0, K = 0, groups = 0;
    double at(const std::vector<float>& v, int64_t e, int64_t r, int64_t k) const {
      return v[size_t((e * R + r) * K + k)];
    }
  };
  Dequant dequant(const QuantizedWeight& q, int64_t R, int64_t K) const {
    Dequant d;
    d.R = R, d.K = K, d.groups = (K + scheme.group_size(K) - 1) / scheme.group_size(K);
    d.w.resize(size_t(c.E_global * R * K));
    d.zp.assign(d.w.size(), 0.f);
    const WeightScales s = q.scales();
    for (int64_t e = 0; e < c.E_global; ++e)
      for (int64_t r = 0; r < R; ++r) {
        dequantize_weight_row(q.data, s, scheme, e, r, d.w.data() + (e * R + r) * K);
        if (!scheme.zero_point) continue;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t g = k / scheme.group_size(K), i = (e * R + r) * d.groups + g;
          d.zp[size_t((e * R + r) * K + k)] = float(static_cast<const uint8_t*>(s.zero.data)[i]) *
                                              load_as_float(s.scale.data, s.scale.dtype, i);
        }
      }
    return d;
  }

  // Rounds t (a value divided by its scale) to the activation code's value.
  double round_code(double t) const {
    if (spec.dtype == DType::kI8)
      return std::clamp(std::nearbyint(double(float(t))), -127.0, 127.0);
    return decode(MiniFloat::kE4M3, encode(MiniFloat::kE4M3, float(t)));
  }
  // The dynamic scales an amax in [lo, hi] can give (the kernel's fp32 division included).
  std::pair<double, double> scale_range(double amax_lo, double amax_hi) const {
    const double max = spec.dtype == DType::kI8 ? 127 : 448;
    if (amax_hi == 0) return {1, 1};
    EXPECT_GT(amax_lo, 0) << "an intermediate scale group is all near zero";
    double lo = amax_lo / max * (1 - 4 * kU), hi = amax_hi / max * (1 + 4 * kU);
    if (spec.scale_dtype == DType::kUE8M0)
      lo = std::exp2(std::ceil(std::log2(lo))), hi = std::exp2(std::ceil(std::log2(hi)));
    return {lo, hi};
  }
  // Values a quantized intermediate element of exact interval [lo, hi] can take under a scale
  // in [s_lo, s_hi]: rounding is monotone in value / scale.
  std::pair<double, double> quantized_range(double lo, double hi,
                                            std::pair<double, double> s) const {
    const double t0 = std::min(lo / s.first, lo / s.second),
                 t1 = std::max(hi / s.first, hi / s.second);
    const double q0 = round_code(t0 - std::abs(t0) * 4 * kU),
                 q1 = round_code(t1 + std::abs(t1) * 4 * kU);
    return {std::min(q0 * s.first, q0 * s.second), std::max(q1 * s.first, q1 * s.second)};
  }

  // Checks out [M, k, H]. For each pair the oracle keeps an interval per intermediate element
  // holding what any correct kernel computes:
  //  * GEMM1 x = sum over groups of scaled fp32 sums of exact code products, plus bias:
  //      |x - x_exact| <= gamma(K + 2 groups + 12) (sum |a| (|w| + 2 z s g) + |b|)         (eg)
  //    (z s g: zero point x scale x global, by which the sums of codes exceed those of values)
  //  * activation: first-order propagation of eg, plus 16 ulp of |h| and |g| |up| -> h +- d;
  //  * the intermediate as GEMM2 reads it: bf16 activations round to nearest (monotone); fp8 and
  //    int8 ones are requantized under a dynamic scale whose amax has an interval too, and
  //    round(value / scale) * scale is monotone in value for a fixed scale -> [lo, hi];
  //  * GEMM2 over these intervals (center m, radius r), as GEMM1 for the rest.
  void check(const TensorView& out) const {
    const int64_t H = c.H, I = c.I, k = c.k, rows = c.act.w13_rows(I);
    const Dequant d13 = dequant(qw.w13, rows, H), d2 = dequant(qw.w2, H, I);
    struct Pair {
      int64_t t, s, e;
      std::vector<double> lo, hi;
    };
    std::vector<Pair> pairs;
    for (int64_t t = 0; t < c.M; ++t)
      for (int64_t s = 0; s < k; ++s) {
        const int32_t id = ids.data<int32_t>()[t * k + s];
        const float* o = out.ptr<float>() + (t * k + s) * H;
        if (id < 0) {
          for (int64_t n = 0; n < H; ++n)
            ASSERT_TRUE(o[n] == 0.f && !std::signbit(o[n]))
                << "slot of id -1 not exactly +0 at [" << t << ", " << s << ", " << n << "]";
          continue;
        }
        Pair p{t, s, c.source[size_t(id)], std::vector<double>(size_t(I)),
               std::vector<double>(size_t(I))};
        auto gemm1 = [&](int64_t row, double* err) {
          double acc = c.bias ? load_as_float(b13.view().data, DType::kF32, p.e * rows + row) : 0;
          double mag = std::abs(acc);
          for (int64_t h = 0; h < H; ++h) {
            const double a = a_value(t, h), wv = d13.at(d13.w, p.e, row, h);
            acc += a * wv;
            mag += std::abs(a) * (std::abs(wv) + 2 * d13.at(d13.zp, p.e, row, h));
          }
          *err = gamma(H + 2 * d13.groups + 12) * mag;
          return acc;
        };
        for (int64_t j = 0; j < I; ++j) {
          double eg, eu = 0;
          const double g = gemm1(c.act.gate_row(j, I), &eg);
          const double u = c.act.gated ? gemm1(c.act.up_row(j, I), &eu) : 0;
          const double h = apply_activation<double>(c.act, g, u);
          const double dd = test::activation_error(c.act, g, eg, u, eu);
          p.lo[size_t(j)] = h - dd;
          p.hi[size_t(j)] = h + dd;
        }
        pairs.push_back(std::move(p));
      }
    quantize_intervals(pairs);
    for (const Pair& p : pairs) {
      const float* o = out.ptr<float>() + (p.t * k + p.s) * H;
      for (int64_t n = 0; n < H; ++n) {
        const double b = c.bias ? load_as_float(b2.view().data, DType::kBF16, p.e * H + n) : 0;
        double want = b, rad = 0, mag = std::abs(b);
        for (int64_t j = 0; j < I; ++j) {
          const double wj = d2.at(d2.w, p.e, n, j), m = (p.lo[size_t(j)] + p.hi[size_t(j)]) / 2;
          const double r = (p.hi[size_t(j)] - p.lo[size_t(j)]) / 2;
          want += wj * m;
          rad += std::abs(wj) * r;
          mag += (std::abs(m) + r) * (std::abs(wj) + 2 * d2.at(d2.zp, p.e, n, j));
        }
        const double bound = rad + gamma(I + 2 * d2.groups + 12) * mag + 1e-30;
        ASSERT_LE(std::abs(o[n] - want), bound)
            << "out[" << p.t << ", " << p.s << ", " << n << "] = " << o[n] << ", oracle " << want
            << " (expert " << p.e << ")";
      }
    }
  }

  // The intermediate intervals of every pair as GEMM2 reads them (see check()).
  template <class Pairs>
  void quantize_intervals(Pairs& pairs) const {
    if (spec.dtype == DType::kBF16) {
      for (auto& p : pairs)
        for (size_t j = 0; j < p.lo.size(); ++j) {
          p.lo[j] = bf16_to_float(float_to_bf16(float(p.lo[j])));
          p.hi[j] = bf16_to_float(float_to_bf16(float(p.hi[j])));
        }
      return;
    }
    // Scale groups: the row (kToken), blocks of spec.group (kBlock), every row (kTensor).
    const int64_t I = c.I, g = spec.scale == ScaleKind::kBlock ? spec.group : I;
    auto amax = [](const auto& p, int64_t j0, int64_t j1) {
      double lo = 0, hi = 0;
      for (int64_t j = j0; j < j1; ++j) {
        const double l = p.lo[size_t(j)], h = p.hi[size_t(j)];
        lo = std::max(lo, l > 0 ? l : h < 0 ? -h : 0.0);
        hi = std::max(hi, std::max(std::abs(l), std::abs(h)));
      }
      return std::pair{lo, hi};
    };
    std::pair<double, double> tensor{0, 0};
    for (const auto& p : pairs) {
      const auto a = amax(p, 0, I);
      tensor = {std::max(tensor.first, a.first), std::max(tensor.second, a.second)};
    }
    for (auto& p : pairs)
      for (int64_t j0 = 0; j0 < I; j0 += g) {
        const int64_t j1 = std::min(I, j0 + g);
        const auto a = spec.scale == ScaleKind::kTensor ? tensor : amax(p, j0, j1);
        const auto s = scale_range(a.first, a.second);
        for (int64_t j = j0; j < j1; ++j) {
          const auto v = quantized_range(p.lo[size_t(j)], p.hi[size_t(j)], s);
          p.lo[size_t(j)] = v.first, p.hi[size_t(j)] = v.second;
        }
      }
  }
};

MoEProblem problem_of(const Experts& x, int64_t tokens, int k) {
  return problem_for(x.info(), tokens, k);
}

// apply with exactly workspace_size() bytes and a poisoned tail that must survive; out starts
// as NaN so every element must be written.
Tensor run(const Experts& x, const DispatchedBatch& batch, int64_t H) {
  const int64_t M = batch.a1.size(0);
  const int k = int(batch.topk_ids.size(1));
  EXPECT_FALSE(x.can_implement(problem_of(x, M, k)).has_value());
  const size_t bytes = x.workspace_size(problem_of(x, M, k));
  constexpr size_t kTail = 4096;
  Tensor ws_storage(DType::kU8, {int64_t(bytes + kTail)});
  std::memset(ws_storage.data<std::byte>() + bytes, 0xab, kTail);
  Workspace ws(ws_storage.data<std::byte>(), bytes);
  Tensor out = test::sentinel_tensor(DType::kF32, {M, int64_t(k), H});
  x.apply(batch, out, ws, {});
  for (size_t i = 0; i < kTail; ++i)
    if (ws_storage.data<uint8_t>()[bytes + i] != 0xab) {
      ADD_FAILURE() << "apply wrote past workspace_size() at +" << i;
      break;
    }
  return out;
}

TensorView rows(const Tensor& out) {  // [M, k, H] -> [M * k, H]
  return out.view().reshaped({out.size(0) * out.size(1), out.size(2)});
}

// Runs every family on the case, checks each against the oracle; with an activation free of
// transcendentals (relu2) every family must give the scalar family's bits.
void check_case(const QCase& c, uint64_t seed) {
  SCOPED_TRACE(label(c));
  QProblem pb(c, seed);
  std::vector<Tensor> outs;
  for (CpuIsa isa : supported_isas()) {
    SCOPED_TRACE(name(isa));
    auto x = make_cpu_experts(pb.w, c.act, {.num_threads = 2, .isa = isa});
    EXPECT_EQ(x->activation_spec().dtype, pb.spec.dtype);
    EXPECT_EQ(x->activation_spec().scale, pb.spec.scale);
    Tensor out = run(*x, pb.batch(), c.H);
    pb.check(out);
    if (c.act.fn == ActivationFn::kRelu2 && !outs.empty())
      EXPECT_TRUE(test::bits_equal(rows(out), rows(outs[0])));
    outs.push_back(std::move(out));
  }
}

// Every format on a shape whose H and I are not multiples of any group or panel (ragged last
// groups; 4-bit codes need even K), relu2 (bit-exact across families) and silu.
TEST(CpuQuant, EveryFormatEveryFamily) {
  uint64_t seed = 1000;
  for (const std::string& f : all_formats())
    for (ActivationFn fn : {ActivationFn::kRelu2, ActivationFn::kSilu}) {
      QCase c;
      c.format = f;
      c.act.fn = fn;
      check_case(c, ++seed);
    }
}

// Shapes: aligned, 1 token, many tokens per expert (the tall tiles), odd H and I where the
// codes are bytes, the non-gated and interleaved layouts, no biases.
TEST(CpuQuant, Shapes) {
  uint64_t seed = 2000;
  for (const std::string& f : all_formats()) {
    const bool nibbles = (f[0] == 'w' && f[1] == '4') || f.find("fp4") != std::string::npos;
    struct S {
      int64_t H, I, M;
    };
    std::vector<S> shapes = {{256, 128, 1}, {128, 64, 40}, {66, 34, 19}};
    if (!nibbles) shapes.push_back({129, 67, 11});
    for (const S& sh : shapes) {
      QCase c;
      c.format = f;
      c.H = sh.H, c.I = sh.I, c.M = sh.M;
      c.k = sh.M == 40 ? 3 : 2;
      c.bias = sh.M != 19;
      c.act.gated = sh.M != 11;
      c.act.layout = sh.M == 40 ? GateUpLayout::kInterleaved : GateUpLayout::kSplit;
      check_case(c, ++seed);
    }
  }
}

// Every e4m3 code but NaN (subnormals included, which the SIMD families widen through fp16) in
// the weights of every family: the oracle and the scalar family's bits.
TEST(CpuQuant, EveryE4m3Code) {
  QCase c;
  c.format = "fp8-token";
  c.act.fn = ActivationFn::kRelu2;
  QProblem pb(c, 31);
  for (Tensor* t : {&pb.qw.w13.data, &pb.qw.w2.data}) {
    uint8_t* d = t->data<uint8_t>();
    for (int64_t i = 0; i < t->numel(); ++i) {
      const uint8_t code = uint8_t(i * 37 % 256);
      d[i] = (code & 0x7f) == 0x7f ? 0 : code;
    }
  }
  std::vector<Tensor> outs;
  for (CpuIsa isa : supported_isas()) {
    SCOPED_TRACE(name(isa));
    auto x = make_cpu_experts(pb.w, c.act, {.num_threads = 2, .isa = isa});
    Tensor out = run(*x, pb.batch(), c.H);
    pb.check(out);
    if (!outs.empty()) EXPECT_TRUE(test::bits_equal(rows(out), rows(outs[0])));
    outs.push_back(std::move(out));
  }
}

// Bit-identical for 1 and 2 threads and run to run, and a token's output does not depend on
// the other tokens of the batch (its expert's row count changes the tiles) -- except with
// per-tensor scales, whose intermediate scale is the batch's.
TEST(CpuQuant, DeterministicAndBatchInvariant) {
  for (const std::string& f : all_formats()) {
    SCOPED_TRACE(f);
    QCase c;
    c.format = f;
    c.M = 23;
    c.H = 256;
    c.I = 96;
    QProblem pb(c, 77);
    for (CpuIsa isa : supported_isas()) {
      SCOPED_TRACE(name(isa));
      auto x1 = make_cpu_experts(pb.w, c.act, {.num_threads = 1, .isa = isa});
      auto x2 = make_cpu_experts(pb.w, c.act, {.num_threads = 2, .isa = isa});
      Tensor o1 = run(*x1, pb.batch(), c.H), o2 = run(*x2, pb.batch(), c.H);
      Tensor o3 = run(*x2, pb.batch(), c.H);
      EXPECT_TRUE(test::bits_equal(rows(o2), rows(o1)));
      EXPECT_TRUE(test::bits_equal(rows(o3), rows(o2)));
      if (pb.spec.scale == ScaleKind::kTensor) continue;
      for (int64_t t : {int64_t(0), c.M / 2, c.M - 1}) {  // token t alone
        DispatchedBatch b = pb.batch();
        b.a1 = pb.a1.view().slice0(t, t + 1);
        b.topk_ids = pb.ids.view().slice0(t, t + 1);
        if (pb.spec.scale != ScaleKind::kNone)
          b.a1_scale.scale = pb.a1_scale.view().slice0(t, t + 1);
        Tensor alone = run(*x2, b, c.H);
        const TensorView want = rows(o2).slice0(t * c.k, (t + 1) * c.k);
        EXPECT_TRUE(test::bits_equal(rows(alone), want)) << "token " << t;
      }
    }
  }
}

// Bad activations are refused before anything is written, naming what is wrong.
TEST(CpuQuant, RejectsBadActivations) {
  for (const char* f : {"fp8-token", "fp8-block", "int8", "w4a16"}) {
    SCOPED_TRACE(f);
    QCase c;
    c.format = f;
    QProblem pb(c, 9);
    auto x = make_cpu_experts(pb.w, c.act, {.num_threads = 2});
    std::vector<char> ws(x->workspace_size(problem_of(*x, c.M, c.k)));
    auto expect_refused = [&](const DispatchedBatch& b, const char* needle) {
      Tensor out = test::sentinel_tensor(DType::kF32, {c.M, int64_t(c.k), c.H});
      test::Snapshot snap(out);
      Workspace w(ws.data(), ws.size());
      EXPECT_TRUE(test::error_mentions([&] { x->apply(b, out, w, {}); }, needle)) << needle;
      EXPECT_TRUE(snap.unchanged());
    };
    Tensor wrong_a1 = test::random_tensor(
        pb.spec.dtype == DType::kBF16 ? DType::kF32 : DType::kBF16, {c.M, c.H}, 3);
    DispatchedBatch b = pb.batch();
    b.a1 = wrong_a1;
    expect_refused(b, "a1");
    if (pb.spec.scale == ScaleKind::kNone) {
      b = pb.batch();
      b.a1_scale.kind = ScaleKind::kToken;
      expect_refused(b, "scale");
      continue;
    }
    b = pb.batch();
    b.a1_scale = {};  // missing scale
    expect_refused(b, "scale");
    b = pb.batch();
    b.a1_scale.scale = pb.a1_scale.view().slice0(0, c.M - 1);  // one row short
    expect_refused(b, "scale");
    Tensor f16_scale = test::random_tensor(DType::kF16, {pb.a1_scale.size(0)}, 4);
    if (pb.spec.scale == ScaleKind::kToken) {
      b = pb.batch();
      b.a1_scale.scale = f16_scale;
      expect_refused(b, "scale");
    }
  }
}

// Weights the experts cannot take are refused at construction with the reason.
TEST(CpuQuant, RejectsBadWeights) {
  QCase c;
  c.format = "fp8-tensor:static";
  QProblem st(c, 5);
  EXPECT_TRUE(test::error_mentions([&] { make_cpu_experts(st.w, c.act); }, "static"));

  c.format = "fp8-token";
  QProblem nan(c, 6);  // an e4m3 NaN code in w2 of global expert 5 (local slot 2)
  static_cast<uint8_t*>(nan.qw.w2.data.view().data)[5 * c.H * c.I + 3 * c.I + 7] = 0x7f;
  EXPECT_TRUE(test::error_mentions([&] { make_cpu_experts(nan.w, c.act); }, "NaN code"));

  // int8 dot products over a K whose int32 sums could overflow.
  c.format = "int8";
  c.E_global = 1, c.H = 66000, c.I = 1, c.source = {0};
  QProblem big(c, 7);
  EXPECT_TRUE(test::error_mentions([&] { make_cpu_experts(big.w, c.act); }, "overflow"));
}

TEST(CpuCeilings, Int8PeakIsPositive) {
  for (CpuIsa isa : supported_isas())
    EXPECT_GT(measure_cpu_peak_gflops(isa, DType::kI8, 1), 0.0) << name(isa);
  EXPECT_TRUE(test::error_mentions([] { measure_cpu_peak_gflops(CpuIsa::kScalar, DType::kU4, 1); },
                                   "int4"));
}

}  // namespace
}  // namespace moekit
