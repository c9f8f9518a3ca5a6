// Expert parallelism: PrepareFinalize implementations that move tokens between ranks through a
// Communicator, and the batched-format adapter. Every rank builds the same kernel (same E, H,
// I, k, format and placement: checked collectively when the ModularKernel is constructed) and
// calls forward the same number of times; token counts may differ per rank, zero included.
#pragma once

#include <memory>

#include "moekit/dist/communicator.h"
#include "moekit/modular.h"

namespace moekit {

// Time and bytes of the data movement since the last reset (this rank's view).
struct CommStats {
  double dispatch_seconds = 0, combine_seconds = 0;
  int64_t dispatch_bytes_sent = 0, combine_bytes_sent = 0;
  int64_t rounds = 0;
};

class DistributedPrepareFinalize : public PrepareFinalize {
 public:
  const CommStats& stats() const { return stats_; }
  void reset_stats() { stats_ = {}; }
  Communicator& communicator() const { return *comm_; }

 protected:
  explicit DistributedPrepareFinalize(std::shared_ptr<Communicator> comm);
  std::shared_ptr<Communicator> comm_;
  CommStats stats_;
};

// Naive DP/EP: all-gather every rank's tokens, ids and weights (variable counts); each rank runs
// its local experts over all of them and weight-and-reduces into fp32 partial sums; a
// reduce-scatter returns each owner the sum over ranks. Standard format.
std::shared_ptr<DistributedPrepareFinalize> make_naive_prepare_finalize(
    std::shared_ptr<Communicator> comm, ExpertMap map);

// All-to-all: each token travels once to every rank that serves one of its experts (not once
// per expert); each (token, slot) result returns to the owner in fp32, which applies the
// caller's weights and sums in slot order. Standard format. Counts are exchanged on the host.
std::shared_ptr<DistributedPrepareFinalize> make_all_to_all_prepare_finalize(
    std::shared_ptr<Communicator> comm, ExpertMap map);

// Low-latency: batched (expert-major) receive buffers [E_local, ranks * max_tokens_per_rank, H]
// sized at construction; fixed-size exchanges, so no host-side size exchange in the forward
// path. One round per forward: a rank may pass at most max_tokens_per_rank tokens.
std::shared_ptr<DistributedPrepareFinalize> make_low_latency_prepare_finalize(
    std::shared_ptr<Communicator> comm, ExpertMap map, int64_t max_tokens_per_rank);

// Batched-format Experts over a standard-format one: row j of expert e's batch is computed as a
// token with the single local id e (rows past the expert's count are padding, id -1).
std::shared_ptr<Experts> make_batched_experts(std::shared_ptr<Experts> standard);

}  // namespace moekit
