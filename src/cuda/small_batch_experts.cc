// Small-batch experts (decode): the host layer of small_batch.cu.
#include <cuda_runtime_api.h>

#include "cuda/check.h"
#include "cuda/experts_base.h"

namespace moekit::cuda {
namespace {

// The active-expert bitmap of small_batch.cu covers 1024 local experts.
constexpr int64_t kMaxLocalExperts = 1024;

class SmallBatchExperts final : public CudaExpertsBase {
 public:
  SmallBatchExperts(const ExpertWeights& w, const Activation& act, TopKWeightApplied applied)
      : CudaExpertsBase("cuda-small-batch", w, act), applied_(applied) {
    MOEKIT_CHECK(info_.num_local_experts <= kMaxLocalExperts, name_, ": ", info_.num_local_experts,
                 " local experts, at most ", kMaxLocalExperts);
    MOEKIT_CHECK(applied != TopKWeightApplied::kWeighted, name_,
                 ": weight application must be none or weighted_and_reduced");
  }

  std::string_view name() const override { return name_; }
  TopKWeightApplied weight_application() const override { return applied_; }

  size_t workspace_size(const MoEProblem& p) const override {
    // h [M, k, I] bf16, and when reducing here the unweighted rows [M, k, H] fp32.
    const int64_t pairs = p.tokens * p.top_k;
    return Workspace::aligned(pairs * p.intermediate * 2) +
           (reduces() ? Workspace::aligned(pairs * p.hidden * 4) : 0);
  }

  void apply(const DispatchedBatch& b, const TensorView& out, Workspace& ws,
             const ExecContext& ctx) const override {
    check_apply(b, out, reduces());
    const int64_t M = b.a1.size(0), k = b.topk_ids.size(1);
    const cudaStream_t stream = stream_of(ctx.stream);
    if (info_.num_local_experts == 0) {
      MOEKIT_CUDA_CHECK(cudaMemsetAsync(out.data, 0, out.nbytes(), stream));
      return;
    }
    const TensorView h = ws.take(DType::kBF16, {M * k, info_.intermediate});
    const TensorView rows =
        reduces() ? ws.take(DType::kF32, {M, k, info_.hidden}) : out;  // [M, k, H]
    small_batch_experts(weights_, b.a1.ptr<uint16_t>(), b.a1.stride[0], b.topk_ids.ptr<int32_t>(),
                        b.topk_ids.stride[0], M, static_cast<int>(k), h.ptr<uint16_t>(),
                        rows.ptr<float>(), stream);
    if (reduces())
      weight_and_reduce(rows.ptr<float>(), M, static_cast<int>(k), info_.hidden, false,
                        b.topk_ids.ptr<int32_t>(), b.topk_ids.stride[0],
                        b.topk_weights.ptr<float>(), b.topk_weights.stride[0], true, out.data,
                        DType::kF32, info_.hidden, stream);
  }

 private:
  bool reduces() const { return applied_ == TopKWeightApplied::kWeightedAndReduced; }
  TopKWeightApplied applied_;
};

}  // namespace
}  // namespace moekit::cuda

namespace moekit {

std::shared_ptr<Experts> make_cuda_small_batch_experts(const ExpertWeights& weights,
                                                       const Activation& act,
                                                       TopKWeightApplied applied) {
  return std::make_shared<cuda::SmallBatchExperts>(weights, act, applied);
}

}  // namespace moekit
