// ExpertMap: validation of placements and the global<->local tables every rank agrees on.
#include <utility>

#include "moekit/core/error.h"
#include "moekit/placement.h"

namespace moekit {
namespace {

using RankTable = std::vector<std::vector<int32_t>>;  // [rank][slot] -> global expert

void check_counts(const char* what, int num_experts, int64_t num_ranks) {
  MOEKIT_CHECK(num_experts >= 1, what, ": num_experts must be >= 1, got ", num_experts);
  MOEKIT_CHECK(num_ranks >= 1, what, ": needs at least one rank, got ", num_ranks);
}

// linear and round_robin: rank r's slot j holds expert_of(r, j, E_local).
template <typename ExpertOf>
RankTable even_split(const char* what, int num_experts, int num_ranks, ExpertOf expert_of) {
  check_counts(what, num_experts, num_ranks);
  MOEKIT_CHECK(num_experts % num_ranks == 0, what, ": num_experts ", num_experts,
               " is not divisible by num_ranks ", num_ranks);
  const int local = num_experts / num_ranks;
  RankTable table(num_ranks, std::vector<int32_t>(local));
  for (int r = 0; r < num_ranks; ++r)
    for (int j = 0; j < local; ++j) table[r][j] = expert_of(r, j, local);
  return table;
}

// Checks an explicit table: ids in range, no rank holding an expert twice, every expert held,
// and (unless replicas are allowed) no expert held by two ranks.
RankTable checked_table(const char* what, int num_experts,
                        const std::vector<std::vector<int>>& experts_of_rank, bool allow_replicas) {
  check_counts(what, num_experts, static_cast<int64_t>(experts_of_rank.size()));
  // First rank (and slot) seen holding each expert, for messages naming both holders.
  std::vector<int> holder(num_experts, -1);
  std::vector<int> holder_slot(num_experts, -1);
  RankTable table(experts_of_rank.size());
  for (size_t r = 0; r < experts_of_rank.size(); ++r) {
    const std::vector<int>& experts = experts_of_rank[r];
    for (size_t j = 0; j < experts.size(); ++j) {
      const int e = experts[j];
      MOEKIT_CHECK(e >= 0 && e < num_experts, what, ": rank ", r, " slot ", j, " holds expert ", e,
                   ", outside [0, ", num_experts, ")");
      const int prev = holder[e];
      MOEKIT_CHECK(prev != static_cast<int>(r), what, ": rank ", r, " holds expert ", e,
                   " twice (slots ", holder_slot[e], " and ", j, ")");
      MOEKIT_CHECK(prev < 0 || allow_replicas, what, ": expert ", e, " is held by ranks ", prev,
                   " and ", r, "; use ExpertMap::replicated for redundant experts");
      // Keep the latest holder so a rank repeating an expert is caught even when an earlier
      // rank also holds it (ranks are visited in order, so the latest holder is this rank).
      holder[e] = static_cast<int>(r);
      holder_slot[e] = static_cast<int>(j);
      table[r].push_back(e);
    }
  }
  for (int e = 0; e < num_experts; ++e)
    MOEKIT_CHECK(holder[e] >= 0, what, ": expert ", e, " is held by no rank (", num_experts,
                 " experts over ", experts_of_rank.size(), " ranks)");
  return table;
}

// FNV-1a over 64-bit words: stable across platforms and runs, so ranks can compare it.
class Fnv1a {
 public:
  void add(int64_t v) {
    // Little-endian bytes whatever the host order, so every rank hashes the same sequence.
    const uint64_t u = static_cast<uint64_t>(v);
    for (int i = 0; i < 8; ++i) hash_ = (hash_ ^ ((u >> (8 * i)) & 0xffu)) * 0x100000001b3ull;
  }
  uint64_t value() const { return hash_; }

 private:
  uint64_t hash_ = 0xcbf29ce484222325ull;
};

}  // namespace

ExpertMap::ExpertMap(int num_experts, std::vector<std::vector<int32_t>> experts_of_rank,
                     std::string kind)
    : num_experts_(num_experts),
      kind_(std::move(kind)),
      local_to_global_(std::move(experts_of_rank)),
      global_to_local_(local_to_global_.size(), std::vector<int32_t>(num_experts, -1)),
      replicas_(num_experts) {
  // Ranks are visited in ascending order, so each replicas_ list comes out sorted.
  for (size_t r = 0; r < local_to_global_.size(); ++r) {
    for (size_t j = 0; j < local_to_global_[r].size(); ++j) {
      const int32_t e = local_to_global_[r][j];
      global_to_local_[r][e] = static_cast<int32_t>(j);
      replicas_[e].push_back(static_cast<int32_t>(r));
    }
  }
  for (const auto& ranks : replicas_) has_replicas_ = has_replicas_ || ranks.size() > 1;
}

ExpertMap ExpertMap::linear(int num_experts, int num_ranks) {
  return ExpertMap(num_experts,
                   even_split("ExpertMap::linear", num_experts, num_ranks,
                              [](int r, int j, int local) { return r * local + j; }),
                   "linear");
}

ExpertMap ExpertMap::round_robin(int num_experts, int num_ranks) {
  return ExpertMap(num_experts,
                   even_split("ExpertMap::round_robin", num_experts, num_ranks,
                              [num_ranks](int r, int j, int) { return r + j * num_ranks; }),
                   "round_robin");
}

ExpertMap ExpertMap::table(int num_experts, std::vector<std::vector<int>> experts_of_rank) {
  return ExpertMap(num_experts,
                   checked_table("ExpertMap::table", num_experts, experts_of_rank, false), "table");
}

ExpertMap ExpertMap::replicated(int num_experts, std::vector<std::vector<int>> experts_of_rank) {
  return ExpertMap(num_experts,
                   checked_table("ExpertMap::replicated", num_experts, experts_of_rank, true),
                   "replicated");
}

int ExpertMap::num_local(int rank) const {
  return static_cast<int>(local_to_global(rank).size());
}

std::span<const int32_t> ExpertMap::local_to_global(int rank) const {
  MOEKIT_CHECK(rank >= 0 && rank < num_ranks(), "ExpertMap: rank ", rank, " outside [0, ",
               num_ranks(), ") of ", str());
  return local_to_global_[rank];
}

std::span<const int32_t> ExpertMap::replicas(int expert) const {
  MOEKIT_CHECK(expert >= 0 && expert < num_experts_, "ExpertMap: expert ", expert, " outside [0, ",
               num_experts_, ") of ", str());
  return replicas_[expert];
}

int ExpertMap::serving_rank(int32_t expert, int64_t token_key) const {
  const std::span<const int32_t> ranks = replicas(expert);
  const int64_t n = static_cast<int64_t>(ranks.size());
  // Non-negative modulo: a negative key still picks a valid replica.
  return ranks[((token_key % n) + n) % n];
}

int32_t ExpertMap::local_id(int rank, int32_t expert, int64_t token_key) const {
  MOEKIT_CHECK(rank >= 0 && rank < num_ranks(), "ExpertMap::local_id: rank ", rank, " outside [0, ",
               num_ranks(), ") of ", str());
  MOEKIT_CHECK(expert >= 0 && expert < num_experts_, "ExpertMap::local_id: expert ", expert,
               " outside [0, ", num_experts_, ") of ", str());
  const int32_t slot = global_to_local_[rank][expert];
  if (slot < 0 || !has_replicas_) return slot;
  return serving_rank(expert, token_key) == rank ? slot : -1;
}

uint64_t ExpertMap::fingerprint() const {
  Fnv1a h;
  h.add(num_experts_);
  h.add(num_ranks());
  for (const auto& experts : local_to_global_) {
    h.add(static_cast<int64_t>(experts.size()));
    for (int32_t e : experts) h.add(e);
  }
  return h.value();
}

std::string ExpertMap::str() const {
  int64_t slots = 0;
  for (const auto& experts : local_to_global_) slots += static_cast<int64_t>(experts.size());
  std::string s = detail::concat(kind_, "(E=", num_experts_, ", ranks=", num_ranks());
  if (has_replicas_) s += detail::concat(", replicas=", slots - num_experts_);
  return s + ")";
}

}  // namespace moekit
