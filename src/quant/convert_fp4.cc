// fp4 e2m1 checkpoints: gpt-oss mxfp4 (Hugging Face layout) and NVIDIA ModelOpt nvfp4.
//
// Layout facts relied on (public sources, facts only):
// - gpt-oss, Hugging Face transformers (integrations/mxfp4.py, Mxfp4GptOssExperts):
//   gate_up_proj_blocks uint8 [E, 2I, H/32, 16], gate_up_proj_scales uint8 [E, 2I, H/32],
//   gate_up_proj_bias [E, 2I], down_proj_blocks [E, H, I/32, 16], down_proj_scales [E, H, I/32],
//   down_proj_bias [E, H]. Its dequantizer (convert_moe_packed_tensors) reads the low nibble of a
//   byte as the even element and the high one as the odd element, looks both up in the e2m1
//   table (+0, 0.5, 1, 1.5, 2, 3, 4, 6, then the negatives) and multiplies by 2^(scale - 127).
//   The activation takes gate from the even and up from the odd columns of gate_up
//   (GptOssExperts: gate_up[..., ::2], gate_up[..., 1::2]), i.e. rows 2j and 2j + 1 here.
// - ModelOpt nvfp4 (vLLM's ModelOptNvFp4 create_weights; modelopt's NVFP4QTensor): weight uint8
//   [N, K/2] packing (q[..., 1::2] << 4) | q[..., 0::2], weight_scale fp8 e4m3 [N, K/16],
//   weight_scale_2 fp32 per tensor, input_scale fp32; the weight is e2m1(q) * weight_scale *
//   weight_scale_2. vLLM's fused MoE keeps one weight_scale_2 for w13 and warns "w1_weight_scale_2
//   must match w3_weight_scale_2. Accuracy may be affected." when gate's and up's differ.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <vector>

#include "convert_common.h"
#include "moekit/core/error.h"
#include "moekit/quant/encodings.h"

namespace moekit {

using namespace convert_detail;

namespace {

constexpr int64_t kMxGroup = 32, kMxBlockBytes = 16, kNvGroup = 16;

// A fresh tensor holding a copy of t's bytes under another dtype and shape (same byte count).
Tensor retyped_copy(const TensorView& t, DType dtype, std::initializer_list<int64_t> shape) {
  Tensor out(dtype, shape);
  MOEKIT_CHECK(out.view().nbytes() == t.nbytes(), "retyped_copy: ", t.str(), " does not fill ",
               out.view().str());
  std::memcpy(out.data<void>(), t.data, t.nbytes());
  return out;
}

// ---- nvfp4 -------------------------------------------------------------------------------------

std::string nv_name(int64_t e, int p, const char* t) {
  return tensor_name("nvfp4", e, kProj[p], t);
}

// Validates one linear [n, k] and returns its weight_scale_2.
float check_nv_linear(const NvFp4Linear& l, int64_t e, int p, int64_t n, int64_t k) {
  check_input(l.weight, nv_name(e, p, "weight"), {n, k / 2}, {DType::kU8});
  check_input(l.weight_scale, nv_name(e, p, "weight_scale"), {n, ceil_div(k, kNvGroup)},
              {DType::kF8E4M3});
  const TensorView& g = l.weight_scale_2;
  const std::string what = nv_name(e, p, "weight_scale_2");
  // A scalar arrives with no dimensions (present() is false then) or as [1].
  MOEKIT_CHECK(g.ndim == 0 || (g.ndim == 1 && g.shape[0] == 1), what,
               ": expected a scalar ([] or [1]), got ", g.str());
  MOEKIT_CHECK(g.data != nullptr, what, ": missing");
  MOEKIT_CHECK(g.device.type == DeviceType::kCPU, what, ": must be a host tensor, got ", g.str());
  MOEKIT_CHECK(g.dtype == DType::kF32, what, ": expected dtype fp32, got ", g.str());
  const float v = *static_cast<const float*>(g.data);
  MOEKIT_CHECK(std::isfinite(v) && v > 0, what, " = ", v, " is not a positive finite scale");
  return v;
}

// Appends the linear's e4m3 block scales, each times `factor` and re-rounded to e4m3 when the
// factor is not 1 (a global scale moved from the linear's own to a larger shared one).
void append_scales(const NvFp4Linear& l, double factor, uint8_t*& out) {
  const auto* s = l.weight_scale.ptr<const uint8_t>();
  for (int64_t i = 0; i < l.weight_scale.numel(); ++i)
    *out++ = factor == 1.0
                 ? s[i]
                 : encode(MiniFloat::kE4M3, float(decode(MiniFloat::kE4M3, s[i]) * factor));
}

void append_bytes(const TensorView& t, uint8_t*& out) {
  std::memcpy(out, t.data, t.nbytes());
  out += t.nbytes();
}

}  // namespace

ConvertedExperts convert_gpt_oss_mxfp4(const GptOssMxfp4Layer& layer) {
  const auto gu = extents(layer.gate_up_blocks, 4, "gpt-oss gate_up_proj_blocks");
  const int64_t E = gu[0], rows = gu[1], H = gu[2] * kMxGroup;
  MOEKIT_CHECK(E > 0 && rows > 0 && H > 0, "gpt-oss gate_up_proj_blocks: empty ",
               layer.gate_up_blocks.str());
  MOEKIT_CHECK(rows % 2 == 0, "gpt-oss gate_up_proj_blocks: ", rows,
               " rows are not gate/up pairs (2I)");
  const int64_t I = rows / 2;
  MOEKIT_CHECK(I % kMxGroup == 0, "gpt-oss: I = ", I, " is not a multiple of ", kMxGroup,
               " (down_proj_blocks hold whole blocks of 32 along I)");
  const std::initializer_list<DType> scale_types = {DType::kU8, DType::kUE8M0};
  check_input(layer.gate_up_blocks, "gpt-oss gate_up_proj_blocks",
              {E, 2 * I, H / kMxGroup, kMxBlockBytes}, {DType::kU8});
  check_input(layer.gate_up_scales, "gpt-oss gate_up_proj_scales", {E, 2 * I, H / kMxGroup},
              scale_types);
  check_input(layer.down_blocks, "gpt-oss down_proj_blocks", {E, H, I / kMxGroup, kMxBlockBytes},
              {DType::kU8});
  check_input(layer.down_scales, "gpt-oss down_proj_scales", {E, H, I / kMxGroup}, scale_types);
  ConvertedExperts out;
  out.b13 = copy_bias(layer.gate_up_bias, {E, 2 * I}, "gpt-oss gate_up_proj_bias");
  out.b2 = copy_bias(layer.down_bias, {E, H}, "gpt-oss down_proj_bias");
  const QuantScheme scheme{Format::kMXFP4};
  for (QuantizedWeight* w : {&out.w13, &out.w2}) w->scheme = scheme;
  // The blocks are already moekit's packing (two codes per byte along K, the even one low) and
  // the scales its ue8m0 codes: the same bytes under moekit's shapes.
  out.w13.data = retyped_copy(layer.gate_up_blocks, DType::kF4E2M1, {E, 2 * I, H});
  out.w13.scale = retyped_copy(layer.gate_up_scales, DType::kUE8M0, {E, 2 * I, H / kMxGroup});
  out.w2.data = retyped_copy(layer.down_blocks, DType::kF4E2M1, {E, H, I});
  out.w2.scale = retyped_copy(layer.down_scales, DType::kUE8M0, {E, H, I / kMxGroup});
  out.layout = GateUpLayout::kInterleaved;
  return out;
}

ConvertedExperts convert_modelopt_nvfp4(std::span<const NvFp4Expert> experts,
                                        const NvFp4Options& options) {
  check_expert_count(experts.size(), "nvfp4");
  const auto g = extents(experts[0].gate.weight, 2, nv_name(0, 0, "weight"));
  const int64_t E = int64_t(experts.size()), I = g[0], H = g[1] * 2;
  MOEKIT_CHECK(I > 0 && H > 0, "nvfp4: empty gate_proj weight ", experts[0].gate.weight.str());
  MOEKIT_CHECK(I % 2 == 0, "nvfp4: I = ", I,
               " must be even (4-bit rows of w2 start on whole bytes)");
  // Per expert: w13's global (shared by gate and up), w2's, and each projection's scale factor.
  std::vector<float> g13(E), g2(E);
  std::vector<std::array<double, 2>> factor(E);
  for (int64_t e = 0; e < E; ++e) {
    const NvFp4Expert& x = experts[e];
    const float gate = check_nv_linear(x.gate, e, 0, I, H), up = check_nv_linear(x.up, e, 1, I, H);
    g2[e] = check_nv_linear(x.down, e, 2, H, I);
    MOEKIT_CHECK(gate == up || options.requantize_gate_up_global, "nvfp4 expert ", e,
                 ": gate_proj.weight_scale_2 = ", gate, " and up_proj.weight_scale_2 = ", up,
                 " differ, but w13 has one global scale per expert (exact only when they match;"
                 " NvFp4Options::requantize_gate_up_global re-rounds the block scales instead)");
    g13[e] = std::max(gate, up);
    factor[e] = {double(gate) / g13[e], double(up) / g13[e]};
  }

  ConvertedExperts out;
  const QuantScheme scheme{Format::kNVFP4};
  for (QuantizedWeight* w : {&out.w13, &out.w2}) w->scheme = scheme;
  out.w13.data = Tensor(DType::kF4E2M1, {E, 2 * I, H});
  out.w13.scale = Tensor(DType::kF8E4M3, {E, 2 * I, ceil_div(H, kNvGroup)});
  out.w13.global = Tensor(DType::kF32, {E});
  out.w2.data = Tensor(DType::kF4E2M1, {E, H, I});
  out.w2.scale = Tensor(DType::kF8E4M3, {E, H, ceil_div(I, kNvGroup)});
  out.w2.global = Tensor(DType::kF32, {E});
  auto* d13 = out.w13.data.data<uint8_t>();
  auto* s13 = out.w13.scale.data<uint8_t>();
  auto* d2 = out.w2.data.data<uint8_t>();
  auto* s2 = out.w2.scale.data<uint8_t>();
  for (int64_t e = 0; e < E; ++e) {
    const NvFp4Expert& x = experts[e];
    append_bytes(x.gate.weight, d13);  // rows [0, I)
    append_bytes(x.up.weight, d13);    // rows [I, 2I)
    append_scales(x.gate, factor[e][0], s13);
    append_scales(x.up, factor[e][1], s13);
    append_bytes(x.down.weight, d2);
    append_scales(x.down, 1.0, s2);
    out.w13.global.data<float>()[e] = g13[e];
    out.w2.global.data<float>()[e] = g2[e];
  }
  return out;
}

}  // namespace moekit
