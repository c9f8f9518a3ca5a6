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
  kI8,
  kF8E4M3,  // OCP e4m3fn (no infinity), quant/encodings.h
  kF8E5M2,
  kUE8M0,   // power-of-two scale 2^(code - 127)
  kI4,      // two per byte, element 2i in the low nibble; signed [-8, 7]
  kU4,      // two per byte; [0, 15] (with a zero point)
  kF4E2M1,  // two per byte, like kI4
  kCount,   // keep last
};

struct DTypeTraits {
  DType dtype;
  std::string_view name;  // as used by --format / JSON
  int bits;               // storage bits per element (4: packed two per byte)
  bool is_float;          // fp32/fp16/bf16: load_as_float reads it, kernels compute in it
  uint8_t dlpack_code;    // DLDataTypeCode: 0 int, 1 uint, 2 float, 4 bfloat, 10 float8_e4m3fn,
                          // 12 float8_e5m2, 14 float8_e8m0fnu, 17 float4_e2m1fn (DLPack 1.1)
};

inline constexpr DTypeTraits kDTypeTraits[] = {
    {DType::kF32, "fp32", 32, true, 2},          {DType::kF16, "fp16", 16, true, 2},
    {DType::kBF16, "bf16", 16, true, 4},         {DType::kI32, "int32", 32, false, 0},
    {DType::kI64, "int64", 64, false, 0},        {DType::kU8, "uint8", 8, false, 1},
    {DType::kI8, "int8", 8, false, 0},           {DType::kF8E4M3, "fp8_e4m3", 8, false, 10},
    {DType::kF8E5M2, "fp8_e5m2", 8, false, 12},  {DType::kUE8M0, "ue8m0", 8, false, 14},
    {DType::kI4, "int4", 4, false, 0},           {DType::kU4, "uint4", 4, false, 1},
    {DType::kF4E2M1, "fp4_e2m1", 4, false, 17},
};
static_assert(sizeof(kDTypeTraits) / sizeof(kDTypeTraits[0]) == static_cast<int>(DType::kCount));

constexpr const DTypeTraits& traits(DType t) { return kDTypeTraits[static_cast<int>(t)]; }
constexpr std::string_view name(DType t) { return traits(t).name; }
// Bytes of one element; packed 4-bit types have none (use storage_bytes), so this throws for them.
int64_t element_bytes(DType t);
// Bytes that n consecutive elements occupy (rounded up to whole bytes for packed types).
constexpr int64_t storage_bytes(DType t, int64_t n) { return (n * traits(t).bits + 7) / 8; }
constexpr bool is_packed(DType t) { return traits(t).bits < 8; }
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

// Reads element i of a contiguous buffer of dtype t as its value: fp32/fp16/bf16, fp8, fp4 and
// integer codes (int8, int4, uint4, uint8), ue8m0 as its power of two. Unscaled: a quantized
// element's scale is applied by whoever knows the format (quant/format.h).
float load_as_float(const void* p, DType t, int64_t i);
// Writes element i (fp32/fp16/bf16 only).
void store_from_float(void* p, DType t, int64_t i, float v);

}  // namespace moekit
