// Quantized activations through every PrepareFinalize in one process (contract 4): each row
// reaches the experts with its own scale -- the per-tensor scalar intact, static or dynamic --
// and what a prepare/finalize cannot produce is refused when the kernel is built, with a reason.
// tests/mpi/test_ep_mpi.cc runs the same checks across ranks.
#include "mpi/quant_dispatch.h"
#include "support/test_support.h"

namespace moekit::test {
namespace {

struct DispatchCase {
  const char* format;
  bool weight_on_input;
};
void PrintTo(const DispatchCase& c, std::ostream* os) {
  *os << c.format << (c.weight_on_input ? " (weight on input)" : "");
}

class ScaledActivations : public ::testing::TestWithParam<DispatchCase> {};

// Local prepare/finalize over 1, 2 and 4 ranks (each rank's share), and each distributed one
// on one rank: the experts see rows of x quantized with their scale, and compute the oracle.
TEST_P(ScaledActivations, ReachTheExpertsWithTheirScaleThroughEveryPrepareFinalize) {
  const QuantLayer layer(GetParam().format, GetParam().weight_on_input);
  const std::vector<ScaledRow> want = layer.expected();
  const int64_t M = layer.x.size(0);
  for (const check::PrepareFinalizeEntry& entry : check::prepare_finalize_registry())
    for (int ranks : {1, 2, 4}) {
      if (entry.distributed && ranks > 1) continue;  // across ranks: test_ep_mpi.cc
      const ExpertMap map = ExpertMap::linear(8, ranks);
      for (int rank = 0; rank < ranks; ++rank) {
        SCOPED_TRACE(entry.name + " rank " + std::to_string(rank) + " of " + map.str());
        auto pf = entry.make(map, rank, make_single_communicator(), M);
        // One round of all rows: a dynamic per-tensor scale then covers the whole batch.
        const Dispatched d = dispatch(layer, pf, map, rank, 0, M, M);
        EXPECT_TRUE(rows_arrived_with_their_scales(*d.experts, want, layer.spec().scale));
        EXPECT_TRUE(rows_match(d.y, layer.reference(&map, rank), layer.bound(1)));
      }
    }
}

// In chunks, a dynamic per-tensor scale covers each chunk's rows; per-token and per-block
// scales do not depend on the chunk at all.
TEST_P(ScaledActivations, FollowTheRowsOfTheirRound) {
  const QuantLayer layer(GetParam().format, GetParam().weight_on_input);
  const ExpertMap map = ExpertMap::linear(8, 1);
  const int64_t M = layer.x.size(0), chunk = 8;
  const Dispatched d = dispatch(layer, make_local_prepare_finalize(map, 0), map, 0, 0, M, chunk);
  std::vector<ScaledRow> want;
  for (int64_t begin = 0; begin < M; begin += chunk) {
    const int64_t end = std::min(M, begin + chunk);
    for (ScaledRow& r : expected_rows(layer.x.view().slice0(begin, end),
                                      layer.routing.topk_weights.view().slice0(begin, end),
                                      layer.routing.weight_on_input, layer.spec()))
      want.push_back(std::move(r));
  }
  EXPECT_TRUE(rows_arrived_with_their_scales(*d.experts, want, layer.spec().scale));
  EXPECT_EQ(d.experts->kinds.size(), size_t((M + chunk - 1) / chunk));
}

INSTANTIATE_TEST_SUITE_P(
    Formats, ScaledActivations,
    ::testing::Values(DispatchCase{"fp8-tensor", false}, DispatchCase{"fp8-tensor", true},
                      DispatchCase{"fp8-tensor:static", false},
                      DispatchCase{"fp8-tensor:static", true}, DispatchCase{"fp8-token", false},
                      DispatchCase{"fp8-token", true}, DispatchCase{"fp8-block", false},
                      DispatchCase{"fp8-block:ue8m0", false}, DispatchCase{"int8", false},
                      DispatchCase{"w4a8", false}),
    [](const auto& info) {
      return test_name(std::string(info.param.format) +
                       (info.param.weight_on_input ? "_weight_on_input" : ""));
    });

// The per-tensor scale a prepare hands the experts is exactly the static one, or the scale of
// the batch's amax: one scalar for every row.
TEST(ScaledActivations, PerTensorScaleIsTheStaticOneOrTheBatchAmaxs) {
  for (const char* format : {"fp8-tensor", "fp8-tensor:static"}) {
    const QuantLayer layer(format, false);
    const float want = layer.scheme.static_act
                           ? kStaticScale
                           : tensor_scale_of_amax(activation_amax(layer.x), DType::kF8E4M3);
    const int64_t M = layer.x.size(0);
    for (const check::PrepareFinalizeEntry& entry : check::prepare_finalize_registry()) {
      const ExpertMap map = ExpertMap::linear(8, 1);
      const Dispatched d =
          dispatch(layer, entry.make(map, 0, make_single_communicator(), M), map, 0, 0, M, M);
      ASSERT_FALSE(d.experts->rows.empty()) << entry.name;
      for (const ScaledRow& r : d.experts->rows) {
        float got;
        ASSERT_EQ(r.scale.size(), sizeof got) << entry.name;
        std::memcpy(&got, r.scale.data(), sizeof got);
        EXPECT_EQ(got, want) << format << " through " << entry.name;
      }
    }
  }
}

// ---- refused when the kernel is built ----------------------------------------------------

ActivationSpec spec_of(DType dtype, ScaleKind kind, int64_t group = 0,
                       DType scale_dtype = DType::kF32, TensorView static_scale = {}) {
  ActivationSpec s;
  s.dtype = dtype;
  s.scale = kind;
  s.group = group;
  s.scale_dtype = scale_dtype;
  s.static_scale = static_scale;
  return s;
}

TEST(CanDispatch, HostPrepareFinalizeRefusesWhatItCannotProduceWithAReason) {
  Tensor two(DType::kF32, {2}), zero = Tensor::zeros(DType::kF32, {1}), good(DType::kF32, {1});
  good.data<float>()[0] = 0.5f;
  struct Refused {
    ActivationSpec spec;
    const char* reason;
  };
  const Refused refused[] = {
      {spec_of(DType::kBF16, ScaleKind::kToken), "float activations take no scale"},
      {spec_of(DType::kF8E5M2, ScaleKind::kTensor), "must be fp8_e4m3 or int8"},
      {spec_of(DType::kI4, ScaleKind::kBlock, 32), "must be fp8_e4m3 or int8"},
      {spec_of(DType::kF8E4M3, ScaleKind::kNone), "need a per-tensor, per-token or per-block"},
      {spec_of(DType::kI8, ScaleKind::kBlock, 0), "group of at least 1"},
      {spec_of(DType::kF8E4M3, ScaleKind::kToken, 0, DType::kUE8M0), "must be fp32"},
      {spec_of(DType::kF8E4M3, ScaleKind::kBlock, 128, DType::kBF16), "must be fp32 or ue8m0"},
      {spec_of(DType::kF8E4M3, ScaleKind::kToken, 0, DType::kF32, good), "per-tensor only"},
      {spec_of(DType::kF8E4M3, ScaleKind::kTensor, 0, DType::kF32, two), "[1] fp32"},
      {spec_of(DType::kF8E4M3, ScaleKind::kTensor, 0, DType::kF32, zero), "positive and finite"},
  };
  const ActivationSpec accepted[] = {
      spec_of(DType::kBF16, ScaleKind::kNone),
      spec_of(DType::kF32, ScaleKind::kNone),
      spec_of(DType::kF8E4M3, ScaleKind::kTensor),
      spec_of(DType::kF8E4M3, ScaleKind::kTensor, 0, DType::kF32, good),
      spec_of(DType::kF8E4M3, ScaleKind::kToken),
      spec_of(DType::kI8, ScaleKind::kToken),
      spec_of(DType::kF8E4M3, ScaleKind::kBlock, 128),
      spec_of(DType::kF8E4M3, ScaleKind::kBlock, 128, DType::kUE8M0),
      spec_of(DType::kI8, ScaleKind::kBlock, 7),  // a ragged last group is fine
  };
  for (const check::PrepareFinalizeEntry& entry : check::prepare_finalize_registry()) {
    auto pf = entry.make(ExpertMap::linear(8, 1), 0, make_single_communicator(), 4);
    for (const Refused& r : refused) {
      const auto reason = pf->can_dispatch(r.spec);
      ASSERT_NE(reason, std::nullopt) << entry.name << ": " << r.reason;
      EXPECT_NE(reason->find(r.reason), std::string::npos) << entry.name << ": " << *reason;
    }
    for (const ActivationSpec& s : accepted)
      EXPECT_EQ(pf->can_dispatch(s), std::nullopt) << entry.name << ": " << name(s.dtype);
  }
}

// A prepare/finalize that does not override can_dispatch (one that does not quantize) refuses
// every scaled spec: the scale is never dropped silently.
class PlainPrepareFinalize final : public PrepareFinalize {
 public:
  std::string_view name() const override { return "plain"; }
  ActivationFormat activation_format() const override { return ActivationFormat::kStandard; }
  const ExpertMap& expert_map() const override { return map_; }
  int rank() const override { return 0; }
  std::optional<std::string> can_implement(const MoEProblem&) const override {
    return std::nullopt;
  }
  int64_t max_dispatched_tokens(const MoEProblem& p) const override { return p.tokens; }
  size_t workspace_size(const MoEProblem&) const override { return 0; }
  DispatchedBatch prepare(const PrepareRequest&, Workspace&, const ExecContext&) override {
    throw std::logic_error("must be refused before it runs");
  }
  void finalize(const FinalizeRequest&, Workspace&, const ExecContext&) override {}

 private:
  ExpertMap map_ = ExpertMap::linear(8, 1);
};

TEST(CanDispatch, APrepareFinalizeThatDoesNotQuantizeRefusesScaledActivations) {
  const QuantLayer layer("fp8-token", false);
  const auto reason = ModularKernel::check_compatible(
      PlainPrepareFinalize(), *layer.experts(ExpertMap::linear(8, 1), 0), {2, DType::kBF16, 16});
  ASSERT_NE(reason, std::nullopt);
  EXPECT_NE(reason->find("does not quantize"), std::string::npos) << *reason;
  EXPECT_NE(reason->find("prepare/finalize 'plain'"), std::string::npos) << *reason;
}

// Experts asking for a scale layout other than their format's are refused: prepare/finalize
// size workspaces and exchanges from the format.
class OtherLayoutExperts final : public Experts {
 public:
  OtherLayoutExperts(std::shared_ptr<Experts> inner, ActivationSpec spec)
      : inner_(std::move(inner)), spec_(spec) {}
  std::string_view name() const override { return "other-layout"; }
  ActivationFormat activation_format() const override { return ActivationFormat::kStandard; }
  ActivationSpec activation_spec() const override { return spec_; }
  TopKWeightApplied weight_application() const override { return TopKWeightApplied::kNone; }
  const ExpertsInfo& info() const override { return inner_->info(); }
  std::optional<std::string> can_implement(const MoEProblem&) const override {
    return std::nullopt;
  }
  size_t workspace_size(const MoEProblem&) const override { return 0; }
  void apply(const DispatchedBatch&, const TensorView&, Workspace&,
             const ExecContext&) const override {
    throw std::logic_error("must be refused before it runs");
  }

 private:
  std::shared_ptr<Experts> inner_;
  ActivationSpec spec_;
};

TEST(CanDispatch, ExpertsMustAskForTheirFormatsScaleLayout) {
  const QuantLayer layer("fp8-block", false);
  const ExpertMap map = ExpertMap::linear(8, 1);
  for (const ActivationSpec& other :
       {spec_of(DType::kF8E4M3, ScaleKind::kBlock, 64), spec_of(DType::kF8E4M3, ScaleKind::kToken),
        spec_of(DType::kI8, ScaleKind::kBlock, 128)}) {
    auto experts = std::make_shared<OtherLayoutExperts>(layer.experts(map, 0), other);
    EXPECT_TRUE(error_mentions(
        [&] {
          ModularKernel(make_local_prepare_finalize(map, 0), experts, make_cpu_weight_and_reduce(1),
                        {2, DType::kBF16, 16});
        },
        "but its format fp8-block has fp8_e4m3 per-block (group 128, fp32 scales)"));
  }
}

// Contract 4 on the experts' side: a quantized a1 handed over without its scale (or with
// another kind) is refused by the reference experts before they write.
TEST(CanDispatch, ReferenceExpertsRefuseABatchWithoutItsScale) {
  const QuantLayer layer("fp8-token", false);
  auto experts = layer.experts(ExpertMap::linear(8, 1), 0);
  const int64_t M = 3, H = 160;
  Tensor a1 = Tensor::zeros(DType::kF8E4M3, {M, H}), ids = Tensor::zeros(DType::kI32, {M, 2});
  Tensor w = Tensor::zeros(DType::kF32, {M, 2}), scalar = Tensor::zeros(DType::kF32, {1});
  DispatchedBatch b;
  b.a1 = a1.view();
  b.topk_ids = ids.view();
  b.topk_weights = w.view();
  const Tensor out = sentinel_tensor(DType::kF32, {M, 2, H});
  const Snapshot before(out);
  Workspace none;
  EXPECT_TRUE(error_mentions([&] { experts->apply(b, out, none, {}); }, "a1 scale is none"));
  b.a1_scale = {ScaleKind::kTensor, 0, scalar.view()};
  EXPECT_TRUE(error_mentions([&] { experts->apply(b, out, none, {}); }, "want a token scale"));
  EXPECT_TRUE(before.unchanged());
}

}  // namespace
}  // namespace moekit::test
