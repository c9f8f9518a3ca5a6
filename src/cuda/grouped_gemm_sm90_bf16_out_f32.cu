// Grouped GEMM, bf16 x bf16 -> fp32 (GEMM2 of the grouped experts: [rows, I] . W2^T).
// Tile 128x256x64, cooperative (two consumer warpgroups), cluster 1x1x1.
#include "cuda/grouped_gemm_sm90.cuh"

namespace moekit::cuda {

using GemmOutF32 = GroupedGemmSm90<float, cute::Shape<cute::_128, cute::_256, cute::_64>,
                                   cute::Shape<cute::_1, cute::_1, cute::_1>>;

size_t grouped_gemm_bf16_out_f32_workspace(int num_groups) {
  return GemmOutF32::workspace(num_groups);
}

void grouped_gemm_bf16_out_f32(const GroupedGemmArgs& args, void* workspace, size_t bytes,
                               cudaStream_t stream) {
  GemmOutF32::run(args, workspace, bytes, stream);
}

}  // namespace moekit::cuda
