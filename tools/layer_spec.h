// The MoE layer a command works on: a DESIGN.md §5 preset, optionally with its shape overridden
// from the command line (-E -H -I -k --routing --activation), or an explicit shape alone.
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <string>
#include <vector>

#include "moekit/activation.h"
#include "moekit/core/dtype.h"
#include "moekit/quant/format.h"
#include "moekit/router.h"

namespace moekit::cli {

// Bound to the command line; 0 / empty means "from the preset" (or the default without one).
struct ShapeOptions {
  std::vector<std::string> presets;
  int experts = 0;
  int64_t hidden = 0;
  int64_t intermediate = 0;
  int top_k = 0;
  std::string routing;
  std::string activation;
};

// Registers --preset (a comma list when `preset_list`), -E, -H, -I, -k, --routing, --activation.
void add_shape_options(CLI::App& cmd, ShapeOptions& options, bool preset_list);

struct LayerSpec {
  std::string preset;  // preset name, or "custom" for an explicit shape
  bool shape_overridden = false;
  int num_experts = 0;       // E
  int64_t hidden = 0;        // H
  int64_t intermediate = 0;  // I
  int top_k = 0;
  RouterConfig router;
  Activation activation;
  bool has_bias = false;
  int num_shared_experts = 0;

  int64_t shared_intermediate() const { return int64_t(num_shared_experts) * intermediate; }
  // Weight (and bias) elements of one routed expert, and of the fused shared expert (0: none).
  int64_t expert_elements() const;
  // Bytes of one routed expert and of the shared expert in `format` (weights with their scales;
  // biases in the layer's activation dtype), and of all routed experts plus the shared one.
  int64_t expert_bytes(const QuantScheme& format) const;
  int64_t shared_bytes(const QuantScheme& format) const;
  int64_t total_weight_bytes(const QuantScheme& format) const;
  // Forward FLOPs (2 per multiply-add) of `tokens` tokens holding `slots` (token, routed expert)
  // pairs in all; the shared expert sees every token.
  double flops(int64_t tokens, int64_t slots) const;
  // "E=128 H=2048 I=768 k=8 softmax_topk(renorm) silu" — for progress lines and messages.
  std::string str() const;
};

// x and y of a layer in `format`: a float format's own dtype, bf16 for quantized formats.
DType io_dtype(const QuantScheme& format);

// One spec per requested preset (or one "custom" spec), overrides applied and validated.
// Throws CLI::ValidationError naming the option and the reason.
std::vector<LayerSpec> resolve_layer_specs(const ShapeOptions& options);

// Parses "1,32,512": positive counts, no empty items. Throws CLI::ValidationError for `option`.
std::vector<int64_t> parse_token_list(const std::string& text, const std::string& option);

}  // namespace moekit::cli
