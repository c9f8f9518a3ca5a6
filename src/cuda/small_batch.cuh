// What the two small-batch kernel families share (small_batch.cu: fp32 dots on the CUDA cores;
// small_batch_mma.cu: tensor-core dots, e4m3 with more than one token): the block's routing (the
// pair ids and the active experts in shared memory), the walk over an expert's pairs, weight and
// activation scales, the zeros of unrouted rows, the launch arguments and persistent launches.
#pragma once

#include <algorithm>

#include "cuda/check.h"
#include "cuda/device.cuh"
#include "cuda/kernels.h"

namespace moekit::cuda::small_batch {

inline constexpr int kWarps = 8;
inline constexpr int kThreads = kWarps * kWarp;
inline constexpr int kMaxLocalExperts = kWarp * 32;  // the active-expert bitmap is one warp's words

// What every block computes once: the ids (as local experts, -1 when not computed here) and
// the active experts in ascending order, in shared memory.
struct Shared {
  uint32_t bits[kWarp];
  int32_t active[kMaxLocalExperts];
  int num_active;
};

__device__ inline void load_routing(const int32_t* __restrict__ ids, int64_t ids_stride,
                                    int num_pairs, int k, int num_local, int32_t* ids_s,
                                    Shared& sh) {
  const int tid = threadIdx.x;
  if (tid < kWarp) sh.bits[tid] = 0;
  __syncthreads();
  for (int p = tid; p < num_pairs; p += kThreads) {
    int32_t e = ids[(p / k) * ids_stride + p % k];
    e = e >= 0 && e < num_local ? e : -1;
    ids_s[p] = e;
    if (e >= 0) atomicOr(&sh.bits[e / 32], 1u << (e % 32));
  }
  __syncthreads();
  if (tid < kWarp) {
    // Exclusive prefix of active experts per 32-id word, then each lane lists its word's ids.
    uint32_t word = sh.bits[tid];
    const int n = __popc(word);
    int incl = n;
#pragma unroll
    for (int o = 1; o < kWarp; o *= 2) {
      const int v = __shfl_up_sync(0xffffffffu, incl, o);
      if (tid >= o) incl += v;
    }
    for (int i = incl - n; word; word &= word - 1) sh.active[i++] = tid * 32 + __ffs(word) - 1;
    if (tid == kWarp - 1) sh.num_active = incl;
  }
  __syncthreads();
}

// The next up to kTokens pairs routed to expert e at or after `pos` (in pair order); lane t <
// count gets pair t in `mine`. Whole warp; returns count (warp-uniform). The pairs stay in
// registers (other lanes read them with __shfl_sync): a per-warp list in shared memory, written
// and read by different lanes, is what racecheck reported in v3.
template <int kTokens>
__device__ inline int next_pairs(const int32_t* ids_s, int num_pairs, int e, int& pos, int& mine) {
  static_assert(kTokens <= kWarp);
  const int lane = threadIdx.x % kWarp;
  int count = 0;
  while (count < kTokens && pos < num_pairs) {
    const int p = pos + lane;
    uint32_t m = __ballot_sync(0xffffffffu, p < num_pairs && ids_s[p] == e);
    // Lane count + i takes the i-th match; the walk over m's set bits is warp-uniform.
    const int take = min(__popc(m), kTokens - count);
    for (int i = 0; i < take; ++i, m &= m - 1)
      if (lane == count + i) mine = pos + __ffs(m) - 1;
    count += take;
    pos = m && count == kTokens ? pos + __ffs(m) - 1 : pos + kWarp;  // resume at a match not taken
  }
  return count;
}

// Pair t of the warp's current pass (0 past nt, so that rows stay in bounds), on every lane.
__device__ __forceinline__ int pair_of(int mine, int t, int nt) {
  const int p = __shfl_sync(0xffffffffu, mine, t);
  return t < nt ? p : 0;
}

__device__ __forceinline__ int64_t expert_index(const DeviceWeights& w, int e) {
  return w.index ? w.index[e] : e;
}

__device__ __forceinline__ float bias_at(const float* b, int64_t i) {
  return b ? b[i] : 0.0f;
}

// Weight row scales (fp32 per row, null: float weights) and activation row scales.
__device__ __forceinline__ float scale_at(const float* s, int64_t i) {
  return s ? s[i] : 1.0f;
}
__device__ __forceinline__ float scale_at(RowScale s, int64_t row) {
  return s.scale ? s.scale[row * s.stride] : 1.0f;
}

// Rows [num_pairs, n] of `out` for pairs computed nowhere (id -1; ids past E_local are treated
// alike) get zeros, spread over the grid's blocks.
template <typename T>
__device__ void zero_unrouted_rows(const int32_t* ids_s, int num_pairs, int64_t n, T* out) {
  for (int p = blockIdx.x; p < num_pairs; p += gridDim.x)
    if (ids_s[p] < 0)
      for (int64_t i = threadIdx.x; i < n; i += kThreads) store_float(out, p * n + i, 0.0f);
}

// One token chunk's launches (at most kSmallBatchMaxPairs pairs, whose ids live in shared memory):
//   gemm1: h[pair, j] = act(W13[e] gate_j . a1[t] + b, W13[e] up_j . a1[t] + b)
//   gemm2: out[pair, :] = W2[e] . h[pair] + b2[e]   (zeros for pairs with id -1)
// OutH: T for float formats, fp32 before the e4m3 requantization.
template <typename T, typename OutH>
struct Gemm1Args {
  DeviceWeights w;
  const T* a1;
  int64_t a1_stride;
  RowScale a1_scale;
  const int32_t* ids;
  int64_t ids_stride;
  int num_pairs;
  int k;
  OutH* h;
};
template <typename T>
struct Gemm2Args {
  DeviceWeights w;
  const T* h;
  RowScale h_scale;
  const int32_t* ids;
  int64_t ids_stride;
  int num_pairs;
  int k;
  float* out;
};

// The start of every gemm1 kernel: wait for the ids and a1 (the kernels just before), let the next
// launch start, read the routing into ids_s and sh, and zero the h rows of unrouted pairs (the
// e4m3 requantization reads them: amax, codes).
template <typename T, typename OutH>
__device__ void begin_gemm1(const Gemm1Args<T, OutH>& a, int32_t* ids_s, Shared& sh) {
  grid_dependency_wait();
  launch_dependents();
  load_routing(a.ids, a.ids_stride, a.num_pairs, a.k, a.w.num_local, ids_s, sh);
  zero_unrouted_rows(ids_s, a.num_pairs, a.w.intermediate, a.h);
}

// gemm2's: the routing first (chained launch: gemm1 may still run, but every block of it has
// passed its own wait, so the ids are written; nothing is written before the wait), then wait for
// h (gemm1 or its requantization), let the next launch start, zero the rows of unrouted pairs.
template <typename T>
__device__ void begin_gemm2(const Gemm2Args<T>& a, int32_t* ids_s, Shared& sh) {
  load_routing(a.ids, a.ids_stride, a.num_pairs, a.k, a.w.num_local, ids_s, sh);
  grid_dependency_wait();
  launch_dependents();
  zero_unrouted_rows(ids_s, a.num_pairs, a.w.hidden, a.out);
}

// Launches `kernel` (chained, device.cuh) on blocks that fill the GPU once (persistent), from its
// occupancy with `smem` bytes of dynamic shared memory (past 48 KB allowed first: a kernel must
// opt in; the CUDA-core kernels never need it, so they skip the call).
template <typename Args>
void launch_persistent(void (*kernel)(Args), size_t smem, cudaStream_t stream, const Args& args) {
  if (smem > 48 * 1024)
    MOEKIT_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  int dev = 0, sms = 0, per_sm = 0;
  MOEKIT_CUDA_CHECK(cudaGetDevice(&dev));
  MOEKIT_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  MOEKIT_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
  launch_chained(kernel, static_cast<unsigned>(std::max(1, sms * per_sm)), kThreads, smem, stream,
                 args);
}

// small_batch_mma.cu: the e4m3 kernels with tensor-core dots.
void gemm1_mma(const Gemm1Args<__nv_fp8_e4m3, float>& args, cudaStream_t stream);
void gemm2_mma(const Gemm2Args<__nv_fp8_e4m3>& args, cudaStream_t stream);

}  // namespace moekit::cuda::small_batch
