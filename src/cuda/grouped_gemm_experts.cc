// Grouped-GEMM experts (prefill): pairs sorted by local expert on the device, then
//   a_sorted [R, H] T --GEMM1--> c1 [R, w13_rows] --activation--> a2 [R, I] T
//   --GEMM2--> c2 [R, H] (gemm2_out: bf16 or fp32) --unpermute, weight, reduce--> out [M, H]
//   fp32
// with R = M * k rows reserved (only the valid pairs' rows are used) and per-expert sizes kept
// on the device. T is bf16 or fp16 (c1 in T), or e4m3: then both GEMMs dequantize in their
// epilogue (the per-tensor activation scale, the per-sorted-row activation scale and the weight's
// per-channel scale, grouped_gemm_sm90.cuh), c1 is fp32 and the activation requantizes a2 as
// intermediate_spec (reference.h) says: per sorted row for both fp8 formats (a per-tensor kind
// would take a dynamic scale over all sorted rows, reduced on the device). Weights applied here
// (kWeightedAndReduced): the unpermute reads each of a token's rows once and finalize only
// casts.
#include <algorithm>

#include "cuda/check.h"
#include "cuda/experts_base.h"
#include "cuda/grouped_gemm.h"

namespace moekit::cuda {
namespace {

class GroupedGemmExperts final : public CudaExpertsBase {
 public:
  GroupedGemmExperts(const ExpertWeights& w, const Activation& act,
                     const TensorView& static_act_scale)
      : CudaExpertsBase("cuda-grouped-gemm", w, act, static_act_scale) {
    MOEKIT_CHECK(info_.num_local_experts <= kMaxSortExperts, name_, ": ", info_.num_local_experts,
                 " local experts, at most ", kMaxSortExperts);
  }

  std::string_view name() const override { return name_; }
  TopKWeightApplied weight_application() const override {
    return TopKWeightApplied::kWeightedAndReduced;
  }

  size_t workspace_size(const MoEProblem& p) const override {
    return layout(p.tokens * p.top_k).bytes;
  }

  void apply(const DispatchedBatch& b, const TensorView& out, Workspace& ws,
             const ExecContext& ctx) const override {
    check_apply(b, out, true);
    const cudaStream_t stream = stream_of(ctx.stream);
    const int64_t M = b.a1.size(0), k = b.topk_ids.size(1), R = M * k;
    const int G = static_cast<int>(info_.num_local_experts);
    const int64_t H = info_.hidden;
    if (G == 0 || M == 0) {
      MOEKIT_CUDA_CHECK(cudaMemsetAsync(out.data, 0, out.nbytes(), stream));
      return;
    }
    const Buffers buf = take(ws, R);
    const RowScale a1s = a1_scale(b);
    const bool per_token = a1s.stride != 0;
    sort_by_expert(b.topk_ids.ptr<int32_t>(), b.topk_ids.stride[0], M, static_cast<int>(k), G,
                   b.a1.data, b.a1.stride[0] * elem_bytes(), H * elem_bytes(), a1s, buf.counts,
                   buf.offsets, buf.cursor, buf.pair_pos, buf.activations,
                   per_token ? buf.a1_scale : nullptr, stream);
    // a2 overwrites a_sorted and c2 c1, each consumed before (same stream).
    run_expert_gemms(weights_, G, R,
                     {.counts = buf.counts,
                      .offsets = buf.offsets,
                      .a = buf.activations,
                      .a_scale = per_token ? RowScale{buf.a1_scale, 1} : a1s,
                      .c1 = buf.results,
                      .a2 = buf.activations,
                      .a2_scale = buf.a2_scale,
                      .amax = buf.amax,
                      .d = buf.results,
                      .d_rounded = true,
                      .gemm = buf.gemm,
                      .gemm_bytes = buf.gemm_bytes},
                     stream);
    unpermute_weight_reduce(weights_, buf.results, gemm2_out(weights_.elem), buf.pair_pos,
                            b.topk_ids.ptr<int32_t>(), b.topk_ids.stride[0],
                            b.topk_weights.ptr<float>(), b.topk_weights.stride[0], M,
                            static_cast<int>(k), out.ptr<float>(), stream);
  }

 private:
  // Workspace of one apply() over R = M * k rows. `activations` holds a_sorted [R, H] T and
  // later a2 [R, I] T; `results` holds c1 [R, w13_rows] (gemm1_out) and later c2 [R, H]
  // (gemm2_out). e4m3 only: a1_scale [R] (per-token a1 scales in sorted order), a2_scale [R] (or
  // [1]) and the amax of a dynamic per-tensor a2 scale.
  struct Buffers {
    int32_t *counts, *offsets, *cursor, *pair_pos;
    void* activations;
    void* results;
    float *a1_scale, *a2_scale;
    uint32_t* amax;
    void* gemm;
    size_t gemm_bytes;
  };
  // The bytes of each buffer, in take() order, and their sum.
  struct Layout {
    size_t sizes[10];
    size_t bytes = 0;
  };
  Layout layout(int64_t R) const {
    const int64_t G = info_.num_local_experts, H = info_.hidden, I = info_.intermediate;
    const int64_t rows13 = info_.activation.w13_rows(I);
    const int scaled = quantized() ? 1 : 0;
    Layout l{{size_t(G * 4), size_t(G * 4), size_t(G * 4), size_t(R * 4),
              size_t(R * std::max(H, I) * elem_bytes()),
              size_t(R * std::max(rows13 * gemm1_out_bytes(weights_.elem),
                                  H * traits(gemm2_out(weights_.elem)).bits / 8)),
              size_t(scaled * R * 4), size_t(scaled * R * 4), size_t(scaled * 4),
              expert_gemms_workspace(weights_.elem, int(G))}};
    for (size_t s : l.sizes) l.bytes += Workspace::aligned(s);
    return l;
  }
  Buffers take(Workspace& ws, int64_t R) const {
    const Layout l = layout(R);
    Buffers b;
    b.counts = static_cast<int32_t*>(ws.take_bytes(l.sizes[0]));
    b.offsets = static_cast<int32_t*>(ws.take_bytes(l.sizes[1]));
    b.cursor = static_cast<int32_t*>(ws.take_bytes(l.sizes[2]));
    b.pair_pos = static_cast<int32_t*>(ws.take_bytes(l.sizes[3]));
    b.activations = ws.take_bytes(l.sizes[4]);
    b.results = ws.take_bytes(l.sizes[5]);
    b.a1_scale = static_cast<float*>(ws.take_bytes(l.sizes[6]));
    b.a2_scale = static_cast<float*>(ws.take_bytes(l.sizes[7]));
    b.amax = static_cast<uint32_t*>(ws.take_bytes(l.sizes[8]));
    b.gemm_bytes = l.sizes[9];
    b.gemm = ws.take_bytes(b.gemm_bytes);
    return b;
  }
};

}  // namespace
}  // namespace moekit::cuda

namespace moekit::cuda {

const GroupedGemm& grouped_gemm_for(DType ab, bool out_f32, int64_t rows_per_group) {
  switch (ab) {
    case DType::kBF16:
      if (out_f32) return kGroupedGemmBf16OutF32;
      return rows_per_group <= kBf16FewRowsPerGroup ? kGroupedGemmBf16OutBf16FewRows
                                                    : kGroupedGemmBf16OutBf16;
    case DType::kF16:
      return out_f32 ? kGroupedGemmF16OutF32 : kGroupedGemmF16OutF16;
    case DType::kF8E4M3:
      if (out_f32)
        return rows_per_group <= kE4m3FewRowsPerGroup ? kGroupedGemmE4m3OutF32FewRows
                                                      : kGroupedGemmE4m3OutF32;
      break;
    default:
      break;
  }
  MOEKIT_FAIL("grouped GEMM: no configuration for ", name(ab), " operands with ",
              out_f32 ? "fp32" : name(ab), " output");
}

size_t expert_gemms_workspace(DType ab, int num_groups) {
  // GEMM2 runs GEMM1's configuration (its rounded bf16 output) or the fp32-out one; either may
  // take the few-rows tiles or not.
  size_t bytes = 0;
  for (int64_t rows_per_group :
       {int64_t(0), std::max(kBf16FewRowsPerGroup, kE4m3FewRowsPerGroup) + 1})
    bytes = std::max({bytes, grouped_gemm1_for(ab, rows_per_group).workspace(num_groups),
                      grouped_gemm_for(ab, true, rows_per_group).workspace(num_groups)});
  return bytes;
}

void run_expert_gemms(const DeviceWeights& w, int num_groups, int64_t rows, const ExpertGemms& g,
                      cudaStream_t stream) {
  const int64_t H = w.hidden, I = w.intermediate;
  const int64_t per_group = rows / std::max(1, num_groups);
  const GroupedGemmArgs g1{.num_groups = num_groups,
                           .n = w.activation.w13_rows(I),
                           .k = H,
                           .counts = g.counts,
                           .offsets = g.offsets,
                           .a = g.a,
                           .b = w.w13,
                           .b_group_stride = w.w13_expert_stride,
                           .b_row_stride = w.w13_row_stride,
                           .b_index = w.index,
                           .d = g.c1,
                           .a_scale = g.a_scale,
                           .b_scale = w.s13};
  grouped_gemm1_for(w.elem, per_group).run(g1, g.gemm, g.gemm_bytes, stream);
  grouped_activation(w, g.c1, g.counts, g.offsets, rows, g.a2, g.a2_scale, g.amax, stream);
  const GroupedGemmArgs g2{.num_groups = num_groups,
                           .n = H,
                           .k = I,
                           .counts = g.counts,
                           .offsets = g.offsets,
                           .a = g.a2,
                           .b = w.w2,
                           .b_group_stride = w.w2_expert_stride,
                           .b_row_stride = w.w2_row_stride,
                           .b_index = w.index,
                           .d = g.d,
                           .a_scale = {g.a2_scale, w.a2_scale == ScaleKind::kToken ? 1 : 0},
                           .b_scale = w.s2};
  grouped_gemm_for(w.elem, !g.d_rounded || gemm2_out(w.elem) == DType::kF32, per_group)
      .run(g2, g.gemm, g.gemm_bytes, stream);
}

}  // namespace moekit::cuda

namespace moekit {

std::shared_ptr<Experts> make_cuda_grouped_gemm_experts(const ExpertWeights& weights,
                                                        const Activation& act,
                                                        const TensorView& static_act_scale) {
  return std::make_shared<cuda::GroupedGemmExperts>(weights, act, static_act_scale);
}

std::shared_ptr<Experts> make_cuda_experts(const ExpertWeights& weights, const Activation& act,
                                           int64_t max_small_tokens,
                                           const TensorView& static_act_scale) {
  return make_fallback_experts(
      make_cuda_small_batch_experts(weights, act, TopKWeightApplied::kWeightedAndReduced,
                                    static_act_scale),
      make_cuda_grouped_gemm_experts(weights, act, static_act_scale), max_small_tokens);
}

}  // namespace moekit
