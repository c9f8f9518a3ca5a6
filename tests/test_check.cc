// The contract-check library itself (moekit/check.h): its data, comparisons and placements,
// and -- the point of it -- that the suite catches broken Experts implementations.
#include <cmath>
#include <cstring>
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

TEST(CheckBounds, FollowTheFormatsActivationUnit) {
  auto bound = [](const char* format, bool woi = false) {
    return check::error_bound(QuantScheme::parse(format), DType::kBF16, 1, woi, 64, 64);
  };
  // Float and weight-only formats: the bf16 bound (activations stay bf16).
  EXPECT_EQ(bound("bf16"), check::error_bound(DType::kBF16, 1, false, 64, 64));
  EXPECT_EQ(bound("w4a16:g32:zp"), bound("bf16"));
  EXPECT_EQ(bound("mxfp4", true), check::error_bound(DType::kBF16, 1, true, 64, 64));
  // Quantized activations: y's rounding plus one flip of an intermediate code (2 act_unit);
  // the weight on the input adds nothing (kernel and oracle quantize the same fp32 product).
  const double u_y = 1.0 / 256;
  EXPECT_NEAR(bound("fp8-token") - u_y, 2.0 / 16, 1e-4);
  EXPECT_NEAR(bound("int8") - u_y, 2.0 / 254, 1e-4);
  EXPECT_EQ(bound("fp8-tensor", true), bound("fp8-tensor"));
  EXPECT_GT(check::error_bound(QuantScheme::parse("int8"), DType::kBF16, 4, false, 64, 64),
            bound("int8"));
  EXPECT_THROW(check::error_bound(QuantScheme::parse("int8"), DType::kI8, 1, false, 64, 64), Error);
  // A systematic error: only where kernel and oracle round the same numbers.
  EXPECT_EQ(check::systematic_error_bound(QuantScheme::parse("w4a16"), DType::kBF16, 1),
            std::nullopt);
  EXPECT_NEAR(*check::systematic_error_bound(QuantScheme::parse("fp8-block"), DType::kBF16, 2),
              2 * u_y + 1.0 / 128, 1e-9);
}

TEST(CheckCompare, SystematicErrorIsTheSlopeOfTheErrorOnWant) {
  Tensor want(DType::kF32, {20, 3}), got(DType::kF32, {20, 3});
  for (int64_t i = 0; i < 60; ++i) {
    want.data<float>()[i] = float(i % 7) - 3.0f;
    got.data<float>()[i] = want.data<float>()[i] * 0.97f + (i % 2 ? 0.01f : -0.01f);
  }
  check::Comparison c = check::compare_systematic(got, want, 0.02);
  EXPECT_NEAR(c.max_err, 0.03, 1e-3);
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.str().find("systematic error"), std::string::npos) << c.str();
  EXPECT_TRUE(check::compare_systematic(got, want, 0.04).ok());
  // Fewer rows than min_rows: reported, not bad.
  c = check::compare_systematic(got.view().slice0(0, 5), want.view().slice0(0, 5), 0.02);
  EXPECT_TRUE(c.ok());
  EXPECT_GT(c.max_err, 0.02);
  EXPECT_EQ(check::compare_systematic(Tensor::zeros(DType::kF32, {20, 3}),
                                      Tensor::zeros(DType::kF32, {20, 3}), 0.0).max_err, 0.0);
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

TEST(CheckSuite, FormatsAddCasesAfterTheFloatDtypes) {
  check::CheckOptions o;
  o.experts = {"reference"};
  o.prepare_finalize = {"local"};
  o.routing = {RoutingMethod::kSoftmaxTopK};
  o.formats = {QuantScheme::parse("fp8-block:ue8m0"), QuantScheme::parse("fp32")};
  const auto cases = check::enumerate_cases(o);
  ASSERT_EQ(cases.size(), size_t(3 * 10));
  EXPECT_EQ(cases[10].format.str(), "fp8-block:ue8m0");
  EXPECT_EQ(cases[10].dtype, DType::kBF16);  // x and y of quantized formats
  EXPECT_EQ(cases[20].dtype, DType::kF32);   // a float format listed as a format
  EXPECT_NE(cases[10].name().find("/fp8-block:ue8m0"), std::string::npos) << cases[10].name();
  EXPECT_NE(cases[0].name().find("/bf16"), std::string::npos) << cases[0].name();
  o.formats = {QuantScheme::parse("fp8-tensor:static")};
  EXPECT_TRUE(error_mentions([&] { check::enumerate_cases(o); }, "static activation scale"));
}

// Experts that refuse a format at construction make the case not applicable, with the reason;
// any other construction error is a failure.
TEST(CheckSuite, ExpertsRefusingTheFormatMakeTheCaseNotApplicable) {
  check::CheckOptions o;
  o.threads = 1;
  o.tokens = {7, 19};
  o.routing = {RoutingMethod::kSoftmaxTopK};
  o.placements = {check::Placement::kLinear};
  o.ranks = {1, 2};
  o.formats = {QuantScheme::parse("int8")};
  o.dtypes = {};
  o.experts = {"picky"};
  std::string message;
  o.extra_experts.push_back(
      {"picky",
       [&message](const ExpertWeights&, const Activation&, int) -> std::shared_ptr<Experts> {
         MOEKIT_FAIL(message);
       }});
  message = "picky experts: Format int8 is not supported yet";
  check::CheckReport report = check::run_contract_suite(o);
  ASSERT_EQ(report.results.size(), size_t((2 + 3) * 2));  // local x1, x2; three EP x1
  EXPECT_EQ(report.not_applicable(), report.results.size());
  EXPECT_EQ(report.passed(), 0u);
  EXPECT_TRUE(report.ok());
  for (const auto& r : report.results) {
    EXPECT_TRUE(r.not_applicable && r.passed) << r.str();
    EXPECT_EQ(r.str().rfind("N/A ", 0), 0u) << r.str();
    EXPECT_NE(r.detail.find("not supported yet"), std::string::npos) << r.str();
  }
  message = "picky experts: no memory";
  report = check::run_contract_suite(o);
  EXPECT_EQ(report.failed(), report.results.size());
  EXPECT_EQ(report.not_applicable(), 0u);
}

// A refusal of the shape ("multiples of N") is not applicable only where H or I is not a
// multiple of N: experts refusing a shape they claim to take fail.
TEST(CheckSuite, ExpertsRefusingTheShapeAreNotApplicableOnlyWhereItIsUnaligned) {
  check::CheckOptions o;
  o.threads = 1;
  o.tokens = {7};
  o.routing = {RoutingMethod::kSoftmaxTopK};
  o.placements = {check::Placement::kLinear};
  o.ranks = {1};
  o.experts = {"aligned"};
  o.prepare_finalize = {"local"};
  o.extra_experts.push_back(
      {"aligned", [](const ExpertWeights& w, const Activation&, int) -> std::shared_ptr<Experts> {
         MOEKIT_FAIL("aligned: hidden ", w.hidden(), " and intermediate ", w.intermediate(),
                     " must be multiples of 16");
       }});
  o.hidden = 72;  // 72 = 16 * 4.5; I = 45
  check::CheckReport report = check::run_contract_suite(o);
  ASSERT_EQ(report.results.size(), 1u);
  EXPECT_TRUE(report.results[0].not_applicable) << report.results[0].str();
  EXPECT_EQ(report.results[0].detail.rfind(
                "the experts refuse the shape H=72, I=45 (they need multiples of 16): ", 0),
            0u)
      << report.results[0].detail;
  o.hidden = 64;
  o.intermediate = 48;
  report = check::run_contract_suite(o);
  ASSERT_EQ(report.results.size(), 1u);
  EXPECT_FALSE(report.results[0].not_applicable) << report.results[0].str();
  EXPECT_FALSE(report.results[0].passed);
  EXPECT_NE(report.results[0].detail.find("must be multiples of 16"), std::string::npos)
      << report.results[0].detail;
}

// Entries of a device pair only with prepare/finalize entries of that device; experts named
// without one of theirs are an error, not an empty sweep.
TEST(CheckSuite, CasesPairEntriesOfTheSameDevice) {
  check::CheckOptions o;
  o.routing = {RoutingMethod::kSoftmaxTopK};
  o.extra_experts.push_back({"gpu-stub",
                             [](const ExpertWeights&, const Activation&, int) {
                               return std::shared_ptr<Experts>();
                             },
                             false, DeviceType::kCUDA});
  const std::vector<check::CheckCase> cases = check::enumerate_cases(o);
  ASSERT_FALSE(cases.empty());
  for (const check::CheckCase& c : cases) {
    const bool cuda_pf = c.prepare_finalize.rfind("cuda", 0) == 0;
    EXPECT_EQ(c.device, cuda_pf ? DeviceType::kCUDA : DeviceType::kCPU) << c.name();
    EXPECT_EQ(c.experts == "gpu-stub" || c.experts.rfind("cuda", 0) == 0, cuda_pf) << c.name();
  }
  o.experts = {"gpu-stub"};
  o.prepare_finalize = {"local"};
  EXPECT_TRUE(error_mentions([&] { check::enumerate_cases(o); },
                             "experts 'gpu-stub' run on cuda and no selected prepare/finalize"));
  o.experts = {"reference"};
  o.device = DeviceType::kCPU;
  EXPECT_FALSE(check::enumerate_cases(o).empty());
}

// Without a CUDA device, or in a build without CUDA, the CUDA entries are absent, and naming
// one (or the device) says why instead of running nothing.
TEST(CheckSuite, CudaEntriesWithoutADeviceAreAbsentAndNamingOneSaysWhy) {
  const std::optional<std::string> why = check::device_unavailable(DeviceType::kCUDA);
  EXPECT_EQ(check::device_unavailable(DeviceType::kCPU), std::nullopt);
  if (!why) GTEST_SKIP() << "a CUDA device is present (test_cuda_contracts runs its entries)";
  EXPECT_TRUE(*why == "no CUDA device" || *why == "moekit built without CUDA") << *why;
  EXPECT_TRUE(check::experts_registry(DeviceType::kCUDA).empty());
  EXPECT_TRUE(check::prepare_finalize_registry(DeviceType::kCUDA).empty());
  EXPECT_TRUE(check::experts_registry(std::nullopt).size() == check::experts_registry().size());
  check::CheckOptions o;
  for (const char* name : {"cuda-small-batch", "cuda-grouped-gemm", "cuda"}) {
    o.experts = {name};
    EXPECT_TRUE(error_mentions([&] { check::enumerate_cases(o); },
                               "experts '" + std::string(name) + "': " + *why));
  }
  o.experts = {};
  o.prepare_finalize = {"cuda-local"};
  EXPECT_TRUE(error_mentions([&] { check::enumerate_cases(o); },
                             "prepare/finalize 'cuda-local': " + *why));
  o.prepare_finalize = {};
  o.device = DeviceType::kCUDA;
  EXPECT_TRUE(error_mentions([&] { check::enumerate_cases(o); }, "device cuda: " + *why));
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

class BrokenExperts final : public test::ForwardingExperts {
 public:
  BrokenExperts(const ExpertWeights& w, const Activation& act, Defect d)
      : ForwardingExperts(make_reference_experts(w, act)), defect_(d) {}
  std::string_view name() const override { return "broken"; }
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

// ---- the suite catches broken quantized experts ----

// Bugs of quantized kernels, one at a time.
enum class QuantDefect {
  kNone,                   // the control: must pass
  kInvertedScale,          // a1 = q / scale
  kScaleOfNextRow,         // a1 row t dequantized with row t + 1's scale
  kScaleOfNextGroup,       // a1 group j dequantized with group j + 1's scale
  kTruncatedIntermediate,  // a2 requantized toward zero instead of to nearest
  kDroppedZeroPoint,       // weights dequantized as q * scale
  kWeightScaleOfNextGroup  // weight group j dequantized with group j + 1's scale
};

// A second, deliberately plain implementation of quantized experts (standard format, kNone):
// per (token, slot), a1 dequantized with the batch's scale, weights with dequantize_weight_row,
// a2 of all pairs requantized as intermediate_spec says, all in double -- with one defect
// switched on, by editing copies of the scales or the rounding of a2.
class LoopExperts final : public Experts {
 public:
  LoopExperts(const ExpertWeights& w, const Activation& act, QuantDefect d)
      : w_(w), act_(act), defect_(d), info_(ExpertsInfo::of(w, act)),
        spec_(ActivationSpec::of(w.scheme())), mid_(intermediate_spec(w.scheme())) {
    MOEKIT_CHECK(w.quant, "loop experts: quantized weights only");
    if (spec_.scale == ScaleKind::kNone) spec_.dtype = DType::kF32;
    if (d == QuantDefect::kDroppedZeroPoint) {
      zero13_ = zeros_like(w.s13.zero);
      zero2_ = zeros_like(w.s2.zero);
      w_.s13.zero = zero13_.view();
      w_.s2.zero = zero2_.view();
    }
    if (d == QuantDefect::kWeightScaleOfNextGroup) {
      scale13_ = shifted_groups(w.s13.scale);
      scale2_ = shifted_groups(w.s2.scale);
      w_.s13.scale = scale13_.view();
      w_.s2.scale = scale2_.view();
    }
  }
  std::string_view name() const override { return "loop"; }
  ActivationFormat activation_format() const override { return ActivationFormat::kStandard; }
  ActivationSpec activation_spec() const override { return spec_; }
  TopKWeightApplied weight_application() const override { return TopKWeightApplied::kNone; }
  const ExpertsInfo& info() const override { return info_; }
  std::optional<std::string> can_implement(const MoEProblem&) const override {
    return std::nullopt;
  }
  size_t workspace_size(const MoEProblem&) const override { return 0; }

  void apply(const DispatchedBatch& b, const TensorView& out, Workspace&,
             const ExecContext&) const override {
    const int64_t M = b.a1.size(0), k = b.topk_ids.size(1), H = info_.hidden;
    const int64_t I = info_.intermediate;
    const Tensor a1 = dequantized_a1(b);
    std::vector<float> row(std::max(H, I));
    auto dot = [&](const TensorView& wt, const WeightScales& sc, const TensorView& bias,
                   int64_t e, int64_t r, const auto* in, int64_t n) {
      dequantize_weight_row(wt, sc, *w_.quant, e, r, row.data());
      double acc =
          bias.present() ? load_as_float(bias.data, bias.dtype, e * bias.stride[0] + r) : 0;
      for (int64_t c = 0; c < n; ++c) acc += double(row[c]) * double(in[c]);
      return acc;
    };
    // Pass 1: the intermediate of every (token, slot) pair with an id, [pairs, I].
    std::vector<std::pair<int64_t, int64_t>> pairs;  // (t * k + s, weights' expert)
    std::vector<double> h;
    for (int64_t t = 0; t < M; ++t)
      for (int64_t s = 0; s < k; ++s) {
        std::fill_n(out.ptr<float>() + (t * k + s) * H, H, 0.0f);
        const int32_t e = b.topk_ids.row<int32_t>(t)[s];
        if (e < 0) continue;
        pairs.push_back({t * k + s, w_.index(e)});
        const float* x = a1.data<float>() + t * H;
        for (int64_t j = 0; j < I; ++j) {
          const double gate = dot(w_.w13, w_.s13, w_.b13, w_.index(e), act_.gate_row(j, I), x, H);
          const double up =
              act_.gated ? dot(w_.w13, w_.s13, w_.b13, w_.index(e), act_.up_row(j, I), x, H) : 0;
          h.push_back(apply_activation<double>(act_, gate, up));
        }
      }
    // Pass 2: a2 over all pairs at once (a per-tensor scale covers the call), then GEMM2.
    requantize(h, static_cast<int64_t>(pairs.size()), I);
    for (size_t p = 0; p < pairs.size(); ++p)
      for (int64_t i = 0; i < H; ++i)
        out.ptr<float>()[pairs[p].first * H + i] =
            static_cast<float>(dot(w_.w2, w_.s2, w_.b2, pairs[p].second, i, &h[p * I], I));
  }

 private:
  static Tensor zeros_like(const TensorView& t) {
    MOEKIT_CHECK(t.present() && t.ndim == 3, "loop experts: no zero point to drop");
    return Tensor::zeros(t.dtype, {t.size(0), t.size(1), t.size(2)});
  }
  // A copy of contiguous scales [..., G] whose group j holds group (j + 1) mod G's scale.
  static Tensor shifted_groups(const TensorView& t) {
    MOEKIT_CHECK(t.ndim == 3 && t.is_contiguous() && t.size(2) > 1,
                 "loop experts: no groups to shift in ", t.str());
    const int64_t rows = t.size(0) * t.size(1), G = t.size(2), eb = storage_bytes(t.dtype, 1);
    Tensor s(t.dtype, {t.size(0), t.size(1), G});
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < G; ++j)
        std::memcpy(s.data<char>() + (r * G + j) * eb,
                    static_cast<const char*>(t.data) + (r * G + (j + 1) % G) * eb, eb);
    return s;
  }

  // a1 [M, H] as fp32, through a scale edited as the defect says.
  Tensor dequantized_a1(const DispatchedBatch& b) const {
    const int64_t M = b.a1.size(0), H = b.a1.size(1);
    Tensor a1(DType::kF32, {M, H});
    if (b.a1_scale.kind == ScaleKind::kNone) {
      for (int64_t i = 0; i < M * H; ++i)
        a1.data<float>()[i] = load_as_float(b.a1.data, b.a1.dtype, i);
      return a1;
    }
    const TensorView& s = b.a1_scale.scale;
    const int64_t rows = b.a1_scale.kind == ScaleKind::kTensor ? 1 : M;
    const int64_t G = s.ndim > 1 ? s.size(1) : 1;
    Tensor edited(DType::kF32, {rows, G});
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < G; ++j) {
        const int64_t from_r = defect_ == QuantDefect::kScaleOfNextRow ? (r + 1) % rows : r;
        const int64_t from_j = defect_ == QuantDefect::kScaleOfNextGroup ? (j + 1) % G : j;
        const float v = load_as_float(s.data, s.dtype, from_r * G + from_j);
        edited.data<float>()[r * G + j] = defect_ == QuantDefect::kInvertedScale ? 1.0f / v : v;
      }
    const TensorView scale = b.a1_scale.kind == ScaleKind::kTensor  ? edited.view().reshaped({1})
                             : b.a1_scale.kind == ScaleKind::kToken ? edited.view().reshaped({M})
                                                                     : edited.view();
    dequantize_activations(b.a1, {b.a1_scale.kind, b.a1_scale.group, scale}, a1);
    return a1;
  }

  // a2 [P, I] as the format's kernels round it (or, with the defect, toward zero).
  void requantize(std::vector<double>& h, int64_t P, int64_t I) const {
    if (mid_.scale == ScaleKind::kNone || P == 0) return;
    Tensor v(DType::kF32, {P, I}), q(mid_.dtype, {P, I}), d(DType::kF32, {P, I});
    const std::vector<int64_t> shape = activation_scale_shape(mid_, P, I);
    Tensor s = shape.size() == 1 ? Tensor(DType::kF32, {shape[0]})
                                 : Tensor(mid_.scale_dtype, {shape[0], shape[1]});
    for (int64_t i = 0; i < P * I; ++i) v.data<float>()[i] = static_cast<float>(h[i]);
    quantize_activations(v, mid_, q, s);
    const ActivationScale scale{mid_.scale, mid_.group, s};
    dequantize_activations(q, scale, d);
    if (defect_ == QuantDefect::kTruncatedIntermediate)
      for (int64_t i = 0; i < P * I; ++i) {
        if (!(std::abs(d.data<float>()[i]) > std::abs(v.data<float>()[i]))) continue;
        // One code toward zero: int8 by one step, e4m3 by one magnitude code (sign bit 7).
        uint8_t& c = q.data<uint8_t>()[i];
        if (mid_.dtype == DType::kI8)
          c = static_cast<uint8_t>(static_cast<int8_t>(c) - (static_cast<int8_t>(c) > 0 ? 1 : -1));
        else
          c = static_cast<uint8_t>((c & 0x80) | ((c & 0x7f) - 1));
      }
    dequantize_activations(q, scale, d);
    for (int64_t i = 0; i < P * I; ++i) h[i] = d.data<float>()[i];
  }

  ExpertWeights w_;
  Activation act_;
  QuantDefect defect_;
  ExpertsInfo info_;
  ActivationSpec spec_, mid_;
  Tensor zero13_, zero2_, scale13_, scale2_;
};

struct QuantDefectCase {
  const char* name;
  QuantDefect defect;
  std::vector<const char*> formats;
};
void PrintTo(const QuantDefectCase& c, std::ostream* os) {
  *os << c.name;
}

// Formats with 4-bit weights need even H and I; per-block ones groups of 128 to shift between.
check::CheckOptions defect_options(const QuantScheme& format) {
  check::CheckOptions o;
  o.threads = 1;
  o.tokens = {19, 99};
  o.routing = {RoutingMethod::kSoftmaxTopK};
  o.placements = {check::Placement::kLinear, check::Placement::kShuffledTable};
  o.ranks = {1, 2};
  o.dtypes = {};
  o.formats = {format};
  if (is_packed(format.weight_dtype())) o.hidden = 66, o.intermediate = 46;
  if (format.format == Format::kFP8Block) o.hidden = 200, o.intermediate = 136;
  return o;
}

class CheckSuiteCatchesQuantized : public ::testing::TestWithParam<QuantDefectCase> {};

TEST_P(CheckSuiteCatchesQuantized, ABrokenExpertsImplementation) {
  const QuantDefect defect = GetParam().defect;
  for (const char* f : GetParam().formats) {
    check::CheckOptions o = defect_options(QuantScheme::parse(f));
    o.experts = {"loop"};
    o.extra_experts.push_back(
        {"loop", [defect](const ExpertWeights& w, const Activation& act, int) {
           return std::make_shared<LoopExperts>(w, act, defect);
         }, true});
    const check::CheckReport report = check::run_contract_suite(o);
    ASSERT_EQ(report.results.size(), size_t((4 + 3 * 2) * 2)) << f;
    for (const auto& r : report.results) {
      if (defect == QuantDefect::kNone) {
        EXPECT_TRUE(r.passed && !r.not_applicable) << r.str();
        continue;
      }
      EXPECT_FALSE(r.passed) << r.str();
      EXPECT_TRUE(r.detail.find("first bad coordinate") != std::string::npos ||
                  r.detail.find("systematic error") != std::string::npos)
          << r.str();
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Defects, CheckSuiteCatchesQuantized,
    ::testing::Values(
        QuantDefectCase{"none", QuantDefect::kNone,
                        {"fp8-tensor", "fp8-token", "fp8-block:ue8m0", "int8", "w4a16:g32:zp",
                         "w8a16:g32:zp", "w4a8", "mxfp4", "nvfp4"}},
        QuantDefectCase{"inverted_scale", QuantDefect::kInvertedScale,
                        {"fp8-tensor", "fp8-token", "fp8-block", "int8"}},
        QuantDefectCase{"scale_of_next_row", QuantDefect::kScaleOfNextRow,
                        {"fp8-token", "fp8-block", "int8"}},
        QuantDefectCase{"scale_of_next_group", QuantDefect::kScaleOfNextGroup, {"fp8-block"}},
        QuantDefectCase{"truncated_intermediate", QuantDefect::kTruncatedIntermediate,
                        {"fp8-tensor", "fp8-token", "fp8-block", "int8"}},
        QuantDefectCase{"dropped_zero_point", QuantDefect::kDroppedZeroPoint,
                        {"w4a16:g32:zp", "w8a16:g32:zp"}},
        QuantDefectCase{"weight_scale_of_next_group", QuantDefect::kWeightScaleOfNextGroup,
                        {"w4a16:g32", "w8a16:g32", "mxfp4", "nvfp4"}}),
    [](const auto& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace moekit::test
