// CUDA backend against the oracle: prepare (id mapping), the experts (small-batch, grouped GEMM
// and their fallback), weight-and-reduce, driven part by part on device tensors; then whole
// ModularKernel forwards on the device under every placement, and one captured in a CUDA graph
// and replayed on new inputs. Skips, loudly, without a CUDA device.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <numeric>
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
      make_cuda_prepare_finalize(where.map, where.rank), kind.make(local, l.spec.activation),
      make_cuda_weight_and_reduce(),
      KernelConfig{l.spec.top_k, l.x.dtype(), chunk_tokens, Device{DeviceType::kCUDA, dev},
                   cuda_workspace_allocator(dev)});
}

// The oracle of where.rank's share of l's layer, computed with `weights`.
Tensor oracle(const test::TestLayer& l, const ExpertWeights& weights, const Placement& where) {
  ReferenceArgs ref = l.reference_args();
  ref.weights = weights;
  ref.map = &where.map;
  ref.rank = where.rank;
  ref.round_intermediate_to_bf16 = true;
  return test::reference_output(ref);
}

ForwardArgs args_of(const DeviceLayer& d, const CudaTensor& y) {
  return {d.x, d.ids, d.weights, y};
}

struct ModularCase {
  std::string experts, placement;
  int64_t tokens;
};

class CudaModularVsOracle : public ::testing::TestWithParam<ModularCase> {};

// Contract 1 on the GPU: every CUDA experts x every placement, through ModularKernel::forward
// with device tensors. chunk_tokens 16: 19 and 111 tokens take several rounds (token keys of
// later rounds pick replicas), and the fallback experts switch between small-batch and grouped
// GEMM inside one forward.
TEST_P(CudaModularVsOracle, MatchesReference) {
  SKIP_WITHOUT_CUDA();
  const ModularCase& c = GetParam();
  test::LayerSpec spec;
  spec.num_experts = 16;
  spec.top_k = 4;
  spec.hidden = 264;
  spec.intermediate = 40;
  spec.activation = {
      .fn = ActivationFn::kSwigluOai, .gated = true, .layout = GateUpLayout::kInterleaved};
  spec.bias = true;
  spec.tokens = c.tokens;
  spec.padding_period = 5;
  spec.seed = c.tokens * 7 + 3;
  const test::TestLayer layer(spec);
  const DeviceLayer d(layer);
  const Placement where = named(placements(spec.num_experts), c.placement);
  auto mk = device_kernel(d, layer, where, named(experts_kinds(), c.experts), 16);
  Stream stream;
  CudaTensor y(layer.x.dtype(), {c.tokens, spec.hidden});
  EXPECT_EQ(cudaMemset(y.view().data, 0xff, y.view().nbytes()), cudaSuccess);
  mk->forward(args_of(d, y), ExecContext{stream.s});
  ASSERT_EQ(cudaStreamSynchronize(stream.s), cudaSuccess);
  const Tensor got = y.to_host();
  EXPECT_TRUE(test::rows_match(got.view().reshaped({c.tokens, spec.hidden}),
                               oracle(layer, layer.weights.view(), where), layer.bound()));
  EXPECT_EQ(cuda_bad_id_count(mk->prepare_finalize()), 0);
}

std::vector<ModularCase> modular_cases() {
  std::vector<ModularCase> out;
  for (const ExpertsKind& k : experts_kinds())
    for (const Placement& p : placements(16))
      for (int64_t tokens : {1, 19, 111}) out.push_back({k.name, p.name, tokens});
  return out;
}

INSTANTIATE_TEST_SUITE_P(Placements, CudaModularVsOracle, ::testing::ValuesIn(modular_cases()),
                         [](const ::testing::TestParamInfo<ModularCase>& i) {
                           return test::test_name(i.param.experts + "_" + i.param.placement + "_M" +
                                                  std::to_string(i.param.tokens));
                         });

// Contract 7: forward enqueues everything on ctx.stream without a host synchronisation, so it
// is captured in global mode (a synchronising call anywhere in forward fails the capture), and
// the graph, replayed on new inputs written into the same buffers, computes the new layer.
TEST(CudaModularKernel, GraphReplaysOnNewInputs) {
  SKIP_WITHOUT_CUDA();
  test::LayerSpec spec;
  spec.num_experts = 16;
  spec.top_k = 4;
  spec.hidden = 136;
  spec.intermediate = 88;
  spec.tokens = 19;
  spec.padding_period = 5;
  const test::TestLayer first(spec);
  spec.seed = 2;
  const test::TestLayer second(spec);  // new x and routing; the graph keeps first's weights
  DeviceLayer d(first);
  const Placement where = named(placements(spec.num_experts), "replicated");
  for (const ExpertsKind& kind : experts_kinds()) {
    SCOPED_TRACE(kind.name);
    auto mk = device_kernel(d, first, where, kind, 16);
    Stream stream;
    CudaTensor y(first.x.dtype(), {spec.tokens, spec.hidden});
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    ASSERT_EQ(cudaStreamBeginCapture(stream.s, cudaStreamCaptureModeGlobal), cudaSuccess);
    try {
      mk->forward(args_of(d, y), ExecContext{stream.s});
    } catch (const Error& e) {
      ADD_FAILURE() << "forward during capture: " << e.what();
    }
    ASSERT_EQ(cudaStreamEndCapture(stream.s, &graph), cudaSuccess);
    ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
    for (const test::TestLayer* l : {&first, &second}) {
      copy_to_device(l->x, d.x);
      copy_to_device(l->routing.topk_ids, d.ids);
      copy_to_device(l->routing.topk_weights, d.weights);
      EXPECT_EQ(cudaMemset(y.view().data, 0xff, y.view().nbytes()), cudaSuccess);
      EXPECT_EQ(cudaGraphLaunch(exec, stream.s), cudaSuccess);
      ASSERT_EQ(cudaStreamSynchronize(stream.s), cudaSuccess);
      const Tensor got = y.to_host();
      EXPECT_TRUE(test::rows_match(got.view().reshaped({spec.tokens, spec.hidden}),
                                   oracle(*l, first.weights.view(), where), first.bound()));
    }
    EXPECT_EQ(cuda_bad_id_count(mk->prepare_finalize()), 0);
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
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
  const ExpertsKind& kind = experts_kinds().front();
  EXPECT_TRUE(test::error_mentions(
      [&] {
        ModularKernel(make_cuda_prepare_finalize(where.map, 0),
                      kind.make(d.global(), spec.activation), make_cuda_weight_and_reduce(),
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
