// Single-rank PrepareFinalize: no communication. prepare maps global ids to this rank's local
// ids through the expert map and converts or quantizes x into the experts' activation spec (a
// dynamic per-tensor scale covers the rows of this call); finalize runs weight-and-reduce with
// the caller's routing.
#include <cstring>

#include "modular/dispatch_util.h"
#include "moekit/modular.h"

namespace moekit {

namespace {

class LocalPrepareFinalize final : public PrepareFinalize {
 public:
  LocalPrepareFinalize(ExpertMap map, int rank) : map_(std::move(map)), rank_(rank) {
    MOEKIT_CHECK(rank >= 0 && rank < map_.num_ranks(), "local prepare/finalize: rank ", rank,
                 " not in [0, ", map_.num_ranks(), ") of ", map_.str());
  }

  std::string_view name() const override { return "local"; }
  ActivationFormat activation_format() const override { return ActivationFormat::kStandard; }
  const ExpertMap& expert_map() const override { return map_; }
  int rank() const override { return rank_; }

  std::optional<std::string> can_implement(const MoEProblem& p) const override {
    if (auto r = detail::expert_count_mismatch(p, map_)) return r;
    return std::nullopt;
  }

  int64_t max_dispatched_tokens(const MoEProblem& p) const override { return p.tokens; }

  std::optional<std::string> can_dispatch(const ActivationSpec& spec) const override {
    return detail::host_dispatch_refusal(spec);
  }

  size_t workspace_size(const MoEProblem& p) const override {
    // a1 [M, H] (conversion, weight on input, quantization) + ids [M, k] + weights [M, k].
    const int64_t M = p.tokens;
    return detail::prepare_activations_workspace(p, M) + 2 * Workspace::aligned(M * p.top_k * 4);
  }

  DispatchedBatch prepare(const PrepareRequest& req, Workspace& ws, const ExecContext&) override {
    const int64_t M = req.x.size(0), k = req.topk_ids.size(1);
    DispatchedBatch b;
    b.topk_ids = ws.take(DType::kI32, {M, k});
    b.topk_weights = ws.take(DType::kF32, {M, k});
    for (int64_t t = 0; t < M; ++t) {
      const int32_t* ids = req.topk_ids.row<int32_t>(t);
      const float* w = req.topk_weights.row<float>(t);
      int32_t* lids = b.topk_ids.row<int32_t>(t);
      float* lw = b.topk_weights.row<float>(t);
      for (int64_t s = 0; s < k; ++s) {
        lids[s] = ids[s] < 0 ? -1
                             : map_.local_id(rank_, ids[s],
                                             detail::token_key(0, req.token_key_offset + t));
        lw[s] = req.weight_on_input ? 1.0f : w[s];
      }
    }
    const detail::ActivationRows a = detail::prepare_activations(req, ws);
    b.a1 = a.a1;
    b.a1_scale = a.scale;
    return b;
  }

  void finalize(const FinalizeRequest& req, Workspace&, const ExecContext& ctx) override {
    req.weight_and_reduce->apply(req.fused_out, req.topk_ids, req.topk_weights, req.applied, req.y,
                                 ctx);
  }

 private:
  ExpertMap map_;
  int rank_;
};

}  // namespace

std::shared_ptr<PrepareFinalize> make_local_prepare_finalize(ExpertMap map, int rank) {
  return std::make_shared<LocalPrepareFinalize>(std::move(map), rank);
}

}  // namespace moekit
