// Internals shared by the distributed PrepareFinalize implementations.
#pragma once

#include <chrono>

#include "moekit/dist/ep.h"

namespace moekit::detail {

// The base of every EP PrepareFinalize: the expert map, the collective agreement check run when
// a ModularKernel is built over it, and the stats clock.
class EpPrepareFinalize : public DistributedPrepareFinalize {
 public:
  EpPrepareFinalize(std::shared_ptr<Communicator> comm, ExpertMap map, std::string_view name);
  std::string_view name() const override { return name_; }
  const ExpertMap& expert_map() const override { return map_; }
  int rank() const override { return comm_->rank(); }
  // E must match the map; then every rank exchanges its layer signature (a collective: all
  // ranks construct their kernels together) and any disagreement is the reason on every rank.
  std::optional<std::string> can_implement(const MoEProblem& p) const override;
  // The ranks agree on the largest round count (a host exchange).
  int64_t num_rounds(int64_t local_tokens, int64_t chunk) override {
    return comm_->all_reduce_max((local_tokens + chunk - 1) / chunk);
  }
  // Standard format by default; a rank receives each rank's chunk at most once.
  ActivationFormat activation_format() const override { return ActivationFormat::kStandard; }
  int64_t max_dispatched_tokens(const MoEProblem& p) const override {
    return p.tokens * comm_->size();
  }

 protected:
  // Adds the seconds since `start` to `total`.
  static void charge(double& total, std::chrono::steady_clock::time_point start) {
    total += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  ExpertMap map_;
  std::string name_;
};

// Send/receive byte counts of an all_to_all_v, one entry per rank.
struct Counts {
  std::vector<size_t> send, recv;
  explicit Counts(int ranks) : send(ranks, 0), recv(ranks, 0) {}
  static size_t total(const std::vector<size_t>& v) {
    size_t s = 0;
    for (size_t x : v) s += x;
    return s;
  }
};

}  // namespace moekit::detail
