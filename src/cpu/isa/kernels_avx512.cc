// AVX-512 family: bf16 panels widened and FMAed, fp32 panels FMAed. Register tiles: bf16
// 7 rows x 64 columns (28 zmm accumulators + mask, raw, even, odd; A is a memory operand of the
// FMAs): 8 widen uops per 56 FMAs, 7/8 of the FMA peak; fp32 6 x 64 (24 + 4 B + 1 broadcast).
#include "cpu/isa/vec_x86.h"

namespace moekit::cpu {
namespace {
struct Family {
  using V = V512;
  static constexpr int kRowsBf16 = 7, kVecsBf16 = 4, kRowsF32 = 6, kVecsF32 = 4;
};
}  // namespace
}  // namespace moekit::cpu

#include "cpu/isa/fma_family.h"

namespace moekit::cpu {
const KernelTable& kernels_avx512() {
  static const KernelTable table = [] {
    KernelTable t = fma_family_table();
    add_quant_fma_avx512(t);
    add_quant_int8_avx512(t);
    return t;
  }();
  return table;
}
}  // namespace moekit::cpu
