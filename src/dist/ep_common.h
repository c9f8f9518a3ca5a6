// Internals shared by the distributed PrepareFinalize implementations.
#pragma once

#include <chrono>

#include "modular/dispatch_util.h"
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
  // Quantized activations move with their scales: per-token and per-block scale rows travel
  // with their rows, a per-tensor scale is one scalar every rank holds (see agreed_amax).
  std::optional<std::string> can_dispatch(const ActivationSpec& spec) const override;

 protected:
  // A dynamic per-tensor scale: the ranks all-gather their amax (one float each) and take the
  // max, and every rank quantizes with tensor_scale_of_amax of it as a static scale, so one
  // scalar covers the rows of every rank and never travels with them. Every rank's prepare calls
  // it once (ranks without rows too); the bytes sent are added to *sent.
  detail::AmaxAgreement agreed_amax(int64_t* sent);

  using Clock = std::chrono::steady_clock;
  // Stats of one prepare / finalize that began at `start` and sent `bytes` to other ranks.
  void count_dispatch(int64_t bytes, Clock::time_point start) {
    stats_.dispatch_bytes_sent += bytes;
    ++stats_.rounds;
    stats_.dispatch_seconds += seconds_since(start);
  }
  void count_combine(int64_t bytes, Clock::time_point start) {
    stats_.combine_bytes_sent += bytes;
    stats_.combine_seconds += seconds_since(start);
  }

 private:
  static double seconds_since(Clock::time_point start) {
    return std::chrono::duration<double>(Clock::now() - start).count();
  }

 protected:
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
