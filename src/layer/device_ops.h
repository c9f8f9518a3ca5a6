// The few element-wise steps of MoELayer, on whichever device its tensors live.
#pragma once

#include "moekit/core/exec.h"
#include "moekit/core/tensor.h"

namespace moekit::layer {

// Copies contiguous host `src` into contiguous `dst` (same dtype and element count) on dst's
// device; synchronous (set-up only).
void upload(const TensorView& src, const TensorView& dst);

// y[t, :] += x[t, :] for [M, H] float views of one dtype (last dims contiguous); on a CUDA device
// enqueued on ctx.stream.
void add_rows(const TensorView& y, const TensorView& x, const ExecContext& ctx);

}  // namespace moekit::layer
