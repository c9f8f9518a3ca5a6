// CUDA backend against the oracle: prepare (id mapping), the experts (small-batch, grouped GEMM
// and their fallback), weight-and-reduce, driven part by part on device tensors (the
// ModularKernel still validates on the host). Skips, loudly, without a CUDA device.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "moekit/cpu.h"
#include "moekit/cuda.h"
#include "support/test_support.h"

namespace moekit {
namespace {

#define SKIP_WITHOUT_CUDA() \
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device: CUDA tests skipped"

// The layer's tensors on the device; weights global [E, ...] like the host ones.
struct DeviceLayer {
  explicit DeviceLayer(const test::TestLayer& l)
      : w13(CudaTensor::copy_of(l.weights.w13)),
        w2(CudaTensor::copy_of(l.weights.w2)),
        x(CudaTensor::copy_of(l.x)),
        ids(CudaTensor::copy_of(l.routing.topk_ids)),
        weights(CudaTensor::copy_of(l.routing.topk_weights)) {
    if (l.spec.bias) {
      b13 = CudaTensor::copy_of(l.weights.b13);
      b2 = CudaTensor::copy_of(l.weights.b2);
    }
  }
  ExpertWeights global() const { return {w13, w2, b13.view(), b2.view(), std::nullopt}; }

  CudaTensor w13, w2, b13, b2, x, ids, weights;
};

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
  EXPECT_FALSE(experts.can_implement(p).has_value()) << *experts.can_implement(p);
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
  std::function<std::shared_ptr<Experts>(const ExpertWeights&, const Activation&)> make;
};

std::vector<ExpertsKind> experts_kinds() {
  return {
      {"small_batch", [](auto& w, auto& a) { return make_cuda_small_batch_experts(w, a); }},
      {"small_batch_reduced",
       [](auto& w, auto& a) {
         return make_cuda_small_batch_experts(w, a, TopKWeightApplied::kWeightedAndReduced);
       }},
      {"grouped_gemm", [](auto& w, auto& a) { return make_cuda_grouped_gemm_experts(w, a); }},
      {"fallback", [](auto& w, auto& a) { return make_cuda_experts(w, a, 8); }},
  };
}

struct Case {
  std::string experts;
  int64_t tokens;
  int num_experts, top_k;
  int64_t hidden, intermediate;
  Activation activation;
  bool bias;
  int ranks;  // > 1: rank 1's share of a round-robin map
};

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
  const test::TestLayer layer(spec);
  const DeviceLayer d(layer);
  const ExpertMap map = c.ranks > 1 ? ExpertMap::round_robin(c.num_experts, c.ranks)
                                    : ExpertMap::linear(c.num_experts, 1);
  const int rank = c.ranks - 1;
  ExpertWeights local = ExpertWeights::local_view(d.global(), map, rank);
  std::shared_ptr<Experts> experts;
  for (const ExpertsKind& k : experts_kinds())
    if (k.name == c.experts) experts = k.make(local, c.activation);
  ASSERT_TRUE(experts);
  auto pf = make_cuda_prepare_finalize(map, rank);
  auto wr = make_cuda_weight_and_reduce();
  const Tensor y = run_layer(d, *pf, *experts, *wr, layer);

  ReferenceArgs ref = layer.reference_args();
  ref.map = &map;
  ref.rank = rank;
  ref.round_intermediate_to_bf16 = true;
  const Tensor want = test::reference_output(ref);
  const TensorView got = y.view().reshaped({c.tokens, c.hidden});
  EXPECT_TRUE(test::rows_match(got, want, layer.bound()));
  EXPECT_EQ(cuda_bad_id_count(*pf), 0);

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
  for (const ExpertsKind& k : experts_kinds())
    for (int64_t tokens : {1, 7, 19, 99, 111}) {
      out.push_back({k.name, tokens, 8, 2, 136, 88, silu, false, 1});
      out.push_back({k.name, tokens, 16, 4, 264, 40, oai, true, 2});
      out.push_back({k.name, tokens, 8, 2, 72, 200, gelu_nogate, false, 1});
    }
  return out;
}

INSTANTIATE_TEST_SUITE_P(Sweep, CudaExpertsVsOracle, ::testing::ValuesIn(cases()),
                         [](const ::testing::TestParamInfo<Case>& i) {
                           const Case& c = i.param;
                           return test::test_name(
                               c.experts + "_M" + std::to_string(c.tokens) + "_E" +
                               std::to_string(c.num_experts) + "_H" + std::to_string(c.hidden) +
                               "_I" + std::to_string(c.intermediate) + "_" + c.activation.str() +
                               (c.bias ? "_bias" : "") + "_ranks" + std::to_string(c.ranks));
                         });

// Contract 1: a slot with id -1 contributes exactly zero, and an all -1 batch gives zeros.
TEST(CudaExperts, MinusOneIdsGiveExactZeros) {
  SKIP_WITHOUT_CUDA();
  test::LayerSpec spec;
  spec.hidden = 64;
  spec.intermediate = 32;
  spec.tokens = 9;
  const test::TestLayer layer(spec);
  DeviceLayer d(layer);
  Tensor ids = Tensor(DType::kI32, {spec.tokens, spec.top_k});
  for (int64_t i = 0; i < ids.numel(); ++i) ids.data<int32_t>()[i] = -1;
  d.ids = CudaTensor::copy_of(ids);
  const ExpertMap map = ExpertMap::linear(spec.num_experts, 1);
  for (const ExpertsKind& k : experts_kinds()) {
    auto experts = k.make(d.global(), spec.activation);
    auto pf = make_cuda_prepare_finalize(map, 0);
    const Tensor y = run_layer(d, *pf, *experts, *make_cuda_weight_and_reduce(), layer);
    for (int64_t i = 0; i < y.numel(); ++i)
      ASSERT_EQ(y.data<uint16_t>()[i], 0) << k.name << ": element " << i << " is not +0";
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

// Contract 5: shapes the kernels cannot take are refused at construction, with the reason.
TEST(CudaExperts, RefusesUnalignedShapesAndHostWeights) {
  SKIP_WITHOUT_CUDA();
  test::LayerSpec spec;
  spec.hidden = 67;
  spec.intermediate = 45;
  spec.tokens = 1;
  const test::TestLayer layer(spec);
  const DeviceLayer d(layer);
  for (const ExpertsKind& k : experts_kinds())
    EXPECT_TRUE(
        test::error_mentions([&] { k.make(d.global(), spec.activation); }, "multiples of 8"))
        << k.name;
  EXPECT_TRUE(test::error_mentions(
      [&] { make_cuda_small_batch_experts(layer.weights.view(), spec.activation); }, "CUDA"));
}

}  // namespace
}  // namespace moekit
