// Helpers every PrepareFinalize shares (internal header).
#pragma once

#include "moekit/modular.h"

namespace moekit::detail {

// Key that names a token across ranks for replica choice: source rank in the high half.
inline int64_t token_key(int source_rank, int64_t row) {
  return (static_cast<int64_t>(source_rank) << 32) + row;
}

// out [M, H] (out.dtype) = x [M, H], rows multiplied by weights[t, 0] when weight_on_input.
void convert_activations(const TensorView& x, const TensorView& topk_weights, bool weight_on_input,
                         const TensorView& out);

// The reason a prepare/finalize over `map` cannot run `p`, when their E differ.
std::optional<std::string> expert_count_mismatch(const MoEProblem& p, const ExpertMap& map);

// x as the experts want it, [M, H] contiguous in req.spec.dtype, rows scaled by their weight
// when applied on the input: x itself when it already is, else a converted copy taken from ws.
TensorView activations_for_experts(const PrepareRequest& req, Workspace& ws);

}  // namespace moekit::detail
