// Descriptors shared by every part: names, MoEProblem, Workspace, ExpertWeights checks.
#include <sstream>

#include "moekit/modular.h"

namespace moekit {

std::string_view name(ActivationFormat f) {
  return f == ActivationFormat::kStandard ? "standard" : "batched";
}

std::string_view name(TopKWeightApplied w) {
  switch (w) {
    case TopKWeightApplied::kNone: return "none";
    case TopKWeightApplied::kWeighted: return "weighted";
    case TopKWeightApplied::kWeightedAndReduced: return "weighted_and_reduced";
  }
  return "?";
}

std::string MoEProblem::str() const {
  std::ostringstream os;
  os << "E=" << num_experts << " E_local=" << num_local_experts << " H=" << hidden
     << " I=" << intermediate << " k=" << top_k << " tokens=" << tokens
     << " act=" << name(act_dtype) << " w=" << quant.str() << " " << activation.str()
     << (has_bias13 ? " b13" : "") << (has_bias2 ? " b2" : "");
  return os.str();
}

void* Workspace::take_bytes(size_t bytes) {
  const size_t n = aligned(bytes);
  MOEKIT_CHECK(used_ + n <= bytes_, "workspace exhausted: need ", used_ + n, " bytes, have ",
               bytes_, " (workspace_size() under-reported)");
  void* p = base_ + used_;
  used_ += n;
  return p;
}

TensorView Workspace::take(DType dtype, std::initializer_list<int64_t> shape) {
  TensorView v(nullptr, dtype, shape);
  v.data = take_bytes(static_cast<size_t>(v.nbytes()));
  return v;
}

ExpertsInfo ExpertsInfo::of(const ExpertWeights& w, const Activation& act) {
  ExpertsInfo i;
  i.num_local_experts = w.num_local();
  i.hidden = w.hidden();
  i.intermediate = w.intermediate();
  i.weight_dtype = w.w13.dtype;
  i.quant = w.scheme();
  i.activation = act;
  i.has_bias13 = w.b13.present();
  i.has_bias2 = w.b2.present();
  return i;
}

MoEProblem problem_for(const ExpertsInfo& i, int64_t tokens, int top_k, DType act_dtype) {
  MoEProblem p;
  p.num_experts = p.num_local_experts = i.num_local_experts;
  p.hidden = i.hidden;
  p.intermediate = i.intermediate;
  p.top_k = top_k;
  p.tokens = tokens;
  p.act_dtype = act_dtype;
  p.weight_dtype = i.weight_dtype;
  p.quant = i.quant;
  p.activation = i.activation;
  p.has_bias13 = i.has_bias13;
  p.has_bias2 = i.has_bias2;
  return p;
}

ActivationSpec ActivationSpec::of(const QuantScheme& scheme) {
  const FormatTraits& t = scheme.traits();
  ActivationSpec s;
  s.dtype = t.act;
  s.scale = t.act_scale;
  s.group = t.act_group;
  s.scale_dtype = t.act_scale == ScaleKind::kBlock && scheme.ue8m0_scales ? DType::kUE8M0
                                                                         : DType::kF32;
  return s;
}

ExpertWeights ExpertWeights::local_view(const ExpertWeights& global, const ExpertMap& map,
                                        int rank) {
  MOEKIT_CHECK(rank >= 0 && rank < map.num_ranks(), "local_view: rank ", rank, " not in [0, ",
               map.num_ranks(), ")");
  MOEKIT_CHECK(global.w13.ndim == 3 && global.w13.size(0) == map.num_experts(),
               "local_view: weights hold ", global.w13.ndim == 3 ? global.w13.size(0) : -1,
               " experts but the expert map has ", map.num_experts());
  MOEKIT_CHECK(!global.source, "local_view: weights must be global (no source table)");
  ExpertWeights w = global;
  auto ids = map.local_to_global(rank);
  w.source.emplace(ids.begin(), ids.end());
  return w;
}

namespace {
// Reason a weight tensor is unusable, or empty.
std::string check_tensor(const TensorView& t, const std::string& what,
                         const std::vector<int64_t>& shape, DType dtype, bool dtype_must_match) {
  std::ostringstream os;
  bool shape_ok = t.ndim == static_cast<int>(shape.size());
  int d = 0;
  for (int64_t s : shape) shape_ok = shape_ok && t.shape[d++] == s;
  if (!shape_ok) {
    os << what << ": expected shape [";
    d = 0;
    for (int64_t s : shape) os << (d++ ? ", " : "") << s;
    os << "], got " << t.str();
  } else if (!dtype_must_match && !traits(t.dtype).is_float) {
    os << what << ": dtype " << name(t.dtype) << " is not a float type";
  } else if (dtype_must_match && t.dtype != dtype) {
    os << what << ": dtype " << name(t.dtype) << " is not the expected " << name(dtype);
  } else if (t.numel() > 0 && t.data == nullptr) {
    os << what << ": null data pointer";
  } else if (t.stride[t.ndim - 1] != 1) {
    os << what << ": last dimension must be contiguous, got " << t.str();
  } else if (is_packed(t.dtype)) {
    for (int d = 0; d + 1 < t.ndim; ++d)
      if (t.stride[d] % 2)
        os << what << ": packed " << name(t.dtype) << " rows must start on whole bytes (even "
           << "strides), got " << t.str();
  }
  return os.str();
}

// Reason the scales of quantized weight `what` ([n, R, K]) do not match `q`, or empty.
std::string check_scales(const WeightScales& s, const QuantScheme& q, const char* what, int64_t n,
                         int64_t R, int64_t K) {
  const FormatTraits& t = q.traits();
  const std::string w(what);
  const int64_t g = q.group_size(K), per_row = (K + g - 1) / g;
  const int64_t b = t.block, blocks_r = b ? (R + b - 1) / b : 0;
  std::vector<int64_t> shape;
  switch (t.scale_layout) {
    case WeightScaleLayout::kNone: return "";
    case WeightScaleLayout::kTensor: shape = {n}; break;
    case WeightScaleLayout::kChannel: shape = {n, R}; break;
    case WeightScaleLayout::kBlock: shape = {n, blocks_r, per_row}; break;
    case WeightScaleLayout::kGroup: shape = {n, R, per_row}; break;
  }
  // A float scale element of the table accepts any float dtype (checkpoints keep fp16 scales).
  const DType sd = q.scale_dtype();
  const DType want = traits(sd).is_float && traits(s.scale.dtype).is_float ? s.scale.dtype : sd;
  if (!s.scale.present()) return w + " scale: missing (format " + q.str() + ")";
  std::string r = check_tensor(s.scale, w + " scale", shape, want, true);
  if (!r.empty()) return r;
  if (q.zero_point) {
    if (!s.zero.present()) return w + " zero: missing (format " + q.str() + ")";
    r = check_tensor(s.zero, w + " zero", {n, R, per_row}, DType::kU8, true);
    if (!r.empty()) return r;
  } else if (s.zero.present()) {
    return w + " zero: given, but format " + q.str() + " has no zero point";
  }
  if (t.global_scale) {
    if (!s.global.present()) return w + " global: missing (format " + q.str() + ")";
    return check_tensor(s.global, w + " global", {n}, DType::kF32, true);
  }
  if (s.global.present()) return w + " global: given, but format " + q.str() + " has none";
  return "";
}
}  // namespace

std::optional<std::string> validate_weights(const ExpertWeights& w, const Activation& act) {
  if (w.w13.ndim != 3) return "w13: expected [experts, rows, H], got " + w.w13.str();
  if (w.w2.ndim != 3) return "w2: expected [experts, H, I], got " + w.w2.str();
  const int64_t n = w.w13.size(0), H = w.w13.size(2), I = w.w2.size(2);
  if (n < 1 || H < 1 || I < 1) return "weights: empty expert, H or I dimension in " + w.w13.str();
  if (!act.gated && act.fn == ActivationFn::kSwigluOai) return "activation swiglu_oai must be gated";
  if (w.quant) {
    if (auto why = w.quant->validate()) return "format " + w.quant->str() + ": " + *why;
    if (w.quant->is_float()) return "quant: float format " + w.quant->str() + " needs no scheme";
  } else if (!traits(w.w13.dtype).is_float) {
    return "w13: " + std::string(name(w.w13.dtype)) + " weights are not a float type; quantized weights need a format (quant)";
  }
  const QuantScheme q = w.scheme();
  const DType wt = w.quant ? q.weight_dtype() : w.w13.dtype;
  const int64_t rows = act.w13_rows(I);
  for (const std::string& r :
       {check_tensor(w.w13, "w13", {n, rows, H}, wt, true),
        check_tensor(w.w2, "w2", {n, H, I}, wt, true),
        w.b13.present() ? check_tensor(w.b13, "b13", {n, rows}, wt, false) : "",
        w.b2.present() ? check_tensor(w.b2, "b2", {n, H}, wt, false) : "",
        check_scales(w.s13, q, "w13", n, rows, H), check_scales(w.s2, q, "w2", n, H, I)})
    if (!r.empty()) return r;
  for (size_t e = 0; w.source && e < w.source->size(); ++e)
    if ((*w.source)[e] < 0 || (*w.source)[e] >= n)
      return "source[" + std::to_string(e) + "] = " + std::to_string((*w.source)[e]) +
             " is not an expert of the weights (0.." + std::to_string(n - 1) + ")";
  return std::nullopt;
}

// The default of a prepare/finalize that does not quantize (the host ones override it with the
// checks of detail::host_dispatch_refusal): refusing here keeps a scale from being dropped.
std::optional<std::string> PrepareFinalize::can_dispatch(const ActivationSpec& spec) const {
  if (spec.scale != ScaleKind::kNone || !traits(spec.dtype).is_float)
    return "quantized activations (" + std::string(moekit::name(spec.dtype)) +
           " with a typed scale) are not produced by this prepare/finalize (it does not quantize)";
  return std::nullopt;
}

}  // namespace moekit
