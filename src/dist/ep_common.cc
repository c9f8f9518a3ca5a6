#include "dist/ep_common.h"

#include <cmath>
#include <functional>

#include "modular/dispatch_util.h"

namespace moekit {

DistributedPrepareFinalize::DistributedPrepareFinalize(std::shared_ptr<Communicator> comm)
    : comm_(std::move(comm)) {
  MOEKIT_CHECK(comm_, "distributed prepare/finalize: a communicator is required");
}

namespace detail {

EpPrepareFinalize::EpPrepareFinalize(std::shared_ptr<Communicator> comm, ExpertMap map,
                                     std::string_view name)
    : DistributedPrepareFinalize(std::move(comm)), map_(std::move(map)), name_(name) {
  MOEKIT_CHECK(map_.num_ranks() == comm_->size(), name_, ": the expert map ", map_.str(), " has ",
               map_.num_ranks(), " ranks but the communicator has ", comm_->size());
}

std::optional<std::string> EpPrepareFinalize::can_implement(const MoEProblem& p) const {
  if (auto r = detail::expert_count_mismatch(p, map_)) return r;
  LayerSignature sig;
  sig.num_experts = p.num_experts;
  sig.hidden = p.hidden;
  sig.intermediate = p.intermediate;
  sig.top_k = p.top_k;
  sig.act_dtype = static_cast<int64_t>(p.act_dtype);
  sig.weight_dtype = static_cast<int64_t>(p.weight_dtype);
  sig.format_hash = std::hash<std::string>{}(p.quant.str());
  sig.activation_hash =
      std::hash<std::string>{}(p.activation.str() + "/" + std::to_string(p.activation.alpha) + "/" +
                               std::to_string(p.activation.limit));
  sig.placement_fingerprint = map_.fingerprint();
  try {
    check_consistent(*comm_, sig);
  } catch (const Error& e) {
    return e.message();
  }
  return std::nullopt;
}

std::optional<std::string> EpPrepareFinalize::can_dispatch(const ActivationSpec& spec) const {
  return host_dispatch_refusal(spec);
}

AmaxAgreement EpPrepareFinalize::agreed_amax(int64_t* sent) {
  return [this, sent](float amax) {
    const std::vector<float> all = comm_->all_gather(amax);
    *sent += static_cast<int64_t>(sizeof(float)) * (comm_->size() - 1);
    float m = all[0];
    for (float v : all)
      if (std::isnan(v) || v > m) m = v;  // a NaN anywhere reaches every rank's scale
    return m;
  };
}

}  // namespace detail
}  // namespace moekit
