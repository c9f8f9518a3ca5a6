#include "bench_roofline.h"

namespace moekit::cli {

std::vector<int64_t> expert_loads(const TensorView& topk_ids, int num_experts) {
  std::vector<int64_t> loads(num_experts);
  const int64_t m = topk_ids.size(0), k = topk_ids.size(1);
  for (int64_t t = 0; t < m; ++t)
    for (int64_t s = 0; s < k; ++s) {
      const int32_t e = topk_ids.row<const int32_t>(t)[s];
      if (e >= 0) ++loads[e];
    }
  return loads;
}

RowCost row_cost(const LayerSpec& spec, const QuantScheme& format, std::span<const int64_t> loads, int64_t tokens,
                 const MachineCeilings& ceilings) {
  RowCost c;
  for (int64_t n : loads) {
    c.slots += n;
    c.active_experts += n > 0;
  }
  c.weight_bytes = c.active_experts * spec.expert_bytes(format) + spec.shared_bytes(format);
  c.flops = spec.flops(tokens, c.slots);
  c.memory_us = double(c.weight_bytes) / (ceilings.read_gbps * 1e3);
  c.compute_us = c.flops / (ceilings.peak_gflops(format) * 1e3);
  return c;
}

}  // namespace moekit::cli
