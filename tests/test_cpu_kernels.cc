// The CPU experts backend: every ISA family this machine runs x bf16/fp32 weights x every
// activation and layout x biases x odd/even/aligned shapes, against a double-precision loop
// with a rigorous per-element error bound; -1 ids, id validation, determinism across runs and
// thread counts, workspace bounds, and the weight-and-reduce step.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "moekit/cpu.h"
#include "support/test_support.h"

namespace moekit {
namespace {

using test::gamma;
using test::kU;
using test::supported_isas;

double bf16_round(double v) {
  return bf16_to_float(float_to_bf16(float(v)));
}

struct Case {
  int64_t E_global = 6, H = 7, I = 5, M = 7;
  int k = 2;
  DType wdtype = DType::kBF16;
  Activation act;
  bool bias = true;
  std::vector<int32_t> source = {4, 1, 5, 0};  // local slot -> global expert
  double gate_scale = 1;  // W13 magnitudes x this (100: gates of +-100s, exp over/underflows)
};

// Weights, inputs and the oracle of one case. Weight magnitudes ~2/sqrt(K) keep GEMM1's
// outputs O(1), so every activation sees both its linear and its saturating range.
struct Problem {
  Case c;
  ExpertWeights w;
  Tensor w13, w2, b13, b2, a1, ids;
  int64_t E_local() const { return int64_t(c.source.size()); }

  explicit Problem(const Case& cs, uint64_t seed) : c(cs) {
    const int64_t rows = c.act.w13_rows(c.I);
    const double s1 = 2 * c.gate_scale / std::sqrt(double(c.H)), s2 = 2 / std::sqrt(double(c.I));
    w13 = test::random_tensor(c.wdtype, {c.E_global, rows, c.H}, seed + 1, -s1, s1);
    w2 = test::random_tensor(c.wdtype, {c.E_global, c.H, c.I}, seed + 2, -s2, s2);
    w.w13 = w13;
    w.w2 = w2;
    if (c.bias) {
      b13 = test::random_tensor(DType::kF32, {c.E_global, rows}, seed + 3, -0.5, 0.5);
      b2 = test::random_tensor(DType::kBF16, {c.E_global, c.H}, seed + 4, -0.5, 0.5);
      w.b13 = b13;
      w.b2 = b2;
    }
    w.source = c.source;
    a1 = test::random_tensor(c.wdtype, {c.M, c.H}, seed + 5);
    ids = Tensor(DType::kI32, {c.M, c.k});
    std::mt19937 rng{uint32_t(seed)};
    // Slot 2 of the local experts never gets tokens; about 1 in 6 pairs is -1.
    for (int64_t i = 0; i < c.M * c.k; ++i) {
      int32_t id = int32_t(rng() % uint32_t(E_local() + 1)) - 1;
      if (id == 2 && E_local() > 3) id = 3;
      ids.data<int32_t>()[i] = id;
    }
  }

  double wv(const Tensor& t, int64_t e, int64_t r, int64_t col) const {
    const TensorView& v = t.view();
    return load_as_float(v.data, v.dtype, e * v.stride[0] + r * v.stride[1] + col * v.stride[2]);
  }
  double bias(const Tensor& t, int64_t e, int64_t r) const {
    if (!c.bias) return 0;
    return load_as_float(t.view().data, t.dtype(), e * t.view().stride[0] + r);
  }

  // Checks out [M, k, H] against the oracle. For each pair the oracle carries an interval per
  // intermediate element that contains what any correct kernel computes:
  //  * GEMM1 x = fp32 sum of K products (exact for bf16 x bf16) plus bias:
  //      |x - x_exact| <= gamma(K + 2) * (sum |a w| + |b|)                          (eg)
  //  * activation: first-order propagation of eg (derivative by central differences) plus
  //    16 ulp of |h| and of |g| * |up| (the scalar formula's 1 + tanh / 1 + erf cancels;
  //    vector exp is ~2 ulp):                                                   -> h +- d
  //  * bf16 intermediate: round-to-nearest-even is monotone, so the kernel's value lies in
  //    [bf16(h - d), bf16(h + d)]: mostly one point, two neighbours where h is near a tie.
  //  * GEMM2 over that interval (center m_j, radius r_j):
  //      |out - sum W2 m - b2| <= sum |W2| r + gamma(K + 2) (sum |W2| (|m| + r) + |b2|)
  // This is tight (a wrong column, bias, activation or rounding mode fails it) and never
  // flakes (it is a bound, not a tolerance).
  void check(const TensorView& out) const {
    const int64_t H = c.H, I = c.I, k = c.k;
    const bool mid_bf16 = c.wdtype == DType::kBF16;
    std::vector<double> m(I), r(I);
    for (int64_t t = 0; t < c.M; ++t) {
      for (int64_t s = 0; s < k; ++s) {
        const int32_t id = ids.data<int32_t>()[t * k + s];
        const float* o = out.ptr<float>() + (t * k + s) * H;
        if (id < 0) {
          for (int64_t n = 0; n < H; ++n)
            ASSERT_EQ(std::signbit(o[n]) || o[n] != 0.f, false)
                << "slot of id -1 not exactly +0 at [" << t << ", " << s << ", " << n << "]";
          continue;
        }
        const int64_t e = c.source[size_t(id)];
        auto gemm1 = [&](int64_t row, double* err) {
          double acc = bias(b13, e, row), mag = std::abs(acc);
          for (int64_t h = 0; h < H; ++h) {
            const double p =
                load_as_float(a1.view().data, a1.dtype(), t * H + h) * wv(w13, e, row, h);
            acc += p;
            mag += std::abs(p);
          }
          *err = gamma(H + 2) * mag;
          return acc;
        };
        for (int64_t j = 0; j < I; ++j) {
          double eg, eu = 0;
          const double g = gemm1(c.act.gate_row(j, I), &eg);
          const double u = c.act.gated ? gemm1(c.act.up_row(j, I), &eu) : 0;
          const double h = apply_activation<double>(c.act, g, u);
          const double d = test::activation_error(c.act, g, eg, u, eu);
          double lo = h - d, hi = h + d;
          if (mid_bf16) lo = bf16_round(lo), hi = bf16_round(hi);
          m[size_t(j)] = (lo + hi) / 2;
          r[size_t(j)] = (hi - lo) / 2;
        }
        for (int64_t n = 0; n < H; ++n) {
          const double b = bias(b2, e, n);
          double want = b, rad = 0, mag = std::abs(b);
          for (int64_t j = 0; j < I; ++j) {
            const double wj = wv(w2, e, n, j);
            want += wj * m[size_t(j)];
            rad += std::abs(wj) * r[size_t(j)];
            mag += std::abs(wj) * (std::abs(m[size_t(j)]) + r[size_t(j)]);
          }
          const double bound = rad + gamma(I + 2) * mag + 1e-30;
          ASSERT_LE(std::abs(o[n] - want), bound)
              << "out[" << t << ", " << s << ", " << n << "] = " << o[n] << ", oracle " << want
              << " (expert " << id << ")";
        }
      }
    }
  }
};

MoEProblem problem_of(const Experts& x, int64_t tokens, int k) {
  return problem_for(x.info(), tokens, k, x.info().weight_dtype);  // float experts: x in their dtype
}

// Runs apply with exactly workspace_size() bytes followed by a poisoned tail that must survive;
// out starts as NaN so every element must be written.
Tensor run(const Experts& x, const Problem& pb, const TensorView& a1) {
  const int64_t M = a1.size(0), H = pb.c.H;
  const int k = pb.c.k;
  EXPECT_FALSE(x.can_implement(problem_of(x, M, k)).has_value());
  const size_t bytes = x.workspace_size(problem_of(x, M, k));
  constexpr size_t kTail = 4096;
  Tensor ws_storage(DType::kU8, {int64_t(bytes + kTail)});
  std::memset(ws_storage.data<std::byte>() + bytes, 0xab, kTail);
  Workspace ws(ws_storage.data<std::byte>(), bytes);
  Tensor out = test::sentinel_tensor(DType::kF32, {M, int64_t(k), H});
  DispatchedBatch batch;
  batch.a1 = a1;
  batch.topk_ids = pb.ids;
  x.apply(batch, out, ws, {});
  for (size_t i = 0; i < kTail; ++i)
    if (ws_storage.data<uint8_t>()[bytes + i] != 0xab) {
      ADD_FAILURE() << "apply wrote past workspace_size() at +" << i;
      break;
    }
  return out;
}

std::vector<Activation> all_activations() {
  std::vector<Activation> out;
  for (ActivationFn fn : {ActivationFn::kSilu, ActivationFn::kGeluErf, ActivationFn::kGeluTanh,
                          ActivationFn::kRelu2, ActivationFn::kSwigluOai}) {
    for (GateUpLayout layout : {GateUpLayout::kSplit, GateUpLayout::kInterleaved}) {
      Activation a;
      a.fn = fn;
      a.layout = layout;
      out.push_back(a);
    }
    if (fn != ActivationFn::kSwigluOai) {
      Activation a;
      a.fn = fn;
      a.gated = false;
      out.push_back(a);
    }
  }
  return out;
}

std::string label(CpuIsa isa, const Case& c) {
  return detail::concat(name(isa), " ", name(c.wdtype), " ", c.act.str(),
                        c.act.layout == GateUpLayout::kInterleaved ? " interleaved" : "",
                        c.bias ? " bias" : "", " H=", c.H, " I=", c.I, " M=", c.M, " k=", c.k);
}

void check_case(const Case& c, uint64_t seed) {
  Problem pb(c, seed);
  for (CpuIsa isa : supported_isas()) {
    SCOPED_TRACE(label(isa, c));
    auto x = make_cpu_experts(pb.w, c.act, {.num_threads = 2, .isa = isa});
    Tensor out = run(*x, pb, pb.a1);
    pb.check(out);
  }
}

TEST(CpuIsa, NamesParseDetect) {
  for (CpuIsa isa : {CpuIsa::kScalar, CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAvx512Bf16})
    EXPECT_EQ(parse_cpu_isa(name(isa)), isa);
  EXPECT_TRUE(test::error_mentions([] { parse_cpu_isa("avx9"); }, "avx512bf16"));
  EXPECT_TRUE(cpu_supports(CpuIsa::kScalar));
  EXPECT_TRUE(cpu_supports(detect_cpu_isa()));
}

// Every family x dtype x activation x layout x bias on an odd and a larger shape.
TEST(CpuExperts, ActivationsLayoutsBiases) {
  uint64_t seed = 100;
  for (DType wd : {DType::kBF16, DType::kF32})
    for (const Activation& act : all_activations())
      for (bool bias : {false, true})
        for (auto [H, I, M] : {std::tuple{7, 5, 7}, std::tuple{129, 66, 19}}) {
          Case c;
          c.wdtype = wd;
          c.act = act;
          c.bias = bias;
          c.H = H;
          c.I = I;
          c.M = M;
          check_case(c, ++seed);
        }
}

// Gates far beyond exp's range (|g| up to ~300): silu(-g) and gelu_tanh's tail are (-)0, not
// NaN (the vector reciprocal takes 1 + exp(89) = inf as the largest float).
TEST(CpuExperts, ExtremeGates) {
  uint64_t seed = 900;
  for (DType wd : {DType::kBF16, DType::kF32})
    for (const Activation& act : all_activations()) {
      Case c;
      c.wdtype = wd;
      c.act = act;
      c.H = 129;
      c.I = 66;
      c.M = 19;
      c.gate_scale = 100;
      check_case(c, ++seed);
    }
}

// Odd, even and panel-aligned shapes, 1 to 99 tokens, k up to 4.
TEST(CpuExperts, Shapes) {
  uint64_t seed = 500;
  for (DType wd : {DType::kBF16, DType::kF32})
    for (int64_t H : {7, 64, 129})
      for (int64_t I : {7, 64, 129})
        for (int64_t M : {1, 7, 19, 99}) {
          Case c;
          c.wdtype = wd;
          c.H = H;
          c.I = I;
          c.M = M;
          c.k = M == 99 ? 4 : 2;
          c.act.fn = ActivationFn::kSilu;
          check_case(c, ++seed);
        }
}

TEST(CpuExperts, AllTokensOnOneExpertAndStridedInput) {
  for (DType wd : {DType::kBF16, DType::kF32}) {
    Case c;
    c.wdtype = wd;
    c.H = 65;
    c.I = 33;
    c.M = 40;
    c.k = 1;
    Problem pb(c, 7);
    for (int64_t t = 0; t < c.M; ++t) pb.ids.data<int32_t>()[t] = 1;
    test::Strided a = test::strided_copy(pb.a1, 3);
    for (CpuIsa isa : supported_isas()) {
      SCOPED_TRACE(label(isa, c));
      auto x = make_cpu_experts(pb.w, c.act, {.num_threads = 2, .isa = isa});
      pb.check(run(*x, pb, a.view));
    }
  }
}

TensorView rows(const Tensor& out) {  // [M, k, H] -> [M * k, H]
  return out.view().reshaped({out.size(0) * out.size(1), out.size(2)});
}

// Bit-identical run to run and for 1 vs 2 threads. With bf16 weights every product is exact and
// all families add them in the same order (odd k, then even k, per K-pair), so with an
// activation free of transcendentals (relu2) every family gives the same bits.
TEST(CpuExperts, Deterministic) {
  Case c;
  c.H = 200;
  c.I = 150;
  c.M = 99;
  c.k = 3;
  for (DType wd : {DType::kBF16, DType::kF32})
    for (ActivationFn fn : {ActivationFn::kSilu, ActivationFn::kRelu2}) {
      c.wdtype = wd;
      c.act.fn = fn;
      Problem pb(c, 11);
      std::vector<Tensor> outs;
      for (CpuIsa isa : supported_isas()) {
        SCOPED_TRACE(label(isa, c));
        auto x1 = make_cpu_experts(pb.w, c.act, {.num_threads = 1, .isa = isa});
        auto x2 = make_cpu_experts(pb.w, c.act, {.num_threads = 2, .isa = isa});
        Tensor o1 = run(*x1, pb, pb.a1), o2 = run(*x2, pb, pb.a1), o3 = run(*x2, pb, pb.a1);
        EXPECT_TRUE(test::bits_equal(rows(o2), rows(o1)));
        EXPECT_TRUE(test::bits_equal(rows(o3), rows(o2)));
        outs.push_back(std::move(o1));
      }
      if (wd == DType::kBF16 && fn == ActivationFn::kRelu2)
        for (size_t i = 1; i < outs.size(); ++i)
          EXPECT_TRUE(test::bits_equal(rows(outs[i]), rows(outs[0]))) << name(supported_isas()[i]);
    }
}

TEST(CpuExperts, RejectsBadIdsBeforeWriting) {
  Case c;
  Problem pb(c, 3);
  auto x = make_cpu_experts(pb.w, c.act, {.num_threads = 2});
  std::vector<char> ws(x->workspace_size(problem_of(*x, c.M, c.k)));
  for (int32_t bad : {int32_t(pb.E_local()), -2}) {
    pb.ids.data<int32_t>()[5] = bad;
    Tensor out = test::sentinel_tensor(DType::kF32, {c.M, int64_t(c.k), c.H});
    test::Snapshot snap(out);
    DispatchedBatch batch;
    batch.a1 = pb.a1;
    batch.topk_ids = pb.ids;
    Workspace w(ws.data(), ws.size());
    EXPECT_TRUE(test::error_mentions([&] { x->apply(batch, out, w, {}); }, "outside"));
    EXPECT_TRUE(snap.unchanged());
  }
}

TEST(CpuExperts, RejectsBadWeightsAndShapes) {
  Case c;
  Problem pb(c, 5);
  Activation oai;
  oai.fn = ActivationFn::kSwigluOai;
  oai.gated = false;
  EXPECT_ANY_THROW(make_cpu_experts(pb.w, oai));
  Tensor w13h = test::random_tensor(DType::kF16, {c.E_global, 2 * c.I, c.H}, 1);
  Tensor w2h = test::random_tensor(DType::kF16, {c.E_global, c.H, c.I}, 2);
  ExpertWeights half = pb.w;
  half.w13 = w13h;
  half.w2 = w2h;
  EXPECT_ANY_THROW(make_cpu_experts(half, c.act));
  auto x = make_cpu_experts(pb.w, c.act);
  EXPECT_EQ(x->activation_spec().dtype, DType::kBF16);
  EXPECT_EQ(x->weight_application(), TopKWeightApplied::kNone);
  EXPECT_EQ(x->name(), "cpu-" + std::string(name(detect_cpu_isa())));
  MoEProblem p = problem_of(*x, 4, 2);
  p.hidden += 1;
  EXPECT_TRUE(x->can_implement(p).has_value());
  // Workspace follows the chunk, not the batch.
  EXPECT_LT(x->workspace_size(problem_of(*x, 64, 2)), x->workspace_size(problem_of(*x, 4096, 2)));
}

TEST(CpuWeightAndReduce, SlotOrderFp32ThenRounded) {
  const int64_t M = 9, k = 3, H = 700;  // H > the 512-column chunk
  Tensor f = test::random_tensor(DType::kF32, {M, k, H}, 1);
  Tensor w = test::random_tensor(DType::kF32, {M, k}, 2, 0, 1);
  Tensor ids(DType::kI32, {M, k});
  for (int64_t i = 0; i < M * k; ++i) ids.data<int32_t>()[i] = i % 4 == 1 ? -1 : int32_t(i % 5);
  for (int64_t s = 0; s < k; ++s) ids.data<int32_t>()[2 * k + s] = -1;  // a padding row
  auto wr = make_cpu_weight_and_reduce(2);
  for (DType yd : {DType::kF32, DType::kBF16, DType::kF16})
    for (TopKWeightApplied ap : {TopKWeightApplied::kNone, TopKWeightApplied::kWeighted}) {
      Tensor y = test::sentinel_tensor(yd, {M, H}), want(yd, {M, H});
      wr->apply(f, ids, w, ap, y, {});
      for (int64_t t = 0; t < M; ++t)
        for (int64_t h = 0; h < H; ++h) {
          float acc = 0;
          for (int64_t s = 0; s < k; ++s) {
            if (ids.data<int32_t>()[t * k + s] < 0) continue;
            const float ws = ap == TopKWeightApplied::kNone ? w.data<float>()[t * k + s] : 1.f;
            acc = acc + ws * f.data<float>()[(t * k + s) * H + h];
          }
          store_from_float(want.view().data, yd, t * H + h, acc);
        }
      EXPECT_TRUE(test::bits_equal(y, want)) << name(yd);
    }
  Tensor fr = test::random_tensor(DType::kF32, {M, H}, 3);
  Tensor y = test::sentinel_tensor(DType::kBF16, {M, H}), want(DType::kBF16, {M, H});
  wr->apply(fr, ids, w, TopKWeightApplied::kWeightedAndReduced, y, {});
  for (int64_t i = 0; i < M * H; ++i)
    store_from_float(want.view().data, DType::kBF16, i, fr.data<float>()[i]);
  EXPECT_TRUE(test::bits_equal(y, want));
}

TEST(CpuCeilings, PeakIsPositive) {
  EXPECT_GT(measure_cpu_peak_gflops(detect_cpu_isa(), DType::kBF16, 1), 0.0);
}

}  // namespace
}  // namespace moekit
