// Grouped GEMM, e4m3 x e4m3 -> bf16, dequantized in the epilogue
// (GEMM1 of the fp8 experts: [rows, H] . W13^T).
// Tile 128x256x128, cooperative (two consumer warpgroups), cluster 1x1x1.
#include "cuda/grouped_gemm_sm90.cuh"

namespace moekit::cuda {

using GemmE4m3OutBf16 = GroupedGemmSm90<cutlass::float_e4m3_t, cutlass::bfloat16_t,
                                        cute::Shape<cute::_128, cute::_256, cute::_128>,
                                        cute::Shape<cute::_1, cute::_1, cute::_1>>;

const GroupedGemm kGroupedGemmE4m3OutBf16{GemmE4m3OutBf16::workspace, GemmE4m3OutBf16::run};

}  // namespace moekit::cuda
