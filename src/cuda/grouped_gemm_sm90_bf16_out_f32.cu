// Grouped GEMM, bf16 x bf16 -> fp32 (GEMM2 of the bf16 experts: [rows, I] . W2^T).
// Tile 128x256x64, cooperative (two consumer warpgroups), cluster 1x1x1.
#include "cuda/grouped_gemm_sm90.cuh"

namespace moekit::cuda {

using GemmBf16OutF32 =
    GroupedGemmSm90<cutlass::bfloat16_t, float, cute::Shape<cute::_128, cute::_256, cute::_64>,
                    cute::Shape<cute::_1, cute::_1, cute::_1>>;

const GroupedGemm kGroupedGemmBf16OutF32{GemmBf16OutF32::workspace, GemmBf16OutF32::run};

}  // namespace moekit::cuda
