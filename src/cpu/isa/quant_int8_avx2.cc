// AVX2 family, w8a8 (gemm_x86_int8.h): AVX-VNNI {vex} vpdpbusd on 2 rows x 4 vectors of int32
// accumulators (8 ymm + 2 broadcast A + the weight vector). CPUs of the family without AVX-VNNI
// take the scalar kernel.
#include "cpu/isa/vec_x86.h"

namespace moekit::cpu {
namespace {
struct Family {
  using V = V256;
  static constexpr int kI8Rows = 2, kI8Vecs = 4;
};
}  // namespace
}  // namespace moekit::cpu

#include "cpu/isa/gemm_x86_int8.h"

namespace moekit::cpu {
void add_quant_int8_avx2(KernelTable& t) {
  t.requant_int8 = &requant_int8<V256>;
  __builtin_cpu_init();
  const bool vnni = __builtin_cpu_supports("avxvnni");
  t.gemm_quant[int(QFamily::kInt8Dot)] =
      vnni ? &gemm_int8<Family> : kernels_scalar().gemm_quant[int(QFamily::kInt8Dot)];
  t.peak_loop_int8 = vnni ? &int8_peak_loop<V256> : kernels_scalar().peak_loop_int8;
}
}  // namespace moekit::cpu
