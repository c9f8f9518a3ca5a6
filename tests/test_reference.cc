// The oracle against hand-computed tiny layers, and the plain-loop reference experts.
//
// Hand values (h = act(gate) * up, or act(gate) without a gate) were worked out with a
// calculator for gates g = (1.5, -0.5) and ups u = (-2, 3); see kHandCases.
#include <array>
#include <cmath>

#include "moekit/reference.h"
#include "support/test_support.h"

namespace moekit::test {
namespace {

constexpr std::array<double, 2> kGate = {1.5, -0.5};
constexpr std::array<double, 2> kUp = {-2.0, 3.0};

// E = 2, H = 2, I = 2, fp32. On x = [1, 2], W13's gate row j is [g_j, 0] and its up row j is
// [0, u_j / 2], so gate_j = g_j and up_j = u_j. Row positions are written out here, not taken
// from Activation, so a wrong layout in the code under test cannot cancel out.
// W2[0] = [[1, 1], [-0.5, 0]] and W2[1] = [[2, 0], [3, 1]], so expert outputs are
//   out_0 = [h0 + h1, -0.5 h0],   out_1 = [2 h0, 3 h0 + h1].
struct TinyLayer {
  Activation act;
  Tensor w13, w2, b13, b2;
  ExpertWeights view() const { return {w13.view(), w2.view(), b13.view(), b2.view(), {}}; }
};

TinyLayer tiny_layer(const Activation& act, std::array<double, 2> g = kGate,
                     std::array<double, 2> u = kUp) {
  TinyLayer t{act,
              Tensor::zeros(DType::kF32, {2, act.gated ? 4 : 2, 2}),
              Tensor::zeros(DType::kF32, {2, 2, 2}),
              {},
              {}};
  const bool inter = act.gated && act.layout == GateUpLayout::kInterleaved;
  const int gate_row[2] = {0, inter ? 2 : 1}, up_row[2] = {inter ? 1 : 2, 3};
  float* w13 = t.w13.data<float>();
  for (int e = 0; e < 2; ++e)
    for (int j = 0; j < 2; ++j) {
      w13[(e * (act.gated ? 4 : 2) + gate_row[j]) * 2 + 0] = static_cast<float>(g[j]);
      if (act.gated) w13[(e * 4 + up_row[j]) * 2 + 1] = static_cast<float>(u[j] / 2);
    }
  const float w2[2][2][2] = {{{1, 1}, {-0.5f, 0}}, {{2, 0}, {3, 1}}};
  std::memcpy(t.w2.data<float>(), w2, sizeof(w2));
  return t;
}

std::array<double, 2> expert_out(int e, double h0, double h1) {
  return e == 0 ? std::array<double, 2>{h0 + h1, -0.5 * h0}
                : std::array<double, 2>{2 * h0, 3 * h0 + h1};
}

// Three tokens x = [1, 2]: t0 -> experts (0, 1) weights (0.75, 0.25); t1 -> (1, -1) with a
// weight of 9 on the padded slot, which must be ignored; t2 is a padding row.
struct TinyBatch {
  Tensor x = Tensor(DType::kF32, {3, 2});
  Tensor ids = Tensor(DType::kI32, {3, 2});
  Tensor weights = Tensor(DType::kF32, {3, 2});
  TinyBatch() {
    const float x_rows[] = {1, 2, 1, 2, 1, 2};
    const int32_t id_rows[] = {0, 1, 1, -1, -1, -1};
    const float w_rows[] = {0.75f, 0.25f, 0.5f, 9.0f, 1.0f, 1.0f};
    std::memcpy(x.data<float>(), x_rows, sizeof(x_rows));
    std::memcpy(ids.data<int32_t>(), id_rows, sizeof(id_rows));
    std::memcpy(weights.data<float>(), w_rows, sizeof(w_rows));
  }
  ReferenceArgs args(const TinyLayer& l) const {
    return {x.view(), ids.view(), weights.view(), l.view(), l.act};
  }
};

// y of TinyBatch given the intermediate values h0, h1 (same for both experts) and per-expert
// output biases b2[e].
Tensor expected_tiny_y(double h0, double h1, std::array<std::array<double, 2>, 2> b2 = {}) {
  Tensor y = Tensor::zeros(DType::kF32, {3, 2});
  auto add = [&](int t, int e, double w) {
    const auto out = expert_out(e, h0, h1);
    for (int c = 0; c < 2; ++c) y.data<float>()[t * 2 + c] += float(w * (out[c] + b2[e][c]));
  };
  add(0, 0, 0.75);
  add(0, 1, 0.25);
  add(1, 1, 0.5);
  return y;
}

// fp32 output of double sums: a few ulps of fp32.
constexpr double kFp32Output = 4e-7;

struct HandCase {
  const char* activation;
  double h0, h1;  // act(g_j) * u_j (gated) or act(g_j), j = 0, 1
};
const HandCase kHandCases[] = {
    {"silu", -2.452723428580931, -0.56631100319721805},
    {"gelu", -2.799578396193426, -0.46280630808898032},
    {"gelu_tanh", -2.7991431539604656, -0.46285797052456817},
    {"relu2", -4.5, 0.0},
    {"swiglu_oai", -1.3916621984470767, -0.59844625357447956},
    {"silu_nogate", 1.2263617142904655, -0.1887703343990727},
    {"gelu_nogate", 1.399789198096713, -0.15426876936299344},
    {"gelu_tanh_nogate", 1.3995715769802328, -0.15428599017485606},
    {"relu2_nogate", 2.25, 0.0},
    {"silu_interleaved", -2.452723428580931, -0.56631100319721805},
    {"swiglu_oai_interleaved", -1.3916621984470767, -0.59844625357447956},
};

void PrintTo(const HandCase& c, std::ostream* os) {
  *os << c.activation;
}

class ReferenceHand : public ::testing::TestWithParam<HandCase> {};

TEST_P(ReferenceHand, MatchesHandComputedLayer) {
  const TinyLayer layer = tiny_layer(parse_activation(GetParam().activation));
  const TinyBatch batch;
  EXPECT_TRUE(rows_match(reference_output(batch.args(layer)),
                         expected_tiny_y(GetParam().h0, GetParam().h1), kFp32Output));
}

INSTANTIATE_TEST_SUITE_P(Activations, ReferenceHand, ::testing::ValuesIn(kHandCases),
                         [](const auto& info) { return test_name(info.param.activation); });

TEST(Reference, SwigluOaiClampsGateAboveAndUpBothSides) {
  // gate 10 -> 7 in both columns; up -9 -> -7 and 9 -> 7: h = (up + 1) * 7 sigmoid(1.702 * 7).
  const TinyLayer layer = tiny_layer(parse_activation("swiglu_oai"), {10, 10}, {-9, 9});
  EXPECT_TRUE(rows_match(reference_output(TinyBatch().args(layer)),
                         expected_tiny_y(-41.999718769819907, 55.999625026426543), kFp32Output));
}

TEST(Reference, AddsBothBiases) {
  // Weights give gates (0.5, -0.5) and ups (-1, 3); b13 shifts column 0 by (+1, -1) to the hand
  // case's (1.5, -2); b2 adds per expert after GEMM2 (before the top-k weight).
  TinyLayer layer = tiny_layer(parse_activation("silu"), {0.5, -0.5}, {-1, 3});
  layer.b13 = Tensor::zeros(DType::kF32, {2, 4});
  layer.b2 = Tensor(DType::kF32, {2, 2});
  const std::array<std::array<double, 2>, 2> b2 = {{{0.25, -0.125}, {1, 2}}};
  for (int e = 0; e < 2; ++e) {
    layer.b13.data<float>()[e * 4 + 0] = 1;   // gate row 0
    layer.b13.data<float>()[e * 4 + 2] = -1;  // up row 0
    for (int c = 0; c < 2; ++c) layer.b2.data<float>()[e * 2 + c] = float(b2[e][c]);
  }
  EXPECT_TRUE(rows_match(reference_output(TinyBatch().args(layer)),
                         expected_tiny_y(kHandCases[0].h0, kHandCases[0].h1, b2), kFp32Output));
}

TEST(Reference, WeightOnInputScalesXNotTheOutput) {
  // k = 1, token 0 -> expert 0 with weight 0.5: the expert sees x = [0.5, 1].
  struct Case {
    const char* activation;
    double h0, h1;  // act at gates (0.75, -0.25), ups (-1, 1.5)
  };
  for (const Case& c : {Case{"relu2_nogate", 0.5625, 0.0},
                        Case{"silu", -0.50938402438154473, -0.16418381216782574}}) {
    SCOPED_TRACE(c.activation);
    const TinyLayer layer = tiny_layer(parse_activation(c.activation));
    Tensor x(DType::kF32, {1, 2}), ids = Tensor::zeros(DType::kI32, {1, 1});
    Tensor w(DType::kF32, {1, 1});
    x.data<float>()[0] = 1;
    x.data<float>()[1] = 2;
    w.data<float>()[0] = 0.5f;
    ReferenceArgs args{x.view(), ids.view(), w.view(), layer.view(), layer.act, true};
    Tensor want(DType::kF32, {1, 2});
    const auto out = expert_out(0, c.h0, c.h1);
    for (int i = 0; i < 2; ++i) want.data<float>()[i] = float(out[i]);
    EXPECT_TRUE(rows_match(reference_output(args), want, kFp32Output));
  }
}

TEST(Reference, RoundsTheIntermediateToBf16WhenAsked) {
  // bf16(-2.4527234) = -2.453125, bf16(-0.5663110) = -0.56640625.
  const TinyLayer layer = tiny_layer(parse_activation("silu"));
  const TinyBatch batch;
  ReferenceArgs args = batch.args(layer);
  args.round_intermediate_to_bf16 = true;
  EXPECT_TRUE(rows_match(reference_output(args), expected_tiny_y(-2.453125, -0.56640625), 0.0));
}

TEST(Reference, RankSharesSumToTheWholeLayer) {
  const int E = 8, H = 24, I = 16, k = 3, M = 37;
  const Activation act;
  const check::LayerWeights w = check::make_random_weights(E, H, I, act, DType::kBF16, true, 1);
  const check::Routing rt =
      check::make_random_routing(check::router_config(RoutingMethod::kSoftmaxTopK, E, k), M, 2, 5);
  const Tensor x = random_tensor(DType::kBF16, {M, H}, 3, -3, 3);
  ReferenceArgs args{x.view(), rt.topk_ids.view(), rt.topk_weights.view(), w.view(), act};
  args.token_key_offset = 11;
  const Tensor whole = reference_output(args);
  for (check::Placement p : {check::Placement::kRoundRobin, check::Placement::kShuffledTable,
                             check::Placement::kReplicated}) {
    const ExpertMap map = check::make_placement(p, E, 4, 7);
    SCOPED_TRACE(map.str());
    Tensor sum = Tensor::zeros(DType::kF32, {M, H});
    for (int r = 0; r < map.num_ranks(); ++r) {
      args.map = &map;
      args.rank = r;
      const Tensor share = reference_output(args);
      for (int64_t i = 0; i < M * H; ++i) sum.data<float>()[i] += share.data<float>()[i];
    }
    // Each share rounds to fp32 once and the sum adds up to 4 of them.
    EXPECT_TRUE(rows_match(sum, whole, 8 * kFp32Output));
  }
}

TEST(Reference, AcceptsStridedRows) {
  const int E = 4, H = 19, I = 7, k = 2, M = 9;
  const Activation act = parse_activation("gelu_interleaved");
  const check::LayerWeights w = check::make_random_weights(E, H, I, act, DType::kBF16, false, 4);
  const check::Routing rt =
      check::make_random_routing(check::router_config(RoutingMethod::kTopKSoftmax, E, k), M, 5, 4);
  const Tensor x = random_tensor(DType::kBF16, {M, H}, 6, -3, 3);
  const Strided xs = strided_copy(x, 5);
  ReferenceArgs args{x.view(), rt.topk_ids.view(), rt.topk_weights.view(), w.view(), act};
  const Tensor want = reference_output(args);
  args.x = xs.view;
  EXPECT_TRUE(bits_equal(reference_output(args), want));
}

// ---- reference_moe refuses bad input before writing y ----

struct BadReferenceCase {
  const char* name;
  const char* needle;
  void (*spoil)(ReferenceArgs&, Tensor& scratch);
};
const BadReferenceCase kBadReference[] = {
    {"id_at_E", "not an expert",
     [](ReferenceArgs& a, Tensor&) { a.topk_ids.ptr<int32_t>()[3] = 2; }},
    {"id_below_minus_one", "not an expert",
     [](ReferenceArgs& a, Tensor&) { a.topk_ids.ptr<int32_t>()[1] = -2; }},
    {"weight_on_input_with_k2", "weight_on_input",
     [](ReferenceArgs& a, Tensor&) { a.weight_on_input = true; }},
    {"x_width", "x",
     [](ReferenceArgs& a, Tensor& s) {
       s = Tensor::zeros(DType::kF32, {3, 3});
       a.x = s.view();
     }},
    {"ids_fp32", "topk_ids",
     [](ReferenceArgs& a, Tensor& s) {
       s = Tensor::zeros(DType::kF32, {3, 2});
       a.topk_ids = s.view();
     }},
    {"map_of_other_E", "expert map",
     [](ReferenceArgs& a, Tensor&) {
       static const ExpertMap map = ExpertMap::linear(4, 2);
       a.map = &map;
     }},
    {"rank_out_of_map", "rank",
     [](ReferenceArgs& a, Tensor&) {
       static const ExpertMap map = ExpertMap::linear(2, 2);
       a.map = &map;
       a.rank = 2;
     }},
    {"w2_shape", "w2",
     [](ReferenceArgs& a, Tensor& s) {
       s = Tensor::zeros(DType::kF32, {2, 3, 2});
       a.weights.w2 = s.view();
     }},
};

void PrintTo(const BadReferenceCase& c, std::ostream* os) {
  *os << c.name;
}

class ReferenceBadInput : public ::testing::TestWithParam<BadReferenceCase> {};

TEST_P(ReferenceBadInput, ThrowsAndLeavesYUntouched) {
  const TinyLayer layer = tiny_layer(Activation{});
  TinyBatch batch;
  ReferenceArgs args = batch.args(layer);
  Tensor scratch;
  GetParam().spoil(args, scratch);
  const Tensor y = sentinel_tensor(DType::kF32, {3, 2});
  const Snapshot before(y);
  EXPECT_TRUE(error_mentions([&] { reference_moe(args, y); }, GetParam().needle));
  EXPECT_TRUE(before.unchanged());
}

INSTANTIATE_TEST_SUITE_P(Reference, ReferenceBadInput, ::testing::ValuesIn(kBadReference),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(Reference, RefusesOutputsThatAreNotFp32OrOverlapTheInput) {
  const TinyLayer layer = tiny_layer(Activation{});
  const TinyBatch batch;
  const Tensor y_bf16 = sentinel_tensor(DType::kBF16, {3, 2});
  EXPECT_TRUE(error_mentions([&] { reference_moe(batch.args(layer), y_bf16); }, "fp32"));
  EXPECT_TRUE(error_mentions([&] { reference_moe(batch.args(layer), batch.x); }, "overlaps"));
}

// ---- reference experts ----

TEST(ReferenceExperts, DescribeThemselves) {
  const TinyLayer layer = tiny_layer(Activation{});
  const auto ex = make_reference_experts(layer.view(), layer.act);
  EXPECT_EQ(ex->name(), "reference");
  EXPECT_EQ(ex->activation_format(), ActivationFormat::kStandard);
  EXPECT_EQ(ex->activation_spec().dtype, DType::kF32);
  EXPECT_EQ(ex->weight_application(), TopKWeightApplied::kNone);
  EXPECT_EQ(ex->info().num_local_experts, 2);
  MoEProblem p;
  p.num_local_experts = 2;
  p.hidden = p.intermediate = 2;
  p.top_k = 2;
  p.tokens = 100000;
  p.activation = layer.act;
  EXPECT_EQ(ex->can_implement(p), std::nullopt);
  EXPECT_EQ(ex->workspace_size(p), 0u);
  p.hidden = 3;
  EXPECT_NE(ex->can_implement(p), std::nullopt);
}

// Local view of rank 1 under round-robin(2, 2): its only expert, local 0, is global expert 1.
TEST(ReferenceExperts, ComputeLocalSlotsAndExactZerosForMinusOne) {
  const TinyLayer layer = tiny_layer(Activation{});
  const ExpertMap map = ExpertMap::round_robin(2, 2);
  const auto ex =
      make_reference_experts(ExpertWeights::local_view(layer.view(), map, 1), layer.act);
  TinyBatch batch;
  const int32_t local_ids[] = {0, -1, -1, 0, -1, -1};
  std::memcpy(batch.ids.data<int32_t>(), local_ids, sizeof(local_ids));
  DispatchedBatch b;
  b.a1 = batch.x.view();
  b.topk_ids = batch.ids.view();
  b.topk_weights = batch.weights.view();
  const Tensor out = sentinel_tensor(DType::kF32, {3, 2, 2});
  Workspace ws;
  ex->apply(b, out, ws, {});
  const auto want = expert_out(1, kHandCases[0].h0, kHandCases[0].h1);
  for (int t = 0; t < 3; ++t)
    for (int s = 0; s < 2; ++s)
      for (int c = 0; c < 2; ++c) {
        const float got = out.data<float>()[(t * 2 + s) * 2 + c];
        if (local_ids[t * 2 + s] < 0)
          EXPECT_EQ(got, 0.0f) << "t " << t << " s " << s;
        else
          EXPECT_NEAR(got, want[c], 4e-7 * std::abs(want[c])) << "t " << t << " s " << s;
      }
}

TEST(ReferenceExperts, RefuseLocalIdsOutsideTheirSlotsBeforeWriting) {
  const TinyLayer layer = tiny_layer(Activation{});
  const auto ex = make_reference_experts(layer.view(), layer.act);
  for (int32_t bad : {2, -2}) {
    TinyBatch batch;
    batch.ids.data<int32_t>()[5] = bad;  // the last slot: everything before it is valid
    DispatchedBatch b;
    b.a1 = batch.x.view();
    b.topk_ids = batch.ids.view();
    const Tensor out = sentinel_tensor(DType::kF32, {3, 2, 2});
    const Snapshot before(out);
    Workspace ws;
    EXPECT_TRUE(error_mentions([&] { ex->apply(b, out, ws, {}); }, "outside [-1, 2)"));
    EXPECT_TRUE(before.unchanged());
  }
}

TEST(ReferenceExperts, KeepTheirOwnCopyOfTheWeights) {
  TinyLayer layer = tiny_layer(Activation{});
  const TinyBatch batch;
  auto kernel = make_kernel(make_reference_experts(layer.view(), layer.act),
                            ExpertMap::linear(2, 1), 0, 2, DType::kF32);
  std::memset(layer.w2.data<float>(), 0, layer.w2.view().nbytes());
  const Tensor y = forward(*kernel, batch.x, batch.ids, batch.weights);
  EXPECT_TRUE(rows_match(y, expected_tiny_y(kHandCases[0].h0, kHandCases[0].h1), kFp32Output));
}

}  // namespace
}  // namespace moekit::test
