// Minifloat encoding by nearest representable value: each format's finite magnitudes, in code
// order, are increasing, so encoding is a binary search against the midpoints between
// neighbours (exact in double: every value here is a short dyadic rational), and a tie goes to
// the even code, whose mantissa ends in 0. Slow next to bit tricks, and simple to trust: offline
// weight quantization uses it, and it is the reference for faster kernels.
#include "moekit/quant/encodings.h"

#include <array>
#include <cmath>
#include <cstring>

#include "moekit/core/error.h"

namespace moekit {

namespace {

constexpr MiniFloatTraits kMiniFloats[] = {
    {MiniFloat::kE4M3, "e4m3", 4, 3, 7, 448.0f},
    {MiniFloat::kE5M2, "e5m2", 5, 2, 15, 57344.0f},
    {MiniFloat::kE2M1, "e2m1", 2, 1, 1, 6.0f},
};

// Value of magnitude code c (sign bit clear) of a format whose every exponent field is finite
// except where the caller stops.
double magnitude(const MiniFloatTraits& t, int c) {
  const int e = c >> t.mantissa_bits, m = c & ((1 << t.mantissa_bits) - 1);
  const double frac = double(m) / double(1 << t.mantissa_bits);
  return e == 0 ? std::ldexp(frac, 1 - t.bias) : std::ldexp(1.0 + frac, e - t.bias);
}

// The finite magnitudes of a format, codes 0..count-1.
struct Table {
  std::array<double, 128> value{};
  int count = 0;
};

Table make_table(const MiniFloatTraits& t) {
  Table table;
  for (int c = 0; c < 128; ++c) {
    const double v = magnitude(t, c);
    if (v > t.max_finite || c >= (1 << (t.exponent_bits + t.mantissa_bits))) break;
    table.value[c] = v;
    table.count = c + 1;
  }
  return table;
}

const Table& table_of(MiniFloat f) {
  static const Table tables[] = {make_table(kMiniFloats[0]), make_table(kMiniFloats[1]),
                                 make_table(kMiniFloats[2])};
  return tables[static_cast<int>(f)];
}

// Largest index i with value[i] <= a, then rounded to nearest (ties to the even code).
int nearest_code(const Table& t, double a) {
  int lo = 0, hi = t.count - 1;
  if (a >= t.value[hi]) return hi;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    (t.value[mid] <= a ? lo : hi) = mid;
  }
  const double half = (t.value[lo] + t.value[hi]) / 2;
  if (a < half) return lo;
  if (a > half) return hi;
  return (lo & 1) == 0 ? lo : hi;
}

}  // namespace

const MiniFloatTraits& traits(MiniFloat f) { return kMiniFloats[static_cast<int>(f)]; }

uint8_t encode(MiniFloat format, float f) {
  const MiniFloatTraits& t = traits(format);
  const int sign_shift = t.exponent_bits + t.mantissa_bits;
  const uint8_t sign = std::signbit(f) ? uint8_t(1u << sign_shift) : 0;
  if (std::isnan(f)) {
    if (format == MiniFloat::kE2M1) return 0;
    return sign | uint8_t((1u << sign_shift) - 1);  // all exponent and mantissa bits set
  }
  return sign | uint8_t(nearest_code(table_of(format), std::fabs(double(f))));
}

float decode(MiniFloat format, uint8_t code) {
  const MiniFloatTraits& t = traits(format);
  const int sign_shift = t.exponent_bits + t.mantissa_bits;
  const int c = code & ((1 << sign_shift) - 1);
  const bool negative = (code >> sign_shift) & 1;
  const Table& table = table_of(format);
  float v;
  if (c < table.count) {
    v = static_cast<float>(table.value[c]);
  } else if (format == MiniFloat::kE5M2 && c == ((1 << sign_shift) - 1 - 3)) {
    v = INFINITY;  // S.11111.00
  } else {
    v = NAN;  // e4m3 S.1111.111, e5m2 S.11111.{01,10,11}
  }
  return negative ? -v : v;
}

uint8_t encode_ue8m0(float s, ScaleRounding rounding) {
  if (std::isnan(s)) return 0xFF;
  if (!(s > 0.0f)) return 0;
  int e;
  const float m = std::frexp(s, &e);  // s = m * 2^e, m in [0.5, 1)
  // s = 2^(e-1) exactly when m == 0.5; otherwise it lies between 2^(e-1) and 2^e.
  const int exponent = (m == 0.5f || rounding == ScaleRounding::kDown) ? e - 1 : e;
  const int code = exponent + 127;
  return static_cast<uint8_t>(code < 0 ? 0 : code > 0xFE ? 0xFE : code);
}

float decode_ue8m0(uint8_t code) {
  if (code == 0xFF) return NAN;
  return std::ldexp(1.0f, int(code) - 127);
}

}  // namespace moekit
