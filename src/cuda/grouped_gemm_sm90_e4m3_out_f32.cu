// Grouped GEMM, e4m3 x e4m3 -> fp32, dequantized in the epilogue
// (both GEMMs of the fp8 experts: [rows, H] . W13^T and [rows, I] . W2^T).
// Tile 128x256x128, cooperative (two consumer warpgroups), cluster 1x1x1.
#include "cuda/grouped_gemm_sm90.cuh"

namespace moekit::cuda {

using GemmE4m3OutF32 =
    GroupedGemmSm90<cutlass::float_e4m3_t, float, cute::Shape<cute::_128, cute::_256, cute::_128>,
                    cute::Shape<cute::_1, cute::_1, cute::_1>>;

const GroupedGemm kGroupedGemmE4m3OutF32{GemmE4m3OutF32::workspace, GemmE4m3OutF32::run};

}  // namespace moekit::cuda
