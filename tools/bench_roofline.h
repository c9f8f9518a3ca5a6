// Work, traffic and roofline time of one benchmarked forward, from the routing it actually ran.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "layer_spec.h"
#include "machine.h"
#include "moekit/core/tensor.h"

namespace moekit::cli {

// Trivially copyable: EP ranks gather theirs.
struct RowCost {
  int64_t active_experts = 0;  // distinct routed experts with at least one token
  int64_t slots = 0;           // valid (token, expert) pairs
  int64_t weight_bytes = 0;    // of the active experts, plus the shared expert
  double flops = 0;
  double memory_us = 0;   // weight_bytes / read bandwidth
  double compute_us = 0;  // flops / SIMD peak
  double roofline_us() const { return std::max(memory_us, compute_us); }
  std::string_view bound() const { return memory_us >= compute_us ? "memory" : "compute"; }
};

// Slots (token, expert pairs) of each global expert; topk_ids: [M, k] int32, -1 for padding.
std::vector<int64_t> expert_loads(const TensorView& topk_ids, int num_experts);

// The cost of computing the experts whose slot counts are `loads` (all of the layer's, or one EP
// rank's local ones with the slots every rank sent them), plus the shared expert over `tokens`.
RowCost row_cost(const LayerSpec& spec, const QuantScheme& format, std::span<const int64_t> loads, int64_t tokens,
                 const MachineCeilings& ceilings);

}  // namespace moekit::cli
