#include "moekit/activation.h"

#include "moekit/core/error.h"

namespace moekit {

namespace {
struct ActivationName {
  ActivationFn fn;
  std::string_view name;
};
constexpr ActivationName kActivationNames[] = {
    {ActivationFn::kSilu, "silu"},        {ActivationFn::kGeluErf, "gelu"},
    {ActivationFn::kGeluTanh, "gelu_tanh"}, {ActivationFn::kRelu2, "relu2"},
    {ActivationFn::kSwigluOai, "swiglu_oai"},
};
constexpr std::string_view kNoGate = "_nogate";
constexpr std::string_view kInterleaved = "_interleaved";
}  // namespace

std::string Activation::str() const {
  std::string s;
  for (const auto& n : kActivationNames)
    if (n.fn == fn) s = n.name;
  if (!gated) s += kNoGate;
  if (gated && layout == GateUpLayout::kInterleaved) s += kInterleaved;
  return s;
}

Activation parse_activation(std::string_view s) {
  Activation a;
  const std::string_view full = s;
  if (s.ends_with(kNoGate)) {
    a.gated = false;
    s.remove_suffix(kNoGate.size());
  } else if (s.ends_with(kInterleaved)) {
    a.layout = GateUpLayout::kInterleaved;
    s.remove_suffix(kInterleaved.size());
  }
  std::string known;
  for (const auto& n : kActivationNames) {
    if (n.name == s) {
      a.fn = n.fn;
      MOEKIT_CHECK(a.gated || a.fn != ActivationFn::kSwigluOai,
                   "activation 'swiglu_oai' is gated by definition; '", full, "' is not valid");
      return a;
    }
    known += (known.empty() ? "" : ", ") + std::string(n.name);
  }
  MOEKIT_FAIL("unknown activation '", full, "' (known: ", known, "; suffix ", kNoGate, " or ",
              kInterleaved, ")");
}

}  // namespace moekit
