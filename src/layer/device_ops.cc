#include "layer/device_ops.h"

#include <cstring>

#ifdef MOEKIT_HAS_CUDA
#include "cuda/layer_ops.h"
#include "moekit/cuda.h"
#endif

namespace moekit::layer {

void upload(const TensorView& src, const TensorView& dst) {
  MOEKIT_CHECK(src.dtype == dst.dtype && src.numel() == dst.numel() && src.is_contiguous() &&
                   dst.is_contiguous(),
               "upload: ", src.str(), " does not fit ", dst.str());
  if (dst.device.type == DeviceType::kCPU) {
    std::memcpy(dst.data, src.data, size_t(src.nbytes()));
    return;
  }
#ifdef MOEKIT_HAS_CUDA
  copy_to_device(src, dst);
#else
  MOEKIT_FAIL("upload: ", dst.str(), " but moekit was built without CUDA");
#endif
}

void add_rows(const TensorView& y, const TensorView& x, const ExecContext& ctx) {
  const int64_t M = y.size(0), H = y.size(1);
  if (y.device.type == DeviceType::kCPU) {
    for (int64_t t = 0; t < M; ++t)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t i = t * y.stride[0] + h;
        store_from_float(y.data, y.dtype, i,
                         load_as_float(y.data, y.dtype, i) +
                             load_as_float(x.data, x.dtype, t * x.stride[0] + h));
      }
    return;
  }
#ifdef MOEKIT_HAS_CUDA
  cuda::add_rows(y.data, x.data, y.dtype, M, H, y.stride[0], x.stride[0], ctx.stream);
#else
  (void)ctx;
  MOEKIT_FAIL("add_rows: ", y.str(), " but moekit was built without CUDA");
#endif
}

}  // namespace moekit::layer
