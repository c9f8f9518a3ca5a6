// x86 vector wrappers with one interface for 512-bit (AVX-512F/BW/VL/DQ) and 256-bit (AVX2+FMA)
// registers, so gemm_x86.h and math_x86.h are written once. Only the ISA translation units
// include this; everything is in an anonymous namespace so that code built with different
// flags in different units never merges at link time.
#pragma once

#include <immintrin.h>

// GCC 12 reports its own _mm512_undefined_ps() inside the intrinsics as "maybe uninitialized"
// wherever they inline; the warning says nothing about this code.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include <cstdint>

namespace moekit::cpu {
namespace {

// bf16 bits (RNE, NaN kept quiet) of fp32 lanes held as 32-bit integers, like float_to_bf16.
template <typename I, typename Ops>
I round_to_bf16_bits(I u, I is_nan) {
  I lsb = Ops::and_(Ops::srli(u, 16), Ops::set1_i(1));
  I r = Ops::srli(Ops::add_i(u, Ops::add_i(lsb, Ops::set1_i(0x7fff))), 16);
  I q = Ops::or_(Ops::srli(u, 16), Ops::set1_i(0x40));
  return Ops::blend_i(r, q, is_nan);
}

#ifdef __AVX512F__
struct V512 {
  using F = __m512;
  using I = __m512i;
  static constexpr int kLanes = 16;
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static I set1_i(int32_t v) { return _mm512_set1_epi32(v); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static I load_i(const void* p) { return _mm512_loadu_si512(p); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  // acc + b * broadcast(*a), the broadcast folded into the FMA. Written in asm so that the
  // compiler reloads A for every use instead of keeping 2R broadcasts live and spilling
  // accumulators (the GEMM tiles need every register).
  static F fma_bcast(F acc, F b, const float* a) {
    __asm__("vfmadd231ps %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(b), "m"(*a));
    return acc;
  }
  static F min(F a, F b) { return _mm512_min_ps(a, b); }  // a < b ? a : b
  static F max(F a, F b) { return _mm512_max_ps(a, b); }  // a > b ? a : b
  static F round(F x) {
    return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static F scale2(F p, F n) { return _mm512_scalef_ps(p, n); }  // p * 2^n, n integral
  static F as_f(I v) { return _mm512_castsi512_ps(v); }
  static I srli(I v, int s) { return _mm512_srli_epi32(v, s); }
  static I slli(I v, int s) { return _mm512_slli_epi32(v, s); }
  static I and_(I a, I b) { return _mm512_and_si512(a, b); }
  static I or_(I a, I b) { return _mm512_or_si512(a, b); }
  static I add_i(I a, I b) { return _mm512_add_epi32(a, b); }
  static I xor_i(I a, I b) { return _mm512_xor_si512(a, b); }
  static I blend_i(I a, I b, I mask) {
    return _mm512_mask_mov_epi32(a, _mm512_test_epi32_mask(mask, mask), b);
  }
  static void store_n(float* p, F v, int n) {
    if (n == kLanes)
      _mm512_storeu_ps(p, v);
    else if (n > 0)
      _mm512_mask_storeu_ps(p, __mmask16((1u << n) - 1), v);
  }
  // Rounds to the nearest bf16 (even on ties, NaN kept quiet), returned as fp32 lanes.
  static F round_bf16(F v) {
    I nan = _mm512_movm_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q));
    return as_f(slli(round_to_bf16_bits<I, V512>(_mm512_castps_si512(v), nan), 16));
  }
};
#endif  // __AVX512F__

#ifdef __AVX2__
struct V256 {
  using F = __m256;
  using I = __m256i;
  static constexpr int kLanes = 8;
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static I set1_i(int32_t v) { return _mm256_set1_epi32(v); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static I load_i(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F fma_bcast(F acc, F b, const float* a) {  // as V512's, with a scratch register
    F t;
    __asm__("vbroadcastss %3, %1\n\tvfmadd231ps %1, %2, %0"
            : "+x"(acc), "=&x"(t)
            : "x"(b), "m"(*a));
    return acc;
  }
  static F min(F a, F b) { return _mm256_min_ps(a, b); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static F round(F x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // p * 2^n in two steps so that n in [-151, 129] never builds a bad exponent.
  static F scale2(F p, F n) {
    I ni = _mm256_cvtps_epi32(n);
    I n1 = _mm256_srai_epi32(ni, 1);
    I n2 = _mm256_sub_epi32(ni, n1);
    F s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, set1_i(127)), 23));
    F s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, set1_i(127)), 23));
    return mul(mul(p, s1), s2);
  }
  static F as_f(I v) { return _mm256_castsi256_ps(v); }
  static I srli(I v, int s) { return _mm256_srli_epi32(v, s); }
  static I slli(I v, int s) { return _mm256_slli_epi32(v, s); }
  static I and_(I a, I b) { return _mm256_and_si256(a, b); }
  static I or_(I a, I b) { return _mm256_or_si256(a, b); }
  static I add_i(I a, I b) { return _mm256_add_epi32(a, b); }
  static I xor_i(I a, I b) { return _mm256_xor_si256(a, b); }
  static I blend_i(I a, I b, I mask) { return _mm256_blendv_epi8(a, b, mask); }
  static void store_n(float* p, F v, int n) {
    if (n == kLanes) {
      _mm256_storeu_ps(p, v);
    } else if (n > 0) {
      I lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      _mm256_maskstore_ps(p, _mm256_cmpgt_epi32(set1_i(n), lanes), v);
    }
  }
  static F round_bf16(F v) {
    I nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    return as_f(slli(round_to_bf16_bits<I, V256>(_mm256_castps_si256(v), nan), 16));
  }
};
#endif  // __AVX2__

}  // namespace
}  // namespace moekit::cpu
