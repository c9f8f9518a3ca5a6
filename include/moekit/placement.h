// Expert placement (the expert map): which rank holds which global expert, and in which local
// slot. This is the only place that turns global expert ids into local ones; nothing else
// computes offsets like rank * E_local.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace moekit {

class ExpertMap {
 public:
  // Rank r holds experts [r*E/R, (r+1)*E/R) (E divisible by R).
  static ExpertMap linear(int num_experts, int num_ranks);
  // Rank r holds experts r, r+R, r+2R, ... (E divisible by R).
  static ExpertMap round_robin(int num_experts, int num_ranks);
  // experts_of_rank[r] lists the global experts rank r holds, in local slot order. Every expert
  // must be held exactly once.
  static ExpertMap table(int num_experts, std::vector<std::vector<int>> experts_of_rank);
  // Like table, but an expert may be held by several ranks (redundant replicas, for load
  // balancing). Every expert must be held at least once; a rank holds an expert at most once.
  static ExpertMap replicated(int num_experts, std::vector<std::vector<int>> experts_of_rank);

  int num_experts() const { return num_experts_; }
  int num_ranks() const { return static_cast<int>(local_to_global_.size()); }
  int num_local(int rank) const;                        // E_local of rank
  std::span<const int32_t> local_to_global(int rank) const;  // [E_local] global ids
  // Ranks holding expert e, in ascending order (size 1 unless replicated).
  std::span<const int32_t> replicas(int expert) const;
  bool has_replicas() const { return has_replicas_; }

  // The rank that serves token `token_key`'s choice of `expert`: the replica
  // replicas(expert)[token_key mod n]. token_key identifies the token across ranks
  // (its row in the global batch). Deterministic, spreads a hot expert's tokens evenly.
  int serving_rank(int32_t expert, int64_t token_key) const;
  // Local slot of `expert` on `rank` for this token, or -1 when `rank` does not serve it
  // (not held there, or held but another replica serves this token). expert must be in [0, E).
  int32_t local_id(int rank, int32_t expert, int64_t token_key) const;

  // Agreement check between ranks: a hash of E, ranks and every rank's table.
  uint64_t fingerprint() const;
  // "linear(E=8, ranks=2)" etc., for messages and logs.
  std::string str() const;

 private:
  ExpertMap(int num_experts, std::vector<std::vector<int32_t>> experts_of_rank, std::string kind);
  int num_experts_ = 0;
  std::string kind_;
  bool has_replicas_ = false;
  std::vector<std::vector<int32_t>> local_to_global_;     // [rank][slot] -> expert
  std::vector<std::vector<int32_t>> global_to_local_;     // [rank][expert] -> slot or -1
  std::vector<std::vector<int32_t>> replicas_;            // [expert] -> ranks
};

}  // namespace moekit
