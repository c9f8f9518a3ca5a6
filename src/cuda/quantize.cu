// fp8 e4m3 quantization of activation rows on the device (the prepare's a1, the small-batch
// intermediate): one block per row, per-token or per-tensor (static, or dynamic through an amax
// pass reduced on the device). A dynamic per-tensor scale of a small tensor (decode) takes one
// block and one launch instead of a memset, an amax launch and a quantize launch.
#include "cuda/check.h"
#include "cuda/device.cuh"
#include "cuda/kernels.h"
#include "cuda/quant.cuh"

namespace moekit::cuda {
namespace {

constexpr int kThreads = 256;
// Elements up to which a dynamic per-tensor quantization runs in one block: 16 per thread, a
// few microseconds of one SM, less than the two launches and the memset it replaces. (2^17
// elements took ~40 us more: a single block's loop waits on its loads.)
constexpr int kOneBlockThreads = 1024;
constexpr int64_t kOneBlockElements = 16 * kOneBlockThreads;

// Row t: the values x[t, :] * row_scale(t).
template <typename T, RowQuant Q>
__global__ void quantize_rows_kernel(const T* __restrict__ x, int64_t x_stride, int64_t H,
                                     const float* __restrict__ row_scale, int64_t scale_stride,
                                     Fp8Rows out) {
  grid_dependency_wait();  // x may come from the kernel just before (chained launch)
  launch_dependents();
  const int64_t t = blockIdx.x;
  const float rs = row_scale ? row_scale[t * scale_stride] : 1.0f;
  const T* row = x + t * x_stride;
  quantize_row<Q, 1>([&](int64_t h, float(&v)[1]) { v[0] = load_float(row, h) * rs; }, H, t, out);
}

// The whole [M, H] tensor in one block: its amax, then its codes with the scale of that amax.
template <typename T>
__global__ void quantize_tensor_one_block_kernel(const T* __restrict__ x, int64_t x_stride,
                                                 int64_t M, int64_t H,
                                                 const float* __restrict__ row_scale,
                                                 int64_t scale_stride, Fp8Rows out) {
  grid_dependency_wait();
  launch_dependents();
  const int n = static_cast<int>(M * H);  // <= kOneBlockElements
  const int h = static_cast<int>(H);
  auto value = [&](int i) {
    const int t = i / h;
    return load_float(x, t * x_stride + i % h) * (row_scale ? row_scale[t * scale_stride] : 1.0f);
  };
  float m = 0.0f;
#pragma unroll 8
  for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, finite_abs(value(i)));
  const float scale = e4m3_scale_of_amax(block_max(m));
  if (threadIdx.x == 0) out.scale[0] = scale;
#pragma unroll 8
  for (int i = threadIdx.x; i < n; i += blockDim.x) out.q[i] = to_e4m3(value(i), scale);
}

}  // namespace

void quantize_rows_fp8(const void* x, DType x_dtype, int64_t x_stride, int64_t M, int64_t H,
                       const float* row_scale, int64_t scale_stride, const Fp8Rows& out,
                       cudaStream_t stream) {
  if (M == 0) return;
  with_float_type(x_dtype, [&](auto tag) {
    using T = decltype(tag);
    if (out.kind == ScaleKind::kTensor && !out.static_scale && M * H <= kOneBlockElements) {
      launch_chained(quantize_tensor_one_block_kernel<T>, 1, kOneBlockThreads, 0, stream,
                     static_cast<const T*>(x), x_stride, M, H, row_scale, scale_stride, out);
      return;
    }
    // Chained (device.cuh): at decode these launches sit between the id map, the experts' GEMMs
    // and each other, and a plain launch waits for the previous kernel's last block to retire.
    launch_quantized(out, stream, [&](auto q) {
      launch_chained(quantize_rows_kernel<T, decltype(q)::value>, static_cast<unsigned>(M),
                     kThreads, 0, stream, static_cast<const T*>(x), x_stride, H, row_scale,
                     scale_stride, out);
    });
  });
}

}  // namespace moekit::cuda
