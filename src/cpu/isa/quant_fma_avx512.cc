// AVX-512 family, quantized panels decoded in registers (gemm_x86_quant.h). Tiles: 6 rows x 2
// vectors (12 accumulators + 12 partial sums + codes, table, values: the decoding of each code
// vector serves 6 rows) in two passes per panel, and 2 x 4 for panels of 1-2 rows (decode: one
// pass streams each panel once).
#include "cpu/isa/vec_x86.h"

namespace moekit::cpu {
namespace {
struct Family {
  using V = V512;
  static constexpr int kQRows = 6, kQVecs = 2, kQSmallRows = 2, kQSmallVecs = 4;
};
}  // namespace
}  // namespace moekit::cpu

#include "cpu/isa/gemm_x86_quant.h"

namespace moekit::cpu {
void add_quant_fma_avx512(KernelTable& t) {
  t.gemm_quant[int(QFamily::kNibble)] = &gemm_nibble<Family>;
  t.gemm_quant[int(QFamily::kByte)] = &gemm_byte<Family>;
  t.gemm_quant[int(QFamily::kFp8)] = &gemm_fp8<Family>;
}
}  // namespace moekit::cpu
