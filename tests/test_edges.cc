// Edge sizes and routings (DESIGN.md section 6) for every registered Experts, against the
// oracle: token counts around the chunk, experts that receive nothing, every token on one
// expert, k = E, strided x rows, H and I at alignment +-1, and two realistic shapes.
#include <algorithm>

#include "moekit/cpu.h"
#include "support/test_support.h"

namespace moekit::test {
namespace {

struct EdgeCase {
  const char* name;
  LayerSpec spec;
  void (*reroute)(TestLayer&) = nullptr;  // overrides the router's choice
  int64_t chunk_tokens = 64;
  int64_t x_row_pad = 0;  // > 0: x rows are H + pad elements apart
};

// Sets every row's ids to `ids` (one per slot).
void route_all_to(TestLayer& layer, std::initializer_list<int32_t> ids) {
  int32_t* p = layer.routing.topk_ids.data<int32_t>();
  for (int64_t t = 0; t < layer.spec.tokens; ++t, p += ids.size())
    std::copy(ids.begin(), ids.end(), p);
}

const EdgeCase kEdgeCases[] = {
    {"no_tokens", {.tokens = 0}},
    {"one_token", {.tokens = 1}},
    {"chunk_minus_one", {.tokens = 63}},
    {"chunk_plus_one", {.tokens = 65}},
    {"experts_with_zero_tokens",
     {.tokens = 19},
     [](TestLayer& l) {
       route_all_to(l, {5, 2});
     }},
    {"all_tokens_on_one_expert_k1",
     {.top_k = 1, .tokens = 111},
     [](TestLayer& l) { route_all_to(l, {3}); }},
    {"all_tokens_on_two_experts",
     {.tokens = 99},
     [](TestLayer& l) {
       route_all_to(l, {6, 3});
     }},
    {"all_rows_padding",
     {.tokens = 19},
     [](TestLayer& l) {
       route_all_to(l, {-1, -1});
     }},
    {"k_equals_E", {.top_k = 8, .tokens = 19}},
    {"k_equals_E_grouped",
     {.top_k = 8, .tokens = 7, .routing = RoutingMethod::kSigmoidGroupedTopK}},
    {"one_expert", {.num_experts = 1, .top_k = 1, .tokens = 19}},
    {"strided_x_rows", {.tokens = 99, .padding_period = 5}, nullptr, 64, 5},
    {"strided_x_rows_weight_on_input",
     {.top_k = 1, .tokens = 19, .routing = RoutingMethod::kLlama4Top1Sigmoid},
     nullptr,
     8,
     3},
    {"chunk_of_one", {.tokens = 7, .padding_period = 3}, nullptr, 1},
    {"H31_I33", {.hidden = 31, .intermediate = 33, .tokens = 19}},
    {"H32_I32", {.hidden = 32, .intermediate = 32, .tokens = 19}},
    {"H33_I31", {.hidden = 33, .intermediate = 31, .tokens = 19}},
    {"H63_I65", {.hidden = 63, .intermediate = 65, .tokens = 19}},
    {"H64_I64", {.hidden = 64, .intermediate = 64, .tokens = 19}},
    {"H65_I63", {.hidden = 65, .intermediate = 63, .tokens = 19}},
    {"H127_I129", {.hidden = 127, .intermediate = 129, .tokens = 19}},
    {"H128_I128_bias", {.hidden = 128, .intermediate = 128, .tokens = 19, .bias = true}},
    {"H7_I130", {.hidden = 7, .intermediate = 130, .tokens = 19}},
    {"H130_I7", {.hidden = 130, .intermediate = 7, .tokens = 19}},
    {"H1_I1", {.hidden = 1, .intermediate = 1, .tokens = 7}},
};

void PrintTo(const EdgeCase& c, std::ostream* os) {
  *os << c.name;
}

using EdgeParam = std::tuple<std::string, EdgeCase>;

class EdgeSizes : public ::testing::TestWithParam<EdgeParam> {};

TEST_P(EdgeSizes, MatchTheOracle) {
  const auto& [experts, edge] = GetParam();
  TestLayer layer(edge.spec);
  if (edge.reroute) edge.reroute(layer);
  auto kernel = layer.kernel(experts_entry(experts), edge.chunk_tokens);
  Tensor y;
  if (edge.x_row_pad > 0) {
    const Strided xs = strided_copy(layer.x, edge.x_row_pad);
    y = forward(*kernel, xs.view, layer.routing.topk_ids, layer.routing.topk_weights,
                layer.routing.weight_on_input);
  } else {
    y = layer.forward(*kernel);
  }
  EXPECT_TRUE(rows_match(y, layer.reference(), layer.bound()));
}

INSTANTIATE_TEST_SUITE_P(Registry, EdgeSizes,
                         ::testing::Combine(::testing::ValuesIn(experts_names()),
                                            ::testing::ValuesIn(kEdgeCases)),
                         [](const auto& info) {
                           return test_name(std::get<0>(info.param) + "_" +
                                            std::get<1>(info.param).name);
                         });

// Realistic shapes, a few tokens each: the oracle costs ~10^8 multiply-adds here, so it runs
// once per shape and every CPU implementation is compared with it (the reference experts are
// the oracle's own arithmetic and are skipped).
struct RealisticCase {
  const char* name;
  LayerSpec spec;
};
const RealisticCase kRealistic[] = {
    // Qwen3-30B-A3B's expert shape with 16 of its 128 experts.
    {"qwen3_30b_a3b_16_experts",
     {.num_experts = 16, .hidden = 2048, .intermediate = 768, .top_k = 8, .tokens = 5}},
    // gpt-oss-20b's expert shape (SwiGLU-OAI, biases, top-k -> softmax) with 4 of 32 experts.
    {"gpt_oss_20b_4_experts",
     {.num_experts = 4,
      .hidden = 2880,
      .intermediate = 2880,
      .top_k = 2,
      .tokens = 7,
      .activation = parse_activation("swiglu_oai"),
      .routing = RoutingMethod::kTopKSoftmax,
      .bias = true}},
};

void PrintTo(const RealisticCase& c, std::ostream* os) {
  *os << c.name;
}

class RealisticShapes : public ::testing::TestWithParam<RealisticCase> {};

TEST_P(RealisticShapes, EveryCpuExpertsMatchesTheOracle) {
  const TestLayer layer(GetParam().spec);
  const Tensor want = layer.reference();
  for (const auto& entry : all_experts()) {
    if (entry.name == "reference") continue;
    SCOPED_TRACE(entry.name);
    auto kernel = layer.kernel(entry, 1024, nullptr, 0, 2);
    EXPECT_TRUE(rows_match(layer.forward(*kernel), want, layer.bound()));
  }
}

INSTANTIATE_TEST_SUITE_P(Presets, RealisticShapes, ::testing::ValuesIn(kRealistic),
                         [](const auto& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace moekit::test
