// Quantized weights into the panels of kernels.h: codes repacked per panel (4-bit codes stay 4
// bits, bytes stay bytes), weight scales of every layout expanded to column scales per group
// and stored in the smallest ScaleStore that holds them exactly, zero points as bytes.
#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <mutex>
#include <string>

#include "cpu/pack.h"
#include "moekit/core/error.h"
#include "moekit/quant/encodings.h"

namespace moekit::cpu {
namespace {

// The values of the 16 codes of each 4-bit element type.
struct NibbleTables {
  std::array<float, 16> int4, uint4, e2m1;
  NibbleTables() {
    for (int c = 0; c < 16; ++c) {
      int4[size_t(c)] = float(c < 8 ? c : c - 16);
      uint4[size_t(c)] = float(c);
      e2m1[size_t(c)] = decode(MiniFloat::kE2M1, uint8_t(c));
    }
  }
};
const NibbleTables& nibble_tables() {
  static const NibbleTables t;
  return t;
}

// The element family of each stored weight type (int8 weights meet int8 activations as
// kInt8Dot: see family_of).
struct FamilyRow {
  DType weight;
  QFamily family;
  bool is_signed;
  const float* (*table)();
};
constexpr FamilyRow kFamilies[] = {
    {DType::kI4, QFamily::kNibble, true, [] { return nibble_tables().int4.data(); }},
    {DType::kU4, QFamily::kNibble, false, [] { return nibble_tables().uint4.data(); }},
    {DType::kF4E2M1, QFamily::kNibble, true, [] { return nibble_tables().e2m1.data(); }},
    {DType::kI8, QFamily::kByte, true, [] { return static_cast<const float*>(nullptr); }},
    {DType::kU8, QFamily::kByte, false, [] { return static_cast<const float*>(nullptr); }},
    {DType::kF8E4M3, QFamily::kFp8, true, [] { return static_cast<const float*>(nullptr); }},
};

// Reads the codes, scales and zero points of one quantized weight [n, R, K].
struct QuantSource {
  const PackSource& s;
  const QuantScheme& q;
  const TensorView& w;
  int64_t K;

  // The bytes of row `row` of expert e, and the raw code bits (a nibble or a byte) of its
  // element k.
  const uint8_t* row_bytes(int64_t e, int64_t row) const {
    return static_cast<const uint8_t*>(w.data) +
           w.byte_offset(s.ew->index(e) * w.stride[0] + row * w.stride[1]);
  }
  uint8_t code(const uint8_t* row, int64_t k) const {
    return is_packed(w.dtype) ? uint8_t(row[k / 2] >> (4 * (k & 1)) & 0xF) : row[k];
  }
  // Element offset into the scale tensor of (e, row) in group g along K (layouts: format.h).
  int64_t scale_offset(int64_t e, int64_t row, int64_t g) const {
    const TensorView& t = s.scales->scale;
    const int64_t base = s.ew->index(e) * t.stride[0];
    switch (q.traits().scale_layout) {
      case WeightScaleLayout::kTensor:
        return base;
      case WeightScaleLayout::kChannel:
        return base + row * t.stride[1];
      case WeightScaleLayout::kBlock:
        return base + row / q.traits().block * t.stride[1] + g * t.stride[2];
      default:
        return base + row * t.stride[1] + g * t.stride[2];
    }
  }
  float scale(int64_t e, int64_t row, int64_t g) const {
    const TensorView& t = s.scales->scale;
    return load_as_float(t.data, t.dtype, scale_offset(e, row, g));
  }
  uint8_t zero(int64_t e, int64_t row, int64_t g) const {
    const TensorView& z = s.scales->zero;
    return static_cast<const uint8_t*>(
        z.data)[s.ew->index(e) * z.stride[0] + row * z.stride[1] + g * z.stride[2]];
  }
};

// The smallest store holding every scale exactly: bf16 for bf16, e4m3 and ue8m0 values (ue8m0
// as its code where every code is in 1..254: 0 is 2^-127 and 255 NaN, which the kernels'
// shift does not make), fp32 otherwise (fp16, fp32).
ScaleStore scale_store(const QuantSource& src, QFamily family) {
  const TensorView& t = src.s.scales->scale;
  if (family == QFamily::kFp8 || family == QFamily::kInt8Dot) return ScaleStore::kF32;
  switch (t.dtype) {
    case DType::kBF16:
    case DType::kF8E4M3:
      return ScaleStore::kBF16;
    case DType::kUE8M0: {
      // [n, R, groups] with the last dim contiguous: every code of the experts used.
      for (int64_t e = 0; e < src.s.ew->num_local(); ++e)
        for (int64_t r = 0; r < t.size(1); ++r)
          for (int64_t g = 0; g < t.size(2); ++g) {
            const uint8_t c = static_cast<const uint8_t*>(t.data)[src.scale_offset(e, r, g)];
            if (c == 0 || c == 255) return ScaleStore::kBF16;
          }
      return ScaleStore::kE8;
    }
    default:
      return ScaleStore::kF32;
  }
}

// `factor`: kFp8's 2^8 (its codes decode to value * 2^-8), else 1.
void put_scale(ScaleStore store, uint8_t* dst, int c, const QuantSource& src, int64_t e,
               int64_t row, int64_t g, float factor) {
  switch (store) {
    case ScaleStore::kF32: {
      const float v = row < 0 ? 0.f : src.scale(e, row, g) * factor;
      std::memcpy(dst + 4 * c, &v, 4);
      break;
    }
    case ScaleStore::kBF16: {
      const uint16_t v = row < 0 ? 0 : float_to_bf16(src.scale(e, row, g));
      std::memcpy(dst + 2 * c, &v, 2);
      break;
    }
    case ScaleStore::kE8:
      dst[c] =
          row < 0
              ? 0
              : static_cast<const uint8_t*>(src.s.scales->scale.data)[src.scale_offset(e, row, g)];
      break;
  }
}

// The first bad code met by the packing threads (they cannot throw), reported after them.
struct BadCode {
  std::atomic<bool> found{false};
  std::mutex mutex;
  std::string what;
  void set(std::string w) {
    std::lock_guard<std::mutex> lock(mutex);
    if (!found.exchange(true)) what = std::move(w);
  }
};

// One panel: per group its units of codes, then its column scales, then its zero points.
void fill_panel(const QuantSource& src, const QuantPanel& qp, const PackedGemm& g, int64_t e,
                int64_t p, std::byte* out, BadCode& bad) {
  const int64_t steps = unit_steps(qp.family), ub = unit_bytes(qp.family), K = src.K;
  const bool dot = qp.family == QFamily::kInt8Dot;
  auto* dst = reinterpret_cast<uint8_t*>(out);
  // Padding codes are zero (value 0); kInt8Dot stores w + 128, so its zero weight is 128.
  std::memset(dst, dot ? 128 : 0, size_t(g.panel_bytes));
  int64_t rows[kPanel];
  const uint8_t* row_bytes[kPanel];
  for (int c = 0; c < kPanel; ++c) {
    rows[c] = src.s.row_of(p, c);
    row_bytes[c] = rows[c] < 0 ? nullptr : src.row_bytes(e, rows[c]);
  }
  for (int64_t gi = 0, k0 = 0; k0 < K; ++gi, k0 += qp.group) {
    const int64_t len = std::min(qp.group, K - k0), units = (len + steps - 1) / steps;
    for (int64_t u = 0; u < units; ++u, dst += ub)
      for (int c = 0; c < kPanel; ++c) {
        if (rows[c] < 0) continue;
        for (int64_t i = 0; i < steps; ++i) {
          const int64_t k = k0 + u * steps + i;
          if (k >= K) break;
          const uint8_t code = src.code(row_bytes[c], k);
          switch (qp.family) {
            case QFamily::kNibble:
              dst[4 * c + i / 2] |= uint8_t(code << (4 * (i & 1)));
              break;
            case QFamily::kInt8Dot:
              dst[4 * c + i] = uint8_t(code ^ 0x80);
              break;
            case QFamily::kFp8:
              if ((code & 0x7f) == 0x7f)
                bad.set(detail::concat("cpu experts: ", src.s.what, " of local expert ", e,
                                       " holds the e4m3 NaN code at row ", rows[c], ", column ",
                                       k));
              [[fallthrough]];
            case QFamily::kByte:
              dst[c] = code;
              break;
          }
        }
      }
    const float factor = qp.family == QFamily::kFp8 ? 0x1p8f : 1.0f;
    for (int c = 0; c < kPanel; ++c) put_scale(qp.scale, dst, c, src, e, rows[c], gi, factor);
    dst += kPanel * scale_bytes(qp.scale);
    if (qp.zero_point) {
      for (int c = 0; c < kPanel; ++c) dst[c] = rows[c] < 0 ? 0 : src.zero(e, rows[c], gi);
      dst += kPanel;
    }
  }
}

}  // namespace

void pack_quant(const PackSource& s, const QuantScheme& q, DType act, PackedGemm& g,
                ThreadPool& pool) {
  const TensorView& w = *s.w;
  const FormatTraits& t = q.traits();
  const FamilyRow* row = nullptr;
  for (const FamilyRow& r : kFamilies)
    if (r.weight == w.dtype) row = &r;
  MOEKIT_CHECK(row != nullptr, "cpu experts: no kernel for ", name(w.dtype), " weights (format ",
               q.str(), ")");
  QuantPanel qp;
  qp.family = row->family == QFamily::kByte && act == DType::kI8 ? QFamily::kInt8Dot : row->family;
  qp.is_signed = row->is_signed;
  qp.table = row->table();
  qp.zero_point = q.zero_point;
  qp.block_act_scale = t.act_scale == ScaleKind::kBlock;
  const int64_t K = g.k, steps = unit_steps(qp.family);
  // Groups along K of the format (kGroup, kBlock; a ragged last one is shorter); one group
  // (tensor, channel scales, per-channel groups) spans K rounded up to whole units.
  const bool grouped =
      t.scale_layout == WeightScaleLayout::kGroup || t.scale_layout == WeightScaleLayout::kBlock;
  qp.group = grouped ? q.group_size(K) : K;
  if (qp.group == K) qp.group = (K + steps - 1) / steps * steps;
  MOEKIT_CHECK(qp.group % steps == 0, "cpu experts: ", s.what, " scale groups of ", qp.group,
               " do not hold whole units of ", steps, " codes");
  // Integer sums of K products of |w + 128| <= 255 and |a| <= 127 must fit int32.
  MOEKIT_CHECK(qp.family != QFamily::kInt8Dot || K <= (int64_t(1) << 31) / (255 * 128),
               "cpu experts: int8 ", s.what, " reduces over ", K, " > ",
               (int64_t(1) << 31) / (255 * 128),
               " elements, whose int32 dot products could overflow");
  const QuantSource src{s, q, w, K};
  qp.scale = scale_store(src, qp.family);
  const int64_t groups = (K + qp.group - 1) / qp.group, ub = unit_bytes(qp.family);
  g.panel_bytes = 0;
  for (int64_t gi = 0; gi < groups; ++gi)
    g.panel_bytes += (std::min(qp.group, K - gi * qp.group) + steps - 1) / steps * ub +
                     kPanel * scale_bytes(qp.scale) + (qp.zero_point ? kPanel : 0);
  g.quant = qp;
  g.post.assign(size_t(s.ew->num_local()), 1.f);
  if (t.global_scale)
    for (int64_t e = 0; e < s.ew->num_local(); ++e)
      g.post[size_t(e)] = load_as_float(s.scales->global.data, DType::kF32,
                                        s.ew->index(e) * s.scales->global.stride[0]);
  BadCode bad;
  pack_panels(s, g, pool, [&](int64_t e, int64_t p, std::byte* dst) {
    fill_panel(src, qp, g, e, p, dst, bad);
  });
  if (bad.found) MOEKIT_FAIL(bad.what);
}

}  // namespace moekit::cpu
