// DeepSeek-V3 style fp8 checkpoints (e4m3 weights with 128x128 block scales) into fp8-block.
//
// Layout facts relied on (DeepSeek-V3 README_WEIGHTS.md, "FP8 Weight Documentation"):
// quantization_config {"fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]};
// each weight [N, K] (out x in) comes with weight_scale_inv, fp32, one per 128x128 block; blocks
// not aligned to 128 are the ragged last ones; dequantization is (128x128 block) * scale_inv.
#include <cstring>

#include "convert_common.h"
#include "moekit/core/error.h"

namespace moekit {

using namespace convert_detail;

namespace {

constexpr int64_t kBlock = 128;

void check_linear(const Fp8BlockLinear& l, int64_t e, int p, int64_t n, int64_t k) {
  check_input(l.weight, tensor_name("fp8-block", e, kProj[p], "weight"), {n, k}, {DType::kF8E4M3});
  check_input(l.weight_scale_inv, tensor_name("fp8-block", e, kProj[p], "weight_scale_inv"),
              {ceil_div(n, kBlock), ceil_div(k, kBlock)}, kFloatTypes);
}

// Appends the linear's codes and fp32 scales at the write positions, which then advance.
void append(const Fp8BlockLinear& l, uint8_t*& data, float*& scale) {
  std::memcpy(data, l.weight.data, l.weight.nbytes());
  data += l.weight.nbytes();
  const TensorView& s = l.weight_scale_inv;
  for (int64_t i = 0; i < s.numel(); ++i) *scale++ = load_as_float(s.data, s.dtype, i);
}

}  // namespace

ConvertedExperts convert_fp8_block(std::span<const Fp8BlockExpert> experts) {
  check_expert_count(experts.size(), "fp8-block");
  const auto g =
      extents(experts[0].gate.weight, 2, tensor_name("fp8-block", 0, kProj[0], "weight"));
  const int64_t E = int64_t(experts.size()), I = g[0], H = g[1];
  MOEKIT_CHECK(I > 0 && H > 0, "fp8-block: empty gate_proj weight ", experts[0].gate.weight.str());
  // w13's row blocks [0, I/128) must be gate's and the rest up's: no block may mix the two.
  MOEKIT_CHECK(I % kBlock == 0, "fp8-block: I = ", I, " is not a multiple of ", kBlock,
               ": a 128x128 block of w13 would span gate and up rows, which have separate scales");
  for (size_t e = 0; e < experts.size(); ++e) {
    check_linear(experts[e].gate, int64_t(e), 0, I, H);
    check_linear(experts[e].up, int64_t(e), 1, I, H);
    check_linear(experts[e].down, int64_t(e), 2, H, I);
  }

  ConvertedExperts out;
  const QuantScheme scheme{Format::kFP8Block};
  for (QuantizedWeight* w : {&out.w13, &out.w2}) w->scheme = scheme;
  out.w13.data = Tensor(DType::kF8E4M3, {E, 2 * I, H});
  out.w13.scale = Tensor(DType::kF32, {E, 2 * I / kBlock, ceil_div(H, kBlock)});
  out.w2.data = Tensor(DType::kF8E4M3, {E, H, I});
  out.w2.scale = Tensor(DType::kF32, {E, ceil_div(H, kBlock), ceil_div(I, kBlock)});
  auto* d13 = out.w13.data.data<uint8_t>();
  auto* s13 = out.w13.scale.data<float>();
  auto* d2 = out.w2.data.data<uint8_t>();
  auto* s2 = out.w2.scale.data<float>();
  for (const Fp8BlockExpert& x : experts) {
    append(x.gate, d13, s13);  // rows [0, I) and their block rows [0, I/128)
    append(x.up, d13, s13);
    append(x.down, d2, s2);
  }
  return out;
}

}  // namespace moekit
