// The CUTLASS sm90 grouped GEMM behind grouped_gemm.h, as a template over the output type and
// tile shape; each grouped_gemm_sm90_*.cu instantiates one configuration.
#pragma once

#include <cutlass/cutlass.h>
#include <cutlass/gemm/device/gemm_universal_adapter.h>

#include <cute/tensor.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <mutex>
#include <vector>

#include "cuda/check.h"
#include "cuda/grouped_gemm.h"

namespace moekit::cuda {

template <typename ElementD, typename TileShape, typename ClusterShape>
struct GroupedGemmSm90 {
  using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;
  using ElementAB = cutlass::bfloat16_t;
  using ElementOut = ElementD;
  using LayoutA = cutlass::layout::RowMajor;     // activations [rows, k]
  using LayoutB = cutlass::layout::ColumnMajor;  // weights [n, k] row-major = k x n column-major
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignAB = 16 / sizeof(ElementAB);
  static constexpr int kAlignD = 16 / sizeof(ElementD);

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD*, kAlignD,
      ElementD, LayoutD*, kAlignD, cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
      cutlass::epilogue::fusion::LinearCombination<ElementD, float, void>>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementAB, LayoutA*, kAlignAB, ElementAB,
      LayoutB*, kAlignAB, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
  using Shape = typename ProblemShape::UnderlyingProblemShape;

  // The per-group argument arrays CUTLASS reads, carved from the front of the workspace.
  struct Arrays {
    Shape* shapes;
    const ElementAB** a;
    const ElementAB** b;
    ElementD** d;
    StrideA* stride_a;
    StrideB* stride_b;
    StrideD* stride_d;
    void* cutlass_workspace;

    static size_t bytes(int g) {
      auto al = [](size_t x) { return (x + 255) & ~size_t(255); };
      return al(g * sizeof(Shape)) + 3 * al(g * sizeof(void*)) + al(g * sizeof(StrideA)) +
             al(g * sizeof(StrideB)) + al(g * sizeof(StrideD));
    }
    static Arrays carve(void* ws, int g) {
      auto* p = static_cast<char*>(ws);
      auto take = [&](size_t n) {
        char* q = p;
        p += (n + 255) & ~size_t(255);
        return q;
      };
      Arrays r;
      r.shapes = reinterpret_cast<Shape*>(take(g * sizeof(Shape)));
      r.a = reinterpret_cast<const ElementAB**>(take(g * sizeof(void*)));
      r.b = reinterpret_cast<const ElementAB**>(take(g * sizeof(void*)));
      r.d = reinterpret_cast<ElementD**>(take(g * sizeof(void*)));
      r.stride_a = reinterpret_cast<StrideA*>(take(g * sizeof(StrideA)));
      r.stride_b = reinterpret_cast<StrideB*>(take(g * sizeof(StrideB)));
      r.stride_d = reinterpret_cast<StrideD*>(take(g * sizeof(StrideD)));
      r.cutlass_workspace = p;
      return r;
    }
  };

  static int sm_count() {
    // Queried once per process and device: cudaGetDeviceProperties costs milliseconds.
    static std::mutex mu;
    static std::vector<int> counts;
    int dev = 0;
    MOEKIT_CUDA_CHECK(cudaGetDevice(&dev));
    std::lock_guard lock(mu);
    if (static_cast<int>(counts.size()) <= dev) counts.resize(dev + 1, 0);
    if (counts[dev] == 0)
      MOEKIT_CUDA_CHECK(cudaDeviceGetAttribute(&counts[dev], cudaDevAttrMultiProcessorCount, dev));
    return counts[dev];
  }

  static typename Gemm::Arguments arguments(const Arrays& arr, int g) {
    cutlass::KernelHardwareInfo hw;
    MOEKIT_CUDA_CHECK(cudaGetDevice(&hw.device_id));
    hw.sm_count = sm_count();
    typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGrouped,
                                  {g, arr.shapes, nullptr},
                                  {arr.a, arr.stride_a, arr.b, arr.stride_b},
                                  {{}, nullptr, arr.stride_d, arr.d, arr.stride_d},
                                  hw};
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 0.0f;
    return args;
  }

  static size_t workspace(int g) {
    Arrays dummy{};
    return Arrays::bytes(g) + Gemm::get_workspace_size(arguments(dummy, g)) + 256;
  }

  static void run(const GroupedGemmArgs& p, void* ws, size_t bytes, cudaStream_t stream);
};

// One thread per group: sizes, pointers and strides from the device-side counts and offsets.
template <typename G>
__global__ void grouped_gemm_setup(GroupedGemmArgs p, typename G::Arrays arr) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= p.num_groups) return;
  const int64_t first = p.offsets[g];
  arr.shapes[g] = typename G::Shape(p.counts[g], static_cast<int>(p.n), static_cast<int>(p.k));
  arr.a[g] = reinterpret_cast<const typename G::ElementAB*>(p.a) + first * p.k;
  const int64_t e = p.b_index ? p.b_index[g] : g;
  arr.b[g] = reinterpret_cast<const typename G::ElementAB*>(p.b) + e * p.b_group_stride;
  arr.d[g] = static_cast<typename G::ElementOut*>(p.d) + first * p.n;
  // Row-major A and D, and B as [n, k] rows: only the leading (row) stride is dynamic.
  arr.stride_a[g] = typename G::StrideA{};
  cute::get<0>(arr.stride_a[g]) = p.k;
  arr.stride_b[g] = typename G::StrideB{};
  cute::get<0>(arr.stride_b[g]) = p.b_row_stride;
  arr.stride_d[g] = typename G::StrideD{};
  cute::get<0>(arr.stride_d[g]) = p.n;
}

template <typename ElementD, typename TileShape, typename ClusterShape>
void GroupedGemmSm90<ElementD, TileShape, ClusterShape>::run(const GroupedGemmArgs& p, void* ws,
                                                             size_t bytes, cudaStream_t stream) {
  using Self = GroupedGemmSm90<ElementD, TileShape, ClusterShape>;
  if (p.num_groups == 0) return;
  MOEKIT_CHECK(bytes >= workspace(p.num_groups), "grouped GEMM: workspace of ", bytes, " bytes, ",
               workspace(p.num_groups), " needed");
  // CUTLASS's workspace must be 16-byte aligned; Arrays::carve keeps 256.
  const Arrays arr = Arrays::carve(ws, p.num_groups);
  grouped_gemm_setup<Self><<<(p.num_groups + 127) / 128, 128, 0, stream>>>(p, arr);
  MOEKIT_CUDA_CHECK_LAUNCH();
  typename Gemm::Arguments args = arguments(arr, p.num_groups);
  Gemm gemm;
  const cutlass::Status can = gemm.can_implement(args);
  MOEKIT_CHECK(can == cutlass::Status::kSuccess, "grouped GEMM: CUTLASS cannot implement n=", p.n,
               ", k=", p.k, ": ", cutlassGetStatusString(can));
  const cutlass::Status init = gemm.initialize(args, arr.cutlass_workspace, stream);
  MOEKIT_CHECK(init == cutlass::Status::kSuccess,
               "grouped GEMM: initialize failed: ", cutlassGetStatusString(init));
  const cutlass::Status st = gemm.run(stream);
  MOEKIT_CHECK(st == cutlass::Status::kSuccess,
               "grouped GEMM: launch failed: ", cutlassGetStatusString(st));
}

}  // namespace moekit::cuda
