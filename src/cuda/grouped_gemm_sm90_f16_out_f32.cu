// Grouped GEMM, fp16 x fp16 -> fp32 (GEMM2 of the fp16 experts: [rows, I] . W2^T).
// Tile 128x256x64, cooperative (two consumer warpgroups), cluster 1x1x1.
#include "cuda/grouped_gemm_sm90.cuh"

namespace moekit::cuda {

using GemmF16OutF32 =
    GroupedGemmSm90<cutlass::half_t, float, cute::Shape<cute::_128, cute::_256, cute::_64>,
                    cute::Shape<cute::_1, cute::_1, cute::_1>>;

const GroupedGemm kGroupedGemmF16OutF32{GemmF16OutF32::workspace, GemmF16OutF32::run};

}  // namespace moekit::cuda
