#include "modular/dispatch_util.h"

#include <vector>

namespace moekit::detail {

void convert_activations(const TensorView& x, const TensorView& topk_weights, bool weight_on_input,
                         const TensorView& out) {
  const int64_t M = x.size(0), H = x.size(1);
  std::vector<float> row(H);
  for (int64_t t = 0; t < M; ++t) {
    const float scale = weight_on_input ? topk_weights.row<float>(t)[0] : 1.0f;
    for (int64_t h = 0; h < H; ++h)
      row[h] = load_as_float(x.data, x.dtype, t * x.stride[0] + h) * scale;
    for (int64_t h = 0; h < H; ++h)
      store_from_float(out.data, out.dtype, t * out.stride[0] + h, row[h]);
  }
}

std::optional<std::string> expert_count_mismatch(const MoEProblem& p, const ExpertMap& map) {
  if (p.num_experts == map.num_experts()) return std::nullopt;
  return "problem has E=" + std::to_string(p.num_experts) + " but the expert map has " +
         std::to_string(map.num_experts());
}

TensorView activations_for_experts(const PrepareRequest& req, Workspace& ws) {
  if (!req.weight_on_input && req.x.dtype == req.spec.dtype && req.x.is_contiguous()) return req.x;
  const TensorView a = ws.take(req.spec.dtype, {req.x.size(0), req.x.size(1)});
  convert_activations(req.x, req.topk_weights, req.weight_on_input, a);
  return a;
}

}  // namespace moekit::detail
