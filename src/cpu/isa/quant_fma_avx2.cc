// AVX2 family, quantized panels decoded in registers (gemm_x86_quant.h). 16 registers: tiles
// of 2 rows x 2 vectors (4 accumulators + 4 partial sums + codes, the two table halves,
// values) in four passes per panel.
#include "cpu/isa/vec_x86.h"

namespace moekit::cpu {
namespace {
struct Family {
  using V = V256;
  static constexpr int kQRows = 2, kQVecs = 2, kQSmallRows = 2, kQSmallVecs = 2;
};
}  // namespace
}  // namespace moekit::cpu

#include "cpu/isa/gemm_x86_quant.h"

namespace moekit::cpu {
void add_quant_fma_avx2(KernelTable& t) {
  t.gemm_quant[int(QFamily::kNibble)] = &gemm_nibble<Family>;
  t.gemm_quant[int(QFamily::kByte)] = &gemm_byte<Family>;
  t.gemm_quant[int(QFamily::kFp8)] = &gemm_fp8<Family>;
}
}  // namespace moekit::cpu
