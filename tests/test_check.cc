// The contract-check library itself (moekit/check.h): its data, comparisons and placements,
// and -- the point of it -- that the suite catches broken Experts implementations.
#include <set>

#include "moekit/check.h"
#include "support/test_support.h"

namespace moekit::test {
namespace {

TEST(CheckData, FillUniformIsDeterministicAndIgnoresStrides) {
  const Tensor a = random_tensor(DType::kBF16, {5, 9}, 42, -2, 2);
  const Strided b = strided_copy(random_tensor(DType::kBF16, {5, 9}, 7), 3);
  check::fill_uniform(b.view, 42, -2, 2);
  EXPECT_TRUE(bits_equal(b.view, a));
  const Tensor c = random_tensor(DType::kBF16, {5, 9}, 43, -2, 2);
  EXPECT_FALSE(check::compare_bits(a, c).ok());
  for (int64_t i = 0; i < a.numel(); ++i) {
    const float v = load_as_float(a.data<void>(), DType::kBF16, i);
    EXPECT_TRUE(v >= -2 && v <= 2) << v;
  }
}

TEST(CheckData, RoutingPadsRowsAndSlotsOnSchedule) {
  const check::Routing r =
      check::make_random_routing(check::router_config(RoutingMethod::kSoftmaxTopK, 8, 3), 13, 1, 6);
  for (int64_t t = 0; t < 13; ++t) {
    const int32_t* ids = r.topk_ids.data<int32_t>() + t * 3;
    const bool full = t % 6 == 5, last = t % 6 == 3;
    for (int s = 0; s < 3; ++s)
      EXPECT_EQ(ids[s] < 0, full || (last && s == 2)) << "t " << t << " s " << s;
  }
}

TEST(CheckData, RouterConfigsAreValidForEveryMethod) {
  for (RoutingMethod m : check::CheckOptions{}.routing)
    for (auto [E, k] : {std::pair{8, 2}, {8, 8}, {6, 3}, {256, 8}, {1, 1}}) {
      EXPECT_EQ(check::router_config(m, E, k).validate(), std::nullopt)
          << name(m) << " E=" << E << " k=" << k;
    }
}

TEST(CheckCompare, NamesTheFirstBadCoordinateAndTreatsZeroRowsExactly) {
  Tensor want = Tensor::zeros(DType::kF32, {3, 4}), got = Tensor::zeros(DType::kF32, {3, 4});
  want.data<float>()[1 * 4 + 2] = 2.0f;  // row 1 has scale 2; rows 0 and 2 must be exact zeros
  got.data<float>()[1 * 4 + 2] = 2.01f;
  check::Comparison c = check::compare_rows(got, want, 0.01);
  EXPECT_TRUE(c.ok()) << c.str();
  EXPECT_NEAR(c.max_err, 0.005, 1e-6);
  got.data<float>()[2 * 4 + 3] = 1e-30f;
  got.data<float>()[2 * 4 + 1] = -1e-30f;
  c = check::compare_rows(got, want, 0.01);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.first_bad->row, 2);
  EXPECT_EQ(c.first_bad->col, 1);
  EXPECT_NE(c.str().find("[2, 1]"), std::string::npos) << c.str();
}

TEST(CheckCompare, NanIsAlwaysBad) {
  Tensor want = Tensor::zeros(DType::kF32, {1, 2});
  Tensor got = sentinel_tensor(DType::kF32, {1, 2});  // NaN
  want.data<float>()[0] = 1.0f;
  EXPECT_FALSE(check::compare_rows(got, want, 1e9).ok());
  EXPECT_FALSE(check::compare_bits(got, want).ok());
}

TEST(CheckBounds, GrowWithRanksWeightOnInputAndPrecision) {
  const double b1 = check::error_bound(DType::kBF16, 1, false, 64, 64);
  EXPECT_GT(check::error_bound(DType::kBF16, 4, false, 64, 64), b1);
  EXPECT_GT(check::error_bound(DType::kBF16, 1, true, 64, 64), b1);
  EXPECT_LT(check::error_bound(DType::kF32, 1, false, 64, 64), 1e-4);
  EXPECT_LT(b1, 0.02);  // tight enough to catch a dropped intermediate column (see test below)
  EXPECT_THROW(check::error_bound(DType::kI32, 1, false, 64, 64), Error);
}

// ---- placements ----

TEST(CheckPlacement, EveryExpertIsServedExactlyOncePerToken) {
  for (check::Placement p : check::CheckOptions{}.placements)
    for (int ranks : {1, 2, 3, 4}) {
      if (!check::placement_applies(p, 12, ranks)) continue;
      const ExpertMap map = check::make_placement(p, 12, ranks, 5);
      SCOPED_TRACE(map.str());
      for (int e = 0; e < 12; ++e)
        for (int64_t key = 0; key < 8; ++key) {
          int served = 0;
          for (int r = 0; r < ranks; ++r) served += map.local_id(r, e, key) >= 0;
          EXPECT_EQ(served, 1) << "expert " << e << " key " << key;
        }
    }
}

TEST(CheckPlacement, ShapesAreTheAdvertisedOnes) {
  const ExpertMap shuffled = check::make_placement(check::Placement::kShuffledTable, 8, 4, 5);
  EXPECT_EQ(shuffled.num_local(3), 0);  // an empty rank
  EXPECT_EQ(shuffled.num_local(0), 4);
  const auto ids = shuffled.local_to_global(0);
  EXPECT_NE(std::vector<int32_t>(ids.begin(), ids.end()), (std::vector<int32_t>{0, 1, 2, 3}));
  const ExpertMap replicated = check::make_placement(check::Placement::kReplicated, 8, 4, 5);
  EXPECT_EQ(replicated.replicas(0).size(), 4u);  // the hot expert is everywhere
  EXPECT_EQ(replicated.replicas(2).size(), 2u);  // rank 0 holds rank 1's first expert
  EXPECT_EQ(replicated.replicas(3).size(), 1u);
  EXPECT_FALSE(check::placement_applies(check::Placement::kRoundRobin, 8, 1));
  EXPECT_FALSE(check::placement_applies(check::Placement::kLinear, 8, 3));
  EXPECT_EQ(check::parse_placement("shuffled"), check::Placement::kShuffledTable);
  EXPECT_TRUE(error_mentions([] { check::parse_placement("ring"); }, "round_robin"));
}

// ---- the suite ----

TEST(CheckSuite, EnumeratesTheCrossProductLessWhatDoesNotApply) {
  check::CheckOptions o;
  o.experts = {"reference"};
  // local: ranks 1 (linear, shuffled), ranks 2 and 4 (all four placements); naive, all_to_all
  // and low_latency in one process: ranks 1 only.
  EXPECT_EQ(check::enumerate_cases(o).size(), size_t(4 * (2 + 4 + 4) + 3 * 4 * 2));
  o.prepare_finalize = {"local"};
  EXPECT_EQ(check::enumerate_cases(o).size(), size_t(4 * (2 + 4 + 4)));
  o.experts = {"nonesuch"};
  EXPECT_TRUE(error_mentions([&] { check::enumerate_cases(o); }, "registered: reference"));
}

TEST(CheckSuite, RegistryHasTheReferenceEveryCpuIsaAndAFallback) {
  std::set<std::string> names;
  for (const auto& e : check::experts_registry()) names.insert(e.name);
  EXPECT_TRUE(names.count("reference"));
  EXPECT_TRUE(names.count("cpu-scalar"));
  EXPECT_TRUE(names.count("fallback"));
  EXPECT_EQ(check::prepare_finalize_registry().front().name, "local");
}

// Wraps reference experts and breaks them in one way.
enum class Defect { kComputesMinusOne, kAppliesWeights, kShiftsLocalIds, kDropsAColumn };

class BrokenExperts final : public Experts {
 public:
  BrokenExperts(const ExpertWeights& w, const Activation& act, Defect d)
      : inner_(make_reference_experts(w, act)), defect_(d) {}
  std::string_view name() const override { return "broken"; }
  ActivationFormat activation_format() const override { return inner_->activation_format(); }
  ActivationSpec activation_spec() const override { return inner_->activation_spec(); }
  TopKWeightApplied weight_application() const override { return inner_->weight_application(); }
  const ExpertsInfo& info() const override { return inner_->info(); }
  std::optional<std::string> can_implement(const MoEProblem& p) const override {
    return inner_->can_implement(p);
  }
  size_t workspace_size(const MoEProblem& p) const override { return inner_->workspace_size(p); }
  void apply(const DispatchedBatch& b, const TensorView& out, Workspace& ws,
             const ExecContext& ctx) const override {
    const int64_t M = b.topk_ids.size(0), k = b.topk_ids.size(1), H = info().hidden;
    const int64_t E = info().num_local_experts;
    Tensor ids(DType::kI32, {M, k});
    for (int64_t i = 0; i < M * k; ++i) {
      const int32_t id = b.topk_ids.row<int32_t>(i / k)[i % k];
      const bool any = E > 0;
      ids.data<int32_t>()[i] = defect_ == Defect::kComputesMinusOne && id < 0 && any ? 0
                               : defect_ == Defect::kShiftsLocalIds && id >= 0       ? (id + 1) % E
                                                                                     : id;
    }
    DispatchedBatch broken = b;
    broken.topk_ids = ids.view();
    inner_->apply(broken, out, ws, ctx);
    for (int64_t i = 0; i < M * k; ++i)
      for (int64_t c = 0; c < H; ++c) {
        float& v = out.ptr<float>()[i * H + c];
        if (defect_ == Defect::kAppliesWeights) v *= b.topk_weights.row<float>(i / k)[i % k];
        if (defect_ == Defect::kDropsAColumn && c == H / 2) v = 0;
      }
  }

 private:
  std::shared_ptr<Experts> inner_;
  Defect defect_;
};

struct DefectCase {
  const char* name;
  Defect defect;
};
void PrintTo(const DefectCase& c, std::ostream* os) {
  *os << c.name;
}

class CheckSuiteCatches : public ::testing::TestWithParam<DefectCase> {};

TEST_P(CheckSuiteCatches, ABrokenExpertsImplementation) {
  check::CheckOptions o;
  o.threads = 1;
  o.tokens = {19, 99};
  o.routing = {RoutingMethod::kSoftmaxTopK};
  o.experts = {"broken"};
  const Defect defect = GetParam().defect;
  o.extra_experts.push_back(
      {"broken", [defect](const ExpertWeights& w, const Activation& act, int) {
         return std::make_shared<BrokenExperts>(w, act, defect);
       }});
  const check::CheckReport report = check::run_contract_suite(o);
  ASSERT_FALSE(report.results.empty());
  for (const auto& r : report.results) {
    // On one rank -1 only marks padding, which finalize skips by the caller's id: the defect
    // is invisible there (Contract1ExactZeroForMinusOneIds catches it on Experts::apply).
    if (defect == Defect::kComputesMinusOne && r.kase.ranks == 1) continue;
    // Batched dispatch hands the experts no top-k weights (all 1): applying them is harmless.
    if (defect == Defect::kAppliesWeights && r.kase.prepare_finalize == "low_latency") continue;
    EXPECT_FALSE(r.passed) << r.str();
    EXPECT_NE(r.detail.find("first bad coordinate"), std::string::npos) << r.str();
  }
}

INSTANTIATE_TEST_SUITE_P(Defects, CheckSuiteCatches,
                         ::testing::Values(DefectCase{"computes_minus_one",
                                                      Defect::kComputesMinusOne},
                                           DefectCase{"applies_weights", Defect::kAppliesWeights},
                                           DefectCase{"shifts_local_ids", Defect::kShiftsLocalIds},
                                           DefectCase{"drops_a_column", Defect::kDropsAColumn}),
                         [](const auto& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace moekit::test
