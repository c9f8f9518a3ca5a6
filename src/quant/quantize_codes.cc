#include "quant/quantize_codes.h"

#include <array>
#include <bit>
#include <cstring>
#include <limits>
#include <string>

#include "moekit/core/error.h"
#include "moekit/quant/encodings.h"

namespace moekit::quant {

namespace {

// clang-format off
constexpr Code kCodes[] = {
  // dtype           max       int    unsigned nan_in_scale
  {DType::kF8E4M3,   448.0f,   false, false,   false},
  {DType::kF8E5M2,   57344.0f, false, false,   false},
  {DType::kF4E2M1,   6.0f,     false, false,   true},
  {DType::kI8,       127.0f,   true,  false,   false},
  {DType::kI4,       7.0f,     true,  false,   false},
  {DType::kU8,       255.0f,   true,  true,    false},
  {DType::kU4,       15.0f,    true,  true,    false},
};
// clang-format on

constexpr float kInf = std::numeric_limits<float>::infinity();


// Minifloat encoding by fp32 bit arithmetic, bit-identical to quant/encodings.h's encode() (the
// tests compare them at every midpoint): below the smallest normal, adding 2^(emin - m + 23)
// makes the fp32 unit in the last place equal to the subnormal spacing, so the hardware's
// round-to-nearest-even does the rounding; above it, the fp32 mantissa is rounded to m bits
// with the usual add-half-minus-one-plus-lsb trick and the exponent rebiased. Branch-free
// (selects), so a span's loop vectorizes.
struct MiniFloatEncoder {
  explicit MiniFloatEncoder(MiniFloat f) {
    const MiniFloatTraits& t = traits(f);
    drop = uint32_t(23 - t.mantissa_bits);
    const int emin = 1 - t.bias;
    min_normal = std::bit_cast<float>(uint32_t(emin + 127) << 23);
    magic = std::ldexp(1.0f, emin - t.mantissa_bits + 23);
    magic_bits = std::bit_cast<uint32_t>(magic);
    rebias = uint32_t(127 - t.bias) << t.mantissa_bits;
    max = t.max_finite;
    max_code = encode(f, max);
    sign_shift = uint32_t(31 - t.exponent_bits - t.mantissa_bits);
    nan_code = encode(f, NAN);
    nan_sign_mask = f == MiniFloat::kE2M1 ? 0u : 0xFFu;  // e2m1 encodes every NaN as +0
  }
  uint8_t operator()(float v) const {
    const uint32_t u = std::bit_cast<uint32_t>(v), au = u & 0x7fffffffu;
    const float a = std::bit_cast<float>(au);
    const uint32_t subnormal = std::bit_cast<uint32_t>(a + magic) - magic_bits;
    const uint32_t normal = ((au + (1u << (drop - 1)) - 1u + ((au >> drop) & 1u)) >> drop) - rebias;
    uint32_t code = a < min_normal ? subnormal : normal;
    code = a < max ? code : max_code;  // +-inf and overflow saturate
    const bool nan = a != a;
    code = nan ? nan_code : code;
    const uint32_t sign = ((u & 0x80000000u) >> sign_shift) & (nan ? nan_sign_mask : 0xFFu);
    return uint8_t(sign | code);
  }
  uint32_t drop, magic_bits, rebias, sign_shift, max_code, nan_code, nan_sign_mask;
  float min_normal, magic, max;
};

const MiniFloatEncoder& minifloat_encoder(DType t) {
  static const MiniFloatEncoder e4m3(MiniFloat::kE4M3), e5m2(MiniFloat::kE5M2),
      e2m1(MiniFloat::kE2M1);
  return t == DType::kF8E4M3 ? e4m3 : t == DType::kF8E5M2 ? e5m2 : e2m1;
}

// Integer codes: NaN as 0, clamp to the code range (shifted by the zero point), then round to
// nearest even by adding and subtracting 1.5 * 2^23 (exact for |v| <= 2^22, and |v| <= 255).
struct IntEncoder {
  float lo, hi;
  int zero;
  uint8_t operator()(float v) const {
    if (v != v) v = 0;
    v = v < lo ? lo : v > hi ? hi : v;
    constexpr float kRound = 12582912.0f;  // 1.5 * 2^23
    return uint8_t(int((v + kRound) - kRound) + zero);
  }
};

// The encoders are taken by value: a local copy keeps their fields in registers (stores through
// uint8_t* may alias anything, a reference would be reloaded every element).
template <class Encoder>
void encode_bytes(const float* x, int64_t n, float scale, uint8_t* out, const Encoder enc) {
  for (int64_t i = 0; i < n; ++i) out[i] = enc(x[i] / scale);
}

// Two codes per byte, element 2i in the low nibble; `out` is the byte of the span's first element.
template <class Encoder>
void encode_nibbles(const float* x, int64_t n, float scale, uint8_t* out, const Encoder enc) {
  int64_t i = 0;
  for (; i + 1 < n; i += 2) out[i / 2] = pack_int4(enc(x[i] / scale), enc(x[i + 1] / scale));
  if (i < n) out[i / 2] = uint8_t((out[i / 2] & 0xF0) | (enc(x[i] / scale) & 0xF));
}

template <class Encoder>
void encode_any(bool packed, const float* x, int64_t n, float scale, uint8_t* out,
                const Encoder enc) {
  packed ? encode_nibbles(x, n, scale, out, enc) : encode_bytes(x, n, scale, out, enc);
}

// Values of every code of an 8-bit (or 4-bit) minifloat, decoded once.
struct DecodeTable {
  explicit DecodeTable(MiniFloat f) {
    for (int c = 0; c < 256; ++c) value[c] = decode(f, uint8_t(c));
  }
  std::array<float, 256> value;
};

const DecodeTable& decode_table(DType t) {
  static const DecodeTable e4m3(MiniFloat::kE4M3), e5m2(MiniFloat::kE5M2), e2m1(MiniFloat::kE2M1);
  return t == DType::kF8E4M3 ? e4m3 : t == DType::kF8E5M2 ? e5m2 : e2m1;
}

}  // namespace

const Code& code_of(DType t, const char* what) {
  for (const Code& c : kCodes)
    if (c.dtype == t) return c;
  MOEKIT_FAIL(what, ": ", name(t), " is not a quantized element type");
}

bool is_code(DType t) {
  for (const Code& c : kCodes)
    if (c.dtype == t) return true;
  return false;
}

void Stats::add(const float* x, int64_t n) {
  // kLanes independent accumulators (so the loop vectorizes without reassociating anything);
  // a non-finite value counts as 0, which every range already holds.
  constexpr int kLanes = 8;
  float a_max[kLanes], lo[kLanes], hi[kLanes];
  uint32_t nans[kLanes];
  for (int l = 0; l < kLanes; ++l) a_max[l] = amax, lo[l] = min, hi[l] = max, nans[l] = 0;
  auto add_one = [&](int l, float v) {
    const float a = std::fabs(v);
    const bool finite = a < kInf;
    const float af = finite ? a : 0.0f, vf = finite ? v : 0.0f;
    a_max[l] = af > a_max[l] ? af : a_max[l];
    lo[l] = vf < lo[l] ? vf : lo[l];
    hi[l] = vf > hi[l] ? vf : hi[l];
    nans[l] |= uint32_t(a != a);
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) add_one(l, x[i + l]);
  for (; i < n; ++i) add_one(0, x[i]);
  for (int l = 0; l < kLanes; ++l) {
    amax = std::max(amax, a_max[l]);
    min = std::min(min, lo[l]);
    max = std::max(max, hi[l]);
    nan = nan || nans[l];
  }
}

void Stats::merge(const Stats& o) {
  amax = std::fmax(amax, o.amax);
  min = std::fmin(min, o.min);
  max = std::fmax(max, o.max);
  nan = nan || o.nan;
}

float store_scale(void* p, DType t, int64_t i, float s, bool round_up) {
  auto put = [&](float v) {
    switch (t) {
      case DType::kF32:
        store_from_float(p, t, i, v);
        break;
      case DType::kBF16:
      case DType::kF16:
        store_from_float(p, t, i, v);
        // Positive 16-bit floats are ordered like their bits: one more is the next value up.
        if (round_up && load_as_float(p, t, i) < v) ++static_cast<uint16_t*>(p)[i];
        break;
      case DType::kF8E4M3:
        static_cast<uint8_t*>(p)[i] = encode(MiniFloat::kE4M3, v);
        break;
      case DType::kUE8M0:
        static_cast<uint8_t*>(p)[i] = encode_ue8m0(v, ScaleRounding::kUp);
        break;
      default:
        MOEKIT_FAIL("scale element ", name(t), " is not a scale type");
    }
    return load_as_float(p, t, i);
  };
  if (s != 0.0f) {  // (ue8m0 has no zero: 0 would store as 2^-127)
    const float stored = put(s);
    if (stored != 0.0f) return stored;
  }
  return put(1.0f);
}

float symmetric_scale(const Stats& st, const Code& c) {
  return c.nan_in_scale && st.nan ? NAN : st.amax / c.max;
}

void encode_span(const Code& c, const float* x, int64_t n, float scale, int zero, void* out,
                 int64_t first) {
  const bool packed = is_packed(c.dtype);
  MOEKIT_CHECK(!packed || first % 2 == 0, "encode_span: packed span starts at odd element ", first);
  uint8_t* o = static_cast<uint8_t*>(out) + storage_bytes(c.dtype, first);
  if (c.is_int) {
    const float lo = c.is_unsigned ? 0.0f : -c.max;
    encode_any(packed, x, n, scale, o, IntEncoder{lo - float(zero), c.max - float(zero), zero});
  } else {
    encode_any(packed, x, n, scale, o, minifloat_encoder(c.dtype));
  }
}

void decode_span(DType t, const void* row, int64_t first, int64_t n, float* out) {
  const auto* b = static_cast<const uint8_t*>(row);
  const Code& c = code_of(t, "decode_span");
  if (!c.is_int) {
    const auto& table = decode_table(t).value;
    if (is_packed(t))
      for (int64_t i = 0; i < n; ++i)
        out[i] = table[unpack_uint4(b[(first + i) / 2], (first + i) % 2)];
    else
      for (int64_t i = 0; i < n; ++i) out[i] = table[b[first + i]];
    return;
  }
  switch (t) {
    case DType::kI8:
      for (int64_t i = 0; i < n; ++i) out[i] = float(int8_t(b[first + i]));
      return;
    case DType::kU8:
      for (int64_t i = 0; i < n; ++i) out[i] = float(b[first + i]);
      return;
    case DType::kI4:
      for (int64_t i = 0; i < n; ++i)
        out[i] = float(unpack_int4(b[(first + i) / 2], (first + i) % 2));
      return;
    default:  // kU4
      for (int64_t i = 0; i < n; ++i)
        out[i] = float(unpack_uint4(b[(first + i) / 2], (first + i) % 2));
      return;
  }
}

const float* load_float_row(const void* row, DType t, int64_t n, std::vector<float>& buffer) {
  if (t == DType::kF32) return static_cast<const float*>(row);
  buffer.resize(size_t(n));
  const auto* h = static_cast<const uint16_t*>(row);
  if (t == DType::kBF16)
    for (int64_t i = 0; i < n; ++i) buffer[i] = bf16_to_float(h[i]);
  else if (t == DType::kF16)
    for (int64_t i = 0; i < n; ++i) buffer[i] = f16_to_float(h[i]);
  else
    MOEKIT_FAIL("load_float_row: ", name(t), " is not a float type");
  return buffer.data();
}

void store_float_row(const float* x, int64_t n, DType t, void* row) {
  auto* h = static_cast<uint16_t*>(row);
  if (t == DType::kF32)
    std::memcpy(row, x, size_t(n) * sizeof(float));
  else if (t == DType::kBF16)
    for (int64_t i = 0; i < n; ++i) h[i] = float_to_bf16(x[i]);
  else if (t == DType::kF16)
    for (int64_t i = 0; i < n; ++i) h[i] = float_to_f16(x[i]);
  else
    MOEKIT_FAIL("store_float_row: ", name(t), " is not a float type");
}

void check_shape(const TensorView& t, const std::vector<int64_t>& shape, const char* what) {
  bool ok = t.ndim == int(shape.size());
  for (size_t d = 0; ok && d < shape.size(); ++d) ok = t.shape[d] == shape[d];
  if (ok) return;
  std::string want;
  for (int64_t s : shape) (want += want.empty() ? "" : ", ") += std::to_string(s);
  MOEKIT_FAIL(what, ": expected shape [", want, "], got ", t.str());
}

void check_host_rows(const TensorView& t, int ndim, const char* what) {
  MOEKIT_CHECK(t.ndim == ndim, what, ": expected ", ndim, " dimensions, got ", t.str());
  MOEKIT_CHECK(t.device.type == DeviceType::kCPU, what, ": the quantizers take host tensors, got ",
               t.str());
  check_row_major(t, what);
  check_data(t, what);
}

}  // namespace moekit::quant
