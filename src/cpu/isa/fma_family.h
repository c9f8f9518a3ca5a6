// What the FMA families (AVX-512, AVX2) add to gemm_x86.h: the peak loop and the streaming
// read at the family's vector width. Included once by each family's
// translation unit, which names its family `Family` before including this.
#pragma once

#include "cpu/isa/gemm_x86.h"

namespace moekit::cpu {
namespace {

double fma_peak_loop(DType, int64_t iters) {
  using V = Family::V;
  constexpr int kChains = 12;
  typename V::F acc[kChains];
  for (auto& v : acc) v = V::zero();
  typename V::F a = V::set1(1.0f), b = V::set1(1e-3f);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (auto& v : acc) v = V::fma(a, b, v);
    __asm__ volatile("" : "+x"(a), "+x"(b));
  }
  alignas(64) float out[V::kLanes];
  typename V::F s = V::zero();
  for (auto& v : acc) s = V::add(s, v);
  V::store_n(out, s, V::kLanes);
  volatile float sink = out[0];
  (void)sink;
  return double(iters) * kChains * 2 * V::kLanes;
}

uint64_t stream_read(const void* p, size_t bytes) {
  using V = Family::V;
  constexpr int kStep = 4 * V::kLanes * 4;  // 4 vectors per iteration
  const char* c = static_cast<const char*>(p);
  typename V::I s[4] = {V::set1_i(0), V::set1_i(0), V::set1_i(0), V::set1_i(0)};
  for (size_t i = 0; i + kStep <= bytes; i += kStep)
    for (int l = 0; l < 4; ++l) s[l] = V::add_i(s[l], V::load_i(c + i + l * V::kLanes * 4));
  alignas(64) int32_t out[V::kLanes];
  V::store_n(reinterpret_cast<float*>(out),
             V::as_f(V::xor_i(V::xor_i(s[0], s[1]), V::xor_i(s[2], s[3]))), V::kLanes);
  uint64_t t = 0;
  for (int32_t v : out) t = t * 31 + uint32_t(v);
  return t;
}

// The family's kernel table; the quantized kernels are added by the caller (their own TUs).
KernelTable fma_family_table() {
  KernelTable t{};
  t.gemm_bf16 = &gemm<Family, uint16_t>;
  t.gemm_f32 = &gemm<Family, float>;
  t.peak_loop = &fma_peak_loop;
  t.stream_read = &stream_read;
  return t;
}

}  // namespace
}  // namespace moekit::cpu
