#include "moekit/core/dtype.h"

#include <string>

#include "moekit/core/error.h"
#include "moekit/quant/encodings.h"

namespace moekit {

DType parse_dtype(std::string_view s) {
  std::string known;
  for (const auto& t : kDTypeTraits) {
    if (t.name == s) return t.dtype;
    known += known.empty() ? "" : ", ";
    known += t.name;
  }
  MOEKIT_FAIL("unknown dtype '", s, "' (known: ", known, ")");
}

float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (mant << 13);  // inf / NaN
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    u = sign;
  } else {  // subnormal: renormalise
    int e = -1;
    do {
      ++e;
      mant <<= 1;
    } while ((mant & 0x400u) == 0);
    u = sign | static_cast<uint32_t>(112 - e) << 23 | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t float_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00u;                 // NaN
  if (abs >= 0x477ff000u) return sign | 0x7c00u;                // rounds to inf
  if (abs < 0x38800000u) {                                      // f16 subnormal or zero
    if (abs < 0x33000000u) return sign;                         // below half the smallest
    const uint32_t e = abs >> 23;
    const uint32_t m = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;                             // 14..24
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return sign | static_cast<uint16_t>(r);
  }
  uint32_t r = abs - 0x38000000u;  // rebias exponent 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);  // round to nearest even on the 13 dropped bits
  return sign | static_cast<uint16_t>(r >> 13);
}

int64_t element_bytes(DType t) {
  MOEKIT_CHECK(!is_packed(t), "element_bytes: ", name(t),
               " packs two elements per byte (use storage_bytes)");
  return traits(t).bits / 8;
}

float load_as_float(const void* p, DType t, int64_t i) {
  const auto* b = static_cast<const uint8_t*>(p);
  switch (t) {
    case DType::kF32: return static_cast<const float*>(p)[i];
    case DType::kBF16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    case DType::kF16: return f16_to_float(static_cast<const uint16_t*>(p)[i]);
    case DType::kI32: return static_cast<float>(static_cast<const int32_t*>(p)[i]);
    case DType::kI64: return static_cast<float>(static_cast<const int64_t*>(p)[i]);
    case DType::kU8: return b[i];
    case DType::kI8: return static_cast<const int8_t*>(p)[i];
    case DType::kF8E4M3: return decode(MiniFloat::kE4M3, b[i]);
    case DType::kF8E5M2: return decode(MiniFloat::kE5M2, b[i]);
    case DType::kUE8M0: return decode_ue8m0(b[i]);
    case DType::kI4: return unpack_int4(b[i / 2], int(i % 2));
    case DType::kU4: return unpack_uint4(b[i / 2], int(i % 2));
    case DType::kF4E2M1: return decode(MiniFloat::kE2M1, uint8_t(unpack_uint4(b[i / 2], int(i % 2))));
    case DType::kCount: break;
  }
  MOEKIT_FAIL("load_as_float: invalid dtype ", static_cast<int>(t));  // every dtype is handled
}

void store_from_float(void* p, DType t, int64_t i, float v) {
  switch (t) {
    case DType::kF32: static_cast<float*>(p)[i] = v; return;
    case DType::kBF16: static_cast<uint16_t*>(p)[i] = float_to_bf16(v); return;
    case DType::kF16: static_cast<uint16_t*>(p)[i] = float_to_f16(v); return;
    default: MOEKIT_FAIL("store_from_float: dtype ", name(t), " is not a float type");
  }
}

}  // namespace moekit
