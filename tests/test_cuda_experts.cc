// CUDA backend against the oracle: prepare (id mapping, fp8 quantization), the experts
// (small-batch, grouped GEMM and their fallback) in every format they take (bf16, fp16,
// fp8-tensor dynamic and static, fp8-token), weight-and-reduce, driven part by part on device
// tensors; then whole ModularKernel forwards on the device under every placement, and one
// captured in a CUDA graph and replayed on new inputs. Skips, loudly, without a CUDA device.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include "moekit/cpu.h"
#include "moekit/cuda.h"
#include "moekit/quant/quantize.h"
#include "support/cuda_test_support.h"
#include "support/test_support.h"

namespace moekit {
namespace {

// Formats a test layer runs in: its float dtype, or bf16 x and weights quantized on the host.
struct FormatSpec {
  std::string name;  // QuantScheme::parse form
  QuantScheme scheme() const { return QuantScheme::parse(name); }
  bool quantized() const { return !scheme().is_float(); }
  DType dtype() const { return quantized() ? DType::kBF16 : scheme().traits().weight; }
};

// The random layer of `spec` in a format. Quantized formats take the check library's data:
// weights whose magnitude changes by powers of two from one output row (scale group) to the
// next, quantized, and x whose rows and 128-column blocks do the same, so that a scale read
// from the wrong row, channel or expert is off by 2x or more.
test::TestLayer make_layer(test::LayerSpec spec, const FormatSpec& format) {
  spec.dtype = format.dtype();
  test::TestLayer l(spec);
  if (format.quantized()) {
    const QuantScheme q = format.scheme();
    l.weights =
        check::make_random_weights(spec.num_experts, spec.hidden, spec.intermediate,
                                   spec.activation, q, spec.bias, check::mix_seed(spec.seed, 1));
    l.x = check::make_activations(q, spec.dtype, spec.tokens, spec.hidden,
                                  check::mix_seed(spec.seed, 3));
  }
  return l;
}

// The layer's tensors on the device; weights global [E, ...] like the host ones (quantized
// formats: codes and scales). A static activation scale of 1.25x the dynamic one of x (host and
// device copies).
struct DeviceLayer {
  explicit DeviceLayer(const test::TestLayer& l)
      : format(l.weights.view().scheme()),
        device_weights(l.weights.view()),
        x(CudaTensor::copy_of(l.x)),
        ids(CudaTensor::copy_of(l.routing.topk_ids)),
        weights(CudaTensor::copy_of(l.routing.topk_weights)) {
    if (format.static_act) {
      host_static_scale = Tensor(DType::kF32, {1});
      host_static_scale.data<float>()[0] =
          1.25f * tensor_scale_of_amax(activation_amax(l.x), DType::kF8E4M3);
      static_scale = CudaTensor::copy_of(host_static_scale);
    }
  }
  const ExpertWeights& global() const { return device_weights.view(); }

  QuantScheme format;
  Tensor host_static_scale;
  DeviceExpertWeights device_weights;
  CudaTensor x, ids, weights, static_scale;
};

// The oracle of the layer l (x and routing, and its host weights unless `weights` are given):
// rank's share when a map is given. bf16 kernels round the intermediate to bf16 and so does the
// oracle; formats with quantized activations requantize it on both sides (intermediate_spec).
Tensor oracle(const test::TestLayer& l, const DeviceLayer& d, const ExpertMap* map = nullptr,
              int rank = 0, const ExpertWeights* weights = nullptr) {
  ReferenceArgs ref = l.reference_args();
  if (weights) ref.weights = *weights;
  ref.map = map;
  ref.rank = rank;
  ref.round_intermediate_to_bf16 = d.format.format == Format::kBF16;
  ref.static_act_scale = d.host_static_scale.view();
  return test::reference_output(ref);
}

// got [M, H] against the oracle: every row within check::error_bound of the format, and for
// formats with quantized activations no systematic error beyond check::systematic_error_bound
// (the oracle rounds what the kernels round).
::testing::AssertionResult matches(const Tensor& got, const Tensor& want, const test::TestLayer& l,
                                   const DeviceLayer& d) {
  const int64_t M = l.spec.tokens, H = l.spec.hidden;
  const TensorView g = got.view().reshaped({M, H});
  const double bound = check::error_bound(d.format, l.spec.dtype, 1, l.routing.weight_on_input, H,
                                          l.spec.intermediate);
  if (auto r = test::rows_match(g, want, bound); !r) return r;
  const auto systematic = check::systematic_error_bound(d.format, l.spec.dtype, 1);
  if (!systematic) return ::testing::AssertionSuccess();
  const check::Comparison c = check::compare_systematic(g, want, *systematic);
  if (c.ok()) return ::testing::AssertionSuccess() << c.str();
  return ::testing::AssertionFailure() << c.str();
}

// prepare -> apply -> finalize for one rank's share; returns y [M, H] (host, x's dtype).
Tensor run_layer(const DeviceLayer& d, PrepareFinalize& pf, const Experts& experts,
                 const WeightAndReduce& wr, const test::TestLayer& l) {
  const int64_t M = l.spec.tokens, H = l.spec.hidden;
  const int k = static_cast<int>(l.routing.topk_ids.size(1));
  MoEProblem p;
  p.num_experts = l.spec.num_experts;
  p.num_local_experts = experts.info().num_local_experts;
  p.hidden = H;
  p.intermediate = l.spec.intermediate;
  p.top_k = k;
  p.tokens = M;
  p.quant = d.format;
  EXPECT_FALSE(experts.can_implement(p).has_value()) << *experts.can_implement(p);
  EXPECT_FALSE(pf.can_dispatch(experts.activation_spec()).has_value());
  const bool reduced = experts.weight_application() == TopKWeightApplied::kWeightedAndReduced;
  const size_t bytes = Workspace::aligned(pf.workspace_size(p)) +
                       Workspace::aligned(experts.workspace_size(p)) +
                       Workspace::aligned(M * (reduced ? 1 : k) * H * 4);
  CudaTensor ws_mem(DType::kU8, {static_cast<int64_t>(bytes)});
  // Poison the workspace: every byte the experts read must have been written first.
  EXPECT_EQ(cudaMemset(ws_mem.view().data, 0xff, bytes), cudaSuccess);
  Workspace ws(ws_mem.view().data, bytes);
  CudaTensor y(l.x.dtype(), {M, H});
  EXPECT_EQ(cudaMemset(y.view().data, 0xff, y.view().nbytes()), cudaSuccess);
  const ExecContext ctx{};
  DispatchedBatch b =
      pf.prepare({d.x, d.ids, d.weights, 0, false, experts.activation_spec()}, ws, ctx);
  TensorView out = ws.take(DType::kF32, {M, reduced ? 1 : k, H});
  out.device = d.x.view().device;
  if (reduced) out = out.reshaped({M, H});
  experts.apply(b, out, ws, ctx);
  pf.finalize({y, out, d.ids, d.weights, experts.weight_application(), &wr}, ws, ctx);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  return y.to_host();
}

struct ExpertsKind {
  std::string name;
  // weights, activation, static activation scale (absent unless the format is static)
  std::function<std::shared_ptr<Experts>(const ExpertWeights&, const Activation&,
                                         const TensorView&)>
      make;
  std::shared_ptr<Experts> operator()(const DeviceLayer& d, const ExpertWeights& w,
                                      const Activation& act) const {
    return make(w, act, d.static_scale.view());
  }
};

std::vector<ExpertsKind> experts_kinds() {
  return {
      {"small_batch",
       [](auto& w, auto& a, auto& s) {
         return make_cuda_small_batch_experts(w, a, TopKWeightApplied::kNone, s);
       }},
      {"small_batch_reduced",
       [](auto& w, auto& a, auto& s) {
         return make_cuda_small_batch_experts(w, a, TopKWeightApplied::kWeightedAndReduced, s);
       }},
      {"grouped_gemm",
       [](auto& w, auto& a, auto& s) { return make_cuda_grouped_gemm_experts(w, a, s); }},
      {"fallback", [](auto& w, auto& a, auto& s) { return make_cuda_experts(w, a, 8, s); }},
  };
}

struct Case {
  std::string format;
  std::string experts;
  int64_t tokens;
  int num_experts, top_k;
  int64_t hidden, intermediate;
  Activation activation;
  bool bias;
  int ranks;  // > 1: rank 1's share of a round-robin map
};

const ExpertsKind& kind_named(const std::string& name) {
  static const std::vector<ExpertsKind> kinds = experts_kinds();
  for (const ExpertsKind& k : kinds)
    if (k.name == name) return k;
  throw std::invalid_argument("no experts kind " + name);
}

class CudaExpertsVsOracle : public ::testing::TestWithParam<Case> {};

TEST_P(CudaExpertsVsOracle, MatchesReference) {
  SKIP_WITHOUT_CUDA();
  const Case& c = GetParam();
  test::LayerSpec spec;
  spec.num_experts = c.num_experts;
  spec.top_k = c.top_k;
  spec.hidden = c.hidden;
  spec.intermediate = c.intermediate;
  spec.tokens = c.tokens;
  spec.activation = c.activation;
  spec.bias = c.bias;
  spec.padding_period = 5;  // padding rows and padded slots: -1 ids
  spec.seed = c.tokens * 131 + c.num_experts;
  const test::TestLayer layer = make_layer(spec, FormatSpec{c.format});
  const DeviceLayer d(layer);
  const ExpertMap map = c.ranks > 1 ? ExpertMap::round_robin(c.num_experts, c.ranks)
                                    : ExpertMap::linear(c.num_experts, 1);
  const int rank = c.ranks - 1;
  const ExpertWeights local = ExpertWeights::local_view(d.global(), map, rank);
  const std::shared_ptr<Experts> experts = kind_named(c.experts)(d, local, c.activation);
  auto pf = make_cuda_prepare_finalize(map, rank);
  auto wr = make_cuda_weight_and_reduce();
  const Tensor y = run_layer(d, *pf, *experts, *wr, layer);

  EXPECT_TRUE(matches(y, oracle(layer, d, &map, rank), layer, d));
  EXPECT_EQ(cuda_bad_id_count(*pf), 0);
  const TensorView got = y.view().reshaped({c.tokens, c.hidden});

  // Deterministic: a second run gives the same bits.
  const Tensor again = run_layer(d, *pf, *experts, *wr, layer);
  EXPECT_TRUE(test::bits_equal(again.view().reshaped({c.tokens, c.hidden}), got));
}

std::vector<Case> cases() {
  const Activation silu{};
  const Activation oai{
      .fn = ActivationFn::kSwigluOai, .gated = true, .layout = GateUpLayout::kInterleaved};
  const Activation gelu_nogate{.fn = ActivationFn::kGeluErf, .gated = false};
  std::vector<Case> out;
  for (const ExpertsKind& k : experts_kinds()) {
    for (int64_t tokens : {1, 7, 19, 99, 111, 300}) {
      out.push_back({"bf16", k.name, tokens, 8, 2, 136, 88, silu, false, 1});
      out.push_back({"bf16", k.name, tokens, 16, 4, 264, 40, oai, true, 2});
      out.push_back({"bf16", k.name, tokens, 8, 2, 72, 200, gelu_nogate, false, 1});
    }
    // fp8 rows are 16-byte multiples: H and I multiples of 16. 300 tokens x k = 4: 1200 rows
    // through the grouped GEMM with several tiles per expert. e4m3 grouped GEMMs take their
    // 64-row tiles up to 128 rows per expert on average (19 and 300 tokens here: 4.75 and 75),
    // 128-row ones past (700 tokens: 175).
    for (const char* format : {"fp16", "fp8-tensor", "fp8-tensor:static", "fp8-token"})
      for (int64_t tokens : {1, 19, 300, 700}) {
        out.push_back({format, k.name, tokens, 8, 2, 128, 96, silu, false, 1});
        out.push_back({format, k.name, tokens, 16, 4, 272, 48, oai, true, 2});
      }
  }
  return out;
}

INSTANTIATE_TEST_SUITE_P(Sweep, CudaExpertsVsOracle, ::testing::ValuesIn(cases()),
                         [](const ::testing::TestParamInfo<Case>& i) {
                           const Case& c = i.param;
                           return test::test_name(
                               c.format + "_" + c.experts + "_M" + std::to_string(c.tokens) + "_E" +
                               std::to_string(c.num_experts) + "_H" + std::to_string(c.hidden) +
                               "_I" + std::to_string(c.intermediate) + "_" + c.activation.str() +
                               (c.bias ? "_bias" : "") + "_ranks" + std::to_string(c.ranks));
                         });

const char* const kFormats[] = {"bf16", "fp16", "fp8-tensor", "fp8-tensor:static", "fp8-token"};

// Contract 1: a slot with id -1 contributes exactly zero, and an all -1 batch gives zeros, in
// every format.
TEST(CudaExperts, MinusOneIdsGiveExactZeros) {
  SKIP_WITHOUT_CUDA();
  for (const char* name : kFormats) {
    test::LayerSpec spec;
    spec.hidden = 64;
    spec.intermediate = 32;
    spec.tokens = 9;
    const test::TestLayer layer = make_layer(spec, FormatSpec{name});
    DeviceLayer d(layer);
    Tensor ids = Tensor(DType::kI32, {spec.tokens, spec.top_k});
    for (int64_t i = 0; i < ids.numel(); ++i) ids.data<int32_t>()[i] = -1;
    d.ids = CudaTensor::copy_of(ids);
    const ExpertMap map = ExpertMap::linear(spec.num_experts, 1);
    for (const ExpertsKind& k : experts_kinds()) {
      auto experts = k(d, d.global(), spec.activation);
      auto pf = make_cuda_prepare_finalize(map, 0);
      const Tensor y = run_layer(d, *pf, *experts, *make_cuda_weight_and_reduce(), layer);
      for (int64_t i = 0; i < y.numel(); ++i)
        ASSERT_EQ(y.data<uint16_t>()[i], 0)
            << name << " " << k.name << ": element " << i << " is not +0";
    }
  }
}

// Ids outside [-1, E) are not fatal on the device: they count as -1 and are reported lazily.
TEST(CudaPrepare, BadIdsAreCountedAndSkipped) {
  SKIP_WITHOUT_CUDA();
  test::LayerSpec spec;
  spec.hidden = 64;
  spec.intermediate = 32;
  spec.tokens = 4;
  const test::TestLayer layer(spec);
  DeviceLayer d(layer);
  Tensor ids = Tensor(DType::kI32, {spec.tokens, spec.top_k});
  for (int64_t i = 0; i < ids.numel(); ++i) ids.data<int32_t>()[i] = i % 3 == 0 ? 99 : -7;
  d.ids = CudaTensor::copy_of(ids);
  auto pf = make_cuda_prepare_finalize(ExpertMap::linear(spec.num_experts, 1), 0);
  auto experts = make_cuda_small_batch_experts(d.global(), spec.activation);
  const Tensor y = run_layer(d, *pf, *experts, *make_cuda_weight_and_reduce(), layer);
  for (int64_t i = 0; i < y.numel(); ++i) ASSERT_EQ(y.data<uint16_t>()[i], 0);
  EXPECT_EQ(cuda_bad_id_count(*pf), ids.numel());
  EXPECT_EQ(cuda_bad_id_count(*pf), 0);  // reset by the read
}

// The device quantizer gives the host quantizer's codes and scales bit for bit: per token,
// per tensor dynamic (the amax reduced on the device: one block for a small tensor, an amax
// pass over row blocks for a large one) and static, on x or on x times its top-1 weight (an
// fp32 product on both sides).
TEST(CudaPrepare, QuantizesLikeTheHost) {
  SKIP_WITHOUT_CUDA();
  for (const char* name : {"fp8-token", "fp8-tensor", "fp8-tensor:static"})
    for (const bool weight_on_input : {false, true})
      for (const int64_t tokens : {37, 700}) {
        SCOPED_TRACE(std::string(name) + (weight_on_input ? " weight on input " : " ") +
                     std::to_string(tokens) + " tokens");
        test::LayerSpec spec;
        spec.hidden = 208;
        spec.intermediate = 32;
        spec.tokens = tokens;
        spec.top_k = weight_on_input ? 1 : 2;
        const test::TestLayer layer = make_layer(spec, FormatSpec{name});
        const DeviceLayer d(layer);
        ActivationSpec as = ActivationSpec::of(d.format);
        as.static_scale = d.static_scale.view();
        const int64_t M = spec.tokens, H = spec.hidden;
        auto pf = make_cuda_prepare_finalize(ExpertMap::linear(spec.num_experts, 1), 0);
        MoEProblem p{
            .num_experts = spec.num_experts, .hidden = H, .top_k = spec.top_k, .tokens = M};
        CudaTensor ws_mem(DType::kU8, {static_cast<int64_t>(pf->workspace_size(p))});
        Workspace ws(ws_mem.view().data, pf->workspace_size(p));
        const DispatchedBatch b =
            pf->prepare({d.x, d.ids, d.weights, 0, weight_on_input, as}, ws, ExecContext{});
        ASSERT_EQ(b.a1_scale.kind, as.scale);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);

        Tensor x(DType::kF32, {M, H});  // what is quantized: x, times the weight on input
        for (int64_t i = 0; i < M * H; ++i)
          x.data<float>()[i] =
              load_as_float(layer.x.data<void>(), DType::kBF16, i) *
              (weight_on_input ? layer.routing.topk_weights.data<float>()[i / H] : 1.0f);
        ActivationSpec host_spec = as;
        host_spec.static_scale = d.host_static_scale.view();
        const int64_t scales = as.scale == ScaleKind::kToken ? M : 1;
        Tensor q(DType::kF8E4M3, {M, H}), scale(DType::kF32, {scales});
        quantize_activations(x, host_spec, q, scale);
        Tensor dev_q(DType::kF8E4M3, {M, H}), dev_scale(DType::kF32, {scales});
        copy_to_host(b.a1, dev_q.view());
        copy_to_host(b.a1_scale.scale, dev_scale.view());
        EXPECT_TRUE(test::bits_equal(dev_scale.view().reshaped({1, scales}),
                                     scale.view().reshaped({1, scales})));
        EXPECT_TRUE(test::bits_equal(dev_q.view().reshaped({M, H}), q.view()));
      }
}

// Contract 5: shapes, formats and scales the kernels cannot take are refused at construction,
// with the reason.
TEST(CudaExperts, RefusesUnalignedShapesAndHostWeights) {
  SKIP_WITHOUT_CUDA();
  test::LayerSpec spec;
  spec.hidden = 67;
  spec.intermediate = 45;
  spec.tokens = 1;
  const test::TestLayer layer(spec);
  const DeviceLayer d(layer);
  for (const ExpertsKind& k : experts_kinds())
    EXPECT_TRUE(test::error_mentions([&] { k(d, d.global(), spec.activation); }, "multiples of 8"))
        << k.name;
  EXPECT_TRUE(test::error_mentions(
      [&] { make_cuda_small_batch_experts(layer.weights.view(), spec.activation); }, "CUDA"));
}

TEST(CudaExperts, RefusesFormatsAndScalesItCannotTake) {
  SKIP_WITHOUT_CUDA();
  test::LayerSpec spec;
  spec.hidden = 128;
  spec.intermediate = 128;
  spec.tokens = 1;
  const test::TestLayer layer(spec);
  const Activation& act = spec.activation;
  for (const char* name : {"fp8-block", "int8", "w4a16"}) {
    const DeviceLayer d(make_layer(spec, FormatSpec{name}));
    for (const ExpertsKind& k : experts_kinds())
      EXPECT_TRUE(test::error_mentions([&] { k(d, d.global(), act); }, "format")) << name;
  }
  const DeviceLayer fp8(make_layer(spec, FormatSpec{"fp8-tensor"}));
  const DeviceLayer fp8_static(make_layer(spec, FormatSpec{"fp8-tensor:static"}));
  for (const ExpertsKind& k : experts_kinds()) {
    // A static format without its scale, and a scale the dynamic format does not take.
    EXPECT_TRUE(test::error_mentions([&] { k.make(fp8_static.global(), act, {}); },
                                     "static activation scale"))
        << k.name;
    EXPECT_TRUE(test::error_mentions(
        [&] { k.make(fp8.global(), act, fp8_static.static_scale.view()); }, "static"))
        << k.name;
  }
  // fp8 rows need 16-byte rows: H a multiple of 16.
  spec.hidden = 136;
  const DeviceLayer d(make_layer(spec, FormatSpec{"fp8-token"}));
  EXPECT_TRUE(test::error_mentions([&] { make_cuda_grouped_gemm_experts(d.global(), act); },
                                   "multiples of 16"));
  // The prepare quantizes to per-tensor and per-token e4m3 only (contract 4/5).
  auto pf = make_cuda_prepare_finalize(ExpertMap::linear(spec.num_experts, 1), 0);
  const auto why = pf->can_dispatch(ActivationSpec::of(QuantScheme::parse("fp8-block")));
  ASSERT_TRUE(why.has_value());
  EXPECT_NE(why->find("per-token"), std::string::npos) << *why;
}

// ---- the whole ModularKernel on the device -------------------------------------------------

// One rank's place in an expert map.
struct Placement {
  std::string name;
  ExpertMap map;
  int rank;
};

// Linear (every expert here); round-robin, rank 1 of 2; replicated: rank 1 holds every expert and
// rank 0 the first half again, so rank 1 serves the first half for every other token key.
std::vector<Placement> placements(int E) {
  std::vector<int> all(E), half(E / 2);
  std::iota(all.begin(), all.end(), 0);
  std::iota(half.begin(), half.end(), 0);
  return {{"linear", ExpertMap::linear(E, 1), 0},
          {"round_robin", ExpertMap::round_robin(E, 2), 1},
          {"replicated", ExpertMap::replicated(E, {half, all}), 1}};
}

template <typename T>
const T& named(const std::vector<T>& items, const std::string& name) {
  for (const T& i : items)
    if (i.name == name) return i;
  throw std::invalid_argument("no item named " + name);
}

struct Stream {
  Stream() { EXPECT_EQ(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess); }
  ~Stream() { cudaStreamDestroy(s); }
  cudaStream_t s = nullptr;
};

// cuda prepare/finalize for where.rank, `kind`'s experts over that rank's view of the device
// weights, cuda weight-and-reduce; workspace on the current device.
std::unique_ptr<ModularKernel> device_kernel(const DeviceLayer& d, const test::TestLayer& l,
                                             const Placement& where, const ExpertsKind& kind,
                                             int64_t chunk_tokens) {
  int dev = 0;
  EXPECT_EQ(cudaGetDevice(&dev), cudaSuccess);
  const ExpertWeights local = ExpertWeights::local_view(d.global(), where.map, where.rank);
  return std::make_unique<ModularKernel>(
      make_cuda_prepare_finalize(where.map, where.rank), kind(d, local, l.spec.activation),
      make_cuda_weight_and_reduce(),
      KernelConfig{l.spec.top_k, l.x.dtype(), chunk_tokens, Device{DeviceType::kCUDA, dev},
                   cuda_workspace_allocator(dev)});
}

// A dynamic per-tensor scale of a1 covers the rows of one prepare and one of a2 the rows of one
// apply, i.e. one chunk, while the oracle's cover all M rows: such formats run in one chunk (up
// to 1024 rows) to compare.
int64_t chunk_for(const DeviceLayer& d, int64_t chunk) {
  const bool a1 = ActivationSpec::of(d.format).scale == ScaleKind::kTensor && !d.format.static_act;
  const bool a2 = intermediate_spec(d.format).scale == ScaleKind::kTensor;
  return a1 || a2 ? 1024 : chunk;
}

ForwardArgs args_of(const DeviceLayer& d, const CudaTensor& y) {
  return {d.x, d.ids, d.weights, y};
}

// The layer of the ModularKernel tests: SwiGLU-OAI, interleaved, biases, 16 experts, k = 4;
// H and I at 8-element alignment for bf16 (264, 40), 16-element for the other formats.
test::LayerSpec modular_spec(const FormatSpec& format, int64_t tokens, uint64_t seed) {
  // (x, weights and dtype: make_layer)
  test::LayerSpec spec;
  spec.num_experts = 16;
  spec.top_k = 4;
  const bool bf16 = format.name == "bf16";
  spec.hidden = bf16 ? 264 : 272;
  spec.intermediate = bf16 ? 40 : 48;
  spec.activation = {
      .fn = ActivationFn::kSwigluOai, .gated = true, .layout = GateUpLayout::kInterleaved};
  spec.bias = true;
  spec.tokens = tokens;
  spec.padding_period = 5;
  spec.seed = seed;
  return spec;
}

struct ModularCase {
  std::string format, experts, placement;
  int64_t tokens;
};

class CudaModularVsOracle : public ::testing::TestWithParam<ModularCase> {};

// Contract 1 on the GPU: every CUDA experts x every placement, through ModularKernel::forward
// with device tensors, in every format. chunk_tokens 16: 19 and 111 tokens take several rounds
// (token keys of later rounds pick replicas), and the fallback experts switch between
// small-batch and grouped GEMM inside one forward.
TEST_P(CudaModularVsOracle, MatchesReference) {
  SKIP_WITHOUT_CUDA();
  const ModularCase& c = GetParam();
  const FormatSpec format{c.format};
  const test::LayerSpec spec = modular_spec(format, c.tokens, c.tokens * 7 + 3);
  const test::TestLayer layer = make_layer(spec, format);
  const DeviceLayer d(layer);
  const Placement where = named(placements(spec.num_experts), c.placement);
  auto mk = device_kernel(d, layer, where, kind_named(c.experts), chunk_for(d, 16));
  Stream stream;
  CudaTensor y(layer.x.dtype(), {c.tokens, spec.hidden});
  EXPECT_EQ(cudaMemset(y.view().data, 0xff, y.view().nbytes()), cudaSuccess);
  mk->forward(args_of(d, y), ExecContext{stream.s});
  ASSERT_EQ(cudaStreamSynchronize(stream.s), cudaSuccess);
  const Tensor got = y.to_host();
  EXPECT_TRUE(matches(got, oracle(layer, d, &where.map, where.rank), layer, d));
  EXPECT_EQ(cuda_bad_id_count(mk->prepare_finalize()), 0);
}

std::vector<ModularCase> modular_cases() {
  std::vector<ModularCase> out;
  for (const ExpertsKind& k : experts_kinds()) {
    for (const Placement& p : placements(16))
      for (int64_t tokens : {1, 19, 111}) out.push_back({"bf16", k.name, p.name, tokens});
    for (const char* format : {"fp16", "fp8-tensor", "fp8-tensor:static", "fp8-token"})
      for (const char* placement : {"linear", "replicated"})
        out.push_back({format, k.name, placement, 111});
  }
  return out;
}

INSTANTIATE_TEST_SUITE_P(Placements, CudaModularVsOracle, ::testing::ValuesIn(modular_cases()),
                         [](const ::testing::TestParamInfo<ModularCase>& i) {
                           return test::test_name(i.param.format + "_" + i.param.experts + "_" +
                                                  i.param.placement + "_M" +
                                                  std::to_string(i.param.tokens));
                         });

// Contract 7: forward enqueues everything on ctx.stream without a host synchronisation, so it
// is captured in global mode (a synchronising call anywhere in forward fails the capture), and
// the graph, replayed on new inputs written into the same buffers, computes the new layer -- in
// every format (the fp8 prepare quantizes on the device, a dynamic scale included).
TEST(CudaModularKernel, GraphReplaysOnNewInputs) {
  SKIP_WITHOUT_CUDA();
  for (const char* name : kFormats) {
    const FormatSpec format{name};
    test::LayerSpec spec = modular_spec(format, 19, 1);
    spec.bias = false;
    spec.activation = {};
    const test::TestLayer first = make_layer(spec, format);
    spec.seed = 2;
    // new x and routing; the graph keeps first's weights
    const test::TestLayer second = make_layer(spec, format);
    DeviceLayer d(first);
    const Placement where = named(placements(spec.num_experts), "replicated");
    for (const ExpertsKind& kind : experts_kinds()) {
      SCOPED_TRACE(std::string(name) + " " + kind.name);
      auto mk = device_kernel(d, first, where, kind, chunk_for(d, 16));
      CudaTensor y(first.x.dtype(), {spec.tokens, spec.hidden});
      test::CapturedGraph graph(
          [&](cudaStream_t stream) { mk->forward(args_of(d, y), ExecContext{stream}); });
      ASSERT_TRUE(graph.ok());
      for (const test::TestLayer* l : {&first, &second}) {
        copy_to_device(l->x, d.x);
        copy_to_device(l->routing.topk_ids, d.ids);
        copy_to_device(l->routing.topk_weights, d.weights);
        EXPECT_EQ(cudaMemset(y.view().data, 0xff, y.view().nbytes()), cudaSuccess);
        ASSERT_TRUE(graph.replay());
        const Tensor got = y.to_host();
        const ExpertWeights weights = first.weights.view();
        EXPECT_TRUE(matches(got, oracle(*l, d, &where.map, where.rank, &weights), *l, d));
      }
      EXPECT_EQ(cuda_bad_id_count(mk->prepare_finalize()), 0);
    }
  }
}

// Contract 8 on the device: a CUDA kernel needs a device workspace, and forward refuses tensors
// on another device before enqueueing anything.
TEST(CudaModularKernel, RefusesMixedDevicesAndHostWorkspace) {
  SKIP_WITHOUT_CUDA();
  test::LayerSpec spec;
  spec.hidden = 64;
  spec.intermediate = 32;
  spec.tokens = 3;
  const test::TestLayer layer(spec);
  const DeviceLayer d(layer);
  const Placement where = named(placements(spec.num_experts), "linear");
  const ExpertsKind& kind = kind_named("small_batch");
  EXPECT_TRUE(test::error_mentions(
      [&] {
        ModularKernel(make_cuda_prepare_finalize(where.map, 0),
                      kind(d, d.global(), spec.activation), make_cuda_weight_and_reduce(),
                      KernelConfig{spec.top_k, layer.x.dtype(), 16, Device{DeviceType::kCUDA, 0}});
      },
      "allocate_workspace"));
  auto mk = device_kernel(d, layer, where, kind, 16);
  Tensor host_y = test::sentinel_tensor(layer.x.dtype(), {spec.tokens, spec.hidden});
  const test::Snapshot before(host_y);
  EXPECT_TRUE(test::error_mentions(
      [&] {
        mk->forward({d.x, d.ids, d.weights, host_y});
      },
      "y: expected a tensor on cuda"));
  EXPECT_TRUE(before.unchanged());
}

}  // namespace
}  // namespace moekit
