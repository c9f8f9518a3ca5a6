// Batched-format Experts over a standard-format implementation: the batch [E_local, N, H] is
// viewed as E_local * N tokens of top-1, row j of expert e carrying local id e when j is below
// the expert's count and -1 (padding) otherwise.
#include "moekit/dist/ep.h"

namespace moekit {

namespace {

class BatchedExperts final : public Experts {
 public:
  explicit BatchedExperts(std::shared_ptr<Experts> inner) : inner_(std::move(inner)) {
    MOEKIT_CHECK(inner_, "batched experts: an inner implementation is required");
    MOEKIT_CHECK(inner_->activation_format() == ActivationFormat::kStandard, "batched experts: '",
                 inner_->name(), "' must use the standard format");
    MOEKIT_CHECK(inner_->weight_application() == TopKWeightApplied::kNone, "batched experts: '",
                 inner_->name(), "' must leave top-k weights to finalize");
    name_ = "batched(" + std::string(inner_->name()) + ")";
  }

  std::string_view name() const override { return name_; }
  ActivationFormat activation_format() const override { return ActivationFormat::kBatched; }
  ActivationSpec activation_spec() const override { return inner_->activation_spec(); }
  TopKWeightApplied weight_application() const override { return TopKWeightApplied::kNone; }
  const ExpertsInfo& info() const override { return inner_->info(); }

  // p.tokens counts all batched rows; the inner experts see them as top-1 tokens.
  std::optional<std::string> can_implement(const MoEProblem& p) const override {
    return inner_->can_implement(top1(p));
  }
  size_t workspace_size(const MoEProblem& p) const override {
    return inner_->workspace_size(top1(p)) + 2 * Workspace::aligned(p.tokens * 4);
  }

  void apply(const DispatchedBatch& batch, const TensorView& out, Workspace& ws,
             const ExecContext& ctx) const override {
    const int64_t El = batch.a1.size(0), N = batch.a1.size(1), H = batch.a1.size(2);
    check_shape(batch.expert_num_tokens, {El}, "batched experts: expert_num_tokens");
    DispatchedBatch flat;
    flat.a1 = batch.a1.reshaped({El * N, H});
    flat.a1_scale = batch.a1_scale;
    flat.topk_ids = ws.take(DType::kI32, {El * N, 1});
    flat.topk_weights = ws.take(DType::kF32, {El * N, 1});
    for (int64_t e = 0; e < El; ++e) {
      const int32_t n = batch.expert_num_tokens.ptr<int32_t>()[e];
      MOEKIT_CHECK(n >= 0 && n <= N, "batched experts: expert ", e, " has ", n,
                   " rows, outside [0, ", N, "]");
      for (int64_t j = 0; j < N; ++j) {
        flat.topk_ids.ptr<int32_t>()[e * N + j] = j < n ? static_cast<int32_t>(e) : -1;
        flat.topk_weights.ptr<float>()[e * N + j] = 1.0f;
      }
    }
    inner_->apply(flat, out.reshaped({El * N, 1, H}), ws, ctx);
  }

 private:
  static MoEProblem top1(MoEProblem p) {
    p.top_k = 1;
    return p;
  }
  std::shared_ptr<Experts> inner_;
  std::string name_;
};

}  // namespace

std::shared_ptr<Experts> make_batched_experts(std::shared_ptr<Experts> standard) {
  return std::make_shared<BatchedExperts>(std::move(standard));
}

}  // namespace moekit
