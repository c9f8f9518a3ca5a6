// Element types and their traits table. Every per-dtype fact lives in one row of kDTypeTraits;
// nothing else switches on the dtype to learn sizes or names.
#pragma once

#include <cstdint>
#include <cstring>
#include <string_view>

namespace moekit {

enum class DType : uint8_t {
  kF32,
  kF16,
  kBF16,
  kI32,
  kI64,
  kU8,
  kCount,  // keep last
};

struct DTypeTraits {
  DType dtype;
  std::string_view name;  // as used by --format / JSON
  int bits;               // storage bits per element
  bool is_float;
  uint8_t dlpack_code;    // DLDataTypeCode: 0 int, 1 uint, 2 float, 4 bfloat
};

inline constexpr DTypeTraits kDTypeTraits[] = {
    {DType::kF32, "fp32", 32, true, 2},  {DType::kF16, "fp16", 16, true, 2},
    {DType::kBF16, "bf16", 16, true, 4}, {DType::kI32, "int32", 32, false, 0},
    {DType::kI64, "int64", 64, false, 0}, {DType::kU8, "uint8", 8, false, 1},
};
static_assert(sizeof(kDTypeTraits) / sizeof(kDTypeTraits[0]) == static_cast<int>(DType::kCount));

constexpr const DTypeTraits& traits(DType t) { return kDTypeTraits[static_cast<int>(t)]; }
constexpr std::string_view name(DType t) { return traits(t).name; }
constexpr int64_t element_bytes(DType t) { return traits(t).bits / 8; }
// Parses "bf16", "fp16", "fp32" (and the other names of the table); throws moekit::Error.
DType parse_dtype(std::string_view s);

// ---- scalar conversions (round to nearest even; NaN stays NaN) ----
struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
float f16_to_float(uint16_t h);
uint16_t float_to_f16(float f);

// Reads element i of a contiguous buffer of dtype t as float (fp32/fp16/bf16 only).
float load_as_float(const void* p, DType t, int64_t i);
void store_from_float(void* p, DType t, int64_t i, float v);

}  // namespace moekit
