// Grouped GEMM on Hopper (CUTLASS sm90, TMA, warp-specialized, persistent), sizes on the device:
// for every group g, D_g[rows_g, n] = A_g[rows_g, k] . B_g[n, k]^T with
//   rows_g = counts[g], A_g = a + offsets[g] * k (row-major, packed), D_g = d + offsets[g] * n,
//   B_g = b + index[g] * b_group_stride (rows of b_row_stride elements; index null: identity).
// bf16, fp16 or e4m3 operands, fp32 accumulation. e4m3 GEMMs dequantize in the epilogue:
//   D_g[r, c] = a_scale(r) * b_scale[index[g], c] * acc
// with a_scale per tensor (RowScale stride 0: the scalar, read on the device) or per sorted row
// (stride 1: a_scale[offsets[g] + r]) and b_scale fp32 per output channel. One kernel
// configuration per .cu file (grouped_gemm_sm90_*.cu).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "cuda/kernels.h"
#include "moekit/core/dtype.h"

namespace moekit::cuda {

struct GroupedGemmArgs {
  int num_groups = 0;
  int64_t n = 0, k = 0;
  const int32_t* counts = nullptr;   // [G] device
  const int32_t* offsets = nullptr;  // [G] device
  const void* a = nullptr;
  const void* b = nullptr;
  int64_t b_group_stride = 0, b_row_stride = 0;
  const int32_t* b_index = nullptr;  // [G] device or null
  void* d = nullptr;
  RowScale a_scale;                // e4m3 only
  const float* b_scale = nullptr;  // e4m3 only: [experts, n]
};

// A kernel configuration: device workspace bytes for `num_groups` groups (argument arrays and
// CUTLASS's own), and the launcher.
struct GroupedGemm {
  size_t (*workspace)(int num_groups);
  void (*run)(const GroupedGemmArgs& args, void* workspace, size_t bytes, cudaStream_t stream);
};

// One per grouped_gemm_sm90_<operands>_out_<output>.cu.
extern const GroupedGemm kGroupedGemmBf16OutBf16, kGroupedGemmBf16OutF32;
extern const GroupedGemm kGroupedGemmBf16OutBf16FewRows;
extern const GroupedGemm kGroupedGemmF16OutF16, kGroupedGemmF16OutF32;
extern const GroupedGemm kGroupedGemmE4m3OutF32, kGroupedGemmE4m3OutF32FewRows;

// The element GEMM1 writes for operands `ab`: the operand type for bf16 and fp16; fp32 for e4m3,
// so that the intermediate is requantized from the values the oracle requantizes (a bf16 c1
// moved a few percent of a2's codes one e4m3 step, which the contract suite's systematic check
// caught on single large outputs).
inline DType gemm1_out(DType ab) {
  return ab == DType::kF8E4M3 ? DType::kF32 : ab;
}
// The element GEMM2 writes where the caller reduces c2 in fp32 right after (the grouped
// experts' unpermute): bf16 for bf16 operands -- half the bytes of the epilogue's stores and of
// the unpermute's reads, one more rounding of the kind bf16 kernels already make -- and fp32
// otherwise (fp16: its range could overflow on a slot's row before the weights shrink it; e4m3:
// no e4m3 -> 16-bit configuration).
inline DType gemm2_out(DType ab) {
  return ab == DType::kBF16 ? ab : DType::kF32;
}
// Rows per group (on average) up to which bf16 GEMMs with bf16 output and e4m3 GEMMs take 64-row
// pingpong tiles instead of 128-row cooperative ones (bench/notes_cuda_v8-v11.md v10,
// bench/notes_cuda.md v12, v13; H200).
// bf16: the whole layer is 3-12 % faster at 2-32 rows per expert (mixtral-8x7b 16 and 64 tokens
// -8 to -12 %, deepseek-v3 64 and 256 tokens -3 to -4 %); the bf16 GEMM alone was 2.4 % slower
// at 64 rows per expert and up to 28 % slower from 256. e4m3: qwen3-30b-a3b fp8 64 tokens (4
// rows per expert) -14 %, 1024 tokens (64) -4 %, gpt-oss-20b 1024 tokens (128) -6 %; from 256
// rows per expert mixed (mixtral-8x7b -2 to -4 %, gpt-oss-20b +16 to +22 %, qwen3-30b-a3b 16384
// tokens +4 %).
inline constexpr int64_t kBf16FewRowsPerGroup = 32;
inline constexpr int64_t kE4m3FewRowsPerGroup = 128;
// The configuration for operands `ab` (kBF16, kF16, kF8E4M3) over groups of rows_per_group rows
// on average: out_f32 for fp32 D (GEMM2, and GEMM1 on e4m3), else D in the operand type.
const GroupedGemm& grouped_gemm_for(DType ab, bool out_f32, int64_t rows_per_group);
// GEMM1's configuration (D of gemm1_out(ab)) and its bytes per element.
inline const GroupedGemm& grouped_gemm1_for(DType ab, int64_t rows_per_group) {
  return grouped_gemm_for(ab, gemm1_out(ab) == DType::kF32, rows_per_group);
}
inline int64_t gemm1_out_bytes(DType ab) {
  return traits(gemm1_out(ab)).bits / 8;
}

// The experts' MLP over rows already grouped by local expert (counts, offsets [G]):
//   a [rows, H] (a_scale) --GEMM1--> c1 [rows, w13_rows] --grouped_activation--> a2 [rows, I]
//   (a2_scale and amax for e4m3) --GEMM2--> d [rows, H] (no b2) in fp32, or in gemm2_out when
//   d_rounded.
// c1 and d may share memory, as may a and a2 (each is consumed before the other is written, on
// one stream). gemm: the GEMMs' workspace of gemm_bytes. rows (run_expert_gemms): the rows
// reserved over all groups; rows / num_groups picks the tiles (grouped_gemm_for).
struct ExpertGemms {
  const int32_t* counts;
  const int32_t* offsets;
  const void* a;
  RowScale a_scale;
  void* c1;
  void* a2;
  float* a2_scale;
  uint32_t* amax;
  void* d;
  bool d_rounded;
  void* gemm;
  size_t gemm_bytes;
};
void run_expert_gemms(const DeviceWeights& w, int num_groups, int64_t rows, const ExpertGemms& g,
                      cudaStream_t stream);
// Workspace bytes of run_expert_gemms' GEMMs for operands `ab` over num_groups groups (either
// GEMM2 output).
size_t expert_gemms_workspace(DType ab, int num_groups);

}  // namespace moekit::cuda
