// The contract suite (moekit/check.h) over the CUDA registry entries: every CUDA Experts with the
// CUDA prepare/finalize of its activation format (cuda-local for the standard experts,
// cuda-batched-local for the batched ones) under every placement over 1, 2 and 4 ranks and every
// routing method, in bf16, fp16, fp8-token and fp8-tensor, against the fp64 oracle -- the runner
// that `moekit check` uses, on device tensors. Skips, loudly, without a CUDA device.
#include <gtest/gtest.h>

#include <iostream>
#include <set>
#include <string>
#include <vector>

#include "moekit/check.h"
#include "moekit/cuda.h"
#include "support/cuda_test_support.h"
#include "support/test_support.h"

namespace moekit::test {
namespace {

const std::vector<std::string> kCudaExperts = {"cuda-small-batch",  "cuda-small-batch-reduced",
                                               "cuda-grouped-gemm", "cuda",
                                               "cuda-batched",      "cuda-batched-grouped"};
const std::vector<std::string> kFormats = {"bf16", "fp16", "fp8-token", "fp8-tensor"};
const std::vector<int64_t> kTokens = {1, 7, 19, 99};
// (placement, ranks) pairs that exist for E = 8: linear and shuffled on 1 rank (round-robin is
// linear there, replicas need 2), all four on 2 and on 4 ranks.
constexpr size_t kPlacementsAndRanks = 2 + 4 + 4;

bool batched(const std::string& experts) {
  return experts.rfind("cuda-batched", 0) == 0;
}

// The CUDA entries on a shape they take: H and I multiples of 16 (fp8 rows of 16 bytes), and
// the suite's defaults otherwise (E = 8, k = 2, chunks of 64, every routing method), behind the
// prepare/finalize of their activation format (the other pairs are not applicable:
// MismatchedActivationFormatsAreNotApplicable).
check::CheckOptions cuda_options(const std::string& experts, const std::string& format) {
  check::CheckOptions o;
  o.device = DeviceType::kCUDA;
  o.hidden = 96;
  o.intermediate = 48;
  o.tokens = kTokens;
  o.experts = {experts};
  o.prepare_finalize = {batched(experts) ? "cuda-batched-local" : "cuda-local"};
  const QuantScheme q = QuantScheme::parse(format);
  o.dtypes.clear();
  if (q.is_float())
    o.dtypes = {q.weight_dtype()};
  else
    o.formats = {q};
  return o;
}

// Every result passed and ran (no N/A): `expected` of them.
void expect_all_ran_and_passed(const check::CheckReport& report, size_t expected) {
  for (const check::CaseResult& r : report.results)
    EXPECT_TRUE(r.passed && !r.not_applicable) << r.str();
  std::cout << "  " << report.passed() << " passed, " << report.failed() << " failed, "
            << report.not_applicable() << " not applicable\n";
  EXPECT_GT(report.passed(), 0u);
  EXPECT_EQ(report.passed(), expected);
  EXPECT_EQ(report.results.size(), expected);
}

TEST(CudaContracts, RegistryHasTheCudaEntries) {
  SKIP_WITHOUT_CUDA();
  std::set<std::string> names;
  for (const check::ExpertsEntry& e : check::experts_registry(DeviceType::kCUDA)) {
    EXPECT_EQ(e.device, DeviceType::kCUDA) << e.name;
    // Small-batch rows are computed one by one (cuda-batched takes the small-batch path); the
    // others are not claimed batch-invariant.
    EXPECT_EQ(e.batch_invariant,
              e.name.rfind("cuda-small-batch", 0) == 0 || e.name == "cuda-batched")
        << e.name;
    names.insert(e.name);
  }
  EXPECT_EQ(names, std::set<std::string>(kCudaExperts.begin(), kCudaExperts.end()));
  const auto pfs = check::prepare_finalize_registry(DeviceType::kCUDA);
  ASSERT_EQ(pfs.size(), 2u);
  EXPECT_EQ(pfs[0].name, "cuda-local");
  EXPECT_EQ(pfs[1].name, "cuda-batched-local");
  for (const check::PrepareFinalizeEntry& pf : pfs) EXPECT_FALSE(pf.distributed) << pf.name;
  // The CPU registry (the default) holds none of them.
  for (const check::ExpertsEntry& e : check::experts_registry())
    EXPECT_EQ(e.device, DeviceType::kCPU) << e.name;
}

struct SuiteParam {
  std::string experts, format;
};
void PrintTo(const SuiteParam& p, std::ostream* os) {
  *os << p.experts << " " << p.format;
}

class CudaContractSuite : public ::testing::TestWithParam<SuiteParam> {};

// One CUDA Experts in one format: 4 routing methods x 10 placements and rank counts x 4 token
// counts, each compared with the oracle (rank shares, rank sums, linear(E, 1); bit-exact where
// check.h says so).
TEST_P(CudaContractSuite, MatchesTheOracle) {
  SKIP_WITHOUT_CUDA();
  const check::CheckOptions o = cuda_options(GetParam().experts, GetParam().format);
  const check::CheckReport report = check::run_contract_suite(o);
  expect_all_ran_and_passed(report, o.routing.size() * kPlacementsAndRanks * kTokens.size());
}

std::vector<SuiteParam> suite_params() {
  std::vector<SuiteParam> params;
  for (const std::string& e : kCudaExperts)
    for (const std::string& f : kFormats) params.push_back({e, f});
  return params;
}

INSTANTIATE_TEST_SUITE_P(Registry, CudaContractSuite, ::testing::ValuesIn(suite_params()),
                         [](const auto& info) {
                           return test_name(info.param.experts + "_" + info.param.format);
                         });

// Biases (SwiGLU-OAI, gate and up interleaved, as gpt-oss) with top-k -> softmax, and a
// non-gated activation with the weight on the input (Llama-4 top-1), through every CUDA Experts.
TEST(CudaContractSuite, BiasesAndWeightOnInput) {
  SKIP_WITHOUT_CUDA();
  for (const std::string& experts : kCudaExperts) {
    SCOPED_TRACE(experts);
    check::CheckOptions o = cuda_options(experts, "bf16");
    o.tokens = {1, 19};
    o.biases = {true};
    o.activations = {parse_activation("swiglu_oai_interleaved"), parse_activation("gelu_nogate")};
    o.routing = {RoutingMethod::kTopKSoftmax, RoutingMethod::kLlama4Top1Sigmoid};
    expect_all_ran_and_passed(check::run_contract_suite(o), 2 * 2 * kPlacementsAndRanks * 2);
  }
}

// Batched experts behind cuda-local, and standard experts behind cuda-batched-local: the
// activation formats do not meet, so the cases are not applicable, with that reason.
TEST(CudaContractSuite, MismatchedActivationFormatsAreNotApplicable) {
  SKIP_WITHOUT_CUDA();
  for (const auto& [experts, pf] : {std::pair{"cuda-batched", "cuda-local"},
                                    {"cuda-batched-grouped", "cuda-local"},
                                    {"cuda-small-batch", "cuda-batched-local"}}) {
    SCOPED_TRACE(std::string(experts) + " behind " + pf);
    check::CheckOptions o = cuda_options(experts, "bf16");
    o.prepare_finalize = {pf};
    o.tokens = {7};
    o.routing = {RoutingMethod::kSoftmaxTopK};
    o.ranks = {1, 2};
    o.placements = {check::Placement::kLinear};
    const check::CheckReport report = check::run_contract_suite(o);
    ASSERT_EQ(report.results.size(), 2u);
    EXPECT_EQ(report.not_applicable(), 2u);
    for (const check::CaseResult& r : report.results)
      EXPECT_EQ(r.detail.rfind("the activation formats do not meet", 0), 0u) << r.str();
  }
}

// On the suite's default odd shape (H = 67, I = 45) the CUDA Experts refuse the shape, and on a
// format they lack the format: not applicable, with the reason, never a failure or a pass.
TEST(CudaContractSuite, RefusedShapesAndFormatsAreNotApplicable) {
  SKIP_WITHOUT_CUDA();
  for (const std::string& experts : kCudaExperts)
    for (const char* format : {"bf16", "fp8-token", "int8"}) {
      SCOPED_TRACE(experts + " " + format);
      const bool lacks_format = std::string(format) == "int8";
      check::CheckOptions o = cuda_options(experts, format);
      o.tokens = {7};
      o.routing = {RoutingMethod::kSoftmaxTopK};
      o.placements = {check::Placement::kLinear};
      o.ranks = {1, 2};
      if (!lacks_format) {
        const check::CheckOptions defaults;
        o.hidden = defaults.hidden;
        o.intermediate = defaults.intermediate;
      }
      const check::CheckReport report = check::run_contract_suite(o);
      ASSERT_EQ(report.results.size(), 2u);
      EXPECT_EQ(report.not_applicable(), 2u);
      EXPECT_TRUE(report.ok());
      const std::string want = lacks_format ? "the experts refuse the format: "
                                            : "the experts refuse the shape H=67, I=45";
      for (const check::CaseResult& r : report.results)
        EXPECT_EQ(r.detail.rfind(want, 0), 0u) << r.str();
    }
}

}  // namespace
}  // namespace moekit::test
