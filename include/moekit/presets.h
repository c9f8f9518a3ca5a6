// Model presets of DESIGN.md section 5: shapes, routing and activation of real MoE layers.
#pragma once

#include <span>
#include <string_view>

#include "moekit/activation.h"
#include "moekit/router.h"

namespace moekit {

struct Preset {
  std::string_view name;
  int num_experts;  // E
  int64_t hidden;   // H
  int64_t intermediate;  // I (per routed expert)
  int top_k;
  RouterConfig router;   // num_experts and top_k filled in
  Activation activation;
  bool has_bias;           // b13 and b2 (gpt-oss)
  int num_shared_experts;  // fused into one shared expert of intermediate size n * I
};

std::span<const Preset> presets();
// Throws moekit::Error listing the known names when `name` is unknown.
const Preset& find_preset(std::string_view name);

}  // namespace moekit
