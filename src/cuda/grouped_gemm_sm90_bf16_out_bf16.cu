// Grouped GEMM, bf16 x bf16 -> bf16 (GEMM1 of the bf16 experts: [rows, H] . W13^T).
// Tile 128x256x64, cooperative (two consumer warpgroups), cluster 1x1x1.
#include "cuda/grouped_gemm_sm90.cuh"

namespace moekit::cuda {

using GemmBf16OutBf16 = GroupedGemmSm90<cutlass::bfloat16_t, cutlass::bfloat16_t,
                                        cute::Shape<cute::_128, cute::_256, cute::_64>,
                                        cute::Shape<cute::_1, cute::_1, cute::_1>>;

const GroupedGemm kGroupedGemmBf16OutBf16{GemmBf16OutBf16::workspace, GemmBf16OutBf16::run};

}  // namespace moekit::cuda
