// Element-wise steps of MoELayer on the device (src/layer/device_ops.cc).
#pragma once

#include <cstdint>

#include "moekit/core/dtype.h"

namespace moekit::cuda {

// y[t, h] += x[t, h] for t < M, h < H; y and x of dtype `dtype` (fp32, fp16 or bf16) with row
// strides in elements. Enqueued on `stream`.
void add_rows(void* y, const void* x, DType dtype, int64_t M, int64_t H, int64_t y_stride,
              int64_t x_stride, void* stream);

}  // namespace moekit::cuda
