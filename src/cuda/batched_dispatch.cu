// Kernels of the batched prepare (batched_prepare_finalize.cc): where each (token, slot) pair
// lands in the batched layout [E_local, N, H], and the copy of its row (and per-token scale)
// there. Positions and counts stay on the device.
#include <cub/block/block_scan.cuh>

#include "cuda/check.h"
#include "cuda/device.cuh"
#include "cuda/kernels.h"

namespace moekit::cuda {
namespace {

constexpr int kThreads = 256;

// One block per local expert e: the block walks the pairs in order, tile by tile, and an
// exclusive scan of "pair is e's" numbers e's pairs 0, 1, 2, ... -- the same rows every run.
__global__ void place_kernel(const int32_t* __restrict__ ids, int64_t pairs, int64_t N,
                             int32_t* __restrict__ pair_row, int32_t* __restrict__ counts,
                             int32_t* __restrict__ dropped) {
  using Scan = cub::BlockScan<int32_t, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  const int e = blockIdx.x;
  int64_t before_tile = 0;  // e's pairs in the tiles before this one
  for (int64_t base = 0; base < pairs; base += kThreads) {
    const int64_t p = base + threadIdx.x;
    const int32_t mine = p < pairs && ids[p] == e ? 1 : 0;
    int32_t before = 0, in_tile = 0;
    Scan(tmp).ExclusiveSum(mine, before, in_tile);
    if (mine) {
      const int64_t j = before_tile + before;
      if (j < N)
        pair_row[p] = static_cast<int32_t>(e * N + j);
      else
        atomicAdd(dropped, 1);
    }
    before_tile += in_tile;
    __syncthreads();  // tmp is reused by the next tile's scan
  }
  if (threadIdx.x == 0) counts[e] = static_cast<int32_t>(min(before_tile, N));
}

// One warp per pair; rows are copied in units of U (16, 8, 4, 2 or 1 bytes: the widest that
// the row size, the source stride and both bases allow).
template <typename U>
__global__ void scatter_rows_kernel(const int32_t* __restrict__ pair_row, int64_t pairs, int k,
                                    const char* __restrict__ src, int64_t src_stride_bytes,
                                    int64_t row_units, const float* __restrict__ src_scale,
                                    U* __restrict__ a1, float* __restrict__ a1_scale) {
  const int64_t p = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (p >= pairs) return;
  const int32_t row = pair_row[p];
  if (row < 0) return;
  const int64_t t = p / k;
  if (lane == 0 && src_scale) a1_scale[row] = src_scale[t];
  const U* from = reinterpret_cast<const U*>(src + t * src_stride_bytes);
  U* to = a1 + static_cast<int64_t>(row) * row_units;
  for (int64_t c = lane; c < row_units; c += kWarp) to[c] = from[c];
}

template <typename U>
void launch_scatter(const int32_t* pair_row, int64_t pairs, int k, const void* src,
                    int64_t src_stride_bytes, int64_t row_bytes, const float* src_scale, void* a1,
                    float* a1_scale, cudaStream_t stream) {
  scatter_rows_kernel<U><<<blocks_for(pairs * kWarp, kThreads), kThreads, 0, stream>>>(
      pair_row, pairs, k, static_cast<const char*>(src), src_stride_bytes,
      row_bytes / int64_t(sizeof(U)), src_scale, static_cast<U*>(a1), a1_scale);
  MOEKIT_CUDA_CHECK_LAUNCH();
}

}  // namespace

void batched_place(const int32_t* ids, int64_t pairs, int num_local, int64_t N, int32_t* pair_row,
                   int32_t* counts, int32_t* dropped, cudaStream_t stream) {
  // Every pair not placed below stays -1 (all bytes 0xff).
  if (pairs > 0)
    MOEKIT_CUDA_CHECK(cudaMemsetAsync(pair_row, 0xff, pairs * sizeof(int32_t), stream));
  if (num_local == 0) return;
  place_kernel<<<static_cast<unsigned>(num_local), kThreads, 0, stream>>>(ids, pairs, N, pair_row,
                                                                          counts, dropped);
  MOEKIT_CUDA_CHECK_LAUNCH();
}

void batched_scatter_rows(const int32_t* pair_row, int64_t pairs, int k, const void* src,
                          int64_t src_stride_bytes, int64_t row_bytes, const float* src_scale,
                          void* a1, float* a1_scale, cudaStream_t stream) {
  if (pairs == 0) return;
  const auto fits = [&](int64_t unit) {
    return row_bytes % unit == 0 && src_stride_bytes % unit == 0 &&
           reinterpret_cast<uintptr_t>(src) % unit == 0 &&
           reinterpret_cast<uintptr_t>(a1) % unit == 0;
  };
  const auto launch = [&](auto unit) {
    launch_scatter<decltype(unit)>(pair_row, pairs, k, src, src_stride_bytes, row_bytes, src_scale,
                                   a1, a1_scale, stream);
  };
  if (fits(16))
    launch(uint4{});
  else if (fits(8))
    launch(uint2{});
  else if (fits(4))
    launch(uint32_t{});
  else if (fits(2))
    launch(uint16_t{});
  else
    launch(uint8_t{});
}

}  // namespace moekit::cuda
