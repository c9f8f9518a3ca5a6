#include "cuda/check.h"
#include "cuda/device.cuh"
#include "cuda/layer_ops.h"

namespace moekit::cuda {
namespace {

template <typename T>
__global__ void add_rows_kernel(T* y, const T* x, int64_t M, int64_t H, int64_t ys, int64_t xs) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= M * H) return;
  const int64_t t = i / H, h = i % H;
  store_float(y, t * ys + h, load_float(y, t * ys + h) + load_float(x, t * xs + h));
}

template <typename T>
void launch(void* y, const void* x, int64_t M, int64_t H, int64_t ys, int64_t xs, void* stream) {
  constexpr int kThreads = 256;
  add_rows_kernel<<<blocks_for(M * H, kThreads), kThreads, 0, stream_of(stream)>>>(
      static_cast<T*>(y), static_cast<const T*>(x), M, H, ys, xs);
  MOEKIT_CUDA_CHECK_LAUNCH();
}

}  // namespace

void add_rows(void* y, const void* x, DType dtype, int64_t M, int64_t H, int64_t y_stride,
              int64_t x_stride, void* stream) {
  if (M * H == 0) return;
  switch (dtype) {
    case DType::kF32: return launch<float>(y, x, M, H, y_stride, x_stride, stream);
    case DType::kF16: return launch<__half>(y, x, M, H, y_stride, x_stride, stream);
    case DType::kBF16: return launch<__nv_bfloat16>(y, x, M, H, y_stride, x_stride, stream);
    default: MOEKIT_FAIL("add_rows: dtype ", name(dtype), " is not a float type");
  }
}

}  // namespace moekit::cuda
