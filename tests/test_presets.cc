// Preset tests: the table of DESIGN.md section 5, lookups, and that every preset's router config
// is valid and routes.
#include <gtest/gtest.h>

#include <random>
#include <set>
#include <string>
#include <vector>

#include "moekit/presets.h"

namespace moekit {
namespace {

struct Expected {
  std::string_view name;
  int E;
  int64_t H, I;
  int k;
  RoutingMethod method;
  int shared;
};

// DESIGN.md section 5, row by row.
const Expected kDesignTable[] = {
    {"mixtral-8x7b", 8, 4096, 14336, 2, RoutingMethod::kSoftmaxTopK, 0},
    {"qwen3-30b-a3b", 128, 2048, 768, 8, RoutingMethod::kSoftmaxTopK, 0},
    {"qwen3-235b-a22b", 128, 4096, 1536, 8, RoutingMethod::kSoftmaxTopK, 0},
    {"deepseek-v3", 256, 7168, 2048, 8, RoutingMethod::kSigmoidGroupedTopK, 1},
    {"kimi-k2", 384, 7168, 2048, 8, RoutingMethod::kSigmoidGroupedTopK, 1},
    {"gpt-oss-20b", 32, 2880, 2880, 4, RoutingMethod::kTopKSoftmax, 0},
    {"gpt-oss-120b", 128, 2880, 2880, 4, RoutingMethod::kTopKSoftmax, 0},
    {"llama4-scout", 16, 5120, 8192, 1, RoutingMethod::kLlama4Top1Sigmoid, 1},
};

TEST(Presets, MatchTheDesignTable) {
  ASSERT_EQ(presets().size(), std::size(kDesignTable));
  for (const Expected& want : kDesignTable) {
    const Preset& p = find_preset(want.name);
    EXPECT_EQ(p.name, want.name);
    EXPECT_EQ(p.num_experts, want.E) << want.name;
    EXPECT_EQ(p.hidden, want.H) << want.name;
    EXPECT_EQ(p.intermediate, want.I) << want.name;
    EXPECT_EQ(p.top_k, want.k) << want.name;
    EXPECT_EQ(p.router.method, want.method) << want.name;
    EXPECT_EQ(p.router.num_experts, want.E) << want.name;
    EXPECT_EQ(p.router.top_k, want.k) << want.name;
    EXPECT_EQ(p.num_shared_experts, want.shared) << want.name;
    EXPECT_EQ(p.router.validate(), std::nullopt) << want.name;
  }
}

TEST(Presets, NamesAreUnique) {
  std::set<std::string_view> names;
  for (const Preset& p : presets()) EXPECT_TRUE(names.insert(p.name).second) << p.name;
}

TEST(Presets, SoftmaxModelsRenormalizeWithGatedSilu) {
  for (std::string_view n : {"mixtral-8x7b", "qwen3-30b-a3b", "qwen3-235b-a22b"}) {
    const Preset& p = find_preset(n);
    EXPECT_TRUE(p.router.renormalize) << n;
    EXPECT_EQ(p.activation.fn, ActivationFn::kSilu) << n;
    EXPECT_TRUE(p.activation.gated) << n;
    EXPECT_EQ(p.activation.layout, GateUpLayout::kSplit) << n;
    EXPECT_FALSE(p.has_bias) << n;
  }
}

TEST(Presets, DeepSeekAndKimiUseGroupedSigmoidRouting) {
  const Preset& ds = find_preset("deepseek-v3");
  EXPECT_EQ(ds.router.n_group, 8);
  EXPECT_EQ(ds.router.topk_group, 4);
  EXPECT_FLOAT_EQ(ds.router.routed_scaling_factor, 2.5f);
  EXPECT_TRUE(ds.router.renormalize);
  const Preset& kimi = find_preset("kimi-k2");
  EXPECT_EQ(kimi.router.n_group, 1);
  EXPECT_EQ(kimi.router.topk_group, 1);
  EXPECT_FLOAT_EQ(kimi.router.routed_scaling_factor, 2.827f);
  EXPECT_TRUE(kimi.router.renormalize);
  for (const Preset* p : {&ds, &kimi}) {
    EXPECT_EQ(p->activation.fn, ActivationFn::kSilu);
    EXPECT_TRUE(p->activation.gated);
  }
}

TEST(Presets, GptOssUsesInterleavedClampedSwigluWithBiases) {
  for (std::string_view n : {"gpt-oss-20b", "gpt-oss-120b"}) {
    const Preset& p = find_preset(n);
    EXPECT_EQ(p.activation.fn, ActivationFn::kSwigluOai) << n;
    EXPECT_TRUE(p.activation.gated) << n;
    EXPECT_EQ(p.activation.layout, GateUpLayout::kInterleaved) << n;
    EXPECT_FLOAT_EQ(p.activation.alpha, 1.702f) << n;
    EXPECT_FLOAT_EQ(p.activation.limit, 7.0f) << n;
    EXPECT_TRUE(p.has_bias) << n;
  }
}

TEST(Presets, Llama4ScoutIsTop1SigmoidWithoutRenormalize) {
  const Preset& p = find_preset("llama4-scout");
  EXPECT_EQ(p.router.top_k, 1);
  EXPECT_FALSE(p.router.renormalize);
  EXPECT_EQ(p.activation.fn, ActivationFn::kSilu);
  EXPECT_TRUE(p.activation.gated);
}

TEST(Presets, UnknownNameListsTheKnownOnes) {
  try {
    find_preset("mixtral");
    FAIL() << "expected a throw";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("unknown preset 'mixtral'"), std::string::npos) << e.message();
    for (const Preset& p : presets())
      EXPECT_NE(e.message().find(p.name), std::string::npos) << e.message();
  }
}

// Every preset's router runs on its own shapes and gives k distinct in-range ids per row.
TEST(Presets, EveryRouterConfigRoutes) {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (const Preset& p : presets()) {
    const int M = 5, E = p.num_experts, k = p.top_k;
    std::vector<float> logits(M * E), bias;
    for (float& x : logits) x = normal(rng);
    TensorView bias_view;
    if (p.router.method == RoutingMethod::kSigmoidGroupedTopK) {
      bias.resize(E);
      for (float& x : bias) x = 0.1f * normal(rng);
      bias_view = TensorView(bias.data(), DType::kF32, {E});
    }
    std::vector<int32_t> ids(M * k, -1);
    std::vector<float> weights(M * k);
    route(p.router, TensorView(logits.data(), DType::kF32, {M, E}), bias_view,
          TensorView(ids.data(), DType::kI32, {M, k}),
          TensorView(weights.data(), DType::kF32, {M, k}));
    for (int m = 0; m < M; ++m) {
      const std::set<int32_t> row(ids.begin() + m * k, ids.begin() + (m + 1) * k);
      EXPECT_EQ(static_cast<int>(row.size()), k) << p.name;
      for (int32_t id : row) EXPECT_TRUE(id >= 0 && id < E) << p.name;
    }
  }
}

}  // namespace
}  // namespace moekit
