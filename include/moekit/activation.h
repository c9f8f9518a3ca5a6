// The activation between the two expert GEMMs. Scalar forms live here (inline, templated on
// float/double) so the oracle and every backend evaluate the same formula.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <string_view>
#include <type_traits>

// apply_activation and the W13 row helpers are also compiled into CUDA kernels (nvcc,
// --expt-relaxed-constexpr), so the GPU evaluates the very formula the oracle does.
#if defined(__CUDACC__)
#define MOEKIT_HOST_DEVICE __host__ __device__
#else
#define MOEKIT_HOST_DEVICE
#endif

namespace moekit {

enum class ActivationFn { kSilu, kGeluErf, kGeluTanh, kRelu2, kSwigluOai };

// W13 rows: gate rows [0, I) then up rows [I, 2I) (kSplit), or gate/up alternating row by row
// (kInterleaved: row 2j is gate j, row 2j+1 is up j), as some checkpoints store them.
enum class GateUpLayout { kSplit, kInterleaved };

struct Activation {
  ActivationFn fn = ActivationFn::kSilu;
  bool gated = true;  // gated: act(gate) * up, W13 has 2I rows; non-gated: act(x), W13 has I rows
  GateUpLayout layout = GateUpLayout::kSplit;
  float alpha = 1.702f;  // SwiGLU-OAI only
  float limit = 7.0f;    // SwiGLU-OAI only

  // Rows of W13 per expert for intermediate size I.
  MOEKIT_HOST_DEVICE int64_t w13_rows(int64_t I) const { return gated ? 2 * I : I; }
  // Row of W13 holding gate (or the only input) of intermediate column j.
  MOEKIT_HOST_DEVICE int64_t gate_row(int64_t j, [[maybe_unused]] int64_t I) const {
    return !gated ? j : layout == GateUpLayout::kSplit ? j : 2 * j;
  }
  MOEKIT_HOST_DEVICE int64_t up_row(int64_t j, int64_t I) const {
    return layout == GateUpLayout::kSplit ? I + j : 2 * j + 1;
  }
  // "silu", "gelu", "gelu_tanh", "relu2", "swiglu_oai", each optionally "_nogate"; for messages.
  std::string str() const;
};

// Parses the names of Activation::str(); throws moekit::Error naming the bad value.
Activation parse_activation(std::string_view s);

// x / (1 + e^-y), the logistic factor of silu and swiglu_oai. On the GPU in fp32 with the
// hardware's approximations (__expf, __fdividef: a few ulp of fp32, far below the 16-bit or fp8
// rounding of the result; IEEE expf and division left the activation kernels issue-bound), on
// the host with the standard functions.
template <typename T>
MOEKIT_HOST_DEVICE inline T logistic_times(T x, T y) {
#ifdef __CUDA_ARCH__
  if constexpr (std::is_same_v<T, float>) return __fdividef(x, 1.0f + __expf(-y));
#endif
  return x / (T(1) + std::exp(-y));
}

// act(gate) for non-gated, act(gate) * up for gated, in precision T, for the function F.
template <ActivationFn F, typename T>
MOEKIT_HOST_DEVICE inline T activation_of(const Activation& a, T gate, T up) {
  if constexpr (F == ActivationFn::kSilu) {
    T g = logistic_times(gate, gate);
    return a.gated ? g * up : g;
  } else if constexpr (F == ActivationFn::kGeluErf) {
    T g = T(0.5) * gate * (T(1) + std::erf(gate * T(0.70710678118654752440)));
    return a.gated ? g * up : g;
  } else if constexpr (F == ActivationFn::kGeluTanh) {
    const T c = T(0.79788456080286535588);  // sqrt(2/pi)
    T g = T(0.5) * gate * (T(1) + std::tanh(c * (gate + T(0.044715) * gate * gate * gate)));
    return a.gated ? g * up : g;
  } else if constexpr (F == ActivationFn::kRelu2) {
    T r = gate > T(0) ? gate : T(0);
    return a.gated ? r * r * up : r * r;
  } else {
    static_assert(F == ActivationFn::kSwigluOai);
    // gpt-oss: gate clamped above, up clamped both sides, glu = g*sigmoid(alpha*g), (up+1)*glu.
    const T lim = T(a.limit);
    T g = std::min(gate, lim);
    T u = std::clamp(up, -lim, lim);
    T glu = logistic_times(g, T(a.alpha) * g);
    return (u + T(1)) * glu;
  }
}

// Calls f(std::integral_constant<ActivationFn, fn>{}): loops over many values switch once.
template <typename F>
MOEKIT_HOST_DEVICE inline void with_activation_fn(ActivationFn fn, F&& f) {
  using Fn = ActivationFn;
  switch (fn) {
    case Fn::kSilu:
      return f(std::integral_constant<Fn, Fn::kSilu>{});
    case Fn::kGeluErf:
      return f(std::integral_constant<Fn, Fn::kGeluErf>{});
    case Fn::kGeluTanh:
      return f(std::integral_constant<Fn, Fn::kGeluTanh>{});
    case Fn::kRelu2:
      return f(std::integral_constant<Fn, Fn::kRelu2>{});
    case Fn::kSwigluOai:
      return f(std::integral_constant<Fn, Fn::kSwigluOai>{});
  }
}

// activation_of for a.fn chosen at run time.
template <typename T>
MOEKIT_HOST_DEVICE inline T apply_activation(const Activation& a, T gate, T up) {
  T r = T(0);
  with_activation_fn(a.fn, [&](auto fn) { r = activation_of<decltype(fn)::value>(a, gate, up); });
  return r;
}

}  // namespace moekit
