// Small-batch (decode) experts: few tokens, so the layer is bound by reading the active experts'
// weights. Every weight row of an active expert is streamed from memory once (16-byte loads,
// several in flight per lane) and applied to all of that expert's tokens; the work of all active
// experts is spread over every SM. Two launches:
//   gemm1: h[pair, j] = bf16(act(W13[e] gate_j . a1[t] + b, W13[e] up_j . a1[t] + b))
//   gemm2: fused_out[pair, :] = W2[e] . h[pair] + b2[e]   (zeros for pairs with id -1)
// where pair = t * k + s and e = ids[t, s]. Each block lists the active experts on its own (a
// bitmap of the ids in shared memory), then its warps work persistently through the items
// (active expert, rows); no sort or host round trip precedes the launches.
#include <algorithm>

#include "cuda/check.h"
#include "cuda/device.cuh"
#include "cuda/kernels.h"

namespace moekit::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * kWarp;
constexpr int kTokens = 4;                    // tokens per pass over an item's rows
constexpr int kUnroll = 4;                    // 16-byte chunks per row and lane in flight
constexpr int kMaxLocalExperts = kWarp * 32;  // the active-expert bitmap is one warp's words

// What every block computes once: the ids (as local experts, -1 when not computed here) and
// the active experts in ascending order, in shared memory.
struct Shared {
  uint32_t bits[kWarp];
  int32_t active[kMaxLocalExperts];
  int num_active;
};

__device__ void load_routing(const int32_t* __restrict__ ids, int64_t ids_stride, int num_pairs,
                             int k, int num_local, int32_t* ids_s, Shared& sh) {
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
__device__ int next_pairs(const int32_t* ids_s, int num_pairs, int e, int& pos, int& mine) {
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

// acc[r][t] = row w[r] . x[t] over K (K % 8 == 0, rows 16-byte aligned), summed over the warp.
// Tokens t >= nt are skipped.
template <int R>
__device__ __forceinline__ void warp_dots(const uint16_t* const (&w)[R],
                                          const uint16_t* const (&x)[kTokens], int nt, int64_t K,
                                          float (&acc)[R][kTokens]) {
  const int lane = threadIdx.x % kWarp;
  const int64_t chunks = K / 8;
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int t = 0; t < kTokens; ++t) acc[r][t] = 0.0f;
  for (int64_t c0 = lane; c0 < chunks; c0 += kWarp * kUnroll) {
    uint4 wv[kUnroll][R];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = c0 + u * kWarp;
#pragma unroll
      for (int r = 0; r < R; ++r)
        wv[u][r] = c < chunks ? load_stream(w[r] + c * 8) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = c0 + u * kWarp;
      if (c >= chunks) break;
#pragma unroll
      for (int t = 0; t < kTokens; ++t) {
        if (t >= nt) break;
        const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x[t]) + c);
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r][t] = dot8(wv[u][r], xv, acc[r][t]);
      }
    }
  }
  // Reduce only the tokens present (nt is warp-uniform): at decode that is one in kTokens.
#pragma unroll
  for (int t = 0; t < kTokens; ++t) {
    if (t >= nt) break;
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r][t] = warp_sum(acc[r][t]);
  }
}

__device__ __forceinline__ int64_t expert_index(const DeviceWeights& w, int e) {
  return w.index ? w.index[e] : e;
}

__device__ __forceinline__ float bias_at(const uint16_t* b, int64_t i) {
  return b ? bf16_bits_to_float(b[i]) : 0.0f;
}

// Persistent warps: item i = (active expert i / tasks, task i % tasks), items spread over every
// warp of the grid. A GEMM1 task is intermediate column j (gate and up rows; non-gated: columns
// 2j, 2j+1); a GEMM2 task is kRows2 consecutive output rows.
constexpr int kRows2 = 2;

__global__ void __launch_bounds__(kThreads, 2)
    gemm1_kernel(DeviceWeights w, const uint16_t* __restrict__ a1, int64_t a1_stride,
                 const int32_t* __restrict__ ids, int64_t ids_stride, int num_pairs, int k,
                 uint16_t* __restrict__ h) {
  extern __shared__ int32_t ids_s[];
  __shared__ Shared sh;
  load_routing(ids, ids_stride, num_pairs, k, w.num_local, ids_s, sh);
  const Activation& act = w.activation;
  const int64_t I = w.intermediate, H = w.hidden;
  const int64_t tasks = act.gated ? I : I / 2;
  const int64_t items = sh.num_active * tasks;
  const int64_t warps = int64_t(gridDim.x) * kWarps;
  for (int64_t item = blockIdx.x * int64_t(kWarps) + threadIdx.x / kWarp; item < items;
       item += warps) {
    const int e = sh.active[item / tasks];
    const int64_t task = item % tasks, ex = expert_index(w, e);
    const int64_t j0 = act.gated ? task : 2 * task;
    const int64_t rows[2] = {act.gated ? act.gate_row(j0, I) : j0,
                             act.gated ? act.up_row(j0, I) : j0 + 1};
    const uint16_t* const wr[2] = {w.w13 + ex * w.w13_expert_stride + rows[0] * w.w13_row_stride,
                                   w.w13 + ex * w.w13_expert_stride + rows[1] * w.w13_row_stride};
    const float b0 = bias_at(w.b13, ex * w.b13_expert_stride + rows[0]);
    const float b1 = bias_at(w.b13, ex * w.b13_expert_stride + rows[1]);
    int mine = 0;
    for (int pos = 0, nt; (nt = next_pairs(ids_s, num_pairs, e, pos, mine)) > 0;) {
      const uint16_t* x[kTokens];
#pragma unroll
      for (int t = 0; t < kTokens; ++t) x[t] = a1 + pair_of(mine, t, nt) / k * a1_stride;
      float acc[2][kTokens];
      warp_dots<2>(wr, x, nt, H, acc);
      const int lane = threadIdx.x % kWarp;
      if (lane < nt) {
        // Lane t writes token t (compile-time indices through the unrolled select).
        float g = acc[0][0], u = acc[1][0];
#pragma unroll
        for (int t = 1; t < kTokens; ++t)
          if (lane == t) g = acc[0][t], u = acc[1][t];
        uint16_t* out = h + static_cast<int64_t>(mine) * I;
        if (act.gated) {
          out[j0] = float_to_bf16_bits(apply_activation(act, g + b0, u + b1));
        } else {
          out[j0] = float_to_bf16_bits(apply_activation(act, g + b0, 0.0f));
          out[j0 + 1] = float_to_bf16_bits(apply_activation(act, u + b1, 0.0f));
        }
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads, 2)
    gemm2_kernel(DeviceWeights w, const uint16_t* __restrict__ h, const int32_t* __restrict__ ids,
                 int64_t ids_stride, int num_pairs, int k, float* __restrict__ out) {
  extern __shared__ int32_t ids_s[];
  __shared__ Shared sh;
  load_routing(ids, ids_stride, num_pairs, k, w.num_local, ids_s, sh);
  const int64_t I = w.intermediate, H = w.hidden;
  // Pairs computed nowhere (id -1; ids past E_local are treated alike) get rows of zeros.
  for (int p = blockIdx.x; p < num_pairs; p += gridDim.x)
    if (ids_s[p] < 0)
      for (int64_t i = threadIdx.x; i < H; i += kThreads) out[p * H + i] = 0.0f;
  const int64_t tasks = H / kRows2;
  const int64_t items = sh.num_active * tasks;
  const int64_t warps = int64_t(gridDim.x) * kWarps;
  for (int64_t item = blockIdx.x * int64_t(kWarps) + threadIdx.x / kWarp; item < items;
       item += warps) {
    const int e = sh.active[item / tasks];
    const int64_t row0 = (item % tasks) * kRows2, ex = expert_index(w, e);
    const uint16_t* wr[kRows2];
#pragma unroll
    for (int r = 0; r < kRows2; ++r)
      wr[r] = w.w2 + ex * w.w2_expert_stride + (row0 + r) * w.w2_row_stride;
    int mine = 0;
    for (int pos = 0, nt; (nt = next_pairs(ids_s, num_pairs, e, pos, mine)) > 0;) {
      int pairs[kTokens];
      const uint16_t* x[kTokens];
#pragma unroll
      for (int t = 0; t < kTokens; ++t) {
        pairs[t] = pair_of(mine, t, nt);
        x[t] = h + pairs[t] * I;
      }
      float acc[kRows2][kTokens];
      warp_dots<kRows2>(wr, x, nt, I, acc);
      const int lane = threadIdx.x % kWarp;
      // Lane (t * kRows2 + r) writes row r of token t.
#pragma unroll
      for (int t = 0; t < kTokens; ++t)
#pragma unroll
        for (int r = 0; r < kRows2; ++r)
          if (lane == t * kRows2 + r && t < nt)
            out[static_cast<int64_t>(pairs[t]) * H + row0 + r] =
                acc[r][t] + bias_at(w.b2, ex * w.b2_expert_stride + row0 + r);
    }
  }
}

// Blocks that fill the GPU once (persistent), from the occupancy of `kernel`.
template <typename Kernel>
unsigned persistent_blocks(Kernel kernel, size_t smem) {
  int dev = 0, sms = 0, per_sm = 0;
  MOEKIT_CUDA_CHECK(cudaGetDevice(&dev));
  MOEKIT_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  MOEKIT_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
  return static_cast<unsigned>(std::max(1, sms * per_sm));
}

}  // namespace

void small_batch_experts(const DeviceWeights& w, const uint16_t* a1, int64_t a1_stride,
                         const int32_t* ids, int64_t ids_stride, int64_t M, int k, uint16_t* h,
                         float* fused_out, cudaStream_t stream) {
  MOEKIT_CHECK(w.num_local <= kMaxLocalExperts, "small-batch experts: E_local ", w.num_local, " > ",
               kMaxLocalExperts);
  // Token chunks of at most kSmallBatchMaxPairs pairs: the ids of a chunk live in shared memory.
  const int64_t chunk = std::max<int64_t>(1, kSmallBatchMaxPairs / k);
  for (int64_t t0 = 0; t0 < M; t0 += chunk) {
    const int pairs = static_cast<int>(std::min(chunk, M - t0) * k);
    const size_t smem = pairs * sizeof(int32_t);
    gemm1_kernel<<<persistent_blocks(gemm1_kernel, smem), kThreads, smem, stream>>>(
        w, a1 + t0 * a1_stride, a1_stride, ids + t0 * ids_stride, ids_stride, pairs, k,
        h + t0 * k * w.intermediate);
    MOEKIT_CUDA_CHECK_LAUNCH();
    gemm2_kernel<<<persistent_blocks(gemm2_kernel, smem), kThreads, smem, stream>>>(
        w, h + t0 * k * w.intermediate, ids + t0 * ids_stride, ids_stride, pairs, k,
        fused_out + t0 * k * w.hidden);
    MOEKIT_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace moekit::cuda
