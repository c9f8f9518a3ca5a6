// The CUDA router against the CPU router: the same ids bit for bit, weights to float rounding,
// for every routing method, on random logits, ties, and rows of NaN and infinities. Skips loudly
// without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "moekit/check.h"
#include "moekit/cuda.h"
#include "moekit/router.h"
#include "support/cuda_test_support.h"

namespace moekit {
namespace {

struct Case {
  RoutingMethod method;
  int E, k;
};

// Random N(0, 2) logits with special rows: a tie-heavy row (values from {0, 1}), NaN and +-inf
// scattered, an all-NaN row and an all -inf row.
Tensor make_logits(int64_t M, int E, uint64_t seed) {
  Tensor t(DType::kF32, {M, int64_t(E)});
  check::fill_uniform(t, seed, -4.0, 4.0);
  float* v = t.data<float>();
  const float inf = std::numeric_limits<float>::infinity(), nan = std::nanf("");
  for (int e = 0; e < E; ++e) {
    v[0 * E + e] = float(e % 2);                               // ties
    v[1 * E + e] = e % 5 == 0 ? nan : e % 7 == 0 ? inf : v[1 * E + e];
    v[2 * E + e] = nan;
    v[3 * E + e] = -inf;
    v[4 * E + e] = e % 3 == 0 ? -inf : v[4 * E + e];
  }
  return t;
}

void expect_same_routing(const RouterConfig& config, DType logits_dtype) {
  const Case c{config.method, config.num_experts, config.top_k};
  const int64_t M = 333;
  Tensor logits32 = make_logits(M, c.E, uint64_t(c.E) * 31 + c.k);
  Tensor logits(logits_dtype, {M, int64_t(c.E)});
  for (int64_t i = 0; i < logits.numel(); ++i)
    store_from_float(logits.data<void>(), logits_dtype, i, logits32.data<float>()[i]);
  Tensor bias;
  if (c.method == RoutingMethod::kSigmoidGroupedTopK) {
    bias = Tensor(DType::kF32, {int64_t(c.E)});
    check::fill_uniform(bias, 7, -0.5, 0.5);
  }
  Tensor ids(DType::kI32, {M, int64_t(config.top_k)}), w(DType::kF32, {M, int64_t(config.top_k)});
  route(config, logits, bias.view(), ids, w);

  const CudaTensor d_logits = CudaTensor::copy_of(logits);
  const CudaTensor d_bias = bias.numel() ? CudaTensor::copy_of(bias) : CudaTensor();
  const CudaTensor d_ids(DType::kI32, {M, int64_t(config.top_k)});
  const CudaTensor d_w(DType::kF32, {M, int64_t(config.top_k)});
  route(config, d_logits, d_bias.view(), d_ids, d_w);
  const Tensor got_ids = d_ids.to_host(), got_w = d_w.to_host();
  for (int64_t i = 0; i < ids.numel(); ++i) {
    ASSERT_EQ(got_ids.data<int32_t>()[i], ids.data<int32_t>()[i])
        << config.str() << " row " << i / config.top_k << " slot " << i % config.top_k;
    const float want = w.data<float>()[i], got = got_w.data<float>()[i];
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << config.str() << " row " << i / config.top_k;
    } else {
      EXPECT_NEAR(got, want, 4e-7 * std::max(1.0f, std::abs(want)))
          << config.str() << " row " << i / config.top_k;
    }
  }
}

TEST(CudaRouter, SameIdsAsTheCpuForEveryMethod) {
  SKIP_WITHOUT_CUDA();
  const Case cases[] = {
      {RoutingMethod::kSoftmaxTopK, 8, 2},          {RoutingMethod::kSoftmaxTopK, 128, 8},
      {RoutingMethod::kTopKSoftmax, 32, 4},         {RoutingMethod::kTopKSoftmax, 129, 5},
      {RoutingMethod::kLlama4Top1Sigmoid, 16, 1},   {RoutingMethod::kSigmoidGroupedTopK, 256, 8},
      {RoutingMethod::kSigmoidGroupedTopK, 64, 6},  {RoutingMethod::kSoftmaxTopK, 1024, 32},
  };
  std::vector<RouterConfig> configs;
  for (const Case& c : cases) configs.push_back(check::router_config(c.method, c.E, c.k));
  RouterConfig deepseek = configs[5];  // DeepSeek-V3's own grouping: 8 groups, keep 4
  deepseek.n_group = 8;
  deepseek.topk_group = 4;
  configs.push_back(deepseek);
  for (const RouterConfig& config : configs)
    for (DType dt : {DType::kF32, DType::kBF16}) expect_same_routing(config, dt);
}

TEST(CudaRouter, RefusesWhatItCannotRunAndMixedDevices) {
  SKIP_WITHOUT_CUDA();
  RouterConfig big;
  big.num_experts = 2048;
  big.top_k = 2;
  const CudaTensor logits(DType::kF32, {4, 2048}), ids(DType::kI32, {4, 2}), w(DType::kF32, {4, 2});
  EXPECT_THROW(route(big, logits, {}, ids, w), Error);
  RouterConfig ok;
  ok.num_experts = 8;
  ok.top_k = 2;
  const CudaTensor l8(DType::kF32, {4, 8});
  Tensor host_ids(DType::kI32, {4, 2});
  EXPECT_THROW(route(ok, l8, {}, host_ids, w), Error);
}

}  // namespace
}  // namespace moekit
