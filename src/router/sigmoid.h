// The sigmoid of routing scores, bit-identical on the host and on CUDA devices, so that the CPU
// and CUDA routers choose the same experts (the choice of sigmoid+bias routing compares these
// values). Library exp/expf differ between glibc and CUDA in the last bit; this one uses only
// correctly rounded IEEE operations (+, -, *, / and explicit fma, no contraction by the
// compiler: every multiply-add is written as fma), so every platform computes the same bits.
//
// Accuracy: exp(-x) in double to ~1e-15 relative through exp(t) = 2^n * exp(r), r = t - n ln 2 in
// [-ln2/2, ln2/2] by a Cody-Waite split, exp(r) by its degree-13 Taylor polynomial (truncation
// below 2^-58); the float result is then within one rounding of the true sigmoid.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define MOEKIT_HOST_DEVICE __host__ __device__
#else
#define MOEKIT_HOST_DEVICE
#endif

namespace moekit::detail {

MOEKIT_HOST_DEVICE inline double exact_fma(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return __fma_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

MOEKIT_HOST_DEVICE inline float routing_sigmoid_impl(float x) {
  if (x != x) return x;  // NaN
  const double t = -static_cast<double>(x);
  if (t > 709.0) return 0.0f;  // exp(t) overflows: 1 / (1 + inf)
  if (t < -745.0) return 1.0f;
  constexpr double kLog2e = 1.4426950408889634074;
  constexpr double kLn2Hi = 6.93147180369123816490e-01;  // high bits of ln 2 (exact n * kLn2Hi)
  constexpr double kLn2Lo = 1.90821492927058770002e-10;
  const double n = std::nearbyint(t * kLog2e);
  const double r = exact_fma(-n, kLn2Lo, exact_fma(-n, kLn2Hi, t));
  double p = 1.0 / 6227020800.0;  // 1/13!
  constexpr double kInvFact[] = {1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
                                 1.0 / 362880.0,    1.0 / 40320.0,    1.0 / 5040.0,
                                 1.0 / 720.0,       1.0 / 120.0,      1.0 / 24.0,
                                 1.0 / 6.0,         0.5,              1.0,
                                 1.0};
  for (double c : kInvFact) p = exact_fma(p, r, c);
  const double e = std::ldexp(p, static_cast<int>(n));
  return static_cast<float>(1.0 / (1.0 + e));
}

}  // namespace moekit::detail
