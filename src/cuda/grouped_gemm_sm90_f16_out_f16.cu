// Grouped GEMM, fp16 x fp16 -> fp16 (GEMM1 of the fp16 experts: [rows, H] . W13^T).
// Tile 128x256x64, cooperative (two consumer warpgroups), cluster 1x1x1.
#include "cuda/grouped_gemm_sm90.cuh"

namespace moekit::cuda {

using GemmF16OutF16 = GroupedGemmSm90<cutlass::half_t, cutlass::half_t,
                                      cute::Shape<cute::_128, cute::_256, cute::_64>,
                                      cute::Shape<cute::_1, cute::_1, cute::_1>>;

const GroupedGemm kGroupedGemmF16OutF16{GemmF16OutF16::workspace, GemmF16OutF16::run};

}  // namespace moekit::cuda
