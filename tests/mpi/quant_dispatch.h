// Quantized activations through a PrepareFinalize (contract 4): a quantized layer, the rows
// prepare should hand its experts, and experts that record the rows (codes with their scale)
// they were handed -- for test_dispatch_quant.cc (one process) and test_ep_mpi.cc (ranks).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "moekit/check.h"
#include "moekit/cpu.h"
#include "moekit/dist/ep.h"
#include "moekit/modular.h"
#include "support/test_support.h"
#include "moekit/quant/quantize.h"
#include "moekit/reference.h"

namespace moekit::test {

// One activation row: its codes and the bytes of the scale that covers it (the whole [1]
// scalar of a per-tensor scale, the row's entry or scale row otherwise).
struct ScaledRow {
  std::vector<uint8_t> codes, scale;
  bool operator==(const ScaledRow&) const = default;
};

// Row r of a1 [rows, H] (standard, or batched flattened) with its scale.
inline ScaledRow scaled_row(const TensorView& a1, const ActivationScale& s, int64_t r) {
  const int64_t H = a1.size(a1.ndim - 1), row = storage_bytes(a1.dtype, H);
  const auto* base = static_cast<const uint8_t*>(a1.data) + r * row;
  ScaledRow out{{base, base + row}, {}};
  if (s.kind == ScaleKind::kNone) return out;
  const int64_t per_row =
      s.kind == ScaleKind::kTensor
          ? 0
          : storage_bytes(s.scale.dtype, s.scale.ndim > 1 ? s.scale.size(1) : 1);
  const auto* sb = static_cast<const uint8_t*>(s.scale.data) + r * per_row;
  out.scale.assign(sb, sb + (s.kind == ScaleKind::kTensor ? 4 : per_row));
  return out;
}

// The rows a prepare should produce for x [M, H]: x (times the top-1 weight when it is applied
// on the input, in fp32) quantized as `spec` over all M rows at once.
inline std::vector<ScaledRow> expected_rows(const TensorView& x, const TensorView& topk_weights,
                                            bool weight_on_input, const ActivationSpec& spec) {
  const int64_t M = x.size(0), H = x.size(1);
  Tensor v(DType::kF32, {M, H}), q(spec.dtype, {M, H});
  for (int64_t t = 0; t < M; ++t)
    for (int64_t c = 0; c < H; ++c)
      v.data<float>()[t * H + c] = load_as_float(x.data, x.dtype, t * x.stride[0] + c) *
                                   (weight_on_input ? topk_weights.row<float>(t)[0] : 1.0f);
  const std::vector<int64_t> shape = activation_scale_shape(spec, M, H);
  const DType sd = spec.scale == ScaleKind::kBlock ? spec.scale_dtype : DType::kF32;
  Tensor s = shape.size() == 1 ? Tensor(sd, {shape[0]}) : Tensor(sd, {shape[0], shape[1]});
  quantize_activations(v, spec, q, s);
  std::vector<ScaledRow> rows;
  const ActivationScale scale{spec.scale, spec.scale == ScaleKind::kBlock ? spec.group : 0, s};
  for (int64_t t = 0; t < M; ++t) rows.push_back(scaled_row(q, scale, t));
  return rows;
}

// Experts that record the rows the experts compute (a row with a valid id, or within a batched
// expert's count) with their scales, then delegate to `inner`.
class ScaleRecordingExperts final : public ForwardingExperts {
 public:
  using ForwardingExperts::ForwardingExperts;
  void apply(const DispatchedBatch& b, const TensorView& out, Workspace& ws,
             const ExecContext& ctx) const override {
    kinds.push_back(b.a1_scale.kind);
    if (b.format == ActivationFormat::kBatched) {
      const int64_t N = b.a1.size(1);
      for (int64_t e = 0; e < b.a1.size(0); ++e)
        for (int64_t j = 0; j < b.expert_num_tokens.ptr<int32_t>()[e]; ++j)
          rows.push_back(scaled_row(b.a1, b.a1_scale, e * N + j));
    } else {
      for (int64_t t = 0; t < b.a1.size(0); ++t)
        for (int64_t s = 0; s < b.topk_ids.size(1); ++s)
          if (b.topk_ids.row<int32_t>(t)[s] >= 0) {
            rows.push_back(scaled_row(b.a1, b.a1_scale, t));
            break;
          }
    }
    inner_->apply(b, out, ws, ctx);
  }
  mutable std::vector<ScaleKind> kinds;  // per call
  mutable std::vector<ScaledRow> rows;   // over all calls
};

// The static per-tensor scale of formats with the static option: not what a dynamic scale of
// the test data would be (x reaches about 6, so 6 / 448).
constexpr float kStaticScale = 0.0234375f;

// A layer of `format` (E = 8, H = 160: two activation groups of up to 128, I = 46) and a batch
// of `tokens` rows with padding, routed by softmax top-2 or, with the weight on the input, by
// Llama-4's top-1.
struct QuantLayer {
  QuantLayer(const char* format, bool weight_on_input, int64_t tokens = 23)
      : scheme(QuantScheme::parse(format)),
        weights(check::make_random_weights(8, 160, 46, Activation{}, scheme, false, 7)),
        routing(check::make_random_routing(
            check::router_config(
                weight_on_input ? RoutingMethod::kLlama4Top1Sigmoid : RoutingMethod::kSoftmaxTopK,
                8, 2),
            tokens, 8, 5)),
        x(check::make_activations(scheme, DType::kBF16, tokens, 160, 9)),
        static_scale(DType::kF32, {1}) {
    static_scale.data<float>()[0] = kStaticScale;
  }
  TensorView static_view() const { return scheme.static_act ? static_scale.view() : TensorView{}; }
  ActivationSpec spec() const {
    ActivationSpec s = ActivationSpec::of(scheme);
    s.static_scale = static_view();
    return s;
  }
  int top_k() const { return routing.config.top_k; }
  std::shared_ptr<Experts> experts(const ExpertMap& map, int rank) const {
    return make_reference_experts(ExpertWeights::local_view(weights.view(), map, rank),
                                  Activation{}, static_view());
  }
  std::vector<ScaledRow> expected() const {
    return expected_rows(x, routing.topk_weights, routing.weight_on_input, spec());
  }
  // The oracle over all rows: the whole layer, or `rank`'s share of `map`.
  Tensor reference(const ExpertMap* map = nullptr, int rank = 0) const {
    ReferenceArgs a{
        x.view(),     routing.topk_ids.view(), routing.topk_weights.view(), weights.view(),
        Activation{}, routing.weight_on_input};
    a.map = map;
    a.rank = rank;
    a.static_act_scale = static_view();
    Tensor y(DType::kF32, {x.size(0), x.size(1)});
    reference_moe(a, y);
    return y;
  }
  double bound(int ranks) const {
    return check::error_bound(scheme, DType::kBF16, ranks, routing.weight_on_input, 160, 46);
  }

  QuantScheme scheme;
  check::LayerWeights weights;
  check::Routing routing;
  Tensor x;
  Tensor static_scale;
};

// Rows [begin, end) of the layer through `pf` and reference experts of `rank` that record what
// they are handed, in rounds of `chunk` rows.
struct Dispatched {
  std::shared_ptr<ScaleRecordingExperts> experts;
  Tensor y;  // [end - begin, H] bf16
};
inline Dispatched dispatch(const QuantLayer& layer, std::shared_ptr<PrepareFinalize> pf,
                           const ExpertMap& map, int rank, int64_t begin, int64_t end,
                           int64_t chunk) {
  std::shared_ptr<Experts> inner = layer.experts(map, rank);
  if (pf->activation_format() == ActivationFormat::kBatched) inner = make_batched_experts(inner);
  Dispatched d{std::make_shared<ScaleRecordingExperts>(inner),
               Tensor(DType::kBF16, {end - begin, 160})};
  ModularKernel kernel(pf, d.experts, make_cpu_weight_and_reduce(1),
                       {layer.top_k(), DType::kBF16, chunk});
  kernel.forward({layer.x.view().slice0(begin, end),
                  layer.routing.topk_ids.view().slice0(begin, end),
                  layer.routing.topk_weights.view().slice0(begin, end), d.y.view(),
                  layer.routing.weight_on_input, begin});
  return d;
}

// Every row the experts computed is a row of `want` -- codes and scale bytes: the scale of its
// own row or group, or the one per-tensor scalar -- and every call carried the scale kind.
inline ::testing::AssertionResult rows_arrived_with_their_scales(const ScaleRecordingExperts& seen,
                                                                 const std::vector<ScaledRow>& want,
                                                                 ScaleKind kind) {
  for (ScaleKind k : seen.kinds)
    if (k != kind)
      return ::testing::AssertionFailure()
             << "a call carried a " << name(k) << " scale, want " << name(kind);
  if (seen.rows.empty()) return ::testing::AssertionFailure() << "the experts computed no row";
  for (size_t i = 0; i < seen.rows.size(); ++i)
    if (std::find(want.begin(), want.end(), seen.rows[i]) == want.end())
      return ::testing::AssertionFailure() << "computed row " << i << " (of " << seen.rows.size()
                                           << ") is not a row of x quantized with its scale";
  return ::testing::AssertionSuccess();
}

}  // namespace moekit::test
