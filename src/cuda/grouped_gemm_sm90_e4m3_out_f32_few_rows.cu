// Grouped GEMM, e4m3 x e4m3 -> fp32 (dequantized in the epilogue) for groups of few rows
// (grouped_gemm_for): tile 64x256x128, pingpong, cluster 1x1x1.
#include "cuda/grouped_gemm_sm90.cuh"

namespace moekit::cuda {

using GemmE4m3OutF32FewRows =
    GroupedGemmSm90<cutlass::float_e4m3_t, float, cute::Shape<cute::_64, cute::_256, cute::_128>,
                    cute::Shape<cute::_1, cute::_1, cute::_1>, true>;

const GroupedGemm kGroupedGemmE4m3OutF32FewRows{GemmE4m3OutF32FewRows::workspace,
                                                GemmE4m3OutF32FewRows::run};

}  // namespace moekit::cuda
