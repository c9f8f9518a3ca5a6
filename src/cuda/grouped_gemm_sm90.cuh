// The CUTLASS sm90 grouped GEMM behind grouped_gemm.h, as a template over the operand type, the
// output type and the tile shape; each grouped_gemm_sm90_*.cu instantiates one configuration.
// 16-bit operands use a plain linear-combination epilogue (alpha 1); e4m3 operands an epilogue
// visitor tree that dequantizes the fp32 accumulator:
//   D = token_scale[m] * (channel_scale[n] * (tensor_scale * acc))
// token_scale: per sorted row (null: 1), channel_scale: the weight's per-row scale of the group's
// expert, tensor_scale: a per-tensor activation scale read on the device (null: 1).
#pragma once

#include <cutlass/cutlass.h>
#include <cutlass/gemm/device/gemm_universal_adapter.h>

#include <cute/tensor.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/sm90_visitor_compute_tma_warpspecialized.hpp>
#include <cutlass/epilogue/fusion/sm90_visitor_load_tma_warpspecialized.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <mutex>
#include <type_traits>
#include <vector>

#include "cuda/check.h"
#include "cuda/grouped_gemm.h"

namespace moekit::cuda {

// The dequantizing epilogue of e4m3 GEMMs (see the top of this file).
template <typename ElementD, typename TileShape>
struct ScaledEpilogue {
  template <typename Op, typename... Children>
  using Node = cutlass::epilogue::fusion::Sm90EVT<Op, Children...>;
  template <typename Out>
  using Multiply =
      cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, Out, float,
                                             cutlass::FloatRoundStyle::round_to_nearest>;
  using TensorScale = cutlass::epilogue::fusion::Sm90ScalarBroadcast<float>;
  // Per output channel (N): one row of fp32 scales per group, staged in shared memory.
  using ChannelScale =
      cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float*, float,
                                                  cute::Stride<cute::_0, cute::_1, cute::_0>>;
  // Per row (M): read straight from global memory, one float at a time (a group's rows start
  // at any offset, so no vector alignment can be assumed).
  using TokenScale =
      cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float*, float,
                                                  cute::Stride<cute::_1, cute::_0, cute::_0>, 1>;
  using Callbacks =
      Node<Multiply<ElementD>, TokenScale,
           Node<Multiply<float>, ChannelScale,
                Node<Multiply<float>, TensorScale, cutlass::epilogue::fusion::Sm90AccFetch>>>;
};

// kPingpong: the two consumer warpgroups take alternate tiles of 64 rows (one's epilogue under the
// other's mainloop) instead of sharing one tile of 128 rows (cooperative).
template <typename ElementAB_, typename ElementD, typename TileShape, typename ClusterShape,
          bool kPingpong = false>
struct GroupedGemmSm90 {
  using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;
  using ElementAB = ElementAB_;
  using ElementOut = ElementD;
  static constexpr bool kScaled = cute::sizeof_bits_v<ElementAB> == 8;
  using LayoutA = cutlass::layout::RowMajor;     // activations [rows, k]
  using LayoutB = cutlass::layout::ColumnMajor;  // weights [n, k] row-major = k x n column-major
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignAB = 16 / sizeof(ElementAB);
  static constexpr int kAlignD = 16 / sizeof(ElementD);

  using Fusion =
      std::conditional_t<kScaled, typename ScaledEpilogue<ElementD, TileShape>::Callbacks,
                         cutlass::epilogue::fusion::LinearCombination<ElementD, float, void>>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD*, kAlignD,
      ElementD, LayoutD*, kAlignD,
      std::conditional_t<kPingpong, cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong,
                         cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative>,
      Fusion>::CollectiveOp;
  // e4m3 operands accumulate in the tensor cores' fp32 accumulator throughout (the "fast
  // accumulation" schedule), as 16-bit operands do. CUTLASS's default fp8 mainloop instead adds
  // the accumulator into registers every 4 MMAs, waiting for the tensor cores each time; with both
  // consumer warpgroups of a cooperative tile waiting at once the SM idles: on an H200 it ran
  // slower than bf16 (mixtral-8x7b, 4096 tokens: 405 TFLOP/s against bf16's 646; qwen3-30b-a3b,
  // 256 tokens: 1.1 TB/s of weights). The precision cost shows in the bench's max_rel_err at
  // the presets' K (bench/notes_cuda.md).
  using MainloopSchedule = std::conditional_t<
      kPingpong,
      std::conditional_t<kScaled,
                         cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpongFP8FastAccum,
                         cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong>,
      std::conditional_t<kScaled,
                         cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8FastAccum,
                         cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>>;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementAB, LayoutA*, kAlignAB, ElementAB,
      LayoutB*, kAlignAB, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
  using Shape = typename ProblemShape::UnderlyingProblemShape;

  // The per-group argument arrays CUTLASS reads, carved from the front of the workspace
  // (token_scale and channel_scale: e4m3 only).
  struct Arrays {
    Shape* shapes;
    const ElementAB** a;
    const ElementAB** b;
    ElementD** d;
    StrideA* stride_a;
    StrideB* stride_b;
    StrideD* stride_d;
    float** token_scale;
    float** channel_scale;
    void* cutlass_workspace;

    static constexpr int kPointerArrays = kScaled ? 5 : 3;
    static size_t bytes(int g) {
      auto al = [](size_t x) { return (x + 255) & ~size_t(255); };
      return al(g * sizeof(Shape)) + kPointerArrays * al(g * sizeof(void*)) +
             al(g * sizeof(StrideA)) + al(g * sizeof(StrideB)) + al(g * sizeof(StrideD));
    }
    static Arrays carve(void* ws, int g) {
      auto* p = static_cast<char*>(ws);
      auto take = [&](size_t n) {
        char* q = p;
        p += (n + 255) & ~size_t(255);
        return q;
      };
      Arrays r{};
      r.shapes = reinterpret_cast<Shape*>(take(g * sizeof(Shape)));
      r.a = reinterpret_cast<const ElementAB**>(take(g * sizeof(void*)));
      r.b = reinterpret_cast<const ElementAB**>(take(g * sizeof(void*)));
      r.d = reinterpret_cast<ElementD**>(take(g * sizeof(void*)));
      r.stride_a = reinterpret_cast<StrideA*>(take(g * sizeof(StrideA)));
      r.stride_b = reinterpret_cast<StrideB*>(take(g * sizeof(StrideB)));
      r.stride_d = reinterpret_cast<StrideD*>(take(g * sizeof(StrideD)));
      if constexpr (kScaled) {
        r.token_scale = reinterpret_cast<float**>(take(g * sizeof(void*)));
        r.channel_scale = reinterpret_cast<float**>(take(g * sizeof(void*)));
      }
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

  // a_scale: e4m3 only (per tensor: the device scalar; per row: token_scale arrays).
  static typename Gemm::Arguments arguments(const Arrays& arr, int g, RowScale a_scale) {
    cutlass::KernelHardwareInfo hw;
    MOEKIT_CUDA_CHECK(cudaGetDevice(&hw.device_id));
    hw.sm_count = sm_count();
    typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGrouped,
                                  {g, arr.shapes, nullptr},
                                  {arr.a, arr.stride_a, arr.b, arr.stride_b},
                                  {{}, nullptr, arr.stride_d, arr.d, arr.stride_d},
                                  hw};
    if constexpr (kScaled) {
      const bool per_row = a_scale.stride != 0;
      args.epilogue.thread = {
          {per_row ? arr.token_scale : nullptr, 1.0f, {}},  // token_scale[m]
          {
              {arr.channel_scale, 1.0f, {}},                                // channel_scale[n]
              {{{1.0f}, {per_row ? nullptr : a_scale.scale}, {}}, {}, {}},  // tensor_scale * acc
              {},
          },
          {},
      };
    } else {
      args.epilogue.thread.alpha = 1.0f;
      args.epilogue.thread.beta = 0.0f;
    }
    return args;
  }

  static size_t workspace(int g) {
    Arrays dummy{};
    return Arrays::bytes(g) + Gemm::get_workspace_size(arguments(dummy, g, RowScale{})) + 256;
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
  arr.a[g] = static_cast<const typename G::ElementAB*>(p.a) + first * p.k;
  const int64_t e = p.b_index ? p.b_index[g] : g;
  arr.b[g] = static_cast<const typename G::ElementAB*>(p.b) + e * p.b_group_stride;
  arr.d[g] = static_cast<typename G::ElementOut*>(p.d) + first * p.n;
  // Row-major A and D, and B as [n, k] rows: only the leading (row) stride is dynamic.
  arr.stride_a[g] = typename G::StrideA{};
  cute::get<0>(arr.stride_a[g]) = p.k;
  arr.stride_b[g] = typename G::StrideB{};
  cute::get<0>(arr.stride_b[g]) = p.b_row_stride;
  arr.stride_d[g] = typename G::StrideD{};
  cute::get<0>(arr.stride_d[g]) = p.n;
  if constexpr (G::kScaled) {
    arr.channel_scale[g] = const_cast<float*>(p.b_scale) + e * p.n;
    arr.token_scale[g] = const_cast<float*>(p.a_scale.scale) + first * p.a_scale.stride;
  }
}

template <typename ElementAB, typename ElementD, typename TileShape, typename ClusterShape,
          bool kPingpong>
void GroupedGemmSm90<ElementAB, ElementD, TileShape, ClusterShape, kPingpong>::run(
    const GroupedGemmArgs& p, void* ws, size_t bytes, cudaStream_t stream) {
  using Self = GroupedGemmSm90<ElementAB, ElementD, TileShape, ClusterShape, kPingpong>;
  if (p.num_groups == 0) return;
  MOEKIT_CHECK(bytes >= workspace(p.num_groups), "grouped GEMM: workspace of ", bytes, " bytes, ",
               workspace(p.num_groups), " needed");
  if constexpr (kScaled)
    MOEKIT_CHECK(p.a_scale.scale && p.b_scale, "grouped GEMM: e4m3 operands need their scales");
  // CUTLASS's workspace must be 16-byte aligned; Arrays::carve keeps 256.
  const Arrays arr = Arrays::carve(ws, p.num_groups);
  grouped_gemm_setup<Self><<<(p.num_groups + 127) / 128, 128, 0, stream>>>(p, arr);
  MOEKIT_CUDA_CHECK_LAUNCH();
  typename Gemm::Arguments args = arguments(arr, p.num_groups, p.a_scale);
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
