// The oracle of reference.h: plain loops, every element read through load_as_float (quantized
// weights through dequantize_weight_row) and accumulated in double. It shares no code with the
// modular kernel (only the scalar activation formula of activation.h, which every backend
// evaluates, and the quantizers of quant/quantize.h, whose rounding it must reproduce) and
// handles any strides of float tensors.
//
// The one concession to speed is the loop order: expert-major, so each weight row is
// dequantized once per call and reused by every token routed to that expert. A token's result
// does not depend on which other tokens share its expert (each dot product runs over the same
// elements in the same order), so reference experts are batch-invariant and bit-reproducible --
// except for formats whose intermediate has a per-tensor scale, which covers the whole call.
#include "moekit/reference.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "moekit/quant/quantize.h"

namespace moekit {
namespace {

bool is_float(DType t) {
  return t == DType::kF32 || t == DType::kF16 || t == DType::kBF16;
}

int32_t load_id(const TensorView& ids, int64_t t, int s) {
  return ids.ptr<int32_t>()[t * ids.stride[0] + s * ids.stride[1]];
}

// Element [i0, i1] of a 2-D or [i0, i1, i2] of a 3-D float view, through its strides.
double at(const TensorView& t, int64_t i0, int64_t i1, int64_t i2 = 0) {
  const int64_t offset = i0 * t.stride[0] + i1 * t.stride[1] + (t.ndim > 2 ? i2 * t.stride[2] : 0);
  return load_as_float(t.data, t.dtype, offset);
}

void check_view(const TensorView& t, const char* part, const char* what,
                std::initializer_list<int64_t> shape, bool float_dtype) {
  check_shape(t, shape, what);
  MOEKIT_CHECK(float_dtype ? is_float(t.dtype) : t.dtype == DType::kI32, part, ": ", what,
               float_dtype ? " must be fp32, fp16 or bf16" : " must be int32", ", got ", t.str());
  MOEKIT_CHECK(t.data != nullptr || t.numel() == 0, part, ": ", what, " has a null data pointer");
  MOEKIT_CHECK(t.device.type == DeviceType::kCPU, part, ": ", what, " must be in host memory, got ",
               t.str());
}

// Every tensor of the weights: data, biases and the scales of quantized ones.
std::vector<const TensorView*> weight_tensors(const ExpertWeights& w) {
  return {&w.w13,       &w.w2,       &w.b13,      &w.b2,      &w.s13.scale,
          &w.s13.zero,  &w.s13.global, &w.s2.scale, &w.s2.zero, &w.s2.global};
}

// The weights agree with each other and with `act`; returns E (experts the weights hold).
// Float weights may have any strides; quantized ones are checked by validate_weights.
int64_t check_weights(const ExpertWeights& w, const Activation& act, const char* part) {
  if (w.quant) {
    if (auto why = validate_weights(w, act)) MOEKIT_FAIL(part, ": ", *why);
    for (const TensorView* t : weight_tensors(w))
      MOEKIT_CHECK(!t->present() || t->device.type == DeviceType::kCPU, part,
                   ": weights and scales must be in host memory, got ", t->str());
    return w.num_local();
  }
  MOEKIT_CHECK(w.w13.ndim == 3 && w.w2.ndim == 3, part, ": w13 and w2 must be 3-D, got w13 ",
               w.w13.str(), ", w2 ", w.w2.str());
  MOEKIT_CHECK(act.gated || act.fn != ActivationFn::kSwigluOai, part,
               ": swiglu_oai is gated by definition");
  const int64_t n = w.w13.size(0), H = w.w13.size(2), I = w.w2.size(2);
  MOEKIT_CHECK(H >= 1 && I >= 1, part, ": empty hidden or intermediate size in w13 ", w.w13.str(),
               ", w2 ", w.w2.str());
  check_view(w.w13, part, "w13", {n, act.w13_rows(I), H}, true);
  check_view(w.w2, part, "w2", {n, H, I}, true);
  if (w.b13.present()) check_view(w.b13, part, "b13", {n, act.w13_rows(I)}, true);
  if (w.b2.present()) check_view(w.b2, part, "b2", {n, H}, true);
  for (int64_t e = 0; e < w.num_local(); ++e)
    MOEKIT_CHECK(w.index(e) >= 0 && w.index(e) < n, part, ": source[", e, "] = ", w.index(e),
                 " is outside the weights' ", n, " experts");
  return w.num_local();
}

// The activation spec of `scheme`'s a1 with its static scale (a [1] fp32 host view, required by
// and only by schemes with the static option); kNone for formats with float activations.
ActivationSpec quantized_spec(const QuantScheme& scheme, const TensorView& static_scale,
                              const char* part) {
  ActivationSpec spec = ActivationSpec::of(scheme);
  if (!scheme.static_act) {
    MOEKIT_CHECK(!static_scale.present(), part, ": format ", scheme.str(),
                 " has no static activation scale, but one was given");
    return spec;
  }
  MOEKIT_CHECK(static_scale.present() && static_scale.numel() == 1 &&
                   static_scale.dtype == DType::kF32 && static_scale.data != nullptr &&
                   static_scale.device.type == DeviceType::kCPU,
               part, ": format ", scheme.str(),
               " needs its static activation scale as a [1] fp32 host tensor, got ",
               static_scale.present() ? static_scale.str() : std::string("none"));
  spec.static_scale = static_scale;
  return spec;
}

// An owned scale tensor for `rows` rows of `cols` elements quantized as `spec`.
Tensor scale_tensor(const ActivationSpec& spec, int64_t rows, int64_t cols) {
  switch (spec.scale) {
    case ScaleKind::kTensor:
      return Tensor(DType::kF32, {1});
    case ScaleKind::kToken:
      return Tensor(DType::kF32, {rows});
    case ScaleKind::kBlock:
      return Tensor(spec.scale_dtype, {rows, (cols + spec.group - 1) / spec.group});
    case ScaleKind::kNone:
      break;
  }
  MOEKIT_FAIL("reference: activations without a scale are not quantized");
}

// v [rows, cols] fp32, in place: quantized as `spec` (the library's quantizer) and dequantized.
void round_trip(const TensorView& v, const ActivationSpec& spec) {
  const int64_t rows = v.size(0), cols = v.size(1);
  if (rows == 0) return;
  Tensor q(spec.dtype, {rows, cols});
  const Tensor s = scale_tensor(spec, rows, cols);
  quantize_activations(v, spec, q, s);
  dequantize_activations(q, {spec.scale, spec.scale == ScaleKind::kBlock ? spec.group : 0, s}, v);
}

// One weight tensor [n, R, K] of the experts, float or quantized, read a row at a time.
class WeightMatrix {
 public:
  WeightMatrix(const TensorView& data, const WeightScales& scales,
               const std::optional<QuantScheme>& scheme)
      : data_(data), scales_(scales), scheme_(scheme), scratch_(data.size(2)) {}
  // row[c] = W[e, r, c] for c in [0, K); e indexes dim 0.
  void load(int64_t e, int64_t r, std::vector<double>& row) const {
    const int64_t K = data_.size(2);
    if (!scheme_) {
      for (int64_t c = 0; c < K; ++c) row[c] = at(data_, e, r, c);
      return;
    }
    dequantize_weight_row(data_, scales_, *scheme_, e, r, scratch_.data());
    std::copy(scratch_.begin(), scratch_.end(), row.begin());
  }

 private:
  TensorView data_;
  WeightScales scales_;
  std::optional<QuantScheme> scheme_;
  mutable std::vector<float> scratch_;
};

// dst[p * dst_stride] = W[e, r, :] . in[p, :] + bias[e, r] for p in [0, n); in: [n, len].
void project(const WeightMatrix& w, const TensorView& bias, int64_t e, int64_t r, const double* in,
             int64_t n, int64_t len, std::vector<double>& row, double* dst, int64_t dst_stride) {
  w.load(e, r, row);
  const double b = bias.present() ? at(bias, e, r) : 0.0;
  for (int64_t p = 0; p < n; ++p) {
    double acc = 0.0;
    for (int64_t c = 0; c < len; ++c) acc += row[c] * in[p * len + c];
    dst[p * dst_stride] = acc + b;
  }
}

// How the intermediate is rounded before GEMM2.
struct Intermediate {
  bool round_to_bf16 = false;
  ActivationSpec requantize;  // scale kNone: not requantized
};

// (token, slot) pairs grouped by the expert that computes them: [expert] -> pairs.
using Pairs = std::vector<std::pair<int64_t, int>>;
using Groups = std::vector<Pairs>;

// Rows x[t] (times `scale[t]`) of the pairs of one group, as doubles [n, H].
template <typename RowScale>
std::vector<double> gather_rows(const TensorView& x, const Pairs& g, RowScale scale) {
  const int64_t H = x.size(1);
  std::vector<double> rows(g.size() * H);
  for (size_t p = 0; p < g.size(); ++p) {
    const double s = scale(g[p].first, g[p].second);
    for (int64_t c = 0; c < H; ++c) rows[p * H + c] = at(x, g[p].first, c) * s;
  }
  return rows;
}

// The experts' MLP over the pairs of every group: out[e] [n_e, H] = W2[e] . a2 + b2[e] with
// a2 = act(W13[e] . x + b13[e]) for the rows x = rows_of(groups[e]) [n_e, H]; group e is the
// weights' slot w.index(e). Two passes, because a2 is requantized over the rows of all groups at
// once: a per-tensor intermediate scale covers every row of the call (intermediate_spec).
template <typename RowsOf>
std::vector<std::vector<double>> run_experts(const ExpertWeights& w, const Activation& act,
                                             const Intermediate& mid, const Groups& groups,
                                             RowsOf rows_of) {
  const int64_t E = static_cast<int64_t>(groups.size()), H = w.hidden(), I = w.intermediate();
  const WeightMatrix w13(w.w13, w.s13, w.quant), w2(w.w2, w.s2, w.quant);
  std::vector<double> row(std::max(H, I));
  std::vector<std::vector<double>> h(E);  // [n_e, I]
  int64_t pairs = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = static_cast<int64_t>(groups[e].size());
    if (n == 0) continue;
    const std::vector<double> x = rows_of(groups[e]);
    std::vector<double> gate(n), up(n);
    h[e].resize(n * I);
    for (int64_t j = 0; j < I; ++j) {
      project(w13, w.b13, w.index(e), act.gate_row(j, I), x.data(), n, H, row, gate.data(), 1);
      if (act.gated)
        project(w13, w.b13, w.index(e), act.up_row(j, I), x.data(), n, H, row, up.data(), 1);
      for (int64_t p = 0; p < n; ++p) {
        const double v = apply_activation<double>(act, gate[p], up[p]);
        h[e][p * I + j] =
            mid.round_to_bf16 ? bf16_to_float(float_to_bf16(static_cast<float>(v))) : v;
      }
    }
    pairs += n;
  }
  if (mid.requantize.scale != ScaleKind::kNone) {
    Tensor a2(DType::kF32, {pairs, I});  // every group's rows, in group order
    float* p = a2.data<float>();
    for (const auto& he : h)
      for (double v : he) *p++ = static_cast<float>(v);
    round_trip(a2, mid.requantize);
    p = a2.data<float>();
    for (auto& he : h)
      for (double& v : he) v = *p++;
  }
  std::vector<std::vector<double>> out(E);  // [n_e, H]
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = static_cast<int64_t>(groups[e].size());
    if (n == 0) continue;
    out[e].resize(n * H);
    for (int64_t i = 0; i < H; ++i)
      project(w2, w.b2, w.index(e), i, h[e].data(), n, I, row, &out[e][i], H);
  }
  return out;
}

// x as the experts of a format with quantized activations see it, [M, H] fp32: w * x (fp32,
// when the weight is applied on the input) quantized as `spec` over all rows, dequantized.
Tensor quantized_input(const ReferenceArgs& a, const ActivationSpec& spec) {
  const int64_t M = a.x.size(0), H = a.x.size(1);
  Tensor v(DType::kF32, {M, H});
  for (int64_t t = 0; t < M; ++t) {
    const float w = a.weight_on_input ? static_cast<float>(at(a.topk_weights, t, 0)) : 1.0f;
    for (int64_t c = 0; c < H; ++c)
      v.data<float>()[t * H + c] = static_cast<float>(at(a.x, t, c)) * w;
  }
  round_trip(v, spec);
  return v;
}

}  // namespace

ActivationSpec intermediate_spec(const QuantScheme& scheme) { return ActivationSpec::of(scheme); }

void reference_moe(const ReferenceArgs& a, const TensorView& y) {
  constexpr const char* kPart = "reference_moe";
  MOEKIT_CHECK(a.x.ndim == 2, kPart, ": x must be [M, H], got ", a.x.str());
  const int64_t E = check_weights(a.weights, a.activation, kPart);
  const int64_t M = a.x.size(0), H = a.weights.hidden();
  MOEKIT_CHECK(a.topk_ids.ndim == 2, kPart, ": topk_ids must be [M, k], got ", a.topk_ids.str());
  const int64_t k = a.topk_ids.size(1);
  check_view(a.x, kPart, "x", {M, H}, true);
  check_view(a.topk_ids, kPart, "topk_ids", {M, k}, false);
  check_view(a.topk_weights, kPart, "topk_weights", {M, k}, true);
  MOEKIT_CHECK(a.topk_weights.dtype == DType::kF32, kPart, ": topk_weights must be fp32, got ",
               a.topk_weights.str());
  // DType has no fp64 yet: fp32 is the only output dtype.
  check_view(y, kPart, "y", {M, H}, true);
  MOEKIT_CHECK(y.dtype == DType::kF32, kPart, ": y must be fp32, got ", y.str());
  MOEKIT_CHECK(k >= 1, kPart, ": top-k must be >= 1, got ", a.topk_ids.str());
  MOEKIT_CHECK(!a.weight_on_input || k == 1, kPart, ": weight_on_input needs top_k 1, got ", k);
  for (const TensorView* in : {&a.x, &a.topk_ids, &a.topk_weights})
    MOEKIT_CHECK(!y.overlaps(*in), kPart, ": y overlaps an input (", in->str(), ")");
  if (a.map) {
    MOEKIT_CHECK(a.map->num_experts() == E, kPart, ": expert map ", a.map->str(),
                 " does not match the weights' ", E, " experts");
    MOEKIT_CHECK(a.rank >= 0 && a.rank < a.map->num_ranks(), kPart, ": rank ", a.rank,
                 " not in [0, ", a.map->num_ranks(), ")");
  }
  const QuantScheme scheme = a.weights.scheme();
  const ActivationSpec spec = quantized_spec(scheme, a.static_act_scale, kPart);
  Groups groups(E);
  for (int64_t t = 0; t < M; ++t)
    for (int s = 0; s < k; ++s) {
      const int32_t e = load_id(a.topk_ids, t, s);
      MOEKIT_CHECK(e >= -1 && e < E, kPart, ": topk_ids[", t, ", ", s, "] = ", e,
                   " is not an expert in [0, ", E, ") or -1");
      const bool served =
          e >= 0 && (!a.map || a.map->local_id(a.rank, e, a.token_key_offset + t) >= 0);
      if (served) groups[e].push_back({t, s});
    }

  // Quantized activations: every row is quantized (the weight on the input included), as a
  // prepare does for its whole batch, before any expert reads it.
  const bool quantized = spec.scale != ScaleKind::kNone;
  const Tensor a1 = quantized ? quantized_input(a, spec) : Tensor();
  const TensorView input = quantized ? a1.view() : a.x;
  const bool scale_rows = a.weight_on_input && !quantized;
  const Intermediate mid{a.round_intermediate_to_bf16 && !quantized, intermediate_spec(scheme)};
  auto weight = [&](int64_t t, int s) { return at(a.topk_weights, t, s); };
  // Weight on input: the expert sees w * x and its output is summed unweighted.
  const auto out = run_experts(a.weights, a.activation, mid, groups, [&](const Pairs& g) {
    return gather_rows(input, g, [&](int64_t t, int s) { return scale_rows ? weight(t, s) : 1.0; });
  });
  std::vector<double> acc(M * H, 0.0);  // [M, H]
  for (int64_t e = 0; e < E; ++e)
    for (size_t p = 0; p < groups[e].size(); ++p) {
      const auto [t, s] = groups[e][p];
      const double w = a.weight_on_input ? 1.0 : weight(t, s);
      for (int64_t c = 0; c < H; ++c) acc[t * H + c] += w * out[e][p * H + c];
    }
  for (int64_t t = 0; t < M; ++t)
    for (int64_t c = 0; c < H; ++c)
      store_from_float(y.data, y.dtype, t * y.stride[0] + c * y.stride[1],
                       static_cast<float>(acc[t * H + c]));
}

namespace {

// An owned, contiguous copy of some experts' slice of a weight or scale tensor, and its view.
struct Owned {
  Tensor storage;
  TensorView view;
};

// Copies the experts `w` selects (w.index(e) for e in [0, num_local)) of a tensor [n, ...] (1 to
// 3 dims). Rows whose last dimension is contiguous are copied as bytes (packed 4-bit codes
// included: their rows are padded to whole bytes, as validate_weights requires); other float
// rows element by element.
Owned gather_experts(const TensorView& src, const ExpertWeights& w) {
  if (!src.present()) return {};
  const int64_t n = w.num_local(), last = src.ndim > 1 ? src.size(src.ndim - 1) : 1;
  const int64_t rows = src.ndim > 2 ? src.size(1) : 1;
  const int64_t padded = is_packed(src.dtype) ? (last + 1) / 2 * 2 : last;
  Owned o;
  o.storage = src.ndim == 1   ? Tensor(src.dtype, {n})
              : src.ndim == 2 ? Tensor(src.dtype, {n, padded})
                              : Tensor(src.dtype, {n, rows, padded});
  o.view = o.storage.view();
  if (src.ndim > 1) o.view.shape[src.ndim - 1] = last;
  const int64_t row_bytes = storage_bytes(src.dtype, last),
                dst_row = storage_bytes(src.dtype, padded);
  const bool contiguous = src.ndim == 1 || src.stride[src.ndim - 1] == 1;
  const auto* in = static_cast<const char*>(src.data);
  auto* out = o.storage.data<char>();
  for (int64_t e = 0; e < n; ++e)
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t from = w.index(e) * src.stride[0] + (src.ndim > 2 ? i * src.stride[1] : 0);
      char* to = out + (e * rows + i) * dst_row;
      if (contiguous) {
        std::memcpy(to, in + src.byte_offset(from), row_bytes);
        continue;
      }
      const int64_t eb = element_bytes(src.dtype);
      for (int64_t j = 0; j < last; ++j)
        std::memcpy(to + j * eb, in + (from + j * src.stride[src.ndim - 1]) * eb, eb);
    }
  return o;
}

bool same_activation(const Activation& a, const Activation& b) {
  return a.fn == b.fn && a.gated == b.gated && (!a.gated || a.layout == b.layout) &&
         a.alpha == b.alpha && a.limit == b.limit;
}

class ReferenceExperts final : public Experts {
 public:
  ReferenceExperts(const ExpertWeights& w, const Activation& act, const TensorView& static_scale)
      : act_(act) {
    constexpr const char* kPart = "reference experts";
    check_weights(w, act, kPart);
    const QuantScheme scheme = w.scheme();
    spec_ = quantized_spec(scheme, static_scale, kPart);
    if (spec_.static_scale.present()) {
      static_scale_ = Tensor(DType::kF32, {1});
      static_scale_.data<float>()[0] = spec_.static_scale.ptr<float>()[0];
      spec_.static_scale = static_scale_.view();
    }
    if (spec_.scale == ScaleKind::kNone) spec_.dtype = DType::kF32;  // float: read exactly
    mid_.requantize = intermediate_spec(scheme);
    // Own copies of this rank's experts: the caller's weights need not outlive us.
    const std::vector<const TensorView*> src = weight_tensors(w);
    std::vector<TensorView*> dst = {&weights_.w13,        &weights_.w2,        &weights_.b13,
                                    &weights_.b2,         &weights_.s13.scale, &weights_.s13.zero,
                                    &weights_.s13.global, &weights_.s2.scale,  &weights_.s2.zero,
                                    &weights_.s2.global};
    for (size_t i = 0; i < src.size(); ++i) {
      owned_.push_back(gather_experts(*src[i], w));
      *dst[i] = owned_.back().view;
    }
    weights_.quant = w.quant;
    info_ = ExpertsInfo::of(weights_, act);
  }

  std::string_view name() const override { return "reference"; }
  ActivationFormat activation_format() const override { return ActivationFormat::kStandard; }
  ActivationSpec activation_spec() const override { return spec_; }
  TopKWeightApplied weight_application() const override { return TopKWeightApplied::kNone; }
  const ExpertsInfo& info() const override { return info_; }

  std::optional<std::string> can_implement(const MoEProblem& p) const override {
    if (p.num_local_experts != info_.num_local_experts || p.hidden != info_.hidden ||
        p.intermediate != info_.intermediate)
      return detail::concat("problem E_local=", p.num_local_experts, " H=", p.hidden,
                            " I=", p.intermediate,
                            " differs from the weights' E_local=", info_.num_local_experts,
                            " H=", info_.hidden, " I=", info_.intermediate);
    if (!same_activation(p.activation, act_))
      return "problem activation " + p.activation.str() + " differs from the experts' " +
             act_.str();
    if (p.top_k < 1) return detail::concat("top_k ", p.top_k, " < 1");
    return std::nullopt;
  }

  size_t workspace_size(const MoEProblem&) const override { return 0; }

  void apply(const DispatchedBatch& b, const TensorView& out, Workspace&,
             const ExecContext&) const override {
    constexpr const char* kPart = "reference experts";
    MOEKIT_CHECK(b.format == ActivationFormat::kStandard, kPart, ": expected standard format, got ",
                 moekit::name(b.format));
    MOEKIT_CHECK(b.a1.ndim == 2 && b.topk_ids.ndim == 2, kPart,
                 ": a1 must be [M, H] and "
                 "topk_ids [M, k], got ",
                 b.a1.str(), " and ", b.topk_ids.str());
    const int64_t M = b.a1.size(0), H = info_.hidden, k = b.topk_ids.size(1);
    const int64_t E = info_.num_local_experts;
    check_shape(b.a1, {M, H}, "a1");
    MOEKIT_CHECK(
        b.a1.dtype == spec_.dtype || (spec_.scale == ScaleKind::kNone && is_float(b.a1.dtype)),
        kPart, ": a1 must be ", moekit::name(spec_.dtype), ", got ", b.a1.str());
    MOEKIT_CHECK(b.a1.device.type == DeviceType::kCPU && (b.a1.data || M == 0), kPart,
                 ": a1 must be host data, got ", b.a1.str());
    check_scale(b, M);
    check_view(b.topk_ids, kPart, "topk_ids", {M, k}, false);
    check_view(out, kPart, "out", {M, k, H}, true);
    MOEKIT_CHECK(out.dtype == DType::kF32, kPart, ": out must be fp32, got ", out.str());
    // Every id is checked before anything is written.
    Groups groups(E);
    for (int64_t t = 0; t < M; ++t)
      for (int s = 0; s < k; ++s) {
        const int32_t e = load_id(b.topk_ids, t, s);
        MOEKIT_CHECK(e >= -1 && e < E, kPart, ": local expert id ", e, " at [", t, ", ", s,
                     "] is outside [-1, ", E, ")");
        if (e >= 0) groups[e].push_back({t, s});
      }
    auto store_row = [&](int64_t t, int s, const double* v) {
      for (int64_t c = 0; c < H; ++c)
        out.ptr<float>()[t * out.stride[0] + s * out.stride[1] + c * out.stride[2]] =
            v ? static_cast<float>(v[c]) : 0.0f;
    };
    for (int64_t t = 0; t < M; ++t)
      for (int s = 0; s < k; ++s)
        if (load_id(b.topk_ids, t, s) < 0) store_row(t, s, nullptr);  // contract 1: exact zero
    const Tensor a1 = dequantized(b, groups);
    const auto y = run_experts(weights_, act_, mid_, groups, [&](const Pairs& g) {
      return gather_rows(a1, g, [](int64_t, int) { return 1.0; });
    });
    for (int64_t e = 0; e < E; ++e)
      for (size_t p = 0; p < groups[e].size(); ++p)
        store_row(groups[e][p].first, groups[e][p].second, &y[e][p * H]);
  }

 private:
  // Contract 4: a quantized a1 comes with the scale kind (and group) the spec asks for.
  void check_scale(const DispatchedBatch& b, int64_t M) const {
    constexpr const char* kPart = "reference experts";
    const ActivationScale& s = b.a1_scale;
    MOEKIT_CHECK(s.kind == spec_.scale, kPart, ": a1 scale is ", moekit::name(s.kind),
                 " but the experts want a ", moekit::name(spec_.scale), " scale for ",
                 moekit::name(spec_.dtype), " activations");
    if (s.kind == ScaleKind::kNone) return;
    MOEKIT_CHECK(s.kind != ScaleKind::kBlock || s.group == spec_.group, kPart,
                 ": a1 scale groups of ", s.group, " elements, want ", spec_.group);
    MOEKIT_CHECK(
        s.scale.present() && s.scale.device.type == DeviceType::kCPU && s.scale.data != nullptr &&
            s.scale.size(0) == (s.kind == ScaleKind::kTensor ? 1 : M),
        kPart, ": a1 scale must be a host tensor of ", s.kind == ScaleKind::kTensor ? 1 : M,
        " rows, got ", s.scale.present() ? s.scale.str() : std::string("none"));
  }

  // a1 as fp32 [M, H]: float a1 converted, quantized a1 dequantized row by row -- only the rows
  // some expert reads (rows past a batched expert's count are not data).
  Tensor dequantized(const DispatchedBatch& b, const Groups& groups) const {
    const int64_t M = b.a1.size(0), H = b.a1.size(1);
    Tensor a1(DType::kF32, {M, H});
    std::vector<bool> used(M, false);
    for (const auto& g : groups)
      for (const auto& [t, s] : g) used[t] = true;
    const ActivationScale& s = b.a1_scale;
    for (int64_t t = 0; t < M; ++t) {
      if (!used[t]) continue;
      const TensorView row = a1.view().slice0(t, t + 1);
      if (s.kind == ScaleKind::kNone) {
        for (int64_t c = 0; c < H; ++c) row.ptr<float>()[c] = static_cast<float>(at(b.a1, t, c));
        continue;
      }
      const TensorView scale = s.kind == ScaleKind::kTensor ? s.scale : s.scale.slice0(t, t + 1);
      dequantize_activations(b.a1.slice0(t, t + 1), {s.kind, s.group, scale}, row);
    }
    return a1;
  }

  Activation act_;
  ActivationSpec spec_;
  Intermediate mid_;
  Tensor static_scale_;
  std::vector<Owned> owned_;
  ExpertWeights weights_;
  ExpertsInfo info_;
};

}  // namespace

std::shared_ptr<Experts> make_reference_experts(const ExpertWeights& weights,
                                                const Activation& act,
                                                const TensorView& static_act_scale) {
  return std::make_shared<ReferenceExperts>(weights, act, static_act_scale);
}

}  // namespace moekit
