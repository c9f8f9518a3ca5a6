// Vector activations for GEMM1's epilogue, matching apply_activation<float> (activation.h) to
// within a few ulp: the same operations in the same order, with exp replaced by a vector exp
// (Cody-Waite reduction, degree-7 Taylor polynomial on |r| <= ln2/2: truncation < 0.1 ulp,
// about 1-2 ulp in all), x / (1 + e) by x times a reciprocal estimate refined by one Newton
// step (~1 ulp; vdivps costs ~10x more in the epilogues of the int8 tiles) and erf evaluated
// by libm per lane.
#pragma once

#include <math.h>

#include "cpu/isa/vec_x86.h"
#include "moekit/activation.h"

namespace moekit::cpu {
namespace {

template <class V>
typename V::F vexp(typename V::F x) {
  using F = typename V::F;
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693145751953125f;  // few mantissa bits: n * kLn2Hi is exact
  constexpr float kLn2Lo = 1.42860682030941723212e-6f;
  // exp underflows to 0 below -104 and overflows to inf above 89; the operand order keeps NaN.
  x = V::max(V::set1(-104.f), V::min(V::set1(89.f), x));
  F n = V::round(V::mul(x, V::set1(kLog2e)));
  F r = V::fma(n, V::set1(-kLn2Hi), x);
  r = V::fma(n, V::set1(-kLn2Lo), r);
  constexpr float kInvFact[] = {1.f / 5040, 1.f / 720, 1.f / 120, 1.f / 24,
                                1.f / 6,    0.5f,      1.f,       1.f};
  F p = V::set1(kInvFact[0]);
  for (int i = 1; i < 8; ++i) p = V::fma(p, r, V::set1(kInvFact[i]));
  return V::scale2(p, n);
}

template <class V>
typename V::F verf_per_lane(typename V::F x) {
  alignas(64) float v[V::kLanes];
  if constexpr (V::kLanes == 16)
    _mm512_store_ps(v, x);
  else
    _mm256_store_ps(v, x);
  for (float& e : v) e = ::erff(e);
  return V::load(v);
}

// act(g) * u (gated) or act(g), lane by lane; see apply_activation in activation.h.
template <class V>
typename V::F vactivation(ActivationFn fn, bool gated, float alpha, float limit, typename V::F g,
                          typename V::F u) {
  using F = typename V::F;
  const F one = V::set1(1.f);
  F a;
  switch (fn) {
    case ActivationFn::kSilu:
      a = V::mul(g, V::rcp(V::add(one, vexp<V>(V::sub(V::zero(), g)))));
      break;
    case ActivationFn::kGeluErf:
      a = V::mul(V::mul(V::set1(0.5f), g),
                 V::add(one, verf_per_lane<V>(V::mul(g, V::set1(0.70710678118654752440f)))));
      break;
    case ActivationFn::kGeluTanh: {
      // 0.5 g (1 + tanh(y)) = g / (1 + exp(-2y)): no cancellation where tanh(y) is near -1.
      F g3 = V::mul(V::mul(V::mul(V::set1(0.044715f), g), g), g);
      F y = V::mul(V::set1(0.79788456080286535588f), V::add(g, g3));
      a = V::mul(g, V::rcp(V::add(one, vexp<V>(V::mul(V::set1(-2.f), y)))));
      break;
    }
    case ActivationFn::kRelu2: {
      F r = V::max(g, V::zero());
      a = V::mul(r, r);
      break;
    }
    case ActivationFn::kSwigluOai: {
      const F lim = V::set1(limit);
      F gc = V::min(lim, g);                                  // std::min(g, lim)
      F uc = V::min(lim, V::max(V::sub(V::zero(), lim), u));  // std::clamp(u, -lim, lim)
      F glu = V::mul(gc, V::rcp(V::add(one, vexp<V>(V::mul(V::set1(-alpha), gc)))));
      return V::mul(V::add(uc, one), glu);
    }
  }
  return gated ? V::mul(a, u) : a;
}

}  // namespace
}  // namespace moekit::cpu
