// AVX-512 family, w8a8 (gemm_x86_int8.h): AVX512-VNNI vpdpbusd on 6 rows x 4 vectors of int32
// accumulators (24 zmm + 6 broadcast A + the weight vector). CPUs of the family without VNNI
// (Skylake-X) take the scalar kernel.
#include "cpu/isa/vec_x86.h"

namespace moekit::cpu {
namespace {
struct Family {
  using V = V512;
  static constexpr int kI8Rows = 6, kI8Vecs = 4;
};
}  // namespace
}  // namespace moekit::cpu

#include "cpu/isa/gemm_x86_int8.h"

namespace moekit::cpu {
void add_quant_int8_avx512(KernelTable& t) {
  t.requant_int8 = &requant_int8<V512>;
  __builtin_cpu_init();
  const bool vnni = __builtin_cpu_supports("avx512vnni");
  t.gemm_quant[int(QFamily::kInt8Dot)] =
      vnni ? &gemm_int8<Family> : kernels_scalar().gemm_quant[int(QFamily::kInt8Dot)];
  t.peak_loop_int8 = vnni ? &int8_peak_loop<V512> : kernels_scalar().peak_loop_int8;
}
}  // namespace moekit::cpu
