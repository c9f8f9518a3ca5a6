// Router tests: hand-computed cases per method, the selection rule (ties, NaN, inf), bf16 and
// strided inputs, bad input, and a slow full-sort reference on random inputs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "moekit/router.h"

namespace moekit {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr int32_t kIdSentinel = -7;
constexpr float kWeightSentinel = -123.0f;

RouterConfig make_config(RoutingMethod method, int E, int k, bool renormalize = true) {
  RouterConfig c;
  c.method = method;
  c.num_experts = E;
  c.top_k = k;
  c.renormalize = renormalize;
  return c;
}

RouterConfig grouped_config(int E, int k, int n_group, int topk_group, float scale,
                            bool renormalize = true) {
  RouterConfig c = make_config(RoutingMethod::kSigmoidGroupedTopK, E, k, renormalize);
  c.n_group = n_group;
  c.topk_group = topk_group;
  c.routed_scaling_factor = scale;
  return c;
}

struct Routed {
  std::vector<int32_t> ids;    // [M, k]
  std::vector<float> weights;  // [M, k]
};

// Routes fp32 logits [M, E] (row-major vector) with an optional bias [E].
Routed run(const RouterConfig& c, std::vector<float> logits, const std::vector<float>& bias = {}) {
  const int64_t M = static_cast<int64_t>(logits.size()) / c.num_experts;
  Routed r{std::vector<int32_t>(M * c.top_k, kIdSentinel),
           std::vector<float>(M * c.top_k, kWeightSentinel)};
  std::vector<float> b = bias;
  TensorView bias_view =
      b.empty() ? TensorView{} : TensorView(b.data(), DType::kF32, {c.num_experts});
  route(c, TensorView(logits.data(), DType::kF32, {M, c.num_experts}), bias_view,
        TensorView(r.ids.data(), DType::kI32, {M, c.top_k}),
        TensorView(r.weights.data(), DType::kF32, {M, c.top_k}));
  return r;
}

double sigmoid_d(double x) {
  return 1.0 / (1.0 + std::exp(-x));
}
float sigmoid_f(float x) {  // the routers' own choice scores (bit-identical on CPU and CUDA)
  return routing_sigmoid(x);
}

void expect_weights_near(const std::vector<float>& got, const std::vector<double>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i)
    EXPECT_NEAR(got[i], want[i], 1e-6 * std::max(1.0, std::abs(want[i]))) << "weight " << i;
}

// ---------------------------------------------------------------------------------------------
// The slow reference: whole-row stable sort by score (NaN last), so equal scores keep id order.

std::vector<int32_t> sorted_by_score(const std::vector<float>& score,
                                     std::vector<int32_t> candidates) {
  std::sort(candidates.begin(), candidates.end());
  std::stable_sort(candidates.begin(), candidates.end(), [&](int32_t a, int32_t b) {
    const float sa = score[a], sb = score[b];
    if (std::isnan(sa)) return false;
    return std::isnan(sb) || sa > sb;
  });
  return candidates;
}

std::vector<int32_t> iota_ids(int n, int first = 0) {
  std::vector<int32_t> v(n);
  std::iota(v.begin(), v.end(), first);
  return v;
}

void renormalize_d(std::vector<double>& w) {
  const double sum = std::accumulate(w.begin(), w.end(), 0.0);
  if (sum > 0)
    for (double& v : w) v /= sum;
}

std::vector<double> softmax_d(const std::vector<double>& x) {
  const double mx = *std::max_element(x.begin(), x.end());
  std::vector<double> p;
  for (double v : x) p.push_back(std::exp(v - mx));
  renormalize_d(p);
  return p;
}

// One row of finite logits -> (ids, weights), written from the header's description.
void reference_row(const RouterConfig& c, const std::vector<float>& logits,
                   const std::vector<float>& bias, std::vector<int32_t>& ids,
                   std::vector<double>& weights) {
  const int E = c.num_experts;
  std::vector<int32_t> order;
  if (c.method != RoutingMethod::kSigmoidGroupedTopK) {
    order = sorted_by_score(logits, iota_ids(E));
  } else {
    std::vector<float> choice(E);
    for (int e = 0; e < E; ++e) choice[e] = sigmoid_f(logits[e]) + bias[e];
    const int per_group = E / c.n_group;
    std::vector<float> group_score(c.n_group);
    for (int g = 0; g < c.n_group; ++g) {
      const auto members = sorted_by_score(choice, iota_ids(per_group, g * per_group));
      group_score[g] =
          per_group == 1 ? choice[members[0]] : choice[members[0]] + choice[members[1]];
    }
    const auto groups = sorted_by_score(group_score, iota_ids(c.n_group));
    std::vector<int32_t> kept;
    for (int i = 0; i < c.topk_group; ++i)
      for (int j = 0; j < per_group; ++j) kept.push_back(groups[i] * per_group + j);
    order = sorted_by_score(choice, kept);
  }
  ids.assign(order.begin(), order.begin() + c.top_k);

  std::vector<double> all(logits.begin(), logits.end());
  weights.clear();
  switch (c.method) {
    case RoutingMethod::kSoftmaxTopK: {
      const auto p = softmax_d(all);
      for (int32_t e : ids) weights.push_back(p[e]);
      if (c.renormalize) renormalize_d(weights);
      break;
    }
    case RoutingMethod::kTopKSoftmax: {
      std::vector<double> chosen;
      for (int32_t e : ids) chosen.push_back(logits[e]);
      weights = softmax_d(chosen);
      break;
    }
    case RoutingMethod::kSigmoidGroupedTopK:
      for (int32_t e : ids) weights.push_back(sigmoid_d(logits[e]));
      if (c.renormalize) renormalize_d(weights);
      for (double& w : weights) w *= c.routed_scaling_factor;
      break;
    case RoutingMethod::kLlama4Top1Sigmoid:
      weights.push_back(sigmoid_d(logits[ids[0]]));
      break;
  }
}

// Checks every row of `got` against the reference; logits are [M, E] row-major.
void expect_matches_reference(const RouterConfig& c, const std::vector<float>& logits,
                              const std::vector<float>& bias, const Routed& got) {
  const int E = c.num_experts, k = c.top_k;
  const int64_t M = static_cast<int64_t>(logits.size()) / E;
  std::vector<int32_t> ids;
  std::vector<double> weights;
  for (int64_t m = 0; m < M; ++m) {
    reference_row(c, std::vector<float>(logits.begin() + m * E, logits.begin() + (m + 1) * E), bias,
                  ids, weights);
    for (int i = 0; i < k; ++i) {
      ASSERT_EQ(got.ids[m * k + i], ids[i])
          << c.str() << " row " << m << " rank " << i << " (first bad coordinate)";
      ASSERT_NEAR(got.weights[m * k + i], weights[i], 2e-6 * std::max(1.0, std::abs(weights[i])))
          << c.str() << " row " << m << " rank " << i;
    }
  }
}

// Random logits with many exact ties (values on a 0.5 grid) mixed with continuous values.
std::vector<float> random_logits(std::mt19937& rng, int64_t n) {
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::bernoulli_distribution on_grid(0.4);
  std::vector<float> v(n);
  for (float& x : v) x = on_grid(rng) ? std::round(normal(rng) * 2.0f) / 2.0f : normal(rng);
  return v;
}

std::vector<float> random_bias(std::mt19937& rng, int E) {
  std::uniform_int_distribution<int> tenth(-3, 3);
  std::vector<float> b(E);
  for (float& x : b) x = static_cast<float>(tenth(rng)) * 0.1f;
  return b;
}

// ---------------------------------------------------------------------------------------------
// Hand-computed cases.

TEST(RouterSoftmaxTopK, HandComputedWithAndWithoutRenormalize) {
  const std::vector<float> logits = {1, 2, 3, 0};
  const double S = std::exp(0.0) + std::exp(1.0) + std::exp(2.0) + std::exp(3.0);

  Routed plain = run(make_config(RoutingMethod::kSoftmaxTopK, 4, 2, false), logits);
  EXPECT_EQ(plain.ids, (std::vector<int32_t>{2, 1}));
  expect_weights_near(plain.weights, {std::exp(3.0) / S, std::exp(2.0) / S});

  Routed renorm = run(make_config(RoutingMethod::kSoftmaxTopK, 4, 2, true), logits);
  EXPECT_EQ(renorm.ids, (std::vector<int32_t>{2, 1}));
  expect_weights_near(renorm.weights, {sigmoid_d(1.0), sigmoid_d(-1.0)});
}

TEST(RouterTopKSoftmax, HandComputed) {
  Routed r = run(make_config(RoutingMethod::kTopKSoftmax, 3, 2), {1, 3, 2});
  EXPECT_EQ(r.ids, (std::vector<int32_t>{1, 2}));
  expect_weights_near(r.weights, {sigmoid_d(1.0), sigmoid_d(-1.0)});

  // Equal chosen logits share the mass; the tie goes to the lower id first.
  Routed tie = run(make_config(RoutingMethod::kTopKSoftmax, 4, 2), {0.5f, -1, 2, 2});
  EXPECT_EQ(tie.ids, (std::vector<int32_t>{2, 3}));
  expect_weights_near(tie.weights, {0.5, 0.5});
}

TEST(RouterLlama4, Top1SigmoidOfLogit) {
  Routed r = run(make_config(RoutingMethod::kLlama4Top1Sigmoid, 3, 1), {0.1f, 2, -1, 0.1f, -5, 2});
  EXPECT_EQ(r.ids, (std::vector<int32_t>{1, 2}));
  expect_weights_near(r.weights, {sigmoid_d(2.0), sigmoid_d(2.0)});
  // Renormalize does not apply: the weight stays the sigmoid, not 1.
  Routed renorm = run(make_config(RoutingMethod::kLlama4Top1Sigmoid, 2, 1, true), {-1, -2});
  expect_weights_near(renorm.weights, {sigmoid_d(-1.0)});
}

// E = 8 in 4 groups of 2: {0,1} {2,3} {4,5} {6,7}. Experts 0 and 7 have the best single scores
// but their groups are weak, so keeping 2 groups picks experts 2 and 3 instead.
const std::vector<float> kGroupLogits = {3, -3, 1, 1, 0.5f, 0.5f, -1, 2.5f};

TEST(RouterGroupedTopK, GroupSelectionChangesTheAnswer) {
  const std::vector<float> no_bias(8, 0.0f);
  Routed all_groups = run(grouped_config(8, 2, 4, 4, 1.0f, false), kGroupLogits, no_bias);
  EXPECT_EQ(all_groups.ids, (std::vector<int32_t>{0, 7}));
  expect_weights_near(all_groups.weights, {sigmoid_d(3), sigmoid_d(2.5)});

  // Group scores: g0 0.953+0.047=1.0, g1 2*0.731=1.462, g2 2*0.622=1.245, g3 0.269+0.924=1.193.
  Routed kept = run(grouped_config(8, 2, 4, 2, 1.0f, false), kGroupLogits, no_bias);
  EXPECT_EQ(kept.ids, (std::vector<int32_t>{2, 3}));
  expect_weights_near(kept.weights, {sigmoid_d(1), sigmoid_d(1)});
}

TEST(RouterGroupedTopK, BiasSteersChoiceButWeightsAreUnbiasedRenormalizedAndScaled) {
  // +0.5 on expert 7 lifts g3 to 1.693: groups g3 and g1 are kept; c7 = 1.424 beats c2 = c3.
  std::vector<float> bias(8, 0.0f);
  bias[7] = 0.5f;
  const double s7 = sigmoid_d(2.5), s2 = sigmoid_d(1);
  Routed renorm = run(grouped_config(8, 2, 4, 2, 2.5f, true), kGroupLogits, bias);
  EXPECT_EQ(renorm.ids, (std::vector<int32_t>{7, 2}));
  expect_weights_near(renorm.weights, {2.5 * s7 / (s7 + s2), 2.5 * s2 / (s7 + s2)});

  Routed plain = run(grouped_config(8, 2, 4, 2, 2.5f, false), kGroupLogits, bias);
  EXPECT_EQ(plain.ids, (std::vector<int32_t>{7, 2}));
  expect_weights_near(plain.weights, {2.5 * s7, 2.5 * s2});
}

TEST(RouterGroupedTopK, SingleExpertGroupsScoreByTheirOnlyExpert) {
  // n_group == E: each group is one expert, so keeping 3 groups is plain top-3.
  const std::vector<float> bias(8, 0.0f);
  Routed r = run(grouped_config(8, 3, 8, 3, 1.0f), kGroupLogits, bias);
  EXPECT_EQ(r.ids, (std::vector<int32_t>{0, 7, 2}));
}

// ---------------------------------------------------------------------------------------------
// Selection rule: ties, NaN and infinities.

const RoutingMethod kAllMethods[] = {RoutingMethod::kSoftmaxTopK, RoutingMethod::kTopKSoftmax,
                                     RoutingMethod::kSigmoidGroupedTopK,
                                     RoutingMethod::kLlama4Top1Sigmoid};

// A valid config of `method` for E experts and (where allowed) k.
RouterConfig config_for(RoutingMethod method, int E, int k) {
  if (method == RoutingMethod::kLlama4Top1Sigmoid) return make_config(method, E, 1);
  if (method == RoutingMethod::kSigmoidGroupedTopK && E % 2 == 0 && k <= E / 2)
    return grouped_config(E, k, 2, 1, 1.0f);
  return method == RoutingMethod::kSigmoidGroupedTopK ? grouped_config(E, k, 1, 1, 1.0f)
                                                      : make_config(method, E, k);
}

Routed run_any(const RouterConfig& c, const std::vector<float>& logits) {
  const bool grouped = c.method == RoutingMethod::kSigmoidGroupedTopK;
  return run(c, logits, grouped ? std::vector<float>(c.num_experts, 0.0f) : std::vector<float>{});
}

TEST(RouterSelection, TiesGoToTheLowerId) {
  for (RoutingMethod method : kAllMethods) {
    const RouterConfig c = config_for(method, 6, 3);
    Routed r = run_any(c, std::vector<float>(6, 0.25f));
    const std::vector<int32_t> lowest = {0, 1, 2};
    EXPECT_EQ(r.ids, std::vector<int32_t>(lowest.begin(), lowest.begin() + c.top_k)) << c.str();
  }
  // -0 and +0 are equal scores.
  Routed zeros = run(make_config(RoutingMethod::kTopKSoftmax, 3, 2), {-1, -0.0f, 0.0f});
  EXPECT_EQ(zeros.ids, (std::vector<int32_t>{1, 2}));
}

TEST(RouterSelection, NaNRanksBelowMinusInfinity) {
  const std::vector<float> row = {kNaN, -kInf, 1, kNaN, kInf, kInf};
  Routed r = run(make_config(RoutingMethod::kTopKSoftmax, 6, 6), row);
  EXPECT_EQ(r.ids, (std::vector<int32_t>{4, 5, 2, 1, 0, 3}));
  Routed top4 = run(make_config(RoutingMethod::kSoftmaxTopK, 6, 4), row);
  EXPECT_EQ(top4.ids, (std::vector<int32_t>{4, 5, 2, 1}));
  // A NaN logit makes the whole softmax NaN (IEEE), but the ids stay valid.
  for (float w : top4.weights) EXPECT_TRUE(std::isnan(w));
}

TEST(RouterSelection, NonFiniteRowsGiveDistinctInRangeIds) {
  const int E = 8;
  const std::vector<std::vector<float>> rows = {
      std::vector<float>(E, kNaN),
      std::vector<float>(E, kInf),
      std::vector<float>(E, -kInf),
      {kNaN, kInf, -kInf, kNaN, -kInf, kInf, kNaN, 0},
      {-kInf, kNaN, -kInf, kNaN, -kInf, kNaN, -kInf, kNaN}};
  for (RoutingMethod method : kAllMethods) {
    for (int k : {1, 3, 4, E}) {
      const RouterConfig c = config_for(method, E, k);
      for (const auto& row : rows) {
        Routed r = run_any(c, row);
        const std::set<int32_t> distinct(r.ids.begin(), r.ids.end());
        EXPECT_EQ(static_cast<int>(distinct.size()), c.top_k) << c.str();
        for (int32_t id : r.ids) EXPECT_TRUE(id >= 0 && id < E) << c.str() << " id " << id;
      }
    }
  }
}

TEST(RouterSelection, AllNaNRowPicksTheLowestIds) {
  Routed r = run(make_config(RoutingMethod::kSoftmaxTopK, 5, 3), std::vector<float>(5, kNaN));
  EXPECT_EQ(r.ids, (std::vector<int32_t>{0, 1, 2}));
  Routed g = run(grouped_config(8, 2, 4, 2, 1.0f), std::vector<float>(8, kNaN),
                 std::vector<float>(8, 0.0f));
  EXPECT_EQ(g.ids, (std::vector<int32_t>{0, 1}));
}

TEST(RouterSelection, PlusInfinitySharesTheMassEqually) {
  const std::vector<float> row = {kInf, 0, kInf, -kInf};
  Routed soft = run(make_config(RoutingMethod::kSoftmaxTopK, 4, 3, false), row);
  EXPECT_EQ(soft.ids, (std::vector<int32_t>{0, 2, 1}));
  EXPECT_EQ(soft.weights, (std::vector<float>{0.5f, 0.5f, 0.0f}));
  Routed after = run(make_config(RoutingMethod::kTopKSoftmax, 4, 3), row);
  EXPECT_EQ(after.weights, (std::vector<float>{0.5f, 0.5f, 0.0f}));
  // A row of -inf is the limit of equal logits: uniform.
  Routed low =
      run(make_config(RoutingMethod::kSoftmaxTopK, 4, 2, false), std::vector<float>(4, -kInf));
  EXPECT_EQ(low.weights, (std::vector<float>{0.25f, 0.25f}));
  // Sigmoid saturates: +inf -> 1, -inf -> 0 (renormalizing an all-zero choice keeps 0, not NaN).
  Routed sig = run(grouped_config(4, 2, 1, 1, 1.0f), {-kInf, kInf, -kInf, -kInf},
                   std::vector<float>(4, 0.0f));
  EXPECT_EQ(sig.ids, (std::vector<int32_t>{1, 0}));
  EXPECT_EQ(sig.weights, (std::vector<float>{1.0f, 0.0f}));
  Routed zero = run(grouped_config(4, 2, 1, 1, 1.0f), std::vector<float>(4, -kInf),
                    std::vector<float>(4, 0.0f));
  EXPECT_EQ(zero.weights, (std::vector<float>{0.0f, 0.0f}));
}

// ---------------------------------------------------------------------------------------------
// Input layouts.

TEST(RouterLayout, Bf16LogitsMatchTheirFp32Values) {
  std::mt19937 rng(7);
  const int M = 19, E = 64, k = 8;
  std::vector<float> as_float = random_logits(rng, M * E);
  std::vector<uint16_t> as_bf16(as_float.size());
  for (size_t i = 0; i < as_float.size(); ++i) {
    as_bf16[i] = float_to_bf16(as_float[i]);
    as_float[i] = bf16_to_float(as_bf16[i]);
  }
  const std::vector<float> bias = random_bias(rng, E);
  for (RoutingMethod method : kAllMethods) {
    const RouterConfig c = config_for(method, E, k);
    const bool grouped = method == RoutingMethod::kSigmoidGroupedTopK;
    std::vector<float> b = bias;
    TensorView bias_view = grouped ? TensorView(b.data(), DType::kF32, {E}) : TensorView{};
    Routed got{std::vector<int32_t>(M * c.top_k), std::vector<float>(M * c.top_k)};
    route(c, TensorView(as_bf16.data(), DType::kBF16, {M, E}), bias_view,
          TensorView(got.ids.data(), DType::kI32, {M, c.top_k}),
          TensorView(got.weights.data(), DType::kF32, {M, c.top_k}));
    const Routed want = run(c, as_float, grouped ? bias : std::vector<float>{});
    EXPECT_EQ(got.ids, want.ids) << c.str();
    EXPECT_EQ(got.weights, want.weights) << c.str();
    expect_matches_reference(c, as_float, bias, got);
  }
}

TEST(RouterLayout, StridedLogitsAndOutputs) {
  std::mt19937 rng(11);
  const int M = 7, E = 16, k = 4, pad = 5;
  const std::vector<float> dense = random_logits(rng, M * E);
  // Row stride E + pad; the padding holds values that would win if they were read.
  std::vector<float> strided(M * (E + pad), 1e30f);
  for (int m = 0; m < M; ++m)
    std::copy_n(dense.begin() + m * E, E, strided.begin() + m * (E + pad));
  TensorView logits(strided.data(), DType::kF32, {M, E});
  logits.stride[0] = E + pad;

  // Outputs with row stride k + 2; the gaps must stay untouched.
  std::vector<int32_t> ids(M * (k + 2), kIdSentinel);
  std::vector<float> weights(M * (k + 2), kWeightSentinel);
  TensorView ids_view(ids.data(), DType::kI32, {M, k});
  TensorView weights_view(weights.data(), DType::kF32, {M, k});
  ids_view.stride[0] = weights_view.stride[0] = k + 2;

  const RouterConfig c = make_config(RoutingMethod::kSoftmaxTopK, E, k);
  route(c, logits, TensorView{}, ids_view, weights_view);
  const Routed want = run(c, dense);
  for (int m = 0; m < M; ++m) {
    for (int i = 0; i < k; ++i) {
      EXPECT_EQ(ids[m * (k + 2) + i], want.ids[m * k + i]);
      EXPECT_EQ(weights[m * (k + 2) + i], want.weights[m * k + i]);
    }
    for (int i = k; i < k + 2; ++i) {
      EXPECT_EQ(ids[m * (k + 2) + i], kIdSentinel);
      EXPECT_EQ(weights[m * (k + 2) + i], kWeightSentinel);
    }
  }
}

TEST(RouterLayout, ZeroRowsIsANoOp) {
  RouterConfig c = make_config(RoutingMethod::kSoftmaxTopK, 8, 2);
  route(c, TensorView(nullptr, DType::kF32, {0, 8}), TensorView{},
        TensorView(nullptr, DType::kI32, {0, 2}), TensorView(nullptr, DType::kF32, {0, 2}));
}

// ---------------------------------------------------------------------------------------------
// Random inputs against the full-sort reference.

TEST(RouterReference, RandomInputsAllNonGroupedMethods) {
  std::mt19937 rng(1234);
  const RoutingMethod methods[] = {RoutingMethod::kSoftmaxTopK, RoutingMethod::kTopKSoftmax};
  for (int E : {1, 2, 3, 7, 8, 16, 32, 128, 384}) {
    for (int k : {1, 2, 8, E}) {
      if (k > E) continue;
      for (int M : {1, 7, 19}) {
        const std::vector<float> logits = random_logits(rng, int64_t{M} * E);
        for (RoutingMethod method : methods)
          for (bool renorm : {false, true}) {
            const RouterConfig c = make_config(method, E, k, renorm);
            expect_matches_reference(c, logits, {}, run(c, logits));
          }
        const RouterConfig top1 = make_config(RoutingMethod::kLlama4Top1Sigmoid, E, 1);
        expect_matches_reference(top1, logits, {}, run(top1, logits));
      }
    }
  }
}

TEST(RouterReference, RandomInputsGroupedTopK) {
  std::mt19937 rng(99);
  for (int E : {8, 16, 64, 256, 384}) {
    for (int n_group : {1, 2, 4, 8, 16}) {
      if (E % n_group != 0) continue;
      for (int topk_group : {1, n_group / 2, n_group}) {
        if (topk_group < 1) continue;
        const int kept = topk_group * (E / n_group);
        for (int k : {1, 2, 8, kept}) {
          if (k > kept) continue;
          const int M = 11;
          const std::vector<float> logits = random_logits(rng, int64_t{M} * E);
          const std::vector<float> bias = random_bias(rng, E);
          for (bool renorm : {false, true}) {
            const RouterConfig c = grouped_config(E, k, n_group, topk_group, 2.5f, renorm);
            expect_matches_reference(c, logits, bias, run(c, logits, bias));
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Config, names and bad input.

TEST(RouterConfigTest, NamesRoundTripAndUnknownNamesListTheKnownOnes) {
  for (RoutingMethod m : kAllMethods) EXPECT_EQ(parse_routing_method(name(m)), m);
  EXPECT_EQ(name(RoutingMethod::kSigmoidGroupedTopK), "sigmoid_grouped_topk");
  try {
    parse_routing_method("softmax");
    FAIL() << "expected a throw";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("'softmax'"), std::string::npos) << e.message();
    EXPECT_NE(e.message().find("llama4_top1_sigmoid"), std::string::npos) << e.message();
  }
}

TEST(RouterConfigTest, ValidateGivesTheReason) {
  EXPECT_EQ(grouped_config(256, 8, 8, 4, 2.5f).validate(), std::nullopt);
  EXPECT_EQ(make_config(RoutingMethod::kSoftmaxTopK, 8, 9).validate(), "top_k 9 > num_experts 8");
  EXPECT_EQ(grouped_config(256, 8, 8, 4, 2.5f).str(),
            "sigmoid_grouped_topk(E=256, k=8, renormalize=true, n_group=8, topk_group=4, "
            "routed_scaling_factor=2.5)");
  EXPECT_EQ(make_config(RoutingMethod::kTopKSoftmax, 32, 4).str(), "topk_softmax(E=32, k=4)");
}

// Arguments of one route() call over owned buffers; each bad-input case breaks one thing.
struct Args {
  static constexpr int M = 3, E = 8, k = 2;
  RouterConfig config = grouped_config(E, k, 4, 2, 1.0f);
  std::vector<float> logits = std::vector<float>(M * E, 0.5f);
  std::vector<float> bias = std::vector<float>(E, 0.0f);
  std::vector<int32_t> ids = std::vector<int32_t>(M * k, kIdSentinel);
  std::vector<float> weights = std::vector<float>(M * k, kWeightSentinel);
  TensorView logits_view{logits.data(), DType::kF32, {M, E}};
  TensorView bias_view{bias.data(), DType::kF32, {E}};
  TensorView ids_view{ids.data(), DType::kI32, {M, k}};
  TensorView weights_view{weights.data(), DType::kF32, {M, k}};
};

struct BadCase {
  std::string what;
  std::function<void(Args&)> mutate;
  std::string message;  // expected substring
};

const std::vector<BadCase>& bad_cases() {
  static const std::vector<BadCase> cases = {
      {"k > E", [](Args& a) { a.config.top_k = 9; }, "top_k 9 > num_experts 8"},
      {"k == 0", [](Args& a) { a.config.top_k = 0; }, "top_k must be >= 1"},
      {"E % n_group", [](Args& a) { a.config.n_group = 3; }, "not divisible by n_group 3"},
      {"topk_group > n_group", [](Args& a) { a.config.topk_group = 5; }, "topk_group 5"},
      {"k > kept experts",
       [](Args& a) {
         a.config.top_k = 5;
         a.config.topk_group = 2;
       },
       "top_k 5 > 4 experts"},
      {"llama4 k 2",
       [](Args& a) { a.config = make_config(RoutingMethod::kLlama4Top1Sigmoid, Args::E, 2); },
       "needs top_k 1"},
      {"scale on softmax",
       [](Args& a) {
         a.config = make_config(RoutingMethod::kSoftmaxTopK, Args::E, 2);
         a.config.routed_scaling_factor = 2.0f;
       },
       "only used by sigmoid_grouped_topk"},
      {"config E != logits E", [](Args& a) { a.config.num_experts = 16; }, "route: logits"},
      {"logits 1-D",
       [](Args& a) { a.logits_view = TensorView(a.logits.data(), DType::kF32, {24}); },
       "route: logits"},
      {"logits int32", [](Args& a) { a.logits_view.dtype = DType::kI32; }, "fp32 or bf16"},
      {"logits null", [](Args& a) { a.logits_view.data = nullptr; }, "null data"},
      {"logits last dim strided", [](Args& a) { a.logits_view.stride[1] = 2; }, "contiguous"},
      {"logits rows overlap", [](Args& a) { a.logits_view.stride[0] = 4; }, "route: logits"},
      {"ids on another device than the logits",
       [](Args& a) {
         a.ids_view.device = {DeviceType::kCUDA, 0};
       },
       "route: topk_ids: expected on cpu like the logits"},
      {"bias missing", [](Args& a) { a.bias_view = TensorView{}; }, "correction_bias"},
      {"bias wrong shape", [](Args& a) { a.bias_view.shape[0] = 4; }, "correction_bias"},
      {"bias bf16", [](Args& a) { a.bias_view.dtype = DType::kBF16; }, "correction_bias"},
      {"bias NaN", [](Args& a) { a.bias[3] = kNaN; }, "correction_bias[3]"},
      {"bias for softmax",
       [](Args& a) { a.config = make_config(RoutingMethod::kSoftmaxTopK, Args::E, 2); },
       "correction_bias is only used by"},
      {"ids fp32", [](Args& a) { a.ids_view.dtype = DType::kF32; }, "topk_ids"},
      {"ids wrong k", [](Args& a) { a.ids_view.shape[1] = 3; }, "topk_ids"},
      {"ids wrong M", [](Args& a) { a.ids_view.shape[0] = 2; }, "topk_ids"},
      {"ids null", [](Args& a) { a.ids_view.data = nullptr; }, "topk_ids"},
      {"weights bf16", [](Args& a) { a.weights_view.dtype = DType::kBF16; }, "topk_weights"},
      {"weights wrong shape", [](Args& a) { a.weights_view.shape[1] = 1; }, "topk_weights"},
      {"weights alias logits", [](Args& a) { a.weights_view.data = a.logits.data() + 4; },
       "topk_weights overlaps logits"},
      {"ids alias logits", [](Args& a) { a.ids_view.data = a.logits.data(); },
       "topk_ids overlaps logits"},
      {"ids alias weights", [](Args& a) { a.ids_view.data = a.weights.data(); },
       "topk_ids overlaps topk_weights"},
  };
  return cases;
}

TEST(RouterBadInput, ThrowsNamingTheArgumentAndWritesNothing) {
  {
    Args ok;  // the unbroken arguments route fine
    route(ok.config, ok.logits_view, ok.bias_view, ok.ids_view, ok.weights_view);
    EXPECT_NE(ok.ids[0], kIdSentinel);
  }
  for (const BadCase& bad : bad_cases()) {
    Args a;
    bad.mutate(a);
    try {
      route(a.config, a.logits_view, a.bias_view, a.ids_view, a.weights_view);
      ADD_FAILURE() << bad.what << ": expected a throw";
    } catch (const Error& e) {
      EXPECT_NE(e.message().find(bad.message), std::string::npos)
          << bad.what << ": message '" << e.message() << "' lacks '" << bad.message << "'";
    }
    EXPECT_EQ(a.ids, std::vector<int32_t>(Args::M * Args::k, kIdSentinel)) << bad.what;
    EXPECT_EQ(a.weights, std::vector<float>(Args::M * Args::k, kWeightSentinel)) << bad.what;
    EXPECT_EQ(a.logits, std::vector<float>(Args::M * Args::E, 0.5f)) << bad.what;
  }
}

// The routers' sigmoid is their own (bit-identical on CPU and CUDA): within one float rounding
// of the true value over the range where it is not 0 or 1, and exact at the ends.
TEST(RouterSigmoid, WithinOneRoundingOfTheTrueValue) {
  for (double x = -110.0; x <= 40.0; x += 0.0137) {
    const float xf = static_cast<float>(x);
    const double exact = 1.0 / (1.0 + std::exp(-double(xf)));  // double: far finer than float
    const float got = routing_sigmoid(xf);
    EXPECT_LE(std::abs(got - exact), std::nextafter(float(exact), 2.0f) - float(exact)) << x;
  }
  EXPECT_EQ(routing_sigmoid(0.0f), 0.5f);
  EXPECT_EQ(routing_sigmoid(kInf), 1.0f);
  EXPECT_EQ(routing_sigmoid(-kInf), 0.0f);
  EXPECT_EQ(routing_sigmoid(-800.0f), 0.0f);
  EXPECT_TRUE(std::isnan(routing_sigmoid(kNaN)));
}

}  // namespace
}  // namespace moekit
