// Grouped GEMM, bf16 x bf16 -> bf16 (GEMM1 of the grouped experts: [rows, H] . W13^T).
// Tile 128x256x64, cooperative (two consumer warpgroups), cluster 1x1x1.
#include "cuda/grouped_gemm_sm90.cuh"

namespace moekit::cuda {

using GemmOutBf16 =
    GroupedGemmSm90<cutlass::bfloat16_t, cute::Shape<cute::_128, cute::_256, cute::_64>,
                    cute::Shape<cute::_1, cute::_1, cute::_1>>;

size_t grouped_gemm_bf16_out_bf16_workspace(int num_groups) {
  return GemmOutBf16::workspace(num_groups);
}

void grouped_gemm_bf16_out_bf16(const GroupedGemmArgs& args, void* workspace, size_t bytes,
                                cudaStream_t stream) {
  GemmOutBf16::run(args, workspace, bytes, stream);
}

}  // namespace moekit::cuda
