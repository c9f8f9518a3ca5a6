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
  // 1 / b to ~1 ulp: the 14-bit estimate and one Newton step (vdivps is ~10x slower). b = +inf
  // is taken as the largest float (a tiny result instead of the Newton step's inf * 0 = NaN);
  // NaN stays NaN (min returns its second operand then).
  static F rcp(F b) {
    b = min(set1(3.40282347e38f), b);
    const F r = _mm512_rcp14_ps(b);
    return mul(r, fnmadd(b, r, set1(2.0f)));
  }
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
  // ---- quantized panels (gemm_x86_quant.h, gemm_x86_int8.h) ----
  static F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b
  static F cvt_i(I v) { return _mm512_cvtepi32_ps(v); }
  static I sub_i(I a, I b) { return _mm512_sub_epi32(a, b); }
  // The 16 values of a table of 4-bit codes, and the value of the low 4 bits of each lane.
  using Lut = F;
  static Lut load_lut(const float* t) { return _mm512_loadu_ps(t); }
  static F lut16(const Lut& t, I idx) { return _mm512_permutexvar_ps(idx, t); }
  // kLanes bytes as values: int8, uint8; e4m3 (no NaN code) as value * 2^-8 (kernels.h kFp8):
  // its bits placed into fp16 (same layout, bias 15 for 7), which vcvtph2ps widens exactly and
  // at full speed for subnormal codes too (an fp32 denormal would cost a ~50 ns microcode
  // assist in the FMA or multiply that reads it, measured on Emerald Rapids).
  static F i8_to_f(const void* p) {
    return cvt_i(_mm512_cvtepi8_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p))));
  }
  static F u8_to_f(const void* p) {
    return cvt_i(_mm512_cvtepu8_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p))));
  }
  static F e4m3_to_f(const void* p) {
    // Sign-extended words: bits 15 and 14 both hold the sign after << 7; the mask clears 14.
    const __m256i x = _mm256_cvtepi8_epi16(_mm_loadu_si128(static_cast<const __m128i*>(p)));
    return _mm512_cvtph_ps(
        _mm256_and_si256(_mm256_slli_epi16(x, 7), _mm256_set1_epi16(int16_t(0xbf80))));
  }
  // kLanes scales: bf16 bits, ue8m0 codes (2^(c - 127), c in 1..254).
  // 2 x kLanes e4m3 codes at once (one widening, shift and mask for both vectors).
  static void e4m3x2_to_f(const void* p, F& lo, F& hi) {
    const I x = _mm512_cvtepi8_epi16(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
    const I h = _mm512_and_si512(_mm512_slli_epi16(x, 7), _mm512_set1_epi16(int16_t(0xbf80)));
    lo = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
    hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
  }
  static F bf16_to_f(const void* p) {
    return as_f(
        slli(_mm512_cvtepu16_epi32(_mm256_loadu_si256(static_cast<const __m256i*>(p))), 16));
  }
  static F e8_to_f(const void* p) {
    return as_f(slli(_mm512_cvtepu8_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p))), 23));
  }
  // acc + the 4-byte dot products of unsigned b with the signed bytes of a: AVX512-VNNI
  // vpdpbusd (asm: no -mavx512vnni needed; the caller checks the CPU has it).
  static I bcast4(const void* p) {  // 4 bytes into every lane: a load, no shuffle uop
    I r;
    __asm__("vpbroadcastd %1, %0" : "=v"(r) : "m"(*static_cast<const int32_t*>(p)));
    return r;
  }
  static I dpbusd(I acc, I b, I a) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(b), "v"(a));
    return acc;
  }
  // Loads n <= kLanes floats (the others 0).
  static F load_n(const float* p, int n) {
    return n == kLanes ? load(p) : _mm512_maskz_loadu_ps(__mmask16((1u << n) - 1), p);
  }
  // |x| where finite, else 0; x where not NaN, else 0.
  static F abs_finite(F x) {
    const F a = _mm512_abs_ps(x);
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(a, set1(__builtin_inff()), _CMP_LT_OQ), a);
  }
  static F nan_to_zero(F x) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, x, _CMP_ORD_Q), x); }
  static float reduce_max(F x) { return _mm512_reduce_max_ps(x); }
  static int32_t reduce_add_i(I x) { return _mm512_reduce_add_epi32(x); }
  static I cvt_f(F x) { return _mm512_cvtps_epi32(x); }  // x integral here
  // The low byte of n <= kLanes int32 lanes (values in [-127, 127]) to p.
  static void store_i8_n(void* p, I v, int n) {
    _mm512_mask_cvtepi32_storeu_epi8(p, __mmask16(n == kLanes ? 0xffffu : (1u << n) - 1), v);
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
  static F rcp(F b) {  // as V512's, from the 12-bit estimate: ~23 bits
    b = min(set1(3.40282347e38f), b);
    const F r = _mm256_rcp_ps(b);
    return mul(r, _mm256_fnmadd_ps(b, r, set1(2.0f)));
  }
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
  // ---- quantized panels: as V512's ----
  static F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static F cvt_i(I v) { return _mm256_cvtepi32_ps(v); }
  static I sub_i(I a, I b) { return _mm256_sub_epi32(a, b); }
  // 8-lane permutes index 8 entries: two halves of the table, chosen by bit 3 of the code.
  struct Lut {
    F lo, hi;
  };
  static Lut load_lut(const float* t) { return {_mm256_loadu_ps(t), _mm256_loadu_ps(t + 8)}; }
  static F lut16(const Lut& t, I idx) {
    const F lo = _mm256_permutevar8x32_ps(t.lo, idx), hi = _mm256_permutevar8x32_ps(t.hi, idx);
    return _mm256_blendv_ps(lo, hi, as_f(slli(idx, 28)));
  }
  static __m128i load8(const void* p) { return _mm_loadl_epi64(static_cast<const __m128i*>(p)); }
  static F i8_to_f(const void* p) { return cvt_i(_mm256_cvtepi8_epi32(load8(p))); }
  static F u8_to_f(const void* p) { return cvt_i(_mm256_cvtepu8_epi32(load8(p))); }
  static F e4m3_to_f(const void* p) {
    const __m128i x = _mm_cvtepi8_epi16(load8(p));
    return _mm256_cvtph_ps(_mm_and_si128(_mm_slli_epi16(x, 7), _mm_set1_epi16(int16_t(0xbf80))));
  }
  static F bf16_to_f(const void* p) {
    return as_f(slli(_mm256_cvtepu16_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p))), 16));
  }
  static F e8_to_f(const void* p) { return as_f(slli(_mm256_cvtepu8_epi32(load8(p)), 23)); }
  // AVX-VNNI: {vex} vpdpbusd.
  static I dpbusd(I acc, I b, I a) {
    __asm__("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(b), "x"(a));
    return acc;
  }
  static I bcast4(const void* p) {
    I r;
    __asm__("vpbroadcastd %1, %0" : "=x"(r) : "m"(*static_cast<const int32_t*>(p)));
    return r;
  }
  static I lanes_below(int n) {
    return _mm256_cmpgt_epi32(set1_i(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static F load_n(const float* p, int n) {
    return n == kLanes ? load(p) : _mm256_maskload_ps(p, lanes_below(n));
  }
  static F abs_finite(F x) {
    const F a = _mm256_and_ps(x, as_f(set1_i(0x7fffffff)));
    return _mm256_and_ps(a, _mm256_cmp_ps(a, set1(__builtin_inff()), _CMP_LT_OQ));
  }
  static F nan_to_zero(F x) { return _mm256_and_ps(x, _mm256_cmp_ps(x, x, _CMP_ORD_Q)); }
  static float reduce_max(F x) {
    alignas(32) float v[kLanes];
    _mm256_store_ps(v, x);
    float m = v[0];
    for (float e : v) m = e > m ? e : m;
    return m;
  }
  static int32_t reduce_add_i(I x) {
    alignas(32) int32_t v[kLanes];
    _mm256_store_si256(reinterpret_cast<__m256i*>(v), x);
    int32_t s = 0;
    for (int32_t e : v) s += e;
    return s;
  }
  static I cvt_f(F x) { return _mm256_cvtps_epi32(x); }
  static void store_i8_n(void* p, I v, int n) {
    alignas(32) int32_t t[kLanes];
    _mm256_store_si256(reinterpret_cast<__m256i*>(t), v);
    for (int i = 0; i < n; ++i) static_cast<int8_t*>(p)[i] = int8_t(t[i]);
  }
  static F round_bf16(F v) {
    I nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    return as_f(slli(round_to_bf16_bits<I, V256>(_mm256_castps_si256(v), nan), 16));
  }
};
#endif  // __AVX2__

}  // namespace
}  // namespace moekit::cpu
