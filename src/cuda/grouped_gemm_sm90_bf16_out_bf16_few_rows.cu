// Grouped GEMM, bf16 x bf16 -> bf16 for groups of few rows (grouped_gemm_for): tile 64x256x64,
// pingpong (each consumer warpgroup its own 64-row tile), cluster 1x1x1. A group of 8-32 rows
// fills half as much of a 64-row tile's tensor-core work with padding as of a 128-row one.
#include "cuda/grouped_gemm_sm90.cuh"

namespace moekit::cuda {

using GemmBf16OutBf16FewRows = GroupedGemmSm90<cutlass::bfloat16_t, cutlass::bfloat16_t,
                                               cute::Shape<cute::_64, cute::_256, cute::_64>,
                                               cute::Shape<cute::_1, cute::_1, cute::_1>, true>;

const GroupedGemm kGroupedGemmBf16OutBf16FewRows{GemmBf16OutBf16FewRows::workspace,
                                                 GemmBf16OutBf16FewRows::run};

}  // namespace moekit::cuda
