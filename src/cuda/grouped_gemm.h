// Grouped GEMM on Hopper (CUTLASS sm90, TMA, warp-specialized, persistent), sizes on the device:
// for every group g, D_g[rows_g, n] = A_g[rows_g, k] . B_g[n, k]^T with
//   rows_g = counts[g], A_g = a + offsets[g] * k (row-major, packed), D_g = d + offsets[g] * n,
//   B_g = b + index[g] * b_group_stride (rows of b_row_stride elements; index null: identity).
// bf16 operands, fp32 accumulation. One configuration per .cu file (grouped_gemm_sm90_*.cu).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace moekit::cuda {

struct GroupedGemmArgs {
  int num_groups = 0;
  int64_t n = 0, k = 0;
  const int32_t* counts = nullptr;   // [G] device
  const int32_t* offsets = nullptr;  // [G] device
  const uint16_t* a = nullptr;
  const uint16_t* b = nullptr;
  int64_t b_group_stride = 0, b_row_stride = 0;
  const int32_t* b_index = nullptr;  // [G] device or null
  void* d = nullptr;
};

// Device workspace bytes for `num_groups` groups (argument arrays and CUTLASS's own).
size_t grouped_gemm_bf16_out_bf16_workspace(int num_groups);
size_t grouped_gemm_bf16_out_f32_workspace(int num_groups);
// D bf16 (rounded from the fp32 accumulator) / D fp32.
void grouped_gemm_bf16_out_bf16(const GroupedGemmArgs& args, void* workspace, size_t bytes,
                                cudaStream_t stream);
void grouped_gemm_bf16_out_f32(const GroupedGemmArgs& args, void* workspace, size_t bytes,
                               cudaStream_t stream);

}  // namespace moekit::cuda
