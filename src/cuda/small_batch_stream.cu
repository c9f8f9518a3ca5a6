// Small-batch experts with the weights streamed through shared memory, for 16-bit elements (bf16,
// fp16): one launch for both GEMMs. At decode the layer is a read of the active experts' W13 and
// W2, and short kernels do not reach the DRAM rate: on an H100 a plain read of qwen3-30b-a3b's
// 75 MB took 31.5 us with 16-byte loads per lane and 28.2 us with bulk copies into shared memory
// in one kernel, against 33.4 us as two kernels (W13 then W2). So:
//   - one persistent block per SM; its producer warp issues bulk copies (cp.async.bulk, complete_tx
//     on an mbarrier) of whole weight rows into a ring of stages, as far ahead as the ring allows;
//   - consumer warps take the stages in turn (stage s always by warp s % kConsumers, so each
//     stage's barrier phases are waited in order) and apply the rows to every pair of the
//     expert: dots over shared memory, activation rows from L1/L2;
//   - units: first every GEMM1 tile of every active expert (intermediate columns, gate and up rows
//     interleaved in the stage), then every GEMM2 tile (rows of W2), dealt to blocks round robin so
//     that the blocks stream neighbouring rows. GEMM2 tiles wait until every GEMM1 tile of the
//     grid is counted done (a counter, fence/acquire); their W2 rows are already in flight or in
//     the ring by then, since the producer never waits for h.
// The counters live in a small buffer the experts own (zero between calls): the last block to
// finish puts them back to zero, so one launch at a time may use a buffer (an experts object
// serves one forward at a time). Every block of the grid is resident (occupancy-sized grid), so
// the waits cannot deadlock: a block's GEMM1 tiles never wait for anything but its own ring.
#include <optional>

#include "cuda/small_batch.cuh"

namespace moekit::cuda {
namespace {

using namespace small_batch;

// Consumer warps: 8 (2 per scheduler, each with two chunks of loads in flight) hide the latency
// of the dots' dependent FMAs; with 4 the first version ran at 25 % of the DRAM rate, every warp
// stalled ~9.5 cycles per instruction (ncu). 12 spill past the registers of one block per SM.
constexpr int kConsumers = 8;
constexpr int kThreads = (kConsumers + 1) * kWarp;
constexpr int kMaxRows = 16;    // weight rows per stage
constexpr int kMaxStages = 16;  // a multiple of kConsumers
constexpr int kMinStageBytes = 16 << 10;
constexpr int kRingBytes = 192 << 10;

// How the weights are cut into stages (host-computed; see streamed_shape).
struct Shape {
  int stage_bytes;  // a multiple of 16
  int stages;       // a multiple of kConsumers
  int cols1;        // intermediate columns per GEMM1 tile (2 rows each when gated)
  int rows2;        // W2 rows per GEMM2 tile
  int tiles1;       // GEMM1 tiles per expert: ceil(I / cols1)
  int tiles2;       // GEMM2 tiles per expert: ceil(H / rows2)
};

// ---- mbarrier and bulk copy (PTX; sm_90) ----

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}
// Waits for the completion of the barrier's phase of parity `parity`.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n .reg .pred done;\n"
      "WAIT:\n mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      " @!done bra WAIT;\n}" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes,
                                          uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
          "r"(smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar))
      : "memory");
}

__device__ __forceinline__ uint32_t load_acquire(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// ---- units ----

// Unit u of the launch: GEMM1 tile (phase 1) or GEMM2 tile of active expert `e` (local slot),
// its weight rows (count, bytes each, first row's address and the stride between rows of the
// tile; GEMM1 tiles of split gate/up layouts alternate between two row ranges).
struct Unit {
  bool gemm1;
  int e;
  int64_t ex;    // expert_index(e)
  int64_t first; // GEMM1: first intermediate column; GEMM2: first W2 row
  int rows;      // weight rows in the stage
};

template <typename T>
__device__ __forceinline__ Unit unit_at(const DeviceWeights& w, const Shape& g, const Shared& sh,
                                        int u) {
  const int units1 = sh.num_active * g.tiles1;
  Unit r;
  r.gemm1 = u < units1;
  const int v = r.gemm1 ? u : u - units1;
  const int tiles = r.gemm1 ? g.tiles1 : g.tiles2;
  r.e = sh.active[v / tiles];
  r.ex = expert_index(w, r.e);
  if (r.gemm1) {
    r.first = (v % tiles) * int64_t(g.cols1);
    const int cols = static_cast<int>(min(int64_t(g.cols1), w.intermediate - r.first));
    r.rows = w.activation.gated ? 2 * cols : cols;
  } else {
    r.first = (v % tiles) * int64_t(g.rows2);
    r.rows = static_cast<int>(min(int64_t(g.rows2), w.hidden - r.first));
  }
  return r;
}

// Global address of stage row r of a unit: GEMM1 rows are (gate, up) of each column when gated.
template <typename T>
__device__ __forceinline__ const T* unit_row(const DeviceWeights& w, const Unit& u, int r) {
  if (!u.gemm1)
    return static_cast<const T*>(w.w2) + u.ex * w.w2_expert_stride +
           (u.first + r) * w.w2_row_stride;
  const Activation& act = w.activation;
  const int64_t I = w.intermediate;
  const int64_t j = act.gated ? u.first + r / 2 : u.first + r;
  const int64_t row = !act.gated ? j : r % 2 == 0 ? act.gate_row(j, I) : act.up_row(j, I);
  return static_cast<const T*>(w.w13) + u.ex * w.w13_expert_stride + row * w.w13_row_stride;
}

// The producer: the unit's rows into the stage, runs of adjacent rows as one copy.
template <typename T>
__device__ void issue_unit(const DeviceWeights& w, const Unit& u, char* stage, uint64_t* full) {
  const uint32_t row_bytes =
      static_cast<uint32_t>((u.gemm1 ? w.hidden : w.intermediate) * sizeof(T));
  mbar_expect_tx(full, row_bytes * u.rows);
  for (int r = 0; r < u.rows;) {
    const char* src = reinterpret_cast<const char*>(unit_row<T>(w, u, r));
    int n = 1;
    while (r + n < u.rows &&
           reinterpret_cast<const char*>(unit_row<T>(w, u, r + n)) == src + n * row_bytes)
      ++n;
    bulk_copy(stage + r * row_bytes, src, n * row_bytes, full);
    r += n;
  }
}

// acc[r][t] = stage row r . x[t] over K elements, summed over the warp, for r < rows, t < nt.
// x rows are read through L1 (a1: constant in the launch) or from L2 only (h: written by other
// blocks of this launch).
template <typename T, bool kFromL2>
__device__ __forceinline__ void stage_dots(const char* stage, int rows, int64_t K,
                                           const T* const (&x)[kTokens], int nt,
                                           float (&acc)[kMaxRows][kTokens]) {
  constexpr int kElems = Vec16<T>::kElems;
  const int lane = threadIdx.x % kWarp;
  const int chunks = static_cast<int>(K / kElems);
  const uint4* wrow = reinterpret_cast<const uint4*>(stage);
#pragma unroll
  for (int r = 0; r < kMaxRows; ++r)
#pragma unroll
    for (int t = 0; t < kTokens; ++t) acc[r][t] = 0.0f;
  // Two chunks per lane and step: both chunks' loads are in flight before the math.
  for (int c = lane; c < chunks; c += 2 * kWarp) {
    const bool two = c + kWarp < chunks;
    uint4 xv[2][kTokens];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int t = 0; t < kTokens; ++t) {
        const uint4* p = reinterpret_cast<const uint4*>(x[t]) + c + i * kWarp;
        xv[i][t] = t < nt && (i == 0 || two) ? (kFromL2 ? __ldcg(p) : __ldg(p))
                                               : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
    for (int r = 0; r < kMaxRows; ++r) {
      if (r >= rows) break;
      const uint4 w0 = wrow[r * chunks + c];
      const uint4 w1 = two ? wrow[r * chunks + c + kWarp] : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int t = 0; t < kTokens; ++t)
        if (t < nt) acc[r][t] = Vec16<T>::dot(w1, xv[1][t], Vec16<T>::dot(w0, xv[0][t], acc[r][t]));
    }
  }
#pragma unroll
  for (int r = 0; r < kMaxRows; ++r) {
    if (r >= rows) break;
#pragma unroll
    for (int t = 0; t < kTokens; ++t)
      if (t < nt) acc[r][t] = warp_sum(acc[r][t]);
  }
}

// Lane owning output (r, t) of a stage's sums (every lane holds every sum after warp_sum).
__device__ __forceinline__ bool owns(int r, int t) {
  return threadIdx.x % kWarp == (t * kMaxRows + r) % kWarp;
}

// GEMM1 tile: h[pair, j] = act(gate_j . a1[t] + b, up_j . a1[t] + b) for the expert's pairs.
template <typename T>
__device__ void gemm1_unit(const DeviceWeights& w, const Unit& u, const char* stage,
                           const T* a1, int64_t a1_stride, const int32_t* ids_s, int num_pairs,
                           int k, T* h) {
  const Activation& act = w.activation;
  const int64_t I = w.intermediate, H = w.hidden, rows13 = act.w13_rows(I);
  int mine = 0;
  for (int pos = 0, nt; (nt = next_pairs(ids_s, num_pairs, u.e, pos, mine)) > 0;) {
    const T* x[kTokens];
    int pairs[kTokens];
#pragma unroll
    for (int t = 0; t < kTokens; ++t) {
      pairs[t] = pair_of(mine, t, nt);
      x[t] = a1 + pairs[t] / k * a1_stride;
    }
    float acc[kMaxRows][kTokens];
    stage_dots<T, false>(stage, u.rows, H, x, nt, acc);
#pragma unroll
    for (int r = 0; r < kMaxRows; ++r) {
      if (r >= u.rows) break;
      if (act.gated && r % 2 == 1) continue;  // rows r, r + 1: column j's gate and up
      const int up = r + 1 < kMaxRows ? r + 1 : r;
#pragma unroll
      for (int t = 0; t < kTokens; ++t) {
        if (t >= nt || !owns(r, t)) continue;
        const int64_t j = u.first + (act.gated ? r / 2 : r);
        const float g = acc[r][t] + bias_at(w.b13, u.ex * rows13 + act.gate_row(j, I));
        const float v =
            act.gated ? acc[up][t] + bias_at(w.b13, u.ex * rows13 + act.up_row(j, I)) : 0.0f;
        store_float(h + int64_t(pairs[t]) * I, j, apply_activation(act, g, v));
      }
    }
  }
}

// GEMM2 tile: out[pair, row] = W2[e][row] . h[pair] + b2 for the tile's rows.
template <typename T>
__device__ void gemm2_unit(const DeviceWeights& w, const Unit& u, const char* stage, const T* h,
                           const int32_t* ids_s, int num_pairs, float* out) {
  const int64_t I = w.intermediate, H = w.hidden;
  int mine = 0;
  for (int pos = 0, nt; (nt = next_pairs(ids_s, num_pairs, u.e, pos, mine)) > 0;) {
    const T* x[kTokens];
    int pairs[kTokens];
#pragma unroll
    for (int t = 0; t < kTokens; ++t) {
      pairs[t] = pair_of(mine, t, nt);
      x[t] = h + int64_t(pairs[t]) * I;
    }
    float acc[kMaxRows][kTokens];
    stage_dots<T, true>(stage, u.rows, I, x, nt, acc);
#pragma unroll
    for (int r = 0; r < kMaxRows; ++r) {
      if (r >= u.rows) break;
#pragma unroll
      for (int t = 0; t < kTokens; ++t)
        if (t < nt && owns(r, t))
          out[int64_t(pairs[t]) * H + u.first + r] =
              acc[r][t] + bias_at(w.b2, u.ex * H + u.first + r);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    streamed_kernel(DeviceWeights w, Shape g, const T* __restrict__ a1, int64_t a1_stride,
                    const int32_t* __restrict__ ids, int64_t ids_stride, int num_pairs, int k,
                    T* h, float* __restrict__ out, uint32_t* sync) {
  extern __shared__ __align__(128) char smem[];
  __shared__ Shared sh;
  __shared__ uint64_t full[kMaxStages], empty[kMaxStages];
  char* ring = smem;
  int32_t* ids_s = reinterpret_cast<int32_t*>(smem + int64_t(g.stages) * g.stage_bytes);
  if (threadIdx.x == 0) {
    for (int s = 0; s < g.stages; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 1);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  grid_dependency_wait();  // the ids (and a1) come from the kernels just before
  launch_dependents();
  load_routing(ids, ids_stride, num_pairs, k, w.num_local, ids_s, sh);  // syncs the block
  const int units1 = sh.num_active * g.tiles1;
  const int units = units1 + sh.num_active * g.tiles2;
  // sync[0]: GEMM1 units done over the grid; sync[1]: blocks done.
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (warp == kConsumers) {
    if (lane == 0) {
      int n = 0;
      for (int u = blockIdx.x; u < units; u += gridDim.x, ++n) {
        const int s = static_cast<int>(n % g.stages);
        if (n >= g.stages) mbar_wait(&empty[s], ((n / g.stages) - 1) & 1);
        issue_unit<T>(w, unit_at<T>(w, g, sh, u), ring + int64_t(s) * g.stage_bytes, &full[s]);
      }
    }
    __syncwarp();  // reconverge before the block barrier below (bar.sync is warp-aligned)
  } else {
    // Pairs computed nowhere (id -1) get rows of zeros.
    for (int p = blockIdx.x; p < num_pairs; p += gridDim.x)
      if (ids_s[p] < 0)
        for (int64_t i = threadIdx.x; i < w.hidden; i += kConsumers * kWarp)
          out[p * w.hidden + i] = 0.0f;
    // A warp publishes its GEMM1 units once, after its last one: one fence per warp (a fence
    // per unit, under the load of the streaming, made the first version of this kernel 2x
    // slower than the two-launch kernels). GEMM2 units then wait for every GEMM1 unit of the
    // grid; their W2 rows are in the ring by then.
    uint32_t done = 0;
    bool published = false;
    auto publish = [&] {
      __threadfence();  // this lane's h before the count
      __syncwarp();
      if (lane == 0 && done) atomicAdd(&sync[0], done);
      published = true;
    };
    int n = warp;
    for (int u = blockIdx.x + warp * gridDim.x; u < units; u += kConsumers * gridDim.x,
             n += kConsumers) {
      const int s = static_cast<int>(n % g.stages);
      const char* stage = ring + int64_t(s) * g.stage_bytes;
      const Unit unit = unit_at<T>(w, g, sh, u);
      if (!unit.gemm1 && !published) {
        publish();
        if (lane == 0)
          while (load_acquire(&sync[0]) < uint32_t(units1)) __nanosleep(64);
        __syncwarp();
      }
      mbar_wait(&full[s], (n / g.stages) & 1);
      if (unit.gemm1) {
        gemm1_unit<T>(w, unit, stage, a1, a1_stride, ids_s, num_pairs, k, h);
        ++done;
      } else {
        gemm2_unit<T>(w, unit, stage, h, ids_s, num_pairs, out);
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(&empty[s]);
    }
    if (!published) publish();
  }
  // The last block out puts the counters back to zero for the next launch.
  __syncthreads();
  if (threadIdx.x == 0 && atomicAdd(&sync[1], 1u) == gridDim.x - 1) {
    sync[0] = 0;
    sync[1] = 0;
    __threadfence();
  }
}

int64_t round_up(int64_t v, int64_t m) {
  return (v + m - 1) / m * m;
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// The stage geometry for these weights, or nothing when bulk copies cannot take them (rows or
// strides not 16-byte multiples, a row pair larger than a quarter of the ring).
template <typename T>
std::optional<Shape> streamed_shape(const DeviceWeights& w) {
  const int64_t e = sizeof(T), H = w.hidden, I = w.intermediate;
  const int64_t row1 = H * e, row2 = I * e;
  for (int64_t bytes : {row1, row2, w.w13_row_stride * e, w.w13_expert_stride * e,
                        w.w2_row_stride * e, w.w2_expert_stride * e})
    if (bytes % 16 != 0) return std::nullopt;
  if (!aligned16(w.w13) || !aligned16(w.w2) || w.num_local > kMaxLocalExperts) return std::nullopt;
  const int per_col = w.activation.gated ? 2 : 1;
  const int64_t stage = round_up(std::max<int64_t>({kMinStageBytes, per_col * row1, row2}), 128);
  const int64_t stages = std::min<int64_t>(kMaxStages, kRingBytes / stage) / kConsumers * kConsumers;
  if (stages < kConsumers) return std::nullopt;
  Shape g{};
  g.stage_bytes = static_cast<int>(stage);
  g.stages = static_cast<int>(stages);
  g.cols1 = static_cast<int>(std::min<int64_t>({kMaxRows / per_col, stage / (per_col * row1), I}));
  g.rows2 = static_cast<int>(std::min<int64_t>({kMaxRows, stage / row2, H}));
  g.tiles1 = static_cast<int>((I + g.cols1 - 1) / g.cols1);
  g.tiles2 = static_cast<int>((H + g.rows2 - 1) / g.rows2);
  return g;
}

}  // namespace

bool small_batch_streamed(const DeviceWeights& w, const void* a1, int64_t a1_stride,
                          const int32_t* ids, int64_t ids_stride, int64_t M, int k, void* h,
                          float* fused_out, uint32_t* sync, cudaStream_t stream) {
  if (!sync || w.elem == DType::kF8E4M3) return false;
  bool launched = false;
  with_compute_type(w.elem, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (sizeof(T) == 2) {
    const std::optional<Shape> g = streamed_shape<T>(w);
    if (!g || !aligned16(a1) || (a1_stride * sizeof(T)) % 16 != 0) return;
    const int64_t I = w.intermediate, H = w.hidden;
    const size_t ring = size_t(g->stages) * g->stage_bytes;
    auto kernel = streamed_kernel<T>;
    for_each_chunk(M, k, [&](int64_t t0, int pairs, size_t ids_bytes) {
      const size_t smem = ring + ids_bytes;
      MOEKIT_CUDA_CHECK(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      launch_chained(kernel, persistent_blocks(kernel, kThreads, smem), kThreads, smem, stream, w,
                     *g, static_cast<const T*>(a1) + t0 * a1_stride, a1_stride,
                     ids + t0 * ids_stride, ids_stride, pairs, k,
                     static_cast<T*>(h) + t0 * k * I, fused_out + t0 * k * H, sync);
    });
    launched = true;
    }
  });
  return launched;
}

}  // namespace moekit::cuda
