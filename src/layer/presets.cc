// The model presets of DESIGN.md section 5, with the routing and activation of each model's
// reference implementation.
#include "moekit/presets.h"

#include <string>

#include "moekit/core/error.h"

namespace moekit {
namespace {

constexpr Activation kSiluGated{};  // SiLU(gate) * up, gate rows then up rows
// gpt-oss checkpoints interleave gate and up rows and use the clamped SwiGLU.
constexpr Activation kSwigluOaiInterleaved{.fn = ActivationFn::kSwigluOai,
                                           .gated = true,
                                           .layout = GateUpLayout::kInterleaved,
                                           .alpha = 1.702f,
                                           .limit = 7.0f};

constexpr RouterConfig softmax_topk_renorm() {
  return {.method = RoutingMethod::kSoftmaxTopK};
}

constexpr RouterConfig sigmoid_grouped(int n_group, int topk_group, float scale) {
  return {.method = RoutingMethod::kSigmoidGroupedTopK,
          .renormalize = true,
          .n_group = n_group,
          .topk_group = topk_group,
          .routed_scaling_factor = scale};
}

constexpr RouterConfig topk_softmax() {
  return {.method = RoutingMethod::kTopKSoftmax};
}

// Llama-4 weights are the sigmoid of the top-1 logit, never renormalized.
constexpr RouterConfig llama4_top1() {
  return {.method = RoutingMethod::kLlama4Top1Sigmoid, .renormalize = false};
}

// Fills the router's E and k from the preset's, so the two can never disagree.
constexpr Preset make(std::string_view name, int E, int64_t H, int64_t I, int k,
                      RouterConfig router, Activation activation, bool has_bias, int shared) {
  router.num_experts = E;
  router.top_k = k;
  return {name, E, H, I, k, router, activation, has_bias, shared};
}

constexpr Preset kPresets[] = {
    make("mixtral-8x7b", 8, 4096, 14336, 2, softmax_topk_renorm(), kSiluGated, false, 0),
    make("qwen3-30b-a3b", 128, 2048, 768, 8, softmax_topk_renorm(), kSiluGated, false, 0),
    make("qwen3-235b-a22b", 128, 4096, 1536, 8, softmax_topk_renorm(), kSiluGated, false, 0),
    make("deepseek-v3", 256, 7168, 2048, 8, sigmoid_grouped(8, 4, 2.5f), kSiluGated, false, 1),
    make("kimi-k2", 384, 7168, 2048, 8, sigmoid_grouped(1, 1, 2.827f), kSiluGated, false, 1),
    make("gpt-oss-20b", 32, 2880, 2880, 4, topk_softmax(), kSwigluOaiInterleaved, true, 0),
    make("gpt-oss-120b", 128, 2880, 2880, 4, topk_softmax(), kSwigluOaiInterleaved, true, 0),
    make("llama4-scout", 16, 5120, 8192, 1, llama4_top1(), kSiluGated, false, 1),
};

}  // namespace

std::span<const Preset> presets() {
  return kPresets;
}

const Preset& find_preset(std::string_view name) {
  for (const Preset& p : kPresets)
    if (p.name == name) return p;
  std::string known;
  for (const Preset& p : kPresets) known += detail::concat(known.empty() ? "" : ", ", p.name);
  MOEKIT_FAIL("unknown preset '", name, "' (known: ", known, ")");
}

}  // namespace moekit
