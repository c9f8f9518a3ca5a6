// AVX2 family: 8-lane FMA; a 64-column panel is swept in passes of 2 vectors so that the tile
// fits the 16 registers: bf16 5 rows x 2 accumulators + mask, raw, even, odd, broadcast;
// fp32 6 x 2 + 2 B vectors + broadcast.
#include "cpu/isa/vec_x86.h"

namespace moekit::cpu {
namespace {
struct Family {
  using V = V256;
  static constexpr int kRowsBf16 = 5, kVecsBf16 = 2, kRowsF32 = 6, kVecsF32 = 2;
};
}  // namespace
}  // namespace moekit::cpu

#include "cpu/isa/fma_family.h"

namespace moekit::cpu {
const KernelTable& kernels_avx2() {
  static const KernelTable table = [] {
    KernelTable t = fma_family_table();
    add_quant_fma_avx2(t);
    add_quant_int8_avx2(t);
    return t;
  }();
  return table;
}
}  // namespace moekit::cpu
