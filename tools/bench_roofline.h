// Work, traffic and roofline time of one benchmarked forward, from the routing it actually ran.
#pragma once

#include <cstdint>
#include <string_view>

#include "layer_spec.h"
#include "machine.h"
#include "moekit/core/tensor.h"

namespace moekit::cli {

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

// topk_ids: [M, k] int32 global ids, -1 for padding.
RowCost row_cost(const LayerSpec& spec, DType dtype, const TensorView& topk_ids,
                 const MachineCeilings& ceilings);

}  // namespace moekit::cli
