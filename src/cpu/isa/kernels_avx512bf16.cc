// AVX-512 + AVX512_BF16 family. Its GEMMs are the AVX-512 family's: measured on this machine
// (Emerald Rapids), vdpbf16ps zmm retires about half the flops of the two FMA ports, so bf16
// panels are widened and FMAed (gemm_x86.h). What BF16 adds is one more way to reach the peak,
// so the peak of this family is the best of a vdpbf16ps loop and an FMA loop.
#include "cpu/isa/vec_x86.h"
#include "cpu/kernels.h"

namespace moekit::cpu {

double dpbf16_peak_loop(int64_t iters) {
  constexpr int kChains = 24;  // covers latency x throughput
  __m512 acc[kChains];
  for (auto& v : acc) v = _mm512_setzero_ps();
  __m512i a = _mm512_set1_epi32(0x3f803f80), b = _mm512_set1_epi32(0x3c003c00);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 24
    for (auto& v : acc)
      v = _mm512_dpbf16_ps(v, reinterpret_cast<__m512bh&>(a), reinterpret_cast<__m512bh&>(b));
    __asm__ volatile("" : "+v"(a), "+v"(b));  // keep the operands opaque
  }
  __m512 s = _mm512_setzero_ps();
  for (auto& v : acc) s = _mm512_add_ps(s, v);
  volatile float sink = _mm512_reduce_add_ps(s);
  (void)sink;
  return double(iters) * kChains * 64;
}

const KernelTable& kernels_avx512bf16() {
  return kernels_avx512();
}

}  // namespace moekit::cpu
