// Element encodings of the quantized formats (DESIGN.md section 4), scalar and bit-exact:
// fp8 e4m3 (OCP "e4m3fn") and e5m2, fp4 e2m1, the ue8m0 power-of-two scale, and int4 nibbles.
//
// Rounding is to nearest, ties to even (the even code). Finite values beyond the largest finite
// code saturate to it (no overflow to infinity). NaN and infinities:
//   e4m3: no infinity; +-inf saturate to +-448, NaN encodes as S.1111.111 (sign kept).
//   e5m2: +-inf saturate to +-57344 like every overflow; NaN encodes as S.11111.11.
//   e2m1: no NaN or infinity; +-inf saturate to +-6 and NaN encodes as +0: a NaN in a block
//         reaches its (ue8m0 or fp32) block scale, which keeps it (0xFF is ue8m0's NaN).
#pragma once

#include <cstdint>

namespace moekit {

enum class MiniFloat { kE4M3, kE5M2, kE2M1 };

struct MiniFloatTraits {
  MiniFloat format;
  const char* name;
  int exponent_bits, mantissa_bits, bias;
  float max_finite;
};
const MiniFloatTraits& traits(MiniFloat f);

// The code (low 8 bits; 4 for e2m1) of f, and back. Decoding e2m1 uses the low 4 bits only.
uint8_t encode(MiniFloat format, float f);
float decode(MiniFloat format, uint8_t code);

// ue8m0: the value 2^(code - 127), code 0xFF is NaN. Scales round up (the smallest power of two
// >= s, so that x / scale never exceeds the element range) or down; s <= 0 or below 2^-127
// gives code 0, above 2^127 saturates to 0xFE, NaN gives 0xFF.
enum class ScaleRounding { kUp, kDown };
uint8_t encode_ue8m0(float s, ScaleRounding rounding);
float decode_ue8m0(uint8_t code);

// int4 nibbles, two per byte, element 2i in the low nibble and 2i + 1 in the high one.
// Signed: [-8, 7] in two's complement. Unsigned (with a zero point): [0, 15].
inline uint8_t pack_int4(int lo, int hi) {
  return static_cast<uint8_t>((lo & 0xF) | ((hi & 0xF) << 4));
}
inline int unpack_int4(uint8_t byte, int index) {  // signed
  const int v = (byte >> (4 * index)) & 0xF;
  return v >= 8 ? v - 16 : v;
}
inline int unpack_uint4(uint8_t byte, int index) { return (byte >> (4 * index)) & 0xF; }

}  // namespace moekit
