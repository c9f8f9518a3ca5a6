#include "cpu/quant_rows.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstring>

#include "moekit/core/error.h"
#include "moekit/quant/encodings.h"

namespace moekit::cpu {
namespace {

constexpr float kE4m3Max = 448.0f;


const std::array<float, 256>& e4m3_values() {
  static const std::array<float, 256> t = [] {
    std::array<float, 256> v{};
    for (int c = 0; c < 256; ++c) v[size_t(c)] = decode(MiniFloat::kE4M3, uint8_t(c));
    return v;
  }();
  return t;
}

// Sums of the values of each scale group, in order, into meta[1 + g].
void group_sums(float* row, const RowLayout& l) {
  float* meta = row + l.meta;
  for (int64_t g = 0; g < l.groups; ++g) {
    float s = 0;
    for (int64_t k = g * l.group; k < std::min(l.k, (g + 1) * l.group); ++k) s += row[k];
    meta[1 + g] = s;
  }
}

// Values [k0, k0 + n) divided by s and rounded to e4m3 values.
void to_e4m3(float* x, int64_t n, float s) {
  for (int64_t i = 0; i < n; ++i) x[i] = round_e4m3(x[i] / s);
}

}  // namespace

RowLayout RowLayout::of(const PackedGemm& g, int64_t value_floats) {
  RowLayout l;
  l.k = g.k;
  l.kp = g.k_padded();
  l.group = g.quant->group;
  l.groups = g.groups();
  l.codes = g.quant->family == QFamily::kInt8Dot;
  l.meta = value_floats;
  l.stride = (value_floats + 1 + 2 * l.groups + 15) / 16 * 16;
  return l;
}

float round_e4m3(float v) {
  const float a = std::fabs(v);
  if (!(a < kE4m3Max)) return a != a ? v : std::copysign(kE4m3Max, v);
  float r;
  if (a < 0x1p-6f) {
    // Subnormal codes step by 2^-9, the fp32 spacing at 2^14: the addition rounds.
    r = (a + 0x1p14f) - 0x1p14f;
  } else {
    const uint32_t u = std::bit_cast<uint32_t>(a), drop = 20;  // 23 - 3 mantissa bits
    r = std::bit_cast<float>((u + ((1u << (drop - 1)) - 1) + ((u >> drop) & 1u)) >> drop << drop);
  }
  return std::copysign(r, v);
}

float finite_amax(const float* x, int64_t n) {
  float m = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float a = std::fabs(x[i]);
    if (a < INFINITY) m = std::max(m, a);
  }
  return m;
}

float dynamic_scale(float amax, float max, DType scale_dtype) {
  const float s = amax / max;
  if (s == 0.0f) return 1.0f;
  return scale_dtype == DType::kUE8M0 ? decode_ue8m0(encode_ue8m0(s, ScaleRounding::kUp)) : s;
}

void build_a1_rows(const TensorView& a1, const ActivationScale& scale, const RowLayout& l,
                   bool zero_point, int64_t t0, int64_t t1, float* rows) {
  const int64_t H = l.k;
  for (int64_t t = t0; t < t1; ++t) {
    float* row = rows + t * l.stride;
    float* meta = row + l.meta;
    meta[0] = 1.0f;
    if (l.codes) {  // int8: codes as they are, zero-padded to whole units
      auto* dst = reinterpret_cast<int8_t*>(row);
      const int8_t* src = a1.row<const int8_t>(t);
      int32_t sum = 0;
      for (int64_t h = 0; h < H; ++h) sum += dst[h] = src[h];
      std::memset(dst + H, 0, size_t(l.kp - H));
      meta[0] = scale.scale.ptr<const float>()[t * scale.scale.stride[0]];
      const int32_t corr = 128 * sum;
      std::memcpy(meta + 1, &corr, 4);
      continue;
    }
    if (a1.dtype == DType::kBF16) {
      const uint16_t* src = a1.row<const uint16_t>(t);
      for (int64_t h = 0; h < H; ++h) row[h] = bf16_to_float(src[h]);
    } else {  // e4m3 codes: values, with the row's scale or its block scales
      const uint8_t* src = a1.row<const uint8_t>(t);
      const auto& v = e4m3_values();
      for (int64_t h = 0; h < H; ++h) row[h] = v[src[h]];
      const TensorView& s = scale.scale;
      if (scale.kind == ScaleKind::kBlock) {
        for (int64_t g = 0; g < l.groups; ++g)
          meta[1 + l.groups + g] = load_as_float(s.data, s.dtype, t * s.stride[0] + g);
      } else {
        meta[0] = s.ptr<const float>()[scale.kind == ScaleKind::kTensor ? 0 : t * s.stride[0]];
      }
    }
    std::fill(row + H, row + l.kp, 0.0f);
    if (zero_point) group_sums(row, l);
  }
}

void finish_a2_row(float* row, const RowLayout& l, const ActivationSpec& spec, bool zero_point,
                   float tensor_scale) {
  float* meta = row + l.meta;
  meta[0] = 1.0f;
  switch (spec.scale) {
    case ScaleKind::kNone:
      if (zero_point) group_sums(row, l);
      return;
    case ScaleKind::kTensor:
      to_e4m3(row, l.k, tensor_scale);
      meta[0] = tensor_scale;
      return;
    case ScaleKind::kToken: {
      const float s = dynamic_scale(finite_amax(row, l.k), kE4m3Max, DType::kF32);
      to_e4m3(row, l.k, s);
      meta[0] = s;
      return;
    }
    case ScaleKind::kBlock:  // spec.group == l.group (checked at construction)
      for (int64_t g = 0; g < l.groups; ++g) {
        const int64_t k0 = g * l.group, n = std::min(l.group, l.k - k0);
        const float s = dynamic_scale(finite_amax(row + k0, n), kE4m3Max, spec.scale_dtype);
        to_e4m3(row + k0, n, s);
        meta[1 + l.groups + g] = s;
      }
      return;
  }
}

}  // namespace moekit::cpu
