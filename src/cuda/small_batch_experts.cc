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
  SmallBatchExperts(const ExpertWeights& w, const Activation& act, TopKWeightApplied applied,
                    const TensorView& static_act_scale)
      : CudaExpertsBase("cuda-small-batch", w, act, static_act_scale), applied_(applied) {
    MOEKIT_CHECK(info_.num_local_experts <= kMaxLocalExperts, name_, ": ", info_.num_local_experts,
                 " local experts, at most ", kMaxLocalExperts);
    MOEKIT_CHECK(applied != TopKWeightApplied::kWeighted, name_,
                 ": weight application must be none or weighted_and_reduced");
  }

  std::string_view name() const override { return name_; }
  TopKWeightApplied weight_application() const override { return applied_; }

  size_t workspace_size(const MoEProblem& p) const override {
    // The intermediate (SmallBatchBuffers), and when reducing here the unweighted rows
    // [M, k, H] fp32.
    const int64_t pairs = p.tokens * p.top_k;
    return intermediate_bytes(pairs) + (reduces() ? Workspace::aligned(pairs * p.hidden * 4) : 0);
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
    const SmallBatchBuffers buf = take_intermediate(ws, M * k);
    const TensorView rows =
        reduces() ? ws.take(DType::kF32, {M, k, info_.hidden}) : out;  // [M, k, H]
    small_batch_experts(weights_, b.a1.data, b.a1.stride[0], a1_scale(b), b.topk_ids.ptr<int32_t>(),
                        b.topk_ids.stride[0], M, static_cast<int>(k), buf, rows.ptr<float>(),
                        stream);
    if (reduces())
      weight_and_reduce(rows.ptr<float>(), M, static_cast<int>(k), info_.hidden, false,
                        b.topk_ids.ptr<int32_t>(), b.topk_ids.stride[0],
                        b.topk_weights.ptr<float>(), b.topk_weights.stride[0], true, out.data,
                        DType::kF32, info_.hidden, stream);
  }

 private:
  bool reduces() const { return applied_ == TopKWeightApplied::kWeightedAndReduced; }

  // h [P, I] in the element type (fp32 for e4m3), and for e4m3 its requantized codes [P, I],
  // scales [P] and the amax scratch.
  size_t intermediate_bytes(int64_t pairs) const {
    const int64_t n = pairs * info_.intermediate;
    if (!quantized()) return Workspace::aligned(n * elem_bytes());
    return Workspace::aligned(n * 4) + Workspace::aligned(n) + Workspace::aligned(pairs * 4) +
           Workspace::aligned(4);
  }
  SmallBatchBuffers take_intermediate(Workspace& ws, int64_t pairs) const {
    const int64_t n = pairs * info_.intermediate;
    SmallBatchBuffers b;
    if (!quantized()) {
      b.h = ws.take_bytes(n * elem_bytes());
      return b;
    }
    b.h = ws.take_bytes(n * 4);
    b.h8 = static_cast<uint8_t*>(ws.take_bytes(n));
    b.h_scale = static_cast<float*>(ws.take_bytes(pairs * 4));
    b.amax = static_cast<uint32_t*>(ws.take_bytes(4));
    return b;
  }
  TopKWeightApplied applied_;
};

}  // namespace
}  // namespace moekit::cuda

namespace moekit {

std::shared_ptr<Experts> make_cuda_small_batch_experts(const ExpertWeights& weights,
                                                       const Activation& act,
                                                       TopKWeightApplied applied,
                                                       const TensorView& static_act_scale) {
  return std::make_shared<cuda::SmallBatchExperts>(weights, act, applied, static_act_scale);
}

}  // namespace moekit
