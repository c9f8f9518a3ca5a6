// Grouped-GEMM experts (prefill): pairs sorted by local expert on the device, then
//   a_sorted [R, H] --GEMM1--> c1 [R, w13_rows] bf16 --activation--> a2 [R, I] bf16
//   --GEMM2--> c2 [R, H] fp32 --unpermute, weight, reduce--> out [M, H] fp32
// with R = M * k rows reserved (only the valid pairs' rows are used) and per-expert sizes kept
// on the device. Weights applied here (kWeightedAndReduced): the unpermute reads each of a
// token's rows once and finalize only casts.
#include <algorithm>

#include "cuda/check.h"
#include "cuda/experts_base.h"
#include "cuda/grouped_gemm.h"

namespace moekit::cuda {
namespace {

class GroupedGemmExperts final : public CudaExpertsBase {
 public:
  GroupedGemmExperts(const ExpertWeights& w, const Activation& act)
      : CudaExpertsBase("cuda-grouped-gemm", w, act) {}

  std::string_view name() const override { return name_; }
  TopKWeightApplied weight_application() const override {
    return TopKWeightApplied::kWeightedAndReduced;
  }

  size_t workspace_size(const MoEProblem& p) const override {
    return Buffers::bytes(p.tokens * p.top_k, info_);
  }

  void apply(const DispatchedBatch& b, const TensorView& out, Workspace& ws,
             const ExecContext& ctx) const override {
    check_apply(b, out, true);
    const cudaStream_t stream = stream_of(ctx.stream);
    const int64_t M = b.a1.size(0), k = b.topk_ids.size(1), R = M * k;
    const int G = static_cast<int>(info_.num_local_experts);
    const int64_t H = info_.hidden, I = info_.intermediate;
    const int64_t rows13 = info_.activation.w13_rows(I);
    if (G == 0 || M == 0) {
      MOEKIT_CUDA_CHECK(cudaMemsetAsync(out.data, 0, out.nbytes(), stream));
      return;
    }
    const Buffers buf = Buffers::take(ws, R, info_);
    sort_by_expert(b.topk_ids.ptr<int32_t>(), b.topk_ids.stride[0], M, static_cast<int>(k), G,
                   b.a1.ptr<uint16_t>(), b.a1.stride[0], H, buf.counts, buf.offsets, buf.cursor,
                   buf.pair_pos, buf.activations, stream);
    GroupedGemmArgs g1{.num_groups = G,
                       .n = rows13,
                       .k = H,
                       .counts = buf.counts,
                       .offsets = buf.offsets,
                       .a = buf.activations,
                       .b = weights_.w13,
                       .b_group_stride = weights_.w13_expert_stride,
                       .b_row_stride = weights_.w13_row_stride,
                       .b_index = weights_.index,
                       .d = buf.results};
    grouped_gemm_bf16_out_bf16(g1, buf.gemm, buf.gemm_bytes, stream);
    // a2 overwrites a_sorted, which GEMM1 has consumed (same stream).
    grouped_activation(weights_, static_cast<const uint16_t*>(buf.results), buf.counts, buf.offsets,
                       R, buf.activations, stream);
    GroupedGemmArgs g2{.num_groups = G,
                       .n = H,
                       .k = I,
                       .counts = buf.counts,
                       .offsets = buf.offsets,
                       .a = buf.activations,
                       .b = weights_.w2,
                       .b_group_stride = weights_.w2_expert_stride,
                       .b_row_stride = weights_.w2_row_stride,
                       .b_index = weights_.index,
                       .d = buf.results};
    grouped_gemm_bf16_out_f32(g2, buf.gemm, buf.gemm_bytes, stream);
    unpermute_weight_reduce(weights_, static_cast<const float*>(buf.results), buf.pair_pos,
                            b.topk_ids.ptr<int32_t>(), b.topk_ids.stride[0],
                            b.topk_weights.ptr<float>(), b.topk_weights.stride[0], M,
                            static_cast<int>(k), out.ptr<float>(), stream);
  }

 private:
  // Workspace of one apply() over R = M * k rows. `activations` holds a_sorted [R, H] bf16 and
  // later a2 [R, I] bf16; `results` holds c1 [R, w13_rows] bf16 and later c2 [R, H] fp32.
  struct Buffers {
    int32_t *counts, *offsets, *cursor, *pair_pos;
    uint16_t* activations;
    void* results;
    void* gemm;
    size_t gemm_bytes;

    static size_t activation_bytes(int64_t R, const ExpertsInfo& i) {
      return R * std::max(i.hidden, i.intermediate) * 2;
    }
    static size_t result_bytes(int64_t R, const ExpertsInfo& i) {
      return R * std::max(i.activation.w13_rows(i.intermediate) * 2, i.hidden * 4);
    }
    static size_t gemm_workspace(const ExpertsInfo& i) {
      const int G = static_cast<int>(i.num_local_experts);
      return std::max(grouped_gemm_bf16_out_bf16_workspace(G),
                      grouped_gemm_bf16_out_f32_workspace(G));
    }
    static size_t bytes(int64_t R, const ExpertsInfo& i) {
      const int64_t G = i.num_local_experts;
      return 3 * Workspace::aligned(G * 4) + Workspace::aligned(R * 4) +
             Workspace::aligned(activation_bytes(R, i)) + Workspace::aligned(result_bytes(R, i)) +
             Workspace::aligned(gemm_workspace(i));
    }
    static Buffers take(Workspace& ws, int64_t R, const ExpertsInfo& i) {
      const int64_t G = i.num_local_experts;
      Buffers b;
      b.counts = static_cast<int32_t*>(ws.take_bytes(G * 4));
      b.offsets = static_cast<int32_t*>(ws.take_bytes(G * 4));
      b.cursor = static_cast<int32_t*>(ws.take_bytes(G * 4));
      b.pair_pos = static_cast<int32_t*>(ws.take_bytes(R * 4));
      b.activations = static_cast<uint16_t*>(ws.take_bytes(activation_bytes(R, i)));
      b.results = ws.take_bytes(result_bytes(R, i));
      b.gemm_bytes = gemm_workspace(i);
      b.gemm = ws.take_bytes(b.gemm_bytes);
      return b;
    }
  };
};

}  // namespace
}  // namespace moekit::cuda

namespace moekit {

std::shared_ptr<Experts> make_cuda_grouped_gemm_experts(const ExpertWeights& weights,
                                                        const Activation& act) {
  return std::make_shared<cuda::GroupedGemmExperts>(weights, act);
}

std::shared_ptr<Experts> make_cuda_experts(const ExpertWeights& weights, const Activation& act,
                                           int64_t max_small_tokens) {
  return make_fallback_experts(
      make_cuda_small_batch_experts(weights, act, TopKWeightApplied::kWeightedAndReduced),
      make_cuda_grouped_gemm_experts(weights, act), max_small_tokens);
}

}  // namespace moekit
