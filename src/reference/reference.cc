// The oracle of reference.h: plain loops, every element read through load_as_float and
// accumulated in double. It shares no code with the modular kernel (only the scalar activation
// formula of activation.h, which every backend evaluates) and handles any strides.
//
// The one concession to speed is the loop order: expert-major, so each weight row is
// dequantized once per call and reused by every token routed to that expert. A token's result
// does not depend on which other tokens share its expert (each dot product runs over the same
// elements in the same order), so reference experts are batch-invariant and bit-reproducible.
#include "moekit/reference.h"

#include <algorithm>
#include <cstring>
#include <vector>

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

// The weights agree with each other and with `act`; returns E (experts the weights hold).
int64_t check_weights(const ExpertWeights& w, const Activation& act, const char* part) {
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

// dst[p * dst_stride] = W[e, r, :] . in[p, :] + bias[e, r] for p in [0, n); in: [n, len].
void project(const TensorView& w, const TensorView& bias, int64_t e, int64_t r, const double* in,
             int64_t n, int64_t len, std::vector<double>& row, double* dst, int64_t dst_stride) {
  for (int64_t c = 0; c < len; ++c) row[c] = at(w, e, r, c);
  const double b = bias.present() ? at(bias, e, r) : 0.0;
  for (int64_t p = 0; p < n; ++p) {
    double acc = 0.0;
    for (int64_t c = 0; c < len; ++c) acc += row[c] * in[p * len + c];
    dst[p * dst_stride] = acc + b;
  }
}

// One expert's MLP over n token rows: out[p] = W2[e] . act(W13[e] . x[p] + b13[e]) + b2[e].
// x: [n, H], out: [n, H]; `e` indexes dim 0 of the weight tensors.
void expert_mlp(const ExpertWeights& w, int64_t e, const Activation& act, bool round_to_bf16,
                const std::vector<double>& x, int64_t n, std::vector<double>& out) {
  const int64_t H = w.hidden(), I = w.intermediate();
  std::vector<double> row(std::max(H, I)), gate(n), up(n), h(n * I);  // h: [n, I]
  for (int64_t j = 0; j < I; ++j) {
    project(w.w13, w.b13, e, act.gate_row(j, I), x.data(), n, H, row, gate.data(), 1);
    if (act.gated) project(w.w13, w.b13, e, act.up_row(j, I), x.data(), n, H, row, up.data(), 1);
    for (int64_t p = 0; p < n; ++p) {
      const double v = apply_activation<double>(act, gate[p], up[p]);
      h[p * I + j] = round_to_bf16 ? bf16_to_float(float_to_bf16(static_cast<float>(v))) : v;
    }
  }
  out.assign(n * H, 0.0);
  for (int64_t i = 0; i < H; ++i) project(w.w2, w.b2, e, i, h.data(), n, I, row, &out[i], H);
}

// (token, slot) pairs grouped by the expert that computes them: [expert] -> pairs.
using Groups = std::vector<std::vector<std::pair<int64_t, int>>>;

// Rows x[t] (times `scale[t]`) of the pairs of one group, as doubles [n, H].
template <typename RowScale>
std::vector<double> gather_rows(const TensorView& x, const std::vector<std::pair<int64_t, int>>& g,
                                RowScale scale) {
  const int64_t H = x.size(1);
  std::vector<double> rows(g.size() * H);
  for (size_t p = 0; p < g.size(); ++p) {
    const double s = scale(g[p].first, g[p].second);
    for (int64_t c = 0; c < H; ++c) rows[p * H + c] = at(x, g[p].first, c) * s;
  }
  return rows;
}

}  // namespace

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

  auto weight = [&](int64_t t, int s) { return at(a.topk_weights, t, s); };
  std::vector<double> acc(M * H, 0.0), out;  // [M, H]
  for (int64_t e = 0; e < E; ++e) {
    const auto& g = groups[e];
    if (g.empty()) continue;
    // Weight on input: the expert sees w * x and its output is summed unweighted.
    const std::vector<double> rows = gather_rows(
        a.x, g, [&](int64_t t, int s) { return a.weight_on_input ? weight(t, s) : 1.0; });
    expert_mlp(a.weights, a.weights.index(e), a.activation, a.round_intermediate_to_bf16, rows,
               static_cast<int64_t>(g.size()), out);
    for (size_t p = 0; p < g.size(); ++p) {
      const auto [t, s] = g[p];
      const double w = a.weight_on_input ? 1.0 : weight(t, s);
      for (int64_t c = 0; c < H; ++c) acc[t * H + c] += w * out[p * H + c];
    }
  }
  for (int64_t t = 0; t < M; ++t)
    for (int64_t c = 0; c < H; ++c)
      store_from_float(y.data, y.dtype, t * y.stride[0] + c * y.stride[1],
                       static_cast<float>(acc[t * H + c]));
}

namespace {

// Copies the experts `w` selects (w.index(e) for e in [0, num_local)) of a 2-D or 3-D weight
// tensor into an owned contiguous tensor of the same dtype.
Tensor gather_experts(const TensorView& src, const ExpertWeights& w) {
  if (!src.present()) return Tensor();
  const int64_t n = w.num_local(), d1 = src.size(1), d2 = src.ndim > 2 ? src.size(2) : 1;
  Tensor dst = src.ndim > 2 ? Tensor(src.dtype, {n, d1, d2}) : Tensor(src.dtype, {n, d1});
  const int64_t eb = element_bytes(src.dtype);
  const auto* in = static_cast<const char*>(src.data);
  auto* out = dst.data<char>();
  for (int64_t e = 0; e < n; ++e)
    for (int64_t i = 0; i < d1; ++i)
      for (int64_t j = 0; j < d2; ++j) {
        const int64_t from =
            w.index(e) * src.stride[0] + i * src.stride[1] + (src.ndim > 2 ? j * src.stride[2] : 0);
        std::memcpy(out + ((e * d1 + i) * d2 + j) * eb, in + from * eb, eb);
      }
  return dst;
}

bool same_activation(const Activation& a, const Activation& b) {
  return a.fn == b.fn && a.gated == b.gated && (!a.gated || a.layout == b.layout) &&
         a.alpha == b.alpha && a.limit == b.limit;
}

class ReferenceExperts final : public Experts {
 public:
  ReferenceExperts(const ExpertWeights& w, const Activation& act) : act_(act) {
    check_weights(w, act, "reference experts");
    // Own copies of this rank's experts: the caller's weights need not outlive us.
    w13_ = gather_experts(w.w13, w);
    w2_ = gather_experts(w.w2, w);
    b13_ = gather_experts(w.b13, w);
    b2_ = gather_experts(w.b2, w);
    weights_ = ExpertWeights{w13_.view(), w2_.view(), b13_.view(), b2_.view(), std::nullopt};
    info_ = ExpertsInfo::of(weights_, act);
  }

  std::string_view name() const override { return "reference"; }
  ActivationFormat activation_format() const override { return ActivationFormat::kStandard; }
  ActivationSpec activation_spec() const override { return {DType::kF32, ScaleKind::kNone, 0}; }
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
    check_view(b.a1, kPart, "a1", {M, H}, true);
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
    std::vector<double> y;
    for (int64_t e = 0; e < E; ++e) {
      const auto& g = groups[e];
      if (g.empty()) continue;
      const std::vector<double> rows = gather_rows(b.a1, g, [](int64_t, int) { return 1.0; });
      expert_mlp(weights_, e, act_, false, rows, static_cast<int64_t>(g.size()), y);
      for (size_t p = 0; p < g.size(); ++p) store_row(g[p].first, g[p].second, &y[p * H]);
    }
  }

 private:
  Activation act_;
  Tensor w13_, w2_, b13_, b2_;
  ExpertWeights weights_;
  ExpertsInfo info_;
};

}  // namespace

std::shared_ptr<Experts> make_reference_experts(const ExpertWeights& weights,
                                                const Activation& act) {
  return std::make_shared<ReferenceExperts>(weights, act);
}

}  // namespace moekit
