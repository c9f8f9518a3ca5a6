// Device-side helpers shared by the .cu files: bf16 -> fp32 on raw uint16_t storage (moekit's
// bf16 tensors are plain 16-bit words), 16-byte loads and dot products per element type, warp
// reductions, asynchronous copies to shared memory, warp tensor-core products on e4m3,
// grid sizing, programmatic dependent launch, and the switches from DType to device element
// types.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "cuda/check.h"
#include "moekit/core/dtype.h"
#include "moekit/core/error.h"

namespace moekit::cuda {

inline constexpr int kWarp = 32;

__device__ __forceinline__ float bf16_bits_to_float(uint16_t b) {
  return __uint_as_float(static_cast<uint32_t>(b) << 16);
}

// Two bf16 packed in a 32-bit word -> two floats (low half first).
__device__ __forceinline__ float2 unpack_bf16x2(uint32_t v) {
  return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xffff0000u));
}

// 16-byte weight load that bypasses L1: weights are read once, keep L1 for the activations.
__device__ __forceinline__ uint4 load_stream(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// acc += dot of 8 bf16 weights with 8 bf16 activations.
__device__ __forceinline__ float dot8(uint4 w, uint4 x, float acc) {
  const uint32_t wv[4] = {w.x, w.y, w.z, w.w};
  const uint32_t xv[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 a = unpack_bf16x2(wv[i]), b = unpack_bf16x2(xv[i]);
    acc = fmaf(a.x, b.x, acc);
    acc = fmaf(a.y, b.y, acc);
  }
  return acc;
}

// 16 bytes of elements T (8 bf16 or fp16, 16 e4m3): kElems, and (16-bit T) acc + dot(w, x) in
// fp32.
template <typename T>
struct Vec16;

template <>
struct Vec16<__nv_bfloat16> {
  static constexpr int kElems = 8;
  static __device__ __forceinline__ float dot(uint4 w, uint4 x, float acc) {
    return dot8(w, x, acc);
  }
};

template <>
struct Vec16<__half> {
  static constexpr int kElems = 8;
  static __device__ __forceinline__ float dot(uint4 w, uint4 x, float acc) {
    const uint32_t wv[4] = {w.x, w.y, w.z, w.w};
    const uint32_t xv[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&wv[i]));
      const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&xv[i]));
      acc = fmaf(a.x, b.x, acc);
      acc = fmaf(a.y, b.y, acc);
    }
    return acc;
  }
};

// e4m3 codes are dotted on the tensor cores only (mma_dot2, small_batch_mma.cu): an fp32 dot
// would convert every code.
template <>
struct Vec16<__nv_fp8_e4m3> {
  static constexpr int kElems = 16;
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// 16-byte asynchronous copy global -> shared that bypasses L1 (cp.async.cg); the last
// 16 - src_bytes bytes are zero-filled (src_bytes 0: zeros, nothing read). Completion per thread:
// cp_async_commit() closes a group, cp_async_wait<N>() waits until at most N groups are pending.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  const auto s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(gmem), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// d += A . B on the tensor cores, one warp (mma.sync m16n8k32, e4m3 operands): A 16 x 32
// row-major, B 32 x 8 column-major, d 16 x 8 fp32. Fragments, with g = lane / 4, t = lane % 4:
// a = {row g, row g + 8, row g, row g + 8} x {k slots 4t..4t+3; then 4t+16..4t+19}, b = {column
// g} x {the same slots}, d = {row g, row g + 8} x {columns 2t, 2t + 1}: 8 bytes of a row per
// lane, in the same order for a and b.
__device__ __forceinline__ void mma_m16n8k32_e4m3(float (&d)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// d += A . B on the tensor cores, one warp, for 16-byte element types T: mma.sync m16n8k16 (bf16,
// fp16) or m16n8k32 (e4m3), fp32 accumulators. All three own their fragments alike in 32-bit words
// (2 or 4 elements), with g = lane / 4, t = lane % 4: a = {row g, row g + 8, row g, row g + 8} x
// {word t; word t + 4} of A (16 x 16 or 16 x 32, row-major), b = {column g} x {word t, word t + 4}
// of B (column-major), d = {row g, row g + 8} x {columns 2t, 2t + 1}.
template <typename T>
__device__ __forceinline__ void mma_words(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_fp8_e4m3>) {
    mma_m16n8k32_e4m3(d, a, b0, b1);
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>);
    if constexpr (std::is_same_v<T, __nv_bfloat16>)
      asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
          "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
      asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
          "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two dot products of one warp on the tensor cores, each lane holding its own 16 bytes of two
// weight rows (w0, w1) and of one activation row (x), at the same places: d += one mma_words
// per 8 bytes with A row g = lane group g's w0 words, A row g + 8 = its w1 words, B column g =
// its x words. Then the diagonal D[g][g] sums group g's w0 . x terms and D[g + 8][g] its w1 . x
// terms (the other entries are cross terms, never read): diagonal_sums gives the warp's totals.
// A lane's loads stay 16 contiguous bytes of a row and no element is converted.
template <typename T>
__device__ __forceinline__ void mma_dot2(float (&d)[4], uint4 w0, uint4 w1, uint4 x) {
  mma_words<T>(d, {w0.x, w1.x, w0.y, w1.y}, x.x, x.y);
  mma_words<T>(d, {w0.z, w1.z, w0.w, w1.w}, x.z, x.w);
}
// The warp's sums of mma_dot2's two dots (D[g][g] and D[g + 8][g] sit in lane 4g + g / 2,
// elements g % 2 and 2 + g % 2), on every lane.
__device__ __forceinline__ float2 diagonal_sums(const float (&d)[4]) {
  const int lane = threadIdx.x % kWarp, g = lane / 4;
  const bool mine = lane % 4 == g / 2;
  const float s0 = mine ? (g % 2 ? d[1] : d[0]) : 0.0f;
  const float s1 = mine ? (g % 2 ? d[3] : d[2]) : 0.0f;
  return make_float2(warp_sum(s0), warp_sum(s1));
}

template <typename T>
__device__ __forceinline__ float load_float(const T* p, int64_t i);
template <>
__device__ __forceinline__ float load_float(const float* p, int64_t i) {
  return p[i];
}
template <>
__device__ __forceinline__ float load_float(const __half* p, int64_t i) {
  return __half2float(p[i]);
}
template <>
__device__ __forceinline__ float load_float(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}

// 8 consecutive elements at p as floats: 16-byte loads (p 16-byte aligned; fp32: 32).
__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&v)[8]) {
  static_assert(sizeof(T) == 2);
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 f;
    if constexpr (std::is_same_v<T, __nv_bfloat16>)
      f = unpack_bf16x2(w[i]);
    else
      f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
    v[2 * i] = f.x, v[2 * i + 1] = f.y;
  }
}
// 4 consecutive elements at p as floats: one 16-byte (fp32) or 8-byte (16-bit) load.
__device__ __forceinline__ float4 load4(const float* p) {
  return *reinterpret_cast<const float4*>(p);
}
template <typename T>
__device__ __forceinline__ float4 load4(const T* p) {
  static_assert(sizeof(T) == 2);
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  float2 lo, hi;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    lo = unpack_bf16x2(raw.x), hi = unpack_bf16x2(raw.y);
  } else {
    lo = __half22float2(*reinterpret_cast<const __half2*>(&raw.x));
    hi = __half22float2(*reinterpret_cast<const __half2*>(&raw.y));
  }
  return make_float4(lo.x, lo.y, hi.x, hi.y);
}
// Stores 8 floats at p (16-byte aligned) as 16-bit T, rounded to nearest even.
template <typename T>
__device__ __forceinline__ void store8(T* p, const float (&v)[8]) {
  static_assert(sizeof(T) == 2);
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      const __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
      w[i] = *reinterpret_cast<const uint32_t*>(&h);
    } else {
      const __half2 h = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
      w[i] = *reinterpret_cast<const uint32_t*>(&h);
    }
  }
  *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}

template <typename T>
__device__ __forceinline__ void store_float(T* p, int64_t i, float v);
template <>
__device__ __forceinline__ void store_float(float* p, int64_t i, float v) {
  p[i] = v;
}
template <>
__device__ __forceinline__ void store_float(__half* p, int64_t i, float v) {
  p[i] = __float2half_rn(v);
}
template <>
__device__ __forceinline__ void store_float(__nv_bfloat16* p, int64_t i, float v) {
  p[i] = __float2bfloat16_rn(v);
}

// Programmatic dependent launch (PDL): a kernel launched with launch_chained may start while the
// kernel before it in the stream still runs, once every block of that one has called
// launch_dependents (or exited). grid_dependency_wait returns when the previous kernel has
// finished and its writes are visible (at once for a plain launch). Rule for every kernel here:
// call launch_dependents only after grid_dependency_wait. Then a chained kernel, before its wait,
// may read what the kernel two launches back (or earlier) wrote, and must write nothing.
__device__ __forceinline__ void grid_dependency_wait() {
  asm volatile("griddepcontrol.wait;" ::: "memory");
}
__device__ __forceinline__ void launch_dependents() {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

// kernel<<<grid, block, smem, stream>>>(args...) as a programmatic dependent launch (above).
template <typename... Params, typename... Args>
void launch_chained(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                    cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  MOEKIT_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
}

// Reductions over a token's k slots load kSlotBatch slots' values before using any; their
// per-slot tables in shared memory are padded to a whole batch so that the unrolled reads stay
// in bounds (memcheck found 16-byte reads past [k] without it).
inline constexpr int kSlotBatch = 8;
__host__ __device__ constexpr int padded_slots(int k) {
  return (k + kSlotBatch - 1) / kSlotBatch * kSlotBatch;
}

inline unsigned blocks_for(int64_t n, int threads) {
  return static_cast<unsigned>((n + threads - 1) / threads);
}

}  // namespace moekit::cuda

namespace moekit::cuda {

// Calls f(T{}) with T the device type of a float dtype (fp32, fp16, bf16): the one switch from
// moekit::DType to device element types.
template <typename F>
void with_float_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kF32:
      f(float{});
      return;
    case DType::kF16:
      f(__half{});
      return;
    case DType::kBF16:
      f(__nv_bfloat16{});
      return;
    default:
      MOEKIT_FAIL("CUDA: ", name(dtype), " is not a float dtype");
  }
}

// Calls f(T{}) with T the device type the experts compute in: bf16, fp16 or e4m3.
template <typename F>
void with_compute_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kBF16:
      f(__nv_bfloat16{});
      return;
    case DType::kF16:
      f(__half{});
      return;
    case DType::kF8E4M3:
      f(__nv_fp8_e4m3{});
      return;
    default:
      MOEKIT_FAIL("CUDA experts: no kernels for ", name(dtype), " elements");
  }
}

}  // namespace moekit::cuda
