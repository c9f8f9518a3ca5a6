// Small-batch (decode) experts: few tokens, so the layer is bound by reading the active experts'
// weights. Every weight row of an active expert is streamed from memory once and applied to all
// of that expert's tokens; the work of all active experts is spread over every SM. Two launches
// per token chunk, gemm1 and gemm2 (small_batch.cuh), where pair = t * k + s and e = ids[t, s].
// Weights and activations are of one element type T (bf16, fp16, e4m3); the dots sum the stored
// codes' products in fp32, then take the weight row's scale and the activation row's scale (e4m3;
// 1 for float formats). With e4m3, h is written in fp32 and requantized between the launches (as
// DeviceWeights::a2_scale says): fp8 weights halve the bytes streamed, and W2 reads e4m3
// activations like the grouped GEMM. Each block lists the active experts on its own (a bitmap of
// the ids in shared memory), then its warps work persistently through the items (active expert,
// rows); no sort or host round trip precedes the launches. Both launches are chained
// (programmatic dependent launch, device.cuh): gemm2 is scheduled as gemm1's blocks retire and
// lists its experts before waiting for h.
// Two kernel families: this file's (16-byte loads of each lane straight into registers; dots on
// the tensor cores through mma_dot2 for chunks of few pairs, else fp32 FMAs) for every chunk of
// bf16 and fp16 and for e4m3 chunks of few pairs; small_batch_mma.cu's (rows staged in shared
// memory, tensor-core tiles of 8 rows x 16 tokens) for the other e4m3 chunks, where converting
// every code for each token's fp32 dot costs more issue slots than the loads.
#include <algorithm>
#include <functional>
#include <type_traits>

#include "cuda/small_batch.cuh"

namespace moekit::cuda {
namespace {

using namespace small_batch;

// A kernel's shape: tokens per pass over an item's rows; 16-byte chunks per row and lane in
// flight (unroll1: gemm1, unroll2: gemm2); output rows per gemm2 item; blocks per SM the
// registers must allow (__launch_bounds__).
struct Shape {
  int tokens;
  int unroll1;
  int rows2;
  int unroll2;
  int min_blocks;
  bool mma;  // dots on the tensor cores (warp_dots)
};

// acc[r][t] = row w[r] . x[t] over K (K a multiple of the 16-byte chunk, rows 16-byte aligned),
// summed over the warp. Tokens t >= nt are skipped. kMma: the dots on the tensor cores, rows in
// pairs (mma_dot2, device.cuh; R even), else fp32 FMAs on the CUDA cores.
// Lane l takes chunks l, l + 32, ...; past the row's end its chunks are zeros (the MMAs need the
// whole warp, so the loop bounds are warp-uniform).
template <typename T, int R, int U, bool kMma, int kTokens>
__device__ __forceinline__ void warp_dots(const T* const (&w)[R], const T* const (&x)[kTokens],
                                          int nt, int64_t K, float (&acc)[R][kTokens]) {
  static_assert(!kMma || R % 2 == 0);
  constexpr int kElems = Vec16<T>::kElems, kPairs = R / 2;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  const int lane = threadIdx.x % kWarp;
  const int64_t chunks = K / kElems;
  float d[kPairs][kTokens][4] = {};
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int t = 0; t < kTokens; ++t) acc[r][t] = 0.0f;
  for (int64_t c0 = 0; c0 < chunks; c0 += kWarp * U) {
    uint4 wv[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t c = c0 + u * kWarp + lane;
#pragma unroll
      for (int r = 0; r < R; ++r) wv[u][r] = c < chunks ? load_stream(w[r] + c * kElems) : zero;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (c0 + u * kWarp >= chunks) break;
      const int64_t c = c0 + u * kWarp + lane;
#pragma unroll
      for (int t = 0; t < kTokens; ++t) {
        if (t >= nt) break;
        const uint4 xv = c < chunks ? __ldg(reinterpret_cast<const uint4*>(x[t]) + c) : zero;
        if constexpr (kMma) {
#pragma unroll
          for (int p = 0; p < kPairs; ++p) mma_dot2<T>(d[p][t], wv[u][2 * p], wv[u][2 * p + 1], xv);
        } else {
#pragma unroll
          for (int r = 0; r < R; ++r) acc[r][t] = Vec16<T>::dot(wv[u][r], xv, acc[r][t]);
        }
      }
    }
  }
  // Reduce only the tokens present (nt is warp-uniform): at decode that is one in kTokens.
#pragma unroll
  for (int t = 0; t < kTokens; ++t) {
    if (t >= nt) break;
    if constexpr (kMma) {
#pragma unroll
      for (int p = 0; p < kPairs; ++p) {
        const float2 s = diagonal_sums(d[p][t]);
        acc[2 * p][t] = s.x;
        acc[2 * p + 1][t] = s.y;
      }
    } else {
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r][t] = warp_sum(acc[r][t]);
    }
  }
}

// Persistent warps: item i = (active expert i / tasks, task i % tasks), items spread over every
// warp of the grid. A GEMM1 task is intermediate column j (gate and up rows; non-gated: columns
// 2j, 2j+1); a GEMM2 task is S.rows2 consecutive output rows.
// kBatch (16-bit elements; e4m3 chunks of many pairs take small_batch_mma.cu's kernels): 4 tokens
// per pass, fp32 FMAs, gemm2 items of 4 rows x 3 chunks in flight (3 x 32 chunks cover a row of
// 768 in one pass), 96-128 registers, 2 blocks per SM.
// kOneToken (chunks of few pairs, launch below): one token per pass, dots on the tensor cores
// (warp_dots), 2 rows x 3 chunks in flight per item of either kernel, 64 registers (e4m3 gemm1
// spills 36 bytes), 4 blocks per SM. On an H200 (bench/notes_cuda.md v14, two calls), against
// session 9's CUDA-core shape (fp32 FMAs, 3 blocks per SM), the layer at one token: qwen3-30b-a3b
// bf16 -2 to -5 %, fp8-token -6 to -7 %, gpt-oss-20b fp8-token -7 to -8 %, mixtral-8x7b bf16 -5
// to -6 %, fp8-token -6 to -7 %; gpt-oss-20b bf16 +1 to +2 %.
enum Shapes { kBatch, kOneToken };
constexpr Shape kShapes[] = {
    {4, 4, 4, 3, 2, false},
    {1, 3, 2, 3, 4, true},
};

template <typename T, typename OutH, int kShape>
__global__ void __launch_bounds__(kThreads, kShapes[kShape].min_blocks)
    gemm1_kernel(const __grid_constant__ Gemm1Args<T, OutH> a) {
  constexpr Shape S = kShapes[kShape];
  constexpr int kTokens = S.tokens;
  extern __shared__ int32_t ids_s[];
  __shared__ Shared sh;
  begin_gemm1(a, ids_s, sh);
  const DeviceWeights& w = a.w;
  const Activation& act = w.activation;
  const int64_t I = w.intermediate, H = w.hidden, rows13 = act.w13_rows(I);
  const int64_t tasks = act.gated ? I : I / 2;
  const int64_t items = sh.num_active * tasks;
  const int64_t warps = int64_t(gridDim.x) * kWarps;
  const T* w13 = static_cast<const T*>(w.w13);
  for (int64_t item = blockIdx.x * int64_t(kWarps) + threadIdx.x / kWarp; item < items;
       item += warps) {
    const int e = sh.active[item / tasks];
    const int64_t task = item % tasks, ex = expert_index(w, e);
    const int64_t j0 = act.gated ? task : 2 * task;
    const int64_t rows[2] = {act.gated ? act.gate_row(j0, I) : j0,
                             act.gated ? act.up_row(j0, I) : j0 + 1};
    const T* const wr[2] = {w13 + ex * w.w13_expert_stride + rows[0] * w.w13_row_stride,
                            w13 + ex * w.w13_expert_stride + rows[1] * w.w13_row_stride};
    const float b0 = bias_at(w.b13, ex * rows13 + rows[0]);
    const float b1 = bias_at(w.b13, ex * rows13 + rows[1]);
    const float s0 = scale_at(w.s13, ex * rows13 + rows[0]);
    const float s1 = scale_at(w.s13, ex * rows13 + rows[1]);
    int mine = 0;
    for (int pos = 0, nt; (nt = next_pairs<kTokens>(ids_s, a.num_pairs, e, pos, mine)) > 0;) {
      const T* x[kTokens];
#pragma unroll
      for (int t = 0; t < kTokens; ++t) x[t] = a.a1 + pair_of(mine, t, nt) / a.k * a.a1_stride;
      float acc[2][kTokens];
      warp_dots<T, 2, S.unroll1, S.mma>(wr, x, nt, H, acc);
      const int lane = threadIdx.x % kWarp;
      if (lane < nt) {
        // Lane t writes token t (compile-time indices through the unrolled select).
        float g = acc[0][0], u = acc[1][0];
#pragma unroll
        for (int t = 1; t < kTokens; ++t)
          if (lane == t) g = acc[0][t], u = acc[1][t];
        const float xs = scale_at(a.a1_scale, mine / a.k);
        g = g * s0 * xs + b0;
        u = u * s1 * xs + b1;
        OutH* out = a.h + static_cast<int64_t>(mine) * I;
        if (act.gated) {
          store_float(out, j0, apply_activation(act, g, u));
        } else {
          store_float(out, j0, apply_activation(act, g, 0.0f));
          store_float(out, j0 + 1, apply_activation(act, u, 0.0f));
        }
      }
    }
  }
}

template <typename T, int kShape>
__global__ void __launch_bounds__(kThreads, kShapes[kShape].min_blocks)
    gemm2_kernel(const __grid_constant__ Gemm2Args<T> a) {
  constexpr Shape S = kShapes[kShape];
  constexpr int kTokens = S.tokens, kRows2 = S.rows2;
  extern __shared__ int32_t ids_s[];
  __shared__ Shared sh;
  begin_gemm2(a, ids_s, sh);
  const DeviceWeights& w = a.w;
  const int64_t I = w.intermediate, H = w.hidden;
  const int64_t tasks = H / kRows2;
  const int64_t items = sh.num_active * tasks;
  const int64_t warps = int64_t(gridDim.x) * kWarps;
  const T* w2 = static_cast<const T*>(w.w2);
  for (int64_t item = blockIdx.x * int64_t(kWarps) + threadIdx.x / kWarp; item < items;
       item += warps) {
    const int e = sh.active[item / tasks];
    const int64_t row0 = (item % tasks) * kRows2, ex = expert_index(w, e);
    const T* wr[kRows2];
#pragma unroll
    for (int r = 0; r < kRows2; ++r)
      wr[r] = w2 + ex * w.w2_expert_stride + (row0 + r) * w.w2_row_stride;
    int mine = 0;
    for (int pos = 0, nt; (nt = next_pairs<kTokens>(ids_s, a.num_pairs, e, pos, mine)) > 0;) {
      int pairs[kTokens];
      const T* x[kTokens];
#pragma unroll
      for (int t = 0; t < kTokens; ++t) {
        pairs[t] = pair_of(mine, t, nt);
        x[t] = a.h + pairs[t] * I;
      }
      float acc[kRows2][kTokens];
      warp_dots<T, kRows2, S.unroll2, S.mma>(wr, x, nt, I, acc);
      const int lane = threadIdx.x % kWarp;
      // Lane (t * kRows2 + r) writes row r of token t.
#pragma unroll
      for (int t = 0; t < kTokens; ++t)
#pragma unroll
        for (int r = 0; r < kRows2; ++r)
          if (lane == t * kRows2 + r && t < nt) {
            const int64_t row = ex * H + row0 + r;
            a.out[static_cast<int64_t>(pairs[t]) * H + row0 + r] =
                acc[r][t] * scale_at(w.s2, row) * scale_at(a.h_scale, pairs[t]) +
                bias_at(w.b2, row);
          }
    }
  }
}

// Token chunks of at most kSmallBatchMaxPairs pairs (the ids of a chunk live in shared memory):
// f(first token, pairs) per chunk.
template <typename F>
void for_each_chunk(int64_t M, int k, F&& f) {
  const int64_t chunk = std::max<int64_t>(1, kSmallBatchMaxPairs / k);
  for (int64_t t0 = 0; t0 < M; t0 += chunk) f(t0, static_cast<int>(std::min(chunk, M - t0) * k));
}

RowScale offset(RowScale s, int64_t rows) {
  return s.scale ? RowScale{s.scale + rows * s.stride, s.stride} : s;
}

// The kernels of a chunk: kOneToken when its pairs are few for the local experts (at most
// max(k, E_local / 4); 16-bit elements also at most 2 tokens: most of its experts then hold one
// pair, and an expert's rows read again for its next pair come mostly from L2), else kBatch, or
// small_batch_mma.cu's tensor-core kernels for e4m3 (whose fp32 dots would convert every code for
// every token). On an H200 (v14), kOneToken against kBatch / the e4m3 tensor-core kernels: bf16
// at 2 tokens qwen3-30b-a3b -7 %, gpt-oss-20b -6 %, deepseek-v3 +2 %, at 4 tokens qwen3-30b-a3b
// -2 %, deepseek-v3 +3 %, at 8 deepseek-v3 +20 %; fp8-token at 2 tokens qwen3-30b-a3b -7 %,
// gpt-oss-20b -23 %, deepseek-v3 -12 %, at 4 tokens qwen3-30b-a3b -3 %, deepseek-v3 -11 %, at 8
// deepseek-v3 +5 %; mixtral-8x7b bf16 at 2 tokens (4 pairs on 8 experts) +23 %.
template <typename T, typename Args>
bool few_pairs(const Args& args) {
  const int quarter = args.w.num_local / 4;
  const int most = sizeof(T) == 1 ? quarter : std::min(2 * args.k, quarter);
  return args.num_pairs <= std::max(args.k, most);
}

template <typename T, typename OutH>
void launch(const Gemm1Args<T, OutH>& args, cudaStream_t stream) {
  const size_t smem = args.num_pairs * sizeof(int32_t);
  if (few_pairs<T>(args))
    return launch_persistent(gemm1_kernel<T, OutH, kOneToken>, smem, stream, args);
  if constexpr (std::is_same_v<T, __nv_fp8_e4m3>)
    gemm1_mma(args, stream);
  else
    launch_persistent(gemm1_kernel<T, OutH, kBatch>, smem, stream, args);
}
template <typename T>
void launch(const Gemm2Args<T>& args, cudaStream_t stream) {
  const size_t smem = args.num_pairs * sizeof(int32_t);
  if (few_pairs<T>(args)) return launch_persistent(gemm2_kernel<T, kOneToken>, smem, stream, args);
  if constexpr (std::is_same_v<T, __nv_fp8_e4m3>)
    gemm2_mma(args, stream);
  else
    launch_persistent(gemm2_kernel<T, kBatch>, smem, stream, args);
}

// GEMM1 into h (OutH: T for float formats, fp32 before requantization), then GEMM2 from hq.
template <typename T, typename OutH>
void run_small_batch(const DeviceWeights& w, const T* a1, int64_t a1_stride, RowScale a1_scale,
                     const int32_t* ids, int64_t ids_stride, int64_t M, int k, OutH* h, const T* hq,
                     RowScale h_scale, const std::function<void()>& requantize, float* fused_out,
                     cudaStream_t stream) {
  const int64_t I = w.intermediate, H = w.hidden;
  // Chained launches (device.cuh): each kernel's launch and routing overlap the previous one's
  // tail; gemm1 follows the prepare's kernels, weight-and-reduce follows gemm2. Arguments in the
  // order of Gemm1Args / Gemm2Args.
  for_each_chunk(M, k, [&](int64_t t0, int pairs) {
    launch(Gemm1Args<T, OutH>{w, a1 + t0 * a1_stride, a1_stride, offset(a1_scale, t0),
                              ids + t0 * ids_stride, ids_stride, pairs, k, h + t0 * k * I},
           stream);
  });
  if (requantize) requantize();
  for_each_chunk(M, k, [&](int64_t t0, int pairs) {
    launch(Gemm2Args<T>{w, hq + t0 * k * I, offset(h_scale, t0 * k), ids + t0 * ids_stride,
                        ids_stride, pairs, k, fused_out + t0 * k * H},
           stream);
  });
}

}  // namespace

void small_batch_experts(const DeviceWeights& w, const void* a1, int64_t a1_stride,
                         RowScale a1_scale, const int32_t* ids, int64_t ids_stride, int64_t M,
                         int k, const SmallBatchBuffers& buf, float* fused_out,
                         cudaStream_t stream) {
  MOEKIT_CHECK(w.num_local <= small_batch::kMaxLocalExperts, "small-batch experts: E_local ",
               w.num_local, " > ", small_batch::kMaxLocalExperts);
  if (M == 0) return;
  with_compute_type(w.elem, [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(a1);
    if constexpr (std::is_same_v<T, __nv_fp8_e4m3>) {
      // h in fp32 (gemm1 writes zeros on the rows of pairs with id -1, so that the amax of a
      // per-tensor scale, or a per-token scale, never reads garbage), requantized into h8.
      const int64_t P = M * k, I = w.intermediate;
      float* h = static_cast<float*>(buf.h);
      const Fp8Rows q{.q = buf.h8, .kind = w.a2_scale, .scale = buf.h_scale, .amax = buf.amax};
      const RowScale h_scale{buf.h_scale, w.a2_scale == ScaleKind::kToken ? 1 : 0};
      run_small_batch<T, float>(
          w, x, a1_stride, a1_scale, ids, ids_stride, M, k, h, reinterpret_cast<const T*>(buf.h8),
          h_scale, [&] { quantize_rows_fp8(h, DType::kF32, I, P, I, nullptr, 0, q, stream); },
          fused_out, stream);
    } else {
      T* h = static_cast<T*>(buf.h);
      run_small_batch<T, T>(w, x, a1_stride, a1_scale, ids, ids_stride, M, k, h, h, RowScale{},
                            nullptr, fused_out, stream);
    }
  });
}

}  // namespace moekit::cuda
