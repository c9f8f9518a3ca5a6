#include "modular/dispatch_util.h"

#include <cmath>
#include <vector>

#include "moekit/quant/quantize.h"

namespace moekit::detail {

void convert_activations(const TensorView& x, const TensorView& topk_weights, bool weight_on_input,
                         const TensorView& out) {
  const int64_t M = x.size(0), H = x.size(1);
  std::vector<float> row(H);
  for (int64_t t = 0; t < M; ++t) {
    const float scale = weight_on_input ? topk_weights.row<float>(t)[0] : 1.0f;
    for (int64_t h = 0; h < H; ++h)
      row[h] = load_as_float(x.data, x.dtype, t * x.stride[0] + h) * scale;
    for (int64_t h = 0; h < H; ++h)
      store_from_float(out.data, out.dtype, t * out.stride[0] + h, row[h]);
  }
}

std::optional<std::string> expert_count_mismatch(const MoEProblem& p, const ExpertMap& map) {
  if (p.num_experts == map.num_experts()) return std::nullopt;
  return "problem has E=" + std::to_string(p.num_experts) + " but the expert map has " +
         std::to_string(map.num_experts());
}

std::string describe(const ActivationSpec& s) {
  std::string d(name(s.dtype));
  if (s.scale == ScaleKind::kNone) return d;
  d += " per-" + std::string(name(s.scale));
  if (s.scale == ScaleKind::kBlock)
    d +=
        " (group " + std::to_string(s.group) + ", " + std::string(name(s.scale_dtype)) + " scales)";
  if (s.static_scale.present()) d += " (static)";
  return d;
}

std::optional<std::string> host_dispatch_refusal(const ActivationSpec& s) {
  const std::string what = describe(s) + " activations";
  if (traits(s.dtype).is_float) {
    if (s.scale == ScaleKind::kNone) return std::nullopt;
    return what + ": float activations take no scale";
  }
  if (s.dtype != DType::kF8E4M3 && s.dtype != DType::kI8)
    return what + ": activation codes must be fp8_e4m3 or int8 (the formats' activation dtypes)";
  if (s.scale == ScaleKind::kNone)
    return what + ": quantized activations need a per-tensor, per-token or per-block scale";
  if (s.scale == ScaleKind::kBlock && s.group < 1)
    return what + ": per-block scales need a group of at least 1 element";
  const bool ue8m0_ok = s.scale == ScaleKind::kBlock;
  if (s.scale_dtype != DType::kF32 && !(ue8m0_ok && s.scale_dtype == DType::kUE8M0))
    return what + ": per-" + std::string(name(s.scale)) + " scales must be fp32" +
           (ue8m0_ok ? " or ue8m0" : "");
  if (!s.static_scale.present()) return std::nullopt;
  if (s.scale != ScaleKind::kTensor) return what + ": a static scale is per-tensor only";
  const TensorView& st = s.static_scale;
  if (st.numel() != 1 || st.dtype != DType::kF32 || st.data == nullptr)
    return what + ": the static scale must be a [1] fp32 tensor, got " + st.str();
  if (st.device.type != DeviceType::kCPU)
    return what + ": the static scale must be in host memory for a host prepare, got " + st.str();
  const float v = st.ptr<float>()[0];
  if (!(v > 0.0f && std::isfinite(v)))
    return what + ": the static scale must be positive and finite, got " + std::to_string(v);
  return std::nullopt;
}

RowBytes row_bytes(const ActivationSpec& s, int64_t hidden) {
  RowBytes b;
  b.codes = storage_bytes(s.dtype, hidden);
  if (s.scale == ScaleKind::kToken) b.scale = 4;
  if (s.scale == ScaleKind::kBlock)
    b.scale = storage_bytes(s.scale_dtype, (hidden + s.group - 1) / s.group);
  return b;
}

ActivationRows take_rows(const ActivationSpec& spec, int64_t rows, int64_t hidden,
                         const TensorView& tensor_scale, Workspace& ws) {
  ActivationRows r;
  r.bytes = row_bytes(spec, hidden);
  r.a1 = ws.take(spec.dtype, {rows, hidden});
  r.scale.kind = spec.scale;
  switch (spec.scale) {
    case ScaleKind::kNone:
      break;
    case ScaleKind::kTensor:
      r.scale.scale = tensor_scale;
      break;
    case ScaleKind::kToken:
      r.scale.scale = ws.take(DType::kF32, {rows});
      break;
    case ScaleKind::kBlock:
      r.scale.group = spec.group;
      r.scale.scale = ws.take(spec.scale_dtype, {rows, (hidden + spec.group - 1) / spec.group});
      break;
  }
  return r;
}

ActivationRows prepare_activations(const PrepareRequest& req, Workspace& ws,
                                   const AmaxAgreement& agree) {
  const ActivationSpec& spec = req.spec;
  const int64_t M = req.x.size(0), H = req.x.size(1);
  if (spec.scale == ScaleKind::kNone) {
    ActivationRows r;
    r.bytes = row_bytes(spec, H);
    if (!req.weight_on_input && req.x.dtype == spec.dtype && req.x.is_contiguous()) {
      r.a1 = req.x;
    } else {
      r.a1 = ws.take(spec.dtype, {M, H});
      convert_activations(req.x, req.topk_weights, req.weight_on_input, r.a1);
    }
    return r;
  }
  // Weight on the input: quantize w * x (fp32), not x.
  TensorView src = req.x;
  if (req.weight_on_input) {
    src = ws.take(DType::kF32, {M, H});
    convert_activations(req.x, req.topk_weights, true, src);
  }
  ActivationSpec s = spec;
  TensorView tensor_scale;  // [1]: what the experts get (a copy; never the caller's static one)
  if (spec.scale == ScaleKind::kTensor) {
    tensor_scale = ws.take(DType::kF32, {1});
    if (!spec.static_scale.present()) {
      // Dynamic: the scale of the (agreed) amax, applied as a static scale.
      float amax = M > 0 ? activation_amax(src) : 0.0f;
      if (agree) amax = agree(amax);
      s.static_scale = ws.take(DType::kF32, {1});
      s.static_scale.ptr<float>()[0] = tensor_scale_of_amax(amax, spec.dtype);
    }
    // A rank without rows still holds the scalar: receivers use their own copy.
    tensor_scale.ptr<float>()[0] = s.static_scale.ptr<float>()[0];
  }
  ActivationRows r = take_rows(spec, M, H, tensor_scale, ws);
  if (M > 0) quantize_activations(src, s, r.a1, r.scale.scale);
  return r;
}

ActivationSpec format_spec(const MoEProblem& p) { return ActivationSpec::of(p.quant); }

int64_t max_row_bytes(const MoEProblem& p) {
  return p.hidden * 4 + row_bytes(format_spec(p), p.hidden).scale;
}

size_t rows_workspace(const MoEProblem& p, int64_t rows) {
  return Workspace::aligned(rows * p.hidden * 4) +
         Workspace::aligned(rows * row_bytes(format_spec(p), p.hidden).scale);
}

size_t prepare_activations_workspace(const MoEProblem& p, int64_t rows) {
  // fp32 copy (conversion or weight on input) + codes and scales + two [1] tensor scales.
  return Workspace::aligned(rows * p.hidden * 4) + rows_workspace(p, rows) +
         2 * Workspace::aligned(4);
}

}  // namespace moekit::detail
