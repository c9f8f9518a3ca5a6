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

// True when prepare can hand x to the experts as it is.
inline bool usable_as_is(const PrepareRequest& req) {
  return !req.weight_on_input && req.x.dtype == req.spec.dtype && req.x.is_contiguous();
}

}  // namespace moekit::detail
