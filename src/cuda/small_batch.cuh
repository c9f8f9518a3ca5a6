// What the small-batch kernels share (small_batch.cu: per-warp streaming, used for e4m3 and any
// shape the streamed kernel does not take; small_batch_stream.cu: weights streamed through shared
// memory by bulk copies): each block's view of the routing, the walk over an expert's pairs,
// per-row bias and scale reads, and the host's grid and chunk sizing.
#pragma once

#include <algorithm>

#include "cuda/check.h"
#include "cuda/device.cuh"
#include "cuda/kernels.h"

namespace moekit::cuda::small_batch {

constexpr int kTokens = 4;                    // tokens per pass over an item's rows
constexpr int kMaxLocalExperts = kWarp * 32;  // the active-expert bitmap is one warp's words

// What every block computes once: the ids (as local experts, -1 when not computed here) and
// the active experts in ascending order, in shared memory.
struct Shared {
  uint32_t bits[kWarp];
  int32_t active[kMaxLocalExperts];
  int num_active;
};

__device__ inline void load_routing(const int32_t* __restrict__ ids, int64_t ids_stride, int num_pairs,
                             int k, int num_local, int32_t* ids_s, Shared& sh) {
  const int tid = threadIdx.x;
  if (tid < kWarp) sh.bits[tid] = 0;
  __syncthreads();
  for (int p = tid; p < num_pairs; p += blockDim.x) {
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
__device__ inline int next_pairs(const int32_t* ids_s, int num_pairs, int e, int& pos, int& mine) {
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

// Blocks that fill the GPU once (persistent), from the occupancy of `kernel`.
template <typename Kernel>
unsigned persistent_blocks(Kernel kernel, int threads, size_t smem) {
  int dev = 0, sms = 0, per_sm = 0;
  MOEKIT_CUDA_CHECK(cudaGetDevice(&dev));
  MOEKIT_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  MOEKIT_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
  return static_cast<unsigned>(std::max(1, sms * per_sm));
}

// Token chunks of at most kSmallBatchMaxPairs pairs (the ids of a chunk live in shared memory):
// f(first token, pairs, shared memory bytes) per chunk.
template <typename F>
void for_each_chunk(int64_t M, int k, F&& f) {
  const int64_t chunk = std::max<int64_t>(1, kSmallBatchMaxPairs / k);
  for (int64_t t0 = 0; t0 < M; t0 += chunk) {
    const int pairs = static_cast<int>(std::min(chunk, M - t0) * k);
    f(t0, pairs, pairs * sizeof(int32_t));
  }
}

}  // namespace moekit::cuda::small_batch
