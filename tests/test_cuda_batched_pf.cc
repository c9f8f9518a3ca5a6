// The single-GPU batched prepare/finalize (make_cuda_batched_prepare_finalize): where prepare
// puts each (token, slot) pair -- a1 rows byte for byte, counts, per-token scales -- for a
// hand-built routing under a replicated map, and what finalize sums from where they landed;
// whole ModularKernel forwards with the batched CUDA experts (small-batch and grouped-GEMM
// paths) against the oracle; refusals (too many tokens, bad requests) that change nothing;
// pairs dropped and ids counted; a CUDA graph of prepare + experts + finalize replayed on new
// inputs (the batched entries of the contract suite run in test_cuda_contracts). Skips,
// loudly, without a CUDA device.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "moekit/check.h"
#include "moekit/cuda.h"
#include "moekit/quant/quantize.h"
#include "moekit/reference.h"
#include "support/cuda_test_support.h"
#include "support/test_support.h"

namespace moekit {
namespace {

// max_small_rows of the batched experts that force one path.
constexpr int64_t kAlwaysSmall = std::numeric_limits<int64_t>::max();
constexpr int64_t kAlwaysGrouped = 0;

int current_device() {
  int dev = 0;
  EXPECT_EQ(cudaGetDevice(&dev), cudaSuccess);
  return dev;
}

// A device workspace of `bytes`, every byte 0xff, and a host copy of it to prove it unchanged.
struct DeviceWorkspace {
  explicit DeviceWorkspace(size_t n) : bytes(n), mem(DType::kU8, {static_cast<int64_t>(n) + 1}) {
    EXPECT_EQ(cudaMemset(mem.view().data, 0xff, bytes + 1), cudaSuccess);
  }
  Workspace get() const { return Workspace(mem.view().data, bytes); }
  bool untouched() const {
    const Tensor host = mem.to_host();
    for (int64_t i = 0; i < host.numel(); ++i)
      if (host.data<uint8_t>()[i] != 0xff) return false;
    return true;
  }
  size_t bytes;
  CudaTensor mem;
};

// ---- prepare and finalize, part by part ------------------------------------------------------

// Global ids [M = 7, k = 3] of 8 experts: padding (-1) rows and slots, experts the rank does not
// hold, the replicated expert 0 (served here for every other token key), and expert 6 in most
// rows, so one expert gets several rows.
const int32_t kIds[7][3] = {{6, 1, 0}, {-1, -1, -1}, {0, 6, 4}, {7, 6, -1},
                            {5, 0, 6}, {1, 2, 3},    {6, 0, 7}};
constexpr int64_t kM = 7, kK = 3, kE = 8, kH = 48, kN = 9;  // N = max_tokens > M
constexpr int64_t kKeyOffset = 5;

// Rank 1 of 2 holds experts 4..7 and, as a replica, 0 (rank 0 holds 0..3): its local slots
// 0..3 = experts 4..7, slot 4 = expert 0, served when the token key is odd.
ExpertMap replicated_map() {
  return ExpertMap::replicated(kE, {{0, 1, 2, 3}, {4, 5, 6, 7, 0}});
}

// The host model of batched dispatch: pair p = t * k + s goes to local expert local[p] (-1: not
// here) at row j = row[p] of it, j counting that expert's pairs before p.
struct Placed {
  std::vector<int32_t> local, row, counts;
};
Placed place_on_host(const ExpertMap& map, int rank, const Tensor& ids, int64_t key_offset) {
  const int64_t M = ids.size(0), k = ids.size(1);
  Placed p;
  p.counts.assign(map.num_local(rank), 0);
  for (int64_t t = 0; t < M; ++t)
    for (int64_t s = 0; s < k; ++s) {
      const int32_t e = ids.data<int32_t>()[t * k + s];
      const int32_t l = e < 0 ? -1 : map.local_id(rank, e, key_offset + t);
      p.local.push_back(l);
      p.row.push_back(l < 0 ? -1 : p.counts[l]++);
    }
  return p;
}

Tensor hand_built_ids() {
  Tensor ids(DType::kI32, {kM, kK});
  std::memcpy(ids.data<int32_t>(), kIds, sizeof kIds);
  return ids;
}

MoEProblem problem(int64_t M, int64_t H, int k) {
  MoEProblem p;
  p.num_experts = kE;
  p.hidden = H;
  p.top_k = k;
  p.tokens = M;
  return p;
}

// Prepare's a1 rows are x's rows in the experts' spec, copied byte for byte to row j of the
// pair's expert (the host quantizer gives the codes and scales the device one does); the counts
// are the host model's; finalize sums, in slot order and with fmaf, the caller's weight times
// the fused_out row each pair landed on -- bit for bit the host's sum in fp32.
TEST(CudaBatchedPrepareFinalize, PlacesPairsInTokenSlotOrderAndGathersThemBack) {
  SKIP_WITHOUT_CUDA();
  const ExpertMap map = replicated_map();
  const int rank = 1;
  const int64_t El = map.num_local(rank);
  const Tensor ids = hand_built_ids();
  const Placed want = place_on_host(map, rank, ids, kKeyOffset);
  ASSERT_GT(*std::max_element(want.counts.begin(), want.counts.end()), 2);
  Tensor weights(DType::kF32, {kM, kK});
  check::fill_uniform(weights, 3, 0.1, 1.0);
  const CudaTensor d_ids = CudaTensor::copy_of(ids), d_weights = CudaTensor::copy_of(weights);

  for (const char* format : {"bf16", "fp8-token", "fp8-tensor"}) {
    SCOPED_TRACE(format);
    const QuantScheme q = QuantScheme::parse(format);
    const ActivationSpec spec = ActivationSpec::of(q);
    // x [M, H] bf16 with rows 8 elements apart more than H (a1 taken from x as it is for bf16).
    const int64_t pad = 8;
    const Tensor x = check::make_activations(q, DType::kBF16, kM, kH, 11);
    Tensor wide(DType::kBF16, {kM, kH + pad});
    for (int64_t t = 0; t < kM; ++t)
      std::memcpy(wide.data<uint16_t>() + t * (kH + pad), x.data<uint16_t>() + t * kH, kH * 2);
    const CudaTensor d_wide = CudaTensor::copy_of(wide);
    TensorView d_x = d_wide.view();
    d_x.shape[1] = kH;
    // The rows the experts must see, from the host quantizer (bf16: x).
    Tensor codes, scale;
    TensorView rows = x.view();
    if (spec.scale != ScaleKind::kNone) {
      codes = Tensor(spec.dtype, {kM, kH});
      scale = Tensor(DType::kF32, {spec.scale == ScaleKind::kToken ? kM : 1});
      quantize_activations(x, spec, codes, scale);
      rows = codes.view();
    }
    const int64_t row_bytes = rows.nbytes() / kM;

    auto pf = make_cuda_batched_prepare_finalize(map, rank, kN);
    EXPECT_EQ(pf->name(), "cuda-batched-local");
    EXPECT_EQ(pf->activation_format(), ActivationFormat::kBatched);
    const MoEProblem p = problem(kM, kH, kK);
    EXPECT_EQ(pf->max_dispatched_tokens(p), El * kN);
    DeviceWorkspace dws(pf->workspace_size(p));
    Workspace ws = dws.get();
    const DispatchedBatch b = pf->prepare({d_x, d_ids, d_weights, kKeyOffset, false, spec}, ws, {});
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    ASSERT_EQ(b.format, ActivationFormat::kBatched);
    check_shape(b.a1, {El, kN, kH}, "a1");
    check_dtype(b.a1, spec.dtype, "a1");
    EXPECT_EQ(b.a1_scale.kind, spec.scale);

    Tensor counts(DType::kI32, {El}), a1(spec.dtype, {El, kN, kH});
    copy_to_host(b.expert_num_tokens, counts);
    copy_to_host(b.a1, a1);
    for (int64_t e = 0; e < El; ++e)
      EXPECT_EQ(counts.data<int32_t>()[e], want.counts[e]) << "expert " << e;
    Tensor a1_scale;
    if (spec.scale != ScaleKind::kNone) {
      a1_scale = Tensor(DType::kF32, {b.a1_scale.scale.size(0)});
      copy_to_host(b.a1_scale.scale, a1_scale);
    }
    if (spec.scale == ScaleKind::kTensor) {
      ASSERT_EQ(a1_scale.numel(), 1);  // the one scale, as is
      EXPECT_EQ(a1_scale.data<float>()[0], scale.data<float>()[0]);
    }
    for (int64_t pair = 0; pair < kM * kK; ++pair) {
      if (want.local[pair] < 0) continue;
      const int64_t t = pair / kK, r = want.local[pair] * kN + want.row[pair];
      EXPECT_EQ(
          std::memcmp(a1.data<char>() + r * row_bytes, rows.ptr<char>() + t * row_bytes, row_bytes),
          0)
          << "pair (" << t << ", " << pair % kK << ") at a1 row " << r << " is not x's row " << t;
      if (spec.scale == ScaleKind::kToken) {
        ASSERT_EQ(a1_scale.numel(), El * kN);
        EXPECT_EQ(a1_scale.data<float>()[r], scale.data<float>()[t]) << "a1 row " << r;
      }
    }

    // finalize from fused_out rows of known values into fp32 y, weighted or not.
    Tensor fused(DType::kF32, {El, kN, kH});
    check::fill_uniform(fused, 7, -2, 2);
    const CudaTensor d_fused = CudaTensor::copy_of(fused);
    for (TopKWeightApplied applied : {TopKWeightApplied::kNone, TopKWeightApplied::kWeighted}) {
      SCOPED_TRACE(name(applied));
      CudaTensor y(DType::kF32, {kM, kH});
      ASSERT_EQ(cudaMemset(y.view().data, 0xff, y.view().nbytes()), cudaSuccess);
      pf->finalize({y, d_fused, d_ids, d_weights, applied, nullptr}, ws, {});
      const Tensor got = y.to_host();
      Tensor expect(DType::kF32, {kM, kH});
      for (int64_t t = 0; t < kM; ++t)
        for (int64_t h = 0; h < kH; ++h) {
          float acc = 0.0f;
          for (int64_t s = 0; s < kK; ++s) {
            const int64_t pair = t * kK + s;
            if (want.local[pair] < 0) continue;
            const float w =
                applied == TopKWeightApplied::kNone ? weights.data<float>()[pair] : 1.0f;
            acc = std::fmaf(
                w, fused.data<float>()[(want.local[pair] * kN + want.row[pair]) * kH + h], acc);
          }
          expect.data<float>()[t * kH + h] = acc;
        }
      EXPECT_TRUE(test::bits_equal(got.view().reshaped({kM, kH}), expect));
    }
    EXPECT_EQ(cuda_bad_id_count(*pf), 0);
  }
}

// A token that names one expert in several slots can overflow its N rows: the pairs past N are
// dropped (their rows are not computed) and counted with the ids outside [-1, E), which count as
// -1; nothing else changes.
TEST(CudaBatchedPrepareFinalize, CountsDroppedPairsAndBadIds) {
  SKIP_WITHOUT_CUDA();
  const ExpertMap map = ExpertMap::linear(4, 1);
  const int64_t M = 2, k = 3, H = 32, N = 2;
  // Expert 2: 4 pairs for 2 rows (the last 2 dropped); 99 and -7: bad ids.
  const int32_t given[M][k] = {{2, 2, 99}, {2, -7, 2}};
  Tensor ids(DType::kI32, {M, k}), weights(DType::kF32, {M, k});
  std::memcpy(ids.data<int32_t>(), given, sizeof given);
  check::fill_uniform(weights, 1, 0.5, 1.0);
  Tensor x(DType::kBF16, {M, H});
  check::fill_uniform(x, 2, -1, 1);
  const CudaTensor d_x = CudaTensor::copy_of(x), d_ids = CudaTensor::copy_of(ids),
                   d_weights = CudaTensor::copy_of(weights);
  auto pf = make_cuda_batched_prepare_finalize(map, 0, N);
  MoEProblem p = problem(M, H, k);
  p.num_experts = 4;
  DeviceWorkspace dws(pf->workspace_size(p));
  Workspace ws = dws.get();
  ActivationSpec spec;
  spec.dtype = DType::kBF16;
  const DispatchedBatch b = pf->prepare({d_x, d_ids, d_weights, 0, false, spec}, ws, {});
  Tensor counts(DType::kI32, {4});
  copy_to_host(b.expert_num_tokens, counts);
  EXPECT_EQ(counts.data<int32_t>()[2], 2);
  for (int e : {0, 1, 3}) EXPECT_EQ(counts.data<int32_t>()[e], 0) << "expert " << e;
  // Token 0's two pairs took expert 2's rows 0 and 1: both hold x's row 0.
  Tensor a1(DType::kBF16, {4, N, H});
  copy_to_host(b.a1, a1);
  for (int64_t j = 0; j < N; ++j)
    EXPECT_EQ(std::memcmp(a1.data<uint16_t>() + (2 * N + j) * H, x.data<uint16_t>(), H * 2), 0);
  // finalize: token 1's pairs were dropped, its row is +0.
  const CudaTensor fused(DType::kF32, {4, N, H}), y(DType::kF32, {M, H});
  ASSERT_EQ(cudaMemset(fused.view().data, 0, fused.view().nbytes()), cudaSuccess);
  ASSERT_EQ(cudaMemset(y.view().data, 0xff, y.view().nbytes()), cudaSuccess);
  pf->finalize({y, fused, d_ids, d_weights, TopKWeightApplied::kNone, nullptr}, ws, {});
  const Tensor got = y.to_host();
  for (int64_t i = 0; i < got.numel(); ++i) ASSERT_EQ(got.data<uint32_t>()[i], 0u) << i;
  EXPECT_EQ(cuda_bad_id_count(*pf), 2 + 2);
  EXPECT_EQ(cuda_bad_id_count(*pf), 0);  // reset by the read
}

// Contract 8: a request prepare cannot take is refused with the reason before anything is
// enqueued (the poisoned workspace keeps every byte); so is finalize without its prepare.
TEST(CudaBatchedPrepareFinalize, RefusesBadRequestsAndChangesNothing) {
  SKIP_WITHOUT_CUDA();
  const ExpertMap map = ExpertMap::linear(kE, 1);
  const int64_t M = 5, H = 32, k = 2, N = 4;
  Tensor x(DType::kBF16, {M, H}), ids(DType::kI32, {M, k}), weights(DType::kF32, {M, k});
  check::fill_uniform(x, 1, -1, 1);
  for (int64_t i = 0; i < ids.numel(); ++i) ids.data<int32_t>()[i] = static_cast<int32_t>(i % kE);
  check::fill_uniform(weights, 2, 0, 1);
  const CudaTensor d_x = CudaTensor::copy_of(x), d_ids = CudaTensor::copy_of(ids),
                   d_weights = CudaTensor::copy_of(weights);
  const CudaTensor narrow_weights(DType::kF32, {M, k - 1}), f32_ids(DType::kF32, {M, k});
  auto pf = make_cuda_batched_prepare_finalize(map, 0, N);
  DeviceWorkspace dws(pf->workspace_size(problem(M, H, k)));
  ActivationSpec bf16;
  bf16.dtype = DType::kBF16;
  ActivationSpec int8 = ActivationSpec::of(QuantScheme::parse("int8"));
  struct Bad {
    const char* why;
    PrepareRequest req;
  };
  const std::vector<Bad> bad = {
      {"exceed max_tokens", {d_x, d_ids, d_weights, 0, false, bf16}},  // M = 5 > N = 4
      {"x must be a CUDA tensor", {x, d_ids, d_weights, 0, false, bf16}},
      {"topk_weights: expected shape", {d_x, d_ids, narrow_weights, 0, false, bf16}},
      {"topk_ids: expected dtype", {d_x, f32_ids, d_weights, 0, false, bf16}},
      {"weight_on_input needs k = 1", {d_x, d_ids, d_weights, 0, true, bf16}},
      {"cuda prepare produces", {d_x, d_ids, d_weights, 0, false, int8}},
  };
  for (const Bad& b : bad) {
    Workspace ws = dws.get();
    EXPECT_TRUE(test::error_mentions([&] { pf->prepare(b.req, ws, {}); }, b.why)) << b.why;
  }
  const CudaTensor fused(DType::kF32, {kE, N, H}), y(DType::kBF16, {M, H});
  Workspace ws = dws.get();
  EXPECT_TRUE(test::error_mentions(
      [&] {
        pf->finalize({y, fused, d_ids, d_weights, TopKWeightApplied::kNone, nullptr}, ws, {});
      },
      "no prepare"));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_TRUE(dws.untouched());
  EXPECT_TRUE(test::error_mentions([&] { make_cuda_batched_prepare_finalize(map, 0, 0); },
                                   "max_tokens 0 < 1"));
  EXPECT_TRUE(test::error_mentions([&] { make_cuda_batched_prepare_finalize(map, 1, 4); },
                                   "rank 1 not in [0, 1)"));
}

// ---- whole layers -----------------------------------------------------------------------------

// A layer of `format` (x and y bf16 for fp8 formats) on the host and the device: E = 8, k = 2,
// SiLU; routing through the real router with padding rows and slots.
struct Layer {
  Layer(const std::string& format_name, int64_t tokens, uint64_t seed)
      : format(QuantScheme::parse(format_name)),
        M(tokens),
        host(check::make_random_weights(kE, kLayerH, kLayerI, Activation{}, format, false,
                                        check::mix_seed(seed, 1))),
        device_weights(host.view()) {
    load(seed);
  }
  // New x and routing for the same weights, into the same device buffers when they exist.
  void load(uint64_t seed) {
    routing =
        check::make_random_routing(check::router_config(RoutingMethod::kSoftmaxTopK, kE, kTopK), M,
                                   check::mix_seed(seed, 2), 5);
    x = check::make_activations(format, dtype(), M, kLayerH, check::mix_seed(seed, 3));
    if (d_x.view().data == nullptr) {
      d_x = CudaTensor::copy_of(x);
      d_ids = CudaTensor::copy_of(routing.topk_ids);
      d_weights = CudaTensor::copy_of(routing.topk_weights);
      return;
    }
    copy_to_device(x, d_x);
    copy_to_device(routing.topk_ids, d_ids);
    copy_to_device(routing.topk_weights, d_weights);
  }
  DType dtype() const { return format.is_float() ? format.weight_dtype() : DType::kBF16; }
  // A dynamic per-tensor scale (of a1 or of the intermediate) covers the rows of one call: the
  // kernel then runs all tokens in one round, as the oracle does.
  int64_t chunk(int64_t wanted) const {
    const bool per_call = ActivationSpec::of(format).scale == ScaleKind::kTensor ||
                          intermediate_spec(format).scale == ScaleKind::kTensor;
    return per_call ? M : wanted;
  }
  std::unique_ptr<ModularKernel> kernel(const ExpertMap& map, int rank, int64_t max_small_rows,
                                        int64_t max_tokens, int64_t chunk_tokens) const {
    const int dev = current_device();
    return std::make_unique<ModularKernel>(
        make_cuda_batched_prepare_finalize(map, rank, max_tokens),
        make_cuda_batched_experts(ExpertWeights::local_view(device_weights.view(), map, rank),
                                  Activation{}, max_small_rows),
        make_cuda_weight_and_reduce(),
        KernelConfig{kTopK, dtype(), chunk_tokens, Device{DeviceType::kCUDA, dev},
                     cuda_workspace_allocator(dev)});
  }
  Tensor oracle(const ExpertMap& map, int rank) const {
    ReferenceArgs a{x.view(), routing.topk_ids.view(), routing.topk_weights.view(), host.view(),
                    Activation{}};
    a.map = &map;
    a.rank = rank;
    a.round_intermediate_to_bf16 = format.format == Format::kBF16;
    return test::reference_output(a);
  }
  // y on the host after forward on `stream` (y poisoned first).
  Tensor forward(ModularKernel& mk, const CudaTensor& y, cudaStream_t stream = nullptr) const {
    EXPECT_EQ(cudaMemset(y.view().data, 0xff, y.view().nbytes()), cudaSuccess);
    mk.forward({d_x, d_ids, d_weights, y}, ExecContext{stream});
    EXPECT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    return y.to_host();
  }
  // got [M, H] against the oracle: within check::error_bound, and for quantized activations no
  // systematic error beyond check::systematic_error_bound.
  ::testing::AssertionResult matches(const Tensor& got, const Tensor& want) const {
    const TensorView g = got.view().reshaped({M, kLayerH});
    const double bound = check::error_bound(format, dtype(), 1, false, kLayerH, kLayerI);
    if (auto r = test::rows_match(g, want, bound); !r) return r;
    const auto systematic = check::systematic_error_bound(format, dtype(), 1);
    if (!systematic) return ::testing::AssertionSuccess();
    const check::Comparison c = check::compare_systematic(g, want, *systematic);
    if (c.ok()) return ::testing::AssertionSuccess() << c.str();
    return ::testing::AssertionFailure() << c.str();
  }

  static constexpr int64_t kLayerH = 128, kLayerI = 96;
  static constexpr int kTopK = 2;
  QuantScheme format;
  int64_t M;
  check::LayerWeights host;
  DeviceExpertWeights device_weights;
  check::Routing routing;
  Tensor x;
  CudaTensor d_x, d_ids, d_weights;
};

struct PlacementCase {
  const char* name;
  ExpertMap map;
  int rank;
};
std::vector<PlacementCase> placements() {
  return {{"linear", ExpertMap::linear(kE, 1), 0},
          {"round_robin", ExpertMap::round_robin(kE, 2), 1},
          {"replicated", replicated_map(), 1}};
}

// The layer through prepare, the batched experts on both paths, and finalize, in chunks of 16
// tokens (later chunks' token keys pick replicas) against the oracle's share of the rank; run
// twice, bit for bit the same.
TEST(CudaBatchedPrepareFinalize, LayerMatchesTheOracle) {
  SKIP_WITHOUT_CUDA();
  for (const char* format : {"bf16", "fp16", "fp8-token", "fp8-tensor"})
    for (int64_t M : {1, 37})
      for (int64_t max_small : {kAlwaysSmall, kAlwaysGrouped}) {
        const Layer l(format, M, check::mix_seed(M, format));
        for (const PlacementCase& where : placements()) {
          SCOPED_TRACE(std::string(format) + " M=" + std::to_string(M) + " " + where.name +
                       (max_small ? " small-batch" : " grouped"));
          const int64_t chunk = l.chunk(16);
          auto mk = l.kernel(where.map, where.rank, max_small, chunk, chunk);
          const CudaTensor y(l.dtype(), {M, Layer::kLayerH});
          const Tensor got = l.forward(*mk, y);
          EXPECT_TRUE(l.matches(got, l.oracle(where.map, where.rank)));
          const Tensor again = l.forward(*mk, y);
          EXPECT_TRUE(test::bits_equal(again.view().reshaped({M, Layer::kLayerH}),
                                       got.view().reshaped({M, Layer::kLayerH})));
          EXPECT_EQ(cuda_bad_id_count(mk->prepare_finalize()), 0);
        }
      }
}

// Weight on the input (k = 1): prepare scales x by the weight, finalize sums each row once.
TEST(CudaBatchedPrepareFinalize, WeightOnInputIsAppliedOnce) {
  SKIP_WITHOUT_CUDA();
  const int64_t M = 19, H = 64, I = 32;
  const check::LayerWeights host =
      check::make_random_weights(kE, H, I, Activation{}, DType::kBF16, false, 3);
  const DeviceExpertWeights dev_weights(host.view());
  const check::Routing rt = check::make_random_routing(
      check::router_config(RoutingMethod::kLlama4Top1Sigmoid, kE, 1), M, 4, 5);
  ASSERT_TRUE(rt.weight_on_input);
  const Tensor x = check::make_activations(QuantScheme::parse("bf16"), DType::kBF16, M, H, 5);
  const CudaTensor d_x = CudaTensor::copy_of(x), d_ids = CudaTensor::copy_of(rt.topk_ids),
                   d_w = CudaTensor::copy_of(rt.topk_weights), y(DType::kBF16, {M, H});
  const ExpertMap map = ExpertMap::linear(kE, 1);
  const int dev = current_device();
  ModularKernel mk(make_cuda_batched_prepare_finalize(map, 0, M),
                   make_cuda_batched_experts(dev_weights.view(), Activation{}, kAlwaysSmall),
                   make_cuda_weight_and_reduce(),
                   KernelConfig{1, DType::kBF16, M, Device{DeviceType::kCUDA, dev},
                                cuda_workspace_allocator(dev)});
  mk.forward({d_x, d_ids, d_w, y, true});
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  ReferenceArgs a{x.view(),    rt.topk_ids.view(), rt.topk_weights.view(),
                  host.view(), Activation{},       true};
  a.round_intermediate_to_bf16 = true;
  EXPECT_TRUE(test::rows_match(y.to_host().view().reshaped({M, H}), test::reference_output(a),
                               check::error_bound(DType::kBF16, 1, true, H, I)));
}

// A round holds at most max_tokens tokens: more in one round is refused before anything runs
// (y keeps its bytes); in chunks of at most max_tokens the same batch runs.
TEST(CudaBatchedPrepareFinalize, RefusesMoreTokensThanARoundHolds) {
  SKIP_WITHOUT_CUDA();
  const Layer l("bf16", 37, 9);
  const ExpertMap map = ExpertMap::linear(kE, 1);
  auto too_small = l.kernel(map, 0, kAlwaysSmall, 16, 64);
  const CudaTensor y(l.dtype(), {l.M, Layer::kLayerH});
  ASSERT_EQ(cudaMemset(y.view().data, 0xff, y.view().nbytes()), cudaSuccess);
  EXPECT_TRUE(test::error_mentions(
      [&] {
        too_small->forward({l.d_x, l.d_ids, l.d_weights, y});
      },
      "exceeds max_tokens 16"));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const Tensor untouched = y.to_host();
  for (int64_t i = 0; i < untouched.numel(); ++i)
    ASSERT_EQ(untouched.data<uint16_t>()[i], 0xffff) << i;
  auto chunked = l.kernel(map, 0, kAlwaysSmall, 16, 16);
  EXPECT_TRUE(l.matches(l.forward(*chunked, y), l.oracle(map, 0)));
}

// Contract 7: forward (prepare, experts, finalize) enqueues everything on ctx.stream without a
// host synchronisation -- captured in global mode, where a synchronising call fails the
// capture -- and the graph replayed on new x and routing written into the same buffers
// computes the new layer, on both paths of the experts.
TEST(CudaBatchedPrepareFinalize, GraphReplaysOnNewInputs) {
  SKIP_WITHOUT_CUDA();
  for (const char* format : {"bf16", "fp8-token"})
    for (int64_t max_small : {kAlwaysSmall, kAlwaysGrouped}) {
      SCOPED_TRACE(std::string(format) + (max_small ? " small-batch" : " grouped"));
      Layer l(format, 23, 41);
      const PlacementCase where = placements()[2];
      auto mk = l.kernel(where.map, where.rank, max_small, 16, 16);
      const CudaTensor y(l.dtype(), {l.M, Layer::kLayerH});
      test::CapturedGraph graph([&](cudaStream_t stream) {
        mk->forward({l.d_x, l.d_ids, l.d_weights, y}, ExecContext{stream});
      });
      ASSERT_TRUE(graph.ok());
      for (uint64_t seed : {41, 42}) {
        if (seed != 41) l.load(seed);
        ASSERT_EQ(cudaMemset(y.view().data, 0xff, y.view().nbytes()), cudaSuccess);
        ASSERT_TRUE(graph.replay());
        EXPECT_TRUE(l.matches(y.to_host(), l.oracle(where.map, where.rank))) << "seed " << seed;
      }
      EXPECT_EQ(cuda_bad_id_count(mk->prepare_finalize()), 0);
    }
}

}  // namespace
}  // namespace moekit
