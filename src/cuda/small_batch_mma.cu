// Small-batch gemm1 and gemm2 (small_batch.cuh) on e4m3 for chunks of more than a few pairs
// (small_batch.cu's few_pairs takes the others): the dots on the tensor cores. A warp takes items
// of 8 weight rows and up to 16 of the expert's tokens per pass, as m16n8k32 tiles (tokens x rows,
// fp32 sums, device.cuh). The rows stream row-major through a per-warp cp.async ring in shared
// memory; since a dot may take its terms in any order, each 16-byte chunk a lane reads from the
// ring is directly the B fragment of two k-steps, and the tokens' chunks at the same places
// (16-byte loads through L1) their A fragments: no conversions, no shuffles, one MMA per 8 x 16
// products. Then the weight row's scale, the activation row's scale (e4m3; 1 for float formats) and
// the bias, as in small_batch.cu. Items go to blocks round-robin (item i to block i % grid), so
// that items fewer than the grid's warps still spread over every SM. (The same kernels on bf16 were
// slower than small_batch.cu's at every token count measured: bench/notes_cuda.md v12.)
#include "cuda/small_batch.cuh"

namespace moekit::cuda::small_batch {
namespace {

using T = __nv_fp8_e4m3;
constexpr int kElems = 16;   // codes per 16-byte chunk
constexpr int kTokens = 16;  // tokens per pass over an item's rows (the MMA's M)
constexpr int kRows = 8;     // weight rows per item (the MMA's N)
// Each warp's ring: kStages stages of kSegChunks 16-byte chunks of its 8 rows; a staged row takes
// kRowPitch bytes, 64 more than its chunks, so that rows g and g + 1 fall on different banks when
// lanes (g, t) read their chunks.
constexpr int kStages = 4;
constexpr int kSegChunks = 16;
constexpr int kRowPitch = kSegChunks * 16 + 64;
constexpr int kStageBytes = kRows * kRowPitch;
constexpr size_t kRingBytes = size_t(kWarps) * kStages * kStageBytes;  // per block

// The warp's item: 8 weight rows (lane (g, t)'s row g: w) against up to 16 tokens (A rows g and g +
// 8: x_lo, x_hi; null past the pass's tokens), over K. The rows stream through the warp's ring of
// kStages stages (cp.async, kSegChunks chunks of every row per stage, kStages - 1 stages in
// flight): lanes 0-15 copy 256 contiguous bytes of one row, lanes 16-31 of the next, as a row-major
// load would. Lane t then takes chunks t, t + 4, t + 8, t + 12 of row g from the stage and the same
// chunks of its tokens: each chunk is two k-steps' fragments (device.cuh, mma_m16n8k32_e4m3). d:
// token g's dots with rows 2t and 2t + 1, then token g + 8's.
__device__ __forceinline__ void warp_rows_dot(const T* w, const T* x_lo, const T* x_hi, int64_t K,
                                              unsigned char* ring, float (&d)[4]) {
  const int lane = threadIdx.x % kWarp, g = lane / 4, t = lane % 4;
  const int64_t chunks = K / kElems;
  const int segs = static_cast<int>((chunks + kSegChunks - 1) / kSegChunks);
  // The rows this lane copies: 2i + lane / 16 for i < 4.
  const T* src[kRows / 2];
#pragma unroll
  for (int i = 0; i < kRows / 2; ++i)
    src[i] =
        reinterpret_cast<const T*>(__shfl_sync(0xffffffffu, uintptr_t(w), 4 * (2 * i + lane / 16)));
  auto issue = [&](int s) {
    if (s < segs) {
      unsigned char* stage = ring + (s % kStages) * kStageBytes + (lane % 16) * 16;
      const int64_t c = int64_t(s) * kSegChunks + lane % 16;
#pragma unroll
      for (int i = 0; i < kRows / 2; ++i) {
        const bool ok = c < chunks;  // past K: zeros, nothing read
        cp_async16(stage + (2 * i + lane / 16) * kRowPitch, src[i] + (ok ? c * kElems : 0),
                   ok ? 16 : 0);
      }
    }
    cp_async_commit();  // empty past the end: the group count stays one per stage
  };
  const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int i = 0; i < 4; ++i) d[i] = 0.0f;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) issue(s);
  for (int s = 0; s < segs; ++s) {
    cp_async_wait<kStages - 2>();  // this lane's copies of stage s are in ...
    __syncwarp();                  // ... and every lane's; every lane is done with stage s - 1
    issue(s + kStages - 1);        // into stage s - 1's slot
    const unsigned char* stage = ring + (s % kStages) * kStageBytes + g * kRowPitch;
#pragma unroll
    for (int u = 0; u < kSegChunks / 4; ++u) {
      const int q = 4 * u + t;
      const int64_t c = int64_t(s) * kSegChunks + q;
      const uint4 wv = *reinterpret_cast<const uint4*>(stage + q * 16);
      const uint4 xl = x_lo && c < chunks ? __ldg(reinterpret_cast<const uint4*>(x_lo) + c) : zero;
      const uint4 xh = x_hi && c < chunks ? __ldg(reinterpret_cast<const uint4*>(x_hi) + c) : zero;
      const uint32_t a0[4] = {xl.x, xh.x, xl.y, xh.y}, a1[4] = {xl.z, xh.z, xl.w, xh.w};
      // Each chunk's two products go into fresh registers, then into d in fp32: the MMAs of a
      // stage do not wait on each other, and e4m3 sums keep fp32 whatever the tensor cores keep.
      float p[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      mma_m16n8k32_e4m3(p, a0, wv.x, wv.y);
      mma_m16n8k32_e4m3(p, a1, wv.z, wv.w);
#pragma unroll
      for (int i = 0; i < 4; ++i) d[i] += p[i];
    }
  }
  __syncwarp();  // every lane is done with the ring before the next item's copies
}

__device__ __forceinline__ int64_t first_item() {
  return blockIdx.x + int64_t(gridDim.x) * (threadIdx.x / kWarp);
}
__device__ __forceinline__ int64_t item_stride() {
  return int64_t(gridDim.x) * kWarps;
}

// The dynamic shared memory: the warps' rings, then the pair ids. This warp's ring and the ids.
struct Smem {
  unsigned char* ring;
  int32_t* ids;
};
__device__ __forceinline__ Smem dynamic_smem() {
  extern __shared__ __align__(16) unsigned char smem[];
  return {smem + threadIdx.x / kWarp * (kRingBytes / kWarps),
          reinterpret_cast<int32_t*>(smem + kRingBytes)};
}

// A GEMM1 item is 8 W13 rows: gated, the gate and up rows of 4 intermediate columns, interleaved
// (the MMA's columns 2t and 2t + 1 are then one column's gate and up, both in lane t); non-gated,
// 8 columns. H and I are multiples of 8 (16-byte rows, experts_base.cc): items end with the
// matrices.
__global__ void __launch_bounds__(kThreads, 2)
    gemm1_kernel(const __grid_constant__ Gemm1Args<T, float> a) {
  const auto [ring, ids_s] = dynamic_smem();
  __shared__ Shared sh;
  begin_gemm1(a, ids_s, sh);
  const DeviceWeights& w = a.w;
  const Activation& act = w.activation;
  const int64_t I = w.intermediate, H = w.hidden, rows13 = act.w13_rows(I);
  const int64_t cols = act.gated ? kRows / 2 : kRows;  // intermediate columns per item
  const int64_t tasks = I / cols;
  const int64_t items = sh.num_active * tasks;
  const int g = threadIdx.x % kWarp / 4, t = threadIdx.x % 4;
  // W13 row of column j: gated, its gate (second = false) or up row; non-gated, j itself.
  auto row13 = [&](int64_t j, bool second) {
    return act.gated ? (second ? act.up_row(j, I) : act.gate_row(j, I)) : j;
  };
  const T* w13 = static_cast<const T*>(w.w13);
  for (int64_t item = first_item(); item < items; item += item_stride()) {
    const int e = sh.active[item / tasks];
    const int64_t ex = expert_index(w, e), j0 = (item % tasks) * cols;
    const int64_t jg = act.gated ? j0 + g / 2 : j0 + g;  // lane's streamed row: column jg
    const T* wr = w13 + ex * w.w13_expert_stride + row13(jg, g % 2) * w.w13_row_stride;
    // Lane t's outputs: gated, column jo from its gate and up; non-gated, columns jo and jo + 1.
    const int64_t jo = act.gated ? j0 + t : j0 + 2 * t;
    const int64_t r0 = ex * rows13 + row13(jo, false);
    const int64_t r1 = ex * rows13 + (act.gated ? row13(jo, true) : row13(jo + 1, false));
    const float b0 = bias_at(w.b13, r0), b1 = bias_at(w.b13, r1);
    const float s0 = scale_at(w.s13, r0), s1 = scale_at(w.s13, r1);
    int mine = 0;
    for (int pos = 0, nt; (nt = next_pairs<kTokens>(ids_s, a.num_pairs, e, pos, mine)) > 0;) {
      const int p[2] = {pair_of(mine, g, nt), pair_of(mine, g + 8, nt)};
      float d[4];
      warp_rows_dot(wr, g < nt ? a.a1 + p[0] / a.k * a.a1_stride : nullptr,
                    g + 8 < nt ? a.a1 + p[1] / a.k * a.a1_stride : nullptr, H, ring, d);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        if (g + 8 * half >= nt) continue;
        const float xs = scale_at(a.a1_scale, p[half] / a.k);
        const float u0 = d[2 * half] * s0 * xs + b0, u1 = d[2 * half + 1] * s1 * xs + b1;
        float* out = a.h + static_cast<int64_t>(p[half]) * I;
        if (act.gated) {
          store_float(out, jo, apply_activation(act, u0, u1));
        } else {
          store_float(out, jo, apply_activation(act, u0, 0.0f));
          store_float(out, jo + 1, apply_activation(act, u1, 0.0f));
        }
      }
    }
  }
}

// A GEMM2 item is 8 consecutive output rows (H is a multiple of 8).
__global__ void __launch_bounds__(kThreads, 2)
    gemm2_kernel(const __grid_constant__ Gemm2Args<T> a) {
  const auto [ring, ids_s] = dynamic_smem();
  __shared__ Shared sh;
  begin_gemm2(a, ids_s, sh);
  const DeviceWeights& w = a.w;
  const int64_t I = w.intermediate, H = w.hidden;
  const int64_t tasks = H / kRows;
  const int64_t items = sh.num_active * tasks;
  const int g = threadIdx.x % kWarp / 4, t = threadIdx.x % 4;
  const T* w2 = static_cast<const T*>(w.w2);
  for (int64_t item = first_item(); item < items; item += item_stride()) {
    const int e = sh.active[item / tasks];
    const int64_t ex = expert_index(w, e), row0 = (item % tasks) * kRows;
    const T* wr = w2 + ex * w.w2_expert_stride + (row0 + g) * w.w2_row_stride;
    const int64_t ro = row0 + 2 * t;  // lane t's output rows: ro and ro + 1
    int mine = 0;
    for (int pos = 0, nt; (nt = next_pairs<kTokens>(ids_s, a.num_pairs, e, pos, mine)) > 0;) {
      const int p[2] = {pair_of(mine, g, nt), pair_of(mine, g + 8, nt)};
      float d[4];
      warp_rows_dot(wr, g < nt ? a.h + static_cast<int64_t>(p[0]) * I : nullptr,
                    g + 8 < nt ? a.h + static_cast<int64_t>(p[1]) * I : nullptr, I, ring, d);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        if (g + 8 * half >= nt) continue;
        const float hs = scale_at(a.h_scale, p[half]);
#pragma unroll
        for (int c = 0; c < 2; ++c)
          a.out[static_cast<int64_t>(p[half]) * H + ro + c] =
              d[2 * half + c] * scale_at(w.s2, ex * H + ro + c) * hs +
              bias_at(w.b2, ex * H + ro + c);
      }
    }
  }
}

size_t smem_bytes(int num_pairs) {
  return kRingBytes + num_pairs * sizeof(int32_t);
}

}  // namespace

void gemm1_mma(const Gemm1Args<__nv_fp8_e4m3, float>& args, cudaStream_t stream) {
  launch_persistent(gemm1_kernel, smem_bytes(args.num_pairs), stream, args);
}
void gemm2_mma(const Gemm2Args<__nv_fp8_e4m3>& args, cudaStream_t stream) {
  launch_persistent(gemm2_kernel, smem_bytes(args.num_pairs), stream, args);
}

}  // namespace moekit::cuda::small_batch
