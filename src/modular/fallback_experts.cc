// FallbackExperts: one of two implementations, chosen per call by the number of dispatched rows
// (e.g. a small-batch kernel for decode, a grouped GEMM for prefill).
#include <cstdlib>
#include <cstdio>

#include "moekit/modular.h"

namespace moekit {

namespace {

bool log_choices() {
  static const bool on = std::getenv("MOEKIT_LOG_CHOICES") != nullptr;
  return on;
}

class FallbackExperts final : public Experts {
 public:
  FallbackExperts(std::shared_ptr<Experts> small, std::shared_ptr<Experts> large, int64_t max_small)
      : small_(std::move(small)), large_(std::move(large)), max_small_(max_small) {
    MOEKIT_CHECK(small_ && large_, "fallback experts: both implementations are required");
    MOEKIT_CHECK(max_small_ >= 0, "fallback experts: max_small_tokens ", max_small_, " < 0");
    const auto &a = small_->info(), &b = large_->info();
    MOEKIT_CHECK(small_->activation_format() == large_->activation_format(),
                 "fallback experts: ", small_->name(), " and ", large_->name(),
                 " use different activation formats");
    MOEKIT_CHECK(small_->weight_application() == large_->weight_application(),
                 "fallback experts: ", small_->name(), " and ", large_->name(),
                 " apply top-k weights differently");
    const ActivationSpec sa = small_->activation_spec(), sb = large_->activation_spec();
    MOEKIT_CHECK(sa.dtype == sb.dtype && sa.scale == sb.scale && sa.group == sb.group,
                 "fallback experts: ", small_->name(), " and ", large_->name(),
                 " want different activation dtypes or scales");
    MOEKIT_CHECK(a.num_local_experts == b.num_local_experts && a.hidden == b.hidden &&
                     a.intermediate == b.intermediate && a.activation.str() == b.activation.str(),
                 "fallback experts: ", small_->name(), " and ", large_->name(),
                 " compute different layers");
    name_ = "fallback(" + std::string(small_->name()) + " <= " + std::to_string(max_small_) +
            " < " + std::string(large_->name()) + ")";
  }

  std::string_view name() const override { return name_; }
  ActivationFormat activation_format() const override { return small_->activation_format(); }
  ActivationSpec activation_spec() const override { return small_->activation_spec(); }
  TopKWeightApplied weight_application() const override { return small_->weight_application(); }
  const ExpertsInfo& info() const override { return small_->info(); }

  std::optional<std::string> can_implement(const MoEProblem& p) const override {
    // Any row count up to p.tokens may arrive, so both must handle the problem.
    if (auto r = small_->can_implement(p)) return std::string(small_->name()) + ": " + *r;
    if (auto r = large_->can_implement(p)) return std::string(large_->name()) + ": " + *r;
    return std::nullopt;
  }

  size_t workspace_size(const MoEProblem& p) const override {
    return std::max(small_->workspace_size(p), large_->workspace_size(p));
  }

  void apply(const DispatchedBatch& batch, const TensorView& out, Workspace& ws,
             const ExecContext& ctx) const override {
    const int64_t rows = batch.a1.size(0);
    const Experts& pick = rows <= max_small_ ? *small_ : *large_;
    if (log_choices()) std::fprintf(stderr, "moekit: %s -> %s (%lld rows)\n", name_.c_str(),
                                    std::string(pick.name()).c_str(), static_cast<long long>(rows));
    pick.apply(batch, out, ws, ctx);
  }

 private:
  std::shared_ptr<Experts> small_, large_;
  int64_t max_small_;
  std::string name_;
};

}  // namespace

std::shared_ptr<Experts> make_fallback_experts(std::shared_ptr<Experts> small,
                                               std::shared_ptr<Experts> large,
                                               int64_t max_small_tokens) {
  return std::make_shared<FallbackExperts>(std::move(small), std::move(large), max_small_tokens);
}

}  // namespace moekit
