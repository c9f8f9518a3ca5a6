// The contracts of DESIGN.md section 2.
//
// ContractSuite: one parameterized test over the CPU registry (every Experts x PrepareFinalize) x
// placement x ranks x routing x activation x format, each run for several token counts (1, 7,
// 19, 99 and 111 for the float formats) against the oracle (check.h documents what is
// compared); experts that refuse a format at construction skip their cases with the reason.
// The tests after it pin the contracts one by one, for every registered Experts implementation.
#include <sys/resource.h>

#include <cstring>
#include <fstream>
#include <string>

#include "moekit/check.h"
#include "moekit/cpu.h"
#include "moekit/dist/communicator.h"
#include "support/test_support.h"

namespace moekit::test {
namespace {

// ---- the sweep --------------------------------------------------------------------------

check::CheckOptions suite_options() {
  check::CheckOptions o;  // E = 8, H = 67, I = 45, k = 2, chunks of 64
  // The CPU entries: the CUDA ones refuse these odd shapes (test_cuda_contracts runs them).
  o.device = DeviceType::kCPU;
  // One thread: each case builds up to 5 kernels, and idle pools spinning on 2 cores cost more
  // than the work. Contract9Deterministic covers 2 threads.
  o.threads = 1;
  return o;
}

std::vector<Activation> activations(std::initializer_list<const char*> names) {
  std::vector<Activation> acts;
  for (const char* n : names) acts.push_back(parse_activation(n));
  return acts;
}

std::vector<QuantScheme> formats(std::initializer_list<const char*> names) {
  std::vector<QuantScheme> f;
  for (const char* n : names) f.push_back(QuantScheme::parse(n));
  return f;
}

// The option sets of the sweep; each case runs with the options it was enumerated from.
const std::vector<check::CheckOptions>& option_sets() {
  static const std::vector<check::CheckOptions> sets = [] {
    std::vector<check::CheckOptions> s;
    check::CheckOptions all = suite_options();
    all.activations = activations(
        {"silu", "gelu", "gelu_tanh", "relu2", "swiglu_oai", "silu_nogate", "silu_interleaved"});
    s.push_back(all);
    // Biases, as gpt-oss (top-k -> softmax) and with the weight on the input.
    check::CheckOptions bias = suite_options();
    bias.activations = activations({"swiglu_oai", "gelu_nogate"});
    bias.biases = {true};
    bias.routing = {RoutingMethod::kTopKSoftmax, RoutingMethod::kLlama4Top1Sigmoid};
    s.push_back(bias);
    check::CheckOptions fp32 = suite_options();
    fp32.dtypes = {DType::kF32};
    fp32.activations = activations({"silu", "swiglu_oai_interleaved"});
    fp32.routing = {RoutingMethod::kSoftmaxTopK, RoutingMethod::kSigmoidGroupedTopK};
    s.push_back(fp32);
    // Quantized formats (x and y bf16), with and without the weight on the input. Fewer token
    // counts: every format's kernels are exercised by the placements and ranks, and the oracle
    // of a quantized format costs more.
    check::CheckOptions quant = suite_options();
    quant.dtypes = {};
    quant.tokens = {1, 19, 99};
    quant.routing = {RoutingMethod::kSoftmaxTopK, RoutingMethod::kLlama4Top1Sigmoid};
    quant.formats = formats({"fp8-tensor", "fp8-token", "fp8-block:ue8m0", "int8", "w8a16:g32:zp"});
    s.push_back(quant);
    // 4-bit weights need even H and I.
    check::CheckOptions four = quant;
    four.hidden = 66;
    four.intermediate = 46;
    four.routing = {RoutingMethod::kSoftmaxTopK};
    four.formats = formats({"w4a16:g32:zp", "w4a8", "mxfp4", "nvfp4"});
    s.push_back(four);
    // gpt-oss: mxfp4 with SwiGLU-OAI, biases and top-k -> softmax.
    check::CheckOptions gpt_oss = four;
    gpt_oss.activations = activations({"swiglu_oai"});
    gpt_oss.biases = {true};
    gpt_oss.routing = {RoutingMethod::kTopKSoftmax};
    gpt_oss.formats = formats({"mxfp4"});
    s.push_back(gpt_oss);
    // Per-block scales over several 128 x 128 blocks and 1 x 128 groups (ragged last ones).
    check::CheckOptions blocks = quant;
    blocks.hidden = 200;
    blocks.intermediate = 136;
    blocks.tokens = {7, 99};
    blocks.routing = {RoutingMethod::kSoftmaxTopK};
    blocks.formats = formats({"fp8-block"});
    s.push_back(blocks);
    return s;
  }();
  return sets;
}

struct SuiteCase {
  check::CheckCase kase;
  size_t options = 0;  // index into option_sets()
  std::string name() const {
    const check::CheckOptions& o = option_sets()[options];
    const check::CheckOptions defaults;
    if (o.hidden == defaults.hidden && o.intermediate == defaults.intermediate) return kase.name();
    return kase.name() + "/H" + std::to_string(o.hidden) + "xI" + std::to_string(o.intermediate);
  }
};
// Names the case in gtest's messages instead of dumping its bytes.
void PrintTo(const SuiteCase& c, std::ostream* os) {
  *os << c.name();
}

std::vector<SuiteCase> suite_cases() {
  std::vector<SuiteCase> cases;
  for (size_t i = 0; i < option_sets().size(); ++i)
    for (auto& c : check::enumerate_cases(option_sets()[i])) cases.push_back({std::move(c), i});
  return cases;
}

class ContractSuite : public ::testing::TestWithParam<SuiteCase> {};

// Experts that refuse a format at construction skip the case, loudly, with their reason.
TEST_P(ContractSuite, MatchesTheOracle) {
  std::string not_applicable;
  for (const check::CaseResult& r :
       check::run_case(GetParam().kase, option_sets()[GetParam().options])) {
    if (r.not_applicable) not_applicable = r.detail;
    EXPECT_TRUE(r.passed) << r.str();
  }
  if (!not_applicable.empty()) GTEST_SKIP() << "not applicable: " << not_applicable;
}

INSTANTIATE_TEST_SUITE_P(Registry, ContractSuite, ::testing::ValuesIn(suite_cases()),
                         [](const auto& info) { return test_name(info.param.name()); });

// ---- test-only parts --------------------------------------------------------------------

// Experts that delegate to `inner` and record the dispatched ids and weights of every call.
class RecordingExperts final : public test::ForwardingExperts {
 public:
  using ForwardingExperts::ForwardingExperts;
  void apply(const DispatchedBatch& b, const TensorView& out, Workspace& ws,
             const ExecContext& ctx) const override {
    for (int64_t t = 0; t < b.topk_ids.size(0); ++t)
      for (int64_t s = 0; s < b.topk_ids.size(1); ++s) {
        ids.push_back(b.topk_ids.row<int32_t>(t)[s]);
        weights.push_back(b.topk_weights.row<float>(t)[s]);
      }
    inner_->apply(b, out, ws, ctx);
  }
  mutable std::vector<int32_t> ids;  // [M, k] over all chunks
  mutable std::vector<float> weights;
};

// Experts that only describe themselves: `format` and `refusal` are what contract 5 is about.
class StubExperts final : public Experts {
 public:
  StubExperts(ExpertsInfo info, ActivationFormat format, std::optional<std::string> refusal,
              ActivationSpec spec = {})
      : info_(std::move(info)), format_(format), refusal_(std::move(refusal)), spec_(spec) {}
  std::string_view name() const override { return "stub"; }
  ActivationFormat activation_format() const override { return format_; }
  ActivationSpec activation_spec() const override { return spec_; }
  TopKWeightApplied weight_application() const override { return TopKWeightApplied::kNone; }
  const ExpertsInfo& info() const override { return info_; }
  std::optional<std::string> can_implement(const MoEProblem&) const override { return refusal_; }
  size_t workspace_size(const MoEProblem&) const override { return 0; }
  void apply(const DispatchedBatch&, const TensorView&, Workspace&,
             const ExecContext&) const override {
    throw std::logic_error("stub experts must be refused before they run");
  }

 private:
  ExpertsInfo info_;
  ActivationFormat format_;
  std::optional<std::string> refusal_;
  ActivationSpec spec_;
};

// Local prepare/finalize that overwrites the dispatched weights copy with garbage and checks
// that finalize is handed the caller's routing (the chunk of ForwardArgs it prepared).
class ScramblingPrepareFinalize final : public PrepareFinalize {
 public:
  explicit ScramblingPrepareFinalize(ExpertMap map)
      : inner_(make_local_prepare_finalize(std::move(map), 0)) {}
  std::string_view name() const override { return "scrambling"; }
  ActivationFormat activation_format() const override { return inner_->activation_format(); }
  const ExpertMap& expert_map() const override { return inner_->expert_map(); }
  int rank() const override { return inner_->rank(); }
  std::optional<std::string> can_implement(const MoEProblem& p) const override {
    return inner_->can_implement(p);
  }
  int64_t max_dispatched_tokens(const MoEProblem& p) const override {
    return inner_->max_dispatched_tokens(p);
  }
  size_t workspace_size(const MoEProblem& p) const override { return inner_->workspace_size(p); }
  DispatchedBatch prepare(const PrepareRequest& req, Workspace& ws,
                          const ExecContext& ctx) override {
    DispatchedBatch b = inner_->prepare(req, ws, ctx);
    scrambled_ = Tensor(DType::kF32, {b.topk_weights.size(0), b.topk_weights.size(1)});
    check::fill_uniform(scrambled_, 99, 100.0, 1000.0);
    b.topk_weights = scrambled_.view();
    caller_ids_ = req.topk_ids.data;
    caller_weights_ = req.topk_weights.data;
    return b;
  }
  void finalize(const FinalizeRequest& req, Workspace& ws, const ExecContext& ctx) override {
    ++finalized;
    if (req.topk_ids.data != caller_ids_ || req.topk_weights.data != caller_weights_)
      ++not_callers_routing;
    inner_->finalize(req, ws, ctx);
  }
  int finalized = 0, not_callers_routing = 0;

 private:
  std::shared_ptr<PrepareFinalize> inner_;
  Tensor scrambled_;
  const void* caller_ids_ = nullptr;
  const void* caller_weights_ = nullptr;
};

// ---- contracts, for every registered Experts --------------------------------------------

class EveryExperts : public ::testing::TestWithParam<std::string> {
 protected:
  const check::ExpertsEntry& entry() const { return experts_entry(GetParam()); }
};

// Contract 1: Experts::apply called directly writes exact zeros for every slot with id -1
// (whole padding rows included) and the oracle's values elsewhere.
TEST_P(EveryExperts, Contract1ExactZeroForMinusOneIds) {
  const TestLayer layer({.num_experts = 4, .top_k = 3, .tokens = 9});
  const auto experts = entry().make(layer.weights.view(), layer.spec.activation, 2);
  const int64_t M = 9, k = 3, H = layer.spec.hidden;
  const DType a1_dtype = experts->activation_spec().dtype;
  Tensor ids(DType::kI32, {M, k});
  for (int64_t i = 0; i < M * k; ++i) ids.data<int32_t>()[i] = int32_t(i * 7 % 5) - 1;  // -1..3
  for (int64_t s = 0; s < k; ++s)
    ids.data<int32_t>()[2 * k + s] = ids.data<int32_t>()[6 * k + s] = -1;
  DispatchedBatch b;
  const Tensor a1 = random_tensor(a1_dtype, {M, H}, 5, -3, 3);
  b.a1 = a1.view();
  b.topk_ids = ids.view();
  const Tensor weights = random_tensor(DType::kF32, {M, k}, 6, 0, 1);
  b.topk_weights = weights.view();
  MoEProblem p;
  p.num_experts = p.num_local_experts = 4;
  p.hidden = H;
  p.intermediate = layer.spec.intermediate;
  p.top_k = k;
  p.tokens = M;
  p.act_dtype = a1_dtype;
  p.activation = layer.spec.activation;
  ASSERT_EQ(experts->can_implement(p), std::nullopt);
  Tensor ws_bytes(DType::kU8, {int64_t(experts->workspace_size(p)) + 1});
  Workspace ws(ws_bytes.data<char>(), experts->workspace_size(p));
  const Tensor out = sentinel_tensor(DType::kF32, {M, k, H});
  experts->apply(b, out, ws, {});
  const auto ref = make_reference_experts(layer.weights.view(), layer.spec.activation);
  const Tensor want = sentinel_tensor(DType::kF32, {M, k, H});
  Workspace none;
  ref->apply(b, want, none, {});
  // Rows of [M k, H]: a -1 slot has scale 0, so it must be exactly zero.
  EXPECT_TRUE(rows_match(out.view().reshaped({M * k, H}), want.view().reshaped({M * k, H}),
                         check::error_bound(a1_dtype, 1, false, H, layer.spec.intermediate)));
}

// Contract 1: prepare hands the experts local ids only: map.local_id of the row's global key,
// -1 for experts served elsewhere and for padding.
TEST_P(EveryExperts, Contract1ExpertsSeeOnlyLocalIds) {
  const TestLayer layer({.tokens = 45, .padding_period = 7});
  constexpr int64_t kKeyOffset = 5, kChunk = 16;
  for (check::Placement p : {check::Placement::kRoundRobin, check::Placement::kReplicated}) {
    const ExpertMap map = check::make_placement(p, 8, 2, 3);
    for (int rank = 0; rank < 2; ++rank) {
      SCOPED_TRACE(map.str() + " rank " + std::to_string(rank));
      auto rec = std::make_shared<RecordingExperts>(entry().make(
          ExpertWeights::local_view(layer.weights.view(), map, rank), layer.spec.activation, 2));
      auto kernel = make_kernel(rec, map, rank, 2, DType::kBF16, kChunk);
      Tensor y = sentinel_tensor(DType::kBF16, {45, layer.spec.hidden});
      kernel->forward({layer.x.view(), layer.routing.topk_ids.view(),
                       layer.routing.topk_weights.view(), y.view(), false, kKeyOffset});
      ASSERT_EQ(rec->ids.size(), size_t(45 * 2));
      for (int64_t t = 0; t < 45; ++t)
        for (int s = 0; s < 2; ++s) {
          const int32_t global = layer.routing.topk_ids.data<int32_t>()[t * 2 + s];
          const int32_t want = global < 0 ? -1 : map.local_id(rank, global, kKeyOffset + t);
          EXPECT_EQ(rec->ids[t * 2 + s], want) << "token " << t << " slot " << s;
        }
    }
  }
}

// Contract 2: finalize weights with the caller's routing, never the dispatched copy.
TEST_P(EveryExperts, Contract2FinalizeUsesTheCallersRouting) {
  const TestLayer layer({.tokens = 50, .padding_period = 6});
  const ExpertMap map = ExpertMap::linear(8, 1);
  auto experts = [&] { return entry().make(layer.weights.view(), layer.spec.activation, 2); };
  ASSERT_EQ(experts()->weight_application(), TopKWeightApplied::kNone)
      << "scrambling the dispatched weights only proves something for kNone experts";
  auto scrambler = std::make_shared<ScramblingPrepareFinalize>(map);
  ModularKernel scrambled(scrambler, experts(), make_cpu_weight_and_reduce(2),
                          {2, DType::kBF16, 16});
  auto plain = make_kernel(experts(), map, 0, 2, DType::kBF16, 16, 2);
  EXPECT_TRUE(bits_equal(layer.forward(scrambled), layer.forward(*plain)));
  EXPECT_EQ(scrambler->finalized, 4);  // 50 rows in chunks of 16
  EXPECT_EQ(scrambler->not_callers_routing, 0);
}

// Contract 3: the weight is applied once, on the input, when asked. relu2_nogate is
// homogeneous of degree 2, so expert(w x) = w^2 expert(x): y_on_input = w * y_after exactly in
// real arithmetic (twice applied would be w^2 y_after, never applied y_after / w).
TEST_P(EveryExperts, Contract3WeightOnInputAppliedExactlyOnce) {
  const TestLayer layer({.top_k = 1,
                         .activation = parse_activation("relu2_nogate"),
                         .routing = RoutingMethod::kLlama4Top1Sigmoid});
  check::fill_uniform(layer.routing.topk_weights, 8, 0.25, 0.75);
  auto rec = std::make_shared<RecordingExperts>(
      entry().make(layer.weights.view(), layer.spec.activation, 2));
  auto kernel = make_kernel(rec, ExpertMap::linear(8, 1), 0, 1, DType::kBF16, 64, 2);
  const Tensor on_input = layer.forward(*kernel);
  for (float w : rec->weights) ASSERT_EQ(w, 1.0f) << "the dispatched copy must carry weight 1";
  const Tensor after =
      forward(*kernel, layer.x, layer.routing.topk_ids, layer.routing.topk_weights, false);
  Tensor scaled(DType::kF32, {layer.spec.tokens, layer.spec.hidden});
  for (int64_t t = 0; t < layer.spec.tokens; ++t)
    for (int64_t i = 0; i < layer.spec.hidden; ++i)
      scaled.data<float>()[t * layer.spec.hidden + i] =
          layer.routing.topk_weights.data<float>()[t] *
          load_as_float(after.data<void>(), DType::kBF16, t * layer.spec.hidden + i);
  // Both sides carry the kernel's error: the weight-on-input bound plus the plain one.
  const double plain =
      check::error_bound(DType::kBF16, 1, false, layer.spec.hidden, layer.spec.intermediate);
  EXPECT_TRUE(rows_match(on_input, scaled, layer.bound() + plain));
  EXPECT_TRUE(rows_match(on_input, layer.reference(), layer.bound()));
}

// Contract 3: weight_on_input with k > 1 has no meaning and is refused; y stays untouched.
TEST_P(EveryExperts, Contract3WeightOnInputNeedsTopK1) {
  const TestLayer layer({.tokens = 7});
  auto kernel = layer.kernel(entry());
  const Tensor y = sentinel_tensor(DType::kBF16, {7, layer.spec.hidden});
  const Snapshot before(y);
  EXPECT_TRUE(error_mentions(
      [&] {
        kernel->forward({layer.x.view(), layer.routing.topk_ids.view(),
                         layer.routing.topk_weights.view(), y.view(), true, 0});
      },
      "weight_on_input"));
  EXPECT_TRUE(before.unchanged());
}

// Contract 6: a 4096-token forward in chunks of 256 equals the unchunked one; bit for bit when
// the experts are batch-invariant, else within two kernels' bound.
TEST_P(EveryExperts, Contract6ChunkedEqualsUnchunked) {
  const TestLayer layer({.hidden = 32, .intermediate = 24, .tokens = 4096, .padding_period = 9});
  auto chunked = layer.kernel(entry(), 256);
  auto whole = layer.kernel(entry(), 4096);
  EXPECT_LT(chunked->workspace_bytes(), whole->workspace_bytes());
  const Tensor a = layer.forward(*chunked), b = layer.forward(*whole);
  if (entry().batch_invariant)
    EXPECT_TRUE(bits_equal(a, b));
  else
    EXPECT_TRUE(rows_match(a, b, 2 * layer.bound()));
  EXPECT_TRUE(rows_match(a, layer.reference(), layer.bound()));
}

// Contract 9: the same inputs give bit-identical outputs, run to run and kernel to kernel.
TEST_P(EveryExperts, Contract9Deterministic) {
  const TestLayer layer({.padding_period = 10});
  auto first = layer.kernel(entry(), 64, nullptr, 0, 2);
  auto second = layer.kernel(entry(), 64, nullptr, 0, 2);
  const Tensor y = layer.forward(*first);
  EXPECT_TRUE(bits_equal(layer.forward(*first), y));
  EXPECT_TRUE(bits_equal(layer.forward(*second), y));
}

// Contract 9, batch invariance: a token's row alone equals its row in a batch of 111. Required
// of batch-invariant experts; for the others it is not required yet (DESIGN.md 2.9 asks for a
// batch-invariant *mode*), so a difference skips with a note instead of failing.
TEST_P(EveryExperts, Contract9BatchInvariance) {
  const TestLayer layer({});
  auto kernel = layer.kernel(entry(), 1024, nullptr, 0, 2);
  const Tensor batch = layer.forward(*kernel);
  std::string differs;
  for (int64_t t : {0, 1, 57, 110}) {
    const Tensor alone = forward(*kernel, layer.x.view().slice0(t, t + 1),
                                 layer.routing.topk_ids.view().slice0(t, t + 1),
                                 layer.routing.topk_weights.view().slice0(t, t + 1));
    const check::Comparison c = check::compare_bits(alone, batch.view().slice0(t, t + 1));
    if (!c.ok() && differs.empty()) differs = "token " + std::to_string(t) + ": " + c.str();
  }
  if (entry().batch_invariant) EXPECT_EQ(differs, "");
  if (!differs.empty() && !entry().batch_invariant)
    GTEST_SKIP() << GetParam() << " is not batch-invariant (not required yet): " << differs;
}

INSTANTIATE_TEST_SUITE_P(Registry, EveryExperts, ::testing::ValuesIn(experts_names()),
                         [](const auto& info) { return test_name(info.param); });

// ---- contract 5: refused at construction, with a reason --------------------------------

ExpertsInfo info_of(const TestLayer& layer) {
  return ExpertsInfo::of(layer.weights.view(), layer.spec.activation);
}

TEST(Contract5, BatchedExpertsBehindStandardDispatchAreRefused) {
  const TestLayer layer({.tokens = 1});
  auto stub =
      std::make_shared<StubExperts>(info_of(layer), ActivationFormat::kBatched, std::nullopt);
  auto pf = make_local_prepare_finalize(ExpertMap::linear(8, 1), 0);
  const auto reason = ModularKernel::check_compatible(*pf, *stub, {2, DType::kBF16, 64});
  ASSERT_NE(reason, std::nullopt);
  EXPECT_NE(reason->find("batched"), std::string::npos) << *reason;
  EXPECT_NE(reason->find("standard"), std::string::npos) << *reason;
  EXPECT_TRUE(error_mentions(
      [&] {
        ModularKernel(pf, stub, make_cpu_weight_and_reduce(1), {2, DType::kBF16, 64});
      },
      "batched"));
}

// Contract 4: every registered prepare/finalize hands experts of a quantized format their
// activations with the typed scale they ask for (test_dispatch_quant.cc follows the rows and
// scales), and refuses what it cannot produce -- a float activation with a scale -- when the
// kernel is built, with the reason.
TEST(Contract4, EveryPrepareFinalizeTakesTypedScalesAndRefusesScaledFloats) {
  const ExpertMap map = ExpertMap::linear(8, 1);
  for (const char* f : {"fp8-tensor", "fp8-token", "fp8-block:ue8m0", "int8"}) {
    const check::LayerWeights w =
        check::make_random_weights(8, 67, 45, Activation{}, QuantScheme::parse(f), false, 1);
    const ExpertsInfo info = ExpertsInfo::of(w.view(), Activation{});
    const ActivationSpec spec = ActivationSpec::of(info.quant);
    ActivationSpec scaled_float = spec;
    scaled_float.dtype = DType::kBF16;
    for (const auto& entry : check::prepare_finalize_registry()) {
      auto pf = entry.make(map, 0, make_single_communicator(), 16);
      const ActivationFormat format = pf->activation_format();
      auto good = std::make_shared<StubExperts>(info, format, std::nullopt, spec);
      EXPECT_EQ(ModularKernel::check_compatible(*pf, *good, {2, DType::kBF16, 16}), std::nullopt)
          << entry.name << " " << f;
      auto bad = std::make_shared<StubExperts>(info, format, std::nullopt, scaled_float);
      const auto reason = ModularKernel::check_compatible(*pf, *bad, {2, DType::kBF16, 16});
      ASSERT_NE(reason, std::nullopt) << entry.name;
      EXPECT_NE(reason->find("float activations take no scale"), std::string::npos) << *reason;
    }
  }
}

TEST(Contract5, ExpertsRefusingTheProblemAreRefusedWithTheirReason) {
  const TestLayer layer({.tokens = 1});
  auto stub = std::make_shared<StubExperts>(info_of(layer), ActivationFormat::kStandard,
                                            "H must be a multiple of 64");
  EXPECT_TRUE(
      error_mentions([&] { make_kernel(stub, ExpertMap::linear(8, 1), 0, 2, DType::kBF16); },
                     "experts 'stub': H must be a multiple of 64"));
}

TEST(Contract5, ExpertsOfAnotherPlacementAreRefused) {
  const TestLayer layer({.tokens = 1});
  // All 8 experts, but linear(8, 2) places 4 on rank 0.
  EXPECT_TRUE(error_mentions(
      [&] {
        make_kernel(make_reference_experts(layer.weights.view(), layer.spec.activation),
                    ExpertMap::linear(8, 2), 0, 2, DType::kBF16);
      },
      "expert map"));
}

TEST(Contract5, FallbackOverDifferentActivationSpecsIsRefused) {
  const TestLayer layer({.tokens = 1});
  // CPU experts over bf16 weights want bf16 a1; reference experts want fp32.
  auto cpu = make_cpu_experts(layer.weights.view(), layer.spec.activation);
  auto ref = make_reference_experts(layer.weights.view(), layer.spec.activation);
  EXPECT_TRUE(error_mentions([&] { make_fallback_experts(cpu, ref, 16); }, "activation dtype"));
}

// ---- contract 6: memory follows chunk_tokens, not the batch -----------------------------

// Peak resident memory since the last reset_peak_rss(), in bytes; -1 where Linux's
// /proc/self/clear_refs (write 5: reset the peak) is unavailable.
bool reset_peak_rss() {
  std::ofstream f("/proc/self/clear_refs");
  return static_cast<bool>(f << "5") && static_cast<bool>(f.flush());
}
int64_t peak_rss_bytes() {
  std::ifstream f("/proc/self/status");
  for (std::string line; std::getline(f, line);)
    if (line.rfind("VmHWM:", 0) == 0) return std::stoll(line.substr(6)) * 1024;
  return -1;
}
int64_t rss_bytes() {
  std::ifstream f("/proc/self/status");
  for (std::string line; std::getline(f, line);)
    if (line.rfind("VmRSS:", 0) == 0) return std::stoll(line.substr(6)) * 1024;
  return -1;
}

TEST(Contract6, WorkspaceAndPeakMemoryFollowChunkTokensOnly) {
  constexpr int64_t kTokens = 100000, kChunk = 64;
  const TestLayer layer({.tokens = kTokens});
  const auto& best = experts_entry("cpu-" + std::string(name(detect_cpu_isa())));
  // One thread: 1563 chunks would otherwise time the thread pools' hand-offs, not the layer.
  auto kernel = layer.kernel(best, kChunk, nullptr, 0, 1);
  auto bigger = layer.kernel(best, 4 * kChunk, nullptr, 0, 1);
  const size_t ws = kernel->workspace_bytes();
  EXPECT_LT(ws, bigger->workspace_bytes());
  EXPECT_EQ(ws, layer.kernel(best, kChunk, nullptr, 0, 1)->workspace_bytes());
  Tensor y = sentinel_tensor(DType::kBF16, {kTokens, layer.spec.hidden});
  // Warm-up: thread pools and lazy allocations of a first call are not the batch's memory.
  forward(*kernel, layer.x.view().slice0(0, kChunk),
          layer.routing.topk_ids.view().slice0(0, kChunk),
          layer.routing.topk_weights.view().slice0(0, kChunk));
  if (!reset_peak_rss()) GTEST_SKIP() << "cannot reset the peak RSS here";
  const int64_t before = rss_bytes();
  kernel->forward({layer.x.view(), layer.routing.topk_ids.view(), layer.routing.topk_weights.view(),
                   y.view(), false, 0});
  const int64_t growth = peak_rss_bytes() - before;
  // A batch-sized fused output ([M, k, H] fp32) would be 51 MiB; a chunk's is 34 KiB.
  EXPECT_LT(growth, 8 << 20) << "peak memory grew by " << growth << " bytes for " << kTokens
                             << " tokens with a workspace of " << ws << " bytes";
  // The first and last rows are right (the oracle on 100k rows would take seconds).
  for (int64_t begin : {int64_t(0), kTokens - 200}) {
    ReferenceArgs args = layer.reference_args();
    args.x = args.x.slice0(begin, begin + 200);
    args.topk_ids = args.topk_ids.slice0(begin, begin + 200);
    args.topk_weights = args.topk_weights.slice0(begin, begin + 200);
    EXPECT_TRUE(
        rows_match(y.view().slice0(begin, begin + 200), reference_output(args), layer.bound()));
  }
}

}  // namespace
}  // namespace moekit::test
