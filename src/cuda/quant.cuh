// Device side of fp8 e4m3 activation quantization, shared by the prepare's quantizer
// (quantize.cu), the grouped experts' activation (permute.cu) and the small-batch intermediate:
// scales from an amax, codes, block and grid amax reductions. The rules are the host
// quantizer's (quant/quantize.h): amax over finite values only, scale = amax / 448 in fp32
// (1 when that is 0), codes rounded to nearest even and saturated to +-448.
#pragma once

#include <cuda_fp8.h>

#include <cstdint>
#include <type_traits>

#include "cuda/check.h"
#include "cuda/device.cuh"
#include "cuda/kernels.h"

namespace moekit::cuda {

inline constexpr float kE4m3Max = 448.0f;

// |v| when finite, else 0: NaN and +-inf take no part in a scale (they saturate or stay NaN).
__device__ __forceinline__ float finite_abs(float v) {
  return isfinite(v) ? fabsf(v) : 0.0f;
}

__device__ __forceinline__ float e4m3_scale_of_amax(float amax) {
  const float s = amax / kE4m3Max;
  return s != 0.0f ? s : 1.0f;
}

__device__ __forceinline__ uint8_t to_e4m3(float v, float scale) {
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(v / scale, __NV_SATFINITE, __NV_E4M3));
}

// The maximum of v over the block (every thread gets it). blockDim.x a multiple of 32, at most
// 1024; the block must reach this call together.
__device__ __forceinline__ float block_max(float v) {
  __shared__ float warp_max[32];
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  __syncthreads();  // warp_max may still be read by a previous call
  if (lane == 0) warp_max[warp] = v;
  __syncthreads();
  v = lane < blockDim.x / kWarp ? warp_max[lane] : 0.0f;
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Non-negative floats order like their bit patterns: a grid-wide amax is an atomicMax on bits.
__device__ __forceinline__ void atomic_amax(uint32_t* amax, float v) {
  atomicMax(amax, __float_as_uint(v));
}
__device__ __forceinline__ float load_amax(const uint32_t* amax) {
  return __uint_as_float(*amax);
}

// How a kernel that produces a row of values stores it (one block per row).
enum class RowQuant {
  kNone,         // float output
  kToken,        // e4m3 with the row's own scale (block amax, then codes)
  kTensorAmax,   // first pass of a dynamic per-tensor scale: the amax only
  kTensorApply,  // e4m3 with a per-tensor scale (dynamic from the amax pass, or static)
};

// The scale of kTensorApply: static, or of the amax the kTensorAmax pass reduced. Row 0's block
// writes it to out.scale[0]; a row kernel that skips rows (rows of no expert) must still let
// row 0's block call publish_tensor_scale.
__device__ __forceinline__ float tensor_scale(const Fp8Rows& out) {
  return out.static_scale ? *out.static_scale : e4m3_scale_of_amax(load_amax(out.amax));
}
__device__ __forceinline__ void publish_tensor_scale(int64_t r, const Fp8Rows& out) {
  if (r == 0 && threadIdx.x == 0) out.scale[0] = tensor_scale(out);
}

// Stores W codes of v / scale at q (W-byte aligned; W = 8: one 8-byte store).
template <int W>
__device__ __forceinline__ void store_codes(uint8_t* q, const float (&v)[W], float scale) {
  if constexpr (W == 8) {
    uint32_t half[2] = {0, 0};
#pragma unroll
    for (int i = 0; i < 8; ++i) half[i / 4] |= uint32_t(to_e4m3(v[i], scale)) << (8 * (i % 4));
    *reinterpret_cast<uint2*>(q) = make_uint2(half[0], half[1]);
  } else {
#pragma unroll
    for (int i = 0; i < W; ++i) q[i] = to_e4m3(v[i], scale);
  }
}

// One block stores row r of n values into out.q[r * n + j] as Q says (not kNone), W at a time:
// value(v, vals) fills vals[0..W) with values j = v * W .. v * W + W - 1 (n a multiple of W).
// kToken writes out.scale[r]; kTensorApply writes out.scale[0] from row 0; kTensorAmax only
// raises *out.amax. Every thread of the block must call it.
template <RowQuant Q, int W, typename F>
__device__ __forceinline__ void quantize_row(F value, int64_t n, int64_t r, const Fp8Rows& out) {
  static_assert(Q != RowQuant::kNone);
  float scale;
  float vals[W];
  if constexpr (Q == RowQuant::kTensorApply) {
    scale = tensor_scale(out);
    publish_tensor_scale(r, out);
  } else {
    float m = 0.0f;
    for (int64_t v = threadIdx.x; v < n / W; v += blockDim.x) {
      value(v, vals);
#pragma unroll
      for (int i = 0; i < W; ++i) m = fmaxf(m, finite_abs(vals[i]));
    }
    m = block_max(m);
    if constexpr (Q == RowQuant::kTensorAmax) {
      if (threadIdx.x == 0) atomic_amax(out.amax, m);
      return;
    }
    scale = e4m3_scale_of_amax(m);
    if (threadIdx.x == 0) out.scale[r] = scale;
  }
  uint8_t* q = out.q + r * n;
  for (int64_t v = threadIdx.x; v < n / W; v += blockDim.x) {
    value(v, vals);
    store_codes<W>(q + v * W, vals, scale);
  }
}

// Runs a row kernel for the quantization `out.kind` asks: per token in one launch; per tensor
// with a static scale in one; a dynamic per-tensor scale as an amax launch (after zeroing the
// amax) and an apply launch. launch(tag) enqueues the kernel for RowQuant tag.value.
template <typename Launch>
void launch_quantized(const Fp8Rows& out, cudaStream_t stream, Launch&& launch) {
  using Q = RowQuant;
  if (out.kind == ScaleKind::kToken) {
    launch(std::integral_constant<Q, Q::kToken>{});
    return;
  }
  MOEKIT_CHECK(out.kind == ScaleKind::kTensor, "fp8 quantizer: scale kind ", name(out.kind),
               " is not per-tensor or per-token");
  if (!out.static_scale) {
    MOEKIT_CUDA_CHECK(cudaMemsetAsync(out.amax, 0, sizeof(uint32_t), stream));
    launch(std::integral_constant<Q, Q::kTensorAmax>{});
  }
  launch(std::integral_constant<Q, Q::kTensorApply>{});
}

}  // namespace moekit::cuda
