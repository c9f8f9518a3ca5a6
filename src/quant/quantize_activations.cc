// Activation quantizers (quant/quantize.h): x [M, H] float -> q [M, H] codes with a typed scale
// (contract 4), and back. They run on the host prepare path of every forward, so each row is
// read once for its statistics and once to encode it, with one loop per code type.
#include <cmath>
#include <vector>

#include "moekit/core/error.h"
#include "moekit/quant/quantize.h"
#include "quant/quantize_codes.h"

namespace moekit {

namespace {

using quant::Code;
using quant::Stats;

// The scale shape of a kind for rows x hidden (kBlock: groups of `group` along hidden).
std::vector<int64_t> scale_shape(ScaleKind kind, int64_t group, int64_t rows, int64_t hidden,
                                 const char* what) {
  switch (kind) {
    case ScaleKind::kNone:
      return {};
    case ScaleKind::kTensor:
      return {1};
    case ScaleKind::kToken:
      return {rows};
    case ScaleKind::kBlock:
      MOEKIT_CHECK(group > 0, what, ": block scales need a group > 0, got ", group);
      return {rows, (hidden + group - 1) / group};
  }
  MOEKIT_FAIL(what, ": scale kind ", int(kind), " out of range");
}

// Elements of a row that share one scale: the block group, or the whole row.
int64_t scale_group(ScaleKind kind, int64_t group, int64_t hidden) {
  return kind == ScaleKind::kBlock ? group : std::max<int64_t>(hidden, 1);
}

// Element types a scale of `kind` may have: fp32, and ue8m0 for block scales.
void check_scale_dtype(ScaleKind kind, DType t, const char* what) {
  MOEKIT_CHECK(t == DType::kF32 || (t == DType::kUE8M0 && kind == ScaleKind::kBlock), what, ": ",
               name(kind), " scales are ", kind == ScaleKind::kBlock ? "fp32 or ue8m0" : "fp32",
               ", got ", name(t));
}

// The code an activation of dtype t quantizes to: signed (activations have no zero point), one
// byte per element (packed activations have no typed scale kind).
const Code& activation_code(DType t, const char* what) {
  const Code& c = quant::code_of(t, what);
  MOEKIT_CHECK(!is_packed(t) && !c.is_unsigned, what, ": ", name(t),
               " activations are not supported (fp8 e4m3/e5m2 or int8)");
  return c;
}

// The validated static scale of `spec`, or 0 when the spec is dynamic.
float static_scale_of(const ActivationSpec& spec) {
  const TensorView& s = spec.static_scale;
  if (!s.present()) return 0.0f;
  MOEKIT_CHECK(spec.scale == ScaleKind::kTensor, "quantize_activations: a static scale needs ",
               "per-tensor scales, not ", name(spec.scale));
  quant::check_shape(s, {1}, "quantize_activations: static_scale");
  check_dtype(s, DType::kF32, "quantize_activations: static_scale");
  MOEKIT_CHECK(s.device.type == DeviceType::kCPU,
               "quantize_activations: static_scale must be a host tensor, got ", s.str());
  check_data(s, "quantize_activations: static_scale");
  const float v = *s.ptr<float>();
  MOEKIT_CHECK(std::isfinite(v) && v > 0.0f,
               "quantize_activations: static scale must be positive and finite, got ", v);
  return v;
}

// Row r of a 2-D view whose last dimension is contiguous.
char* row_of(const TensorView& t, int64_t r) {
  return quant::element_ptr(t, r * t.stride[0]);
}

}  // namespace

std::vector<int64_t> activation_scale_shape(const ActivationSpec& spec, int64_t rows,
                                            int64_t hidden) {
  return scale_shape(spec.scale, spec.group, rows, hidden, "activation_scale_shape");
}

float tensor_scale_of_amax(float amax, DType code) {
  const Code& c = quant::code_of(code, "tensor_scale_of_amax");
  MOEKIT_CHECK(!(amax < 0.0f), "tensor_scale_of_amax: amax ", amax, " is negative");
  const float s = amax / c.max;
  return s != 0.0f ? s : 1.0f;
}

float activation_amax(const TensorView& x) {
  constexpr const char* kWhat = "activation_amax: x";
  quant::check_host_rows(x, 2, kWhat);
  MOEKIT_CHECK(traits(x.dtype).is_float, kWhat, ": expected a float dtype, got ", x.str());
  const int64_t M = x.size(0), H = x.size(1);
  std::vector<float> buffer;
  Stats st;
  for (int64_t m = 0; m < M; ++m)
    st.add(quant::load_float_row(row_of(x, m), x.dtype, H, buffer), H);
  return st.amax;
}

void quantize_activations(const TensorView& x, const ActivationSpec& spec, const TensorView& q,
                          const TensorView& scale) {
  // ---- validate everything before writing anything ----
  quant::check_host_rows(x, 2, "quantize_activations: x");
  MOEKIT_CHECK(traits(x.dtype).is_float, "quantize_activations: x must be fp32/fp16/bf16, got ",
               x.str());
  const int64_t M = x.size(0), H = x.size(1);
  quant::check_host_rows(q, 2, "quantize_activations: q");
  quant::check_shape(q, {M, H}, "quantize_activations: q");
  check_dtype(q, spec.dtype, "quantize_activations: q (the spec's dtype)");
  MOEKIT_CHECK(!q.overlaps(x), "quantize_activations: q overlaps x");
  const bool quantized = spec.scale != ScaleKind::kNone;
  if (!quantized) {
    MOEKIT_CHECK(traits(spec.dtype).is_float, "quantize_activations: ", name(spec.dtype),
                 " activations need a scale kind (the spec has none)");
    MOEKIT_CHECK(!spec.static_scale.present(),
                 "quantize_activations: a static scale needs per-tensor scales, not none");
    std::vector<float> buffer;
    for (int64_t m = 0; m < M; ++m)
      quant::store_float_row(quant::load_float_row(row_of(x, m), x.dtype, H, buffer), H, q.dtype,
                             row_of(q, m));
    return;
  }
  const Code& code = activation_code(spec.dtype, "quantize_activations: spec.dtype");
  check_scale_dtype(spec.scale, spec.scale_dtype, "quantize_activations: spec.scale_dtype");
  const std::vector<int64_t> shape =
      scale_shape(spec.scale, spec.group, M, H, "quantize_activations");
  quant::check_shape(scale, shape, "quantize_activations: scale");
  quant::check_host_rows(scale, int(shape.size()), "quantize_activations: scale");
  check_dtype(scale, spec.scale_dtype, "quantize_activations: scale (the spec's scale_dtype)");
  MOEKIT_CHECK(!scale.overlaps(x) && !scale.overlaps(q),
               "quantize_activations: scale overlaps x or q");
  const float static_scale = static_scale_of(spec);

  // ---- per-tensor: one scale, known before the rows ----
  float fixed = 0.0f;  // the per-tensor scale (never 0); 0: per-token or per-block scales
  if (spec.scale == ScaleKind::kTensor)
    fixed = quant::store_scale(
        scale.data, DType::kF32, 0,
        static_scale > 0.0f ? static_scale : tensor_scale_of_amax(activation_amax(x), spec.dtype));

  // ---- rows: statistics of each scale's group, then its codes ----
  const int64_t g = scale_group(spec.scale, spec.group, H);
  std::vector<float> buffer;
  for (int64_t m = 0; m < M; ++m) {
    const float* row = quant::load_float_row(row_of(x, m), x.dtype, H, buffer);
    char* out = row_of(q, m);
    for (int64_t j = 0, k0 = 0; k0 < H; ++j, k0 += g) {
      const int64_t n = std::min(g, H - k0);
      float s = fixed;
      if (s == 0.0f) {
        Stats st;
        st.add(row + k0, n);
        s = quant::store_scale(scale.data, scale.dtype, m * scale.stride[0] + j,
                               quant::symmetric_scale(st, code));
      }
      quant::encode_span(code, row + k0, n, s, 0, out, k0);
    }
  }
}

void dequantize_activations(const TensorView& q, const ActivationScale& scale,
                            const TensorView& out) {
  quant::check_host_rows(q, 2, "dequantize_activations: q");
  const int64_t M = q.size(0), H = q.size(1);
  quant::check_host_rows(out, 2, "dequantize_activations: out");
  quant::check_shape(out, {M, H}, "dequantize_activations: out");
  MOEKIT_CHECK(traits(out.dtype).is_float, "dequantize_activations: out must be fp32/fp16/bf16, ",
               "got ", out.str());
  MOEKIT_CHECK(!out.overlaps(q), "dequantize_activations: out overlaps q");
  std::vector<float> buffer(size_t(std::max<int64_t>(H, 0)));
  if (scale.kind == ScaleKind::kNone) {
    MOEKIT_CHECK(traits(q.dtype).is_float, "dequantize_activations: ", name(q.dtype),
                 " activations need a scale (kind none given)");
    for (int64_t m = 0; m < M; ++m)
      quant::store_float_row(quant::load_float_row(row_of(q, m), q.dtype, H, buffer), H, out.dtype,
                             row_of(out, m));
    return;
  }
  activation_code(q.dtype, "dequantize_activations: q");
  const TensorView& s = scale.scale;
  const std::vector<int64_t> shape =
      scale_shape(scale.kind, scale.group, M, H, "dequantize_activations");
  quant::check_shape(s, shape, "dequantize_activations: scale");
  quant::check_host_rows(s, int(shape.size()), "dequantize_activations: scale");
  check_scale_dtype(scale.kind, s.dtype, "dequantize_activations: scale");
  MOEKIT_CHECK(!out.overlaps(s), "dequantize_activations: out overlaps the scale");

  const int64_t g = scale_group(scale.kind, scale.group, H);
  for (int64_t m = 0; m < M; ++m) {
    quant::decode_span(q.dtype, row_of(q, m), 0, H, buffer.data());
    for (int64_t j = 0, k0 = 0; k0 < H; ++j, k0 += g) {
      const int64_t at = scale.kind == ScaleKind::kTensor ? 0 : m * s.stride[0] + j;
      const float sc = load_as_float(s.data, s.dtype, at);
      for (int64_t k = k0; k < std::min(H, k0 + g); ++k) buffer[k] *= sc;
    }
    quant::store_float_row(buffer.data(), H, out.dtype, row_of(out, m));
  }
}

}  // namespace moekit
