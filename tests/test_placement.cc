// ExpertMap tests: layouts, the one-serving-rank invariant for every map kind and many token
// keys, agreement of the global/local tables, fingerprints and every validation error.
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "moekit/core/error.h"
#include "moekit/placement.h"

namespace moekit {
namespace {

std::vector<int32_t> as_vector(std::span<const int32_t> s) {
  return {s.begin(), s.end()};
}

// A shuffled placement of 12 experts over 4 ranks with uneven counts (rank 2 holds none).
ExpertMap shuffled_table() {
  std::vector<int> perm(12);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), std::mt19937(5));
  return ExpertMap::table(12, {{perm[0], perm[1], perm[2], perm[3], perm[4]},
                               {perm[5], perm[6]},
                               {},
                               {perm[7], perm[8], perm[9], perm[10], perm[11]}});
}

// 8 experts over 3 ranks: expert 0 on all three, experts 3 and 5 twice; rank 2 holds only copies.
ExpertMap replicated_map() {
  return ExpertMap::replicated(8, {{0, 1, 2, 3}, {4, 5, 6, 7, 0}, {5, 0, 3}});
}

ExpertMap single_rank() {
  return ExpertMap::linear(6, 1);
}

struct NamedMap {
  std::string name;
  std::function<ExpertMap()> make;
};

const std::vector<NamedMap>& all_kinds() {
  static const std::vector<NamedMap> kinds = {
      {"linear", [] { return ExpertMap::linear(12, 3); }},
      {"round_robin", [] { return ExpertMap::round_robin(12, 4); }},
      {"table", shuffled_table},
      {"replicated", replicated_map},
      {"one rank", single_rank},
      {"replicated everywhere",
       [] {
         return ExpertMap::replicated(3, {{0, 1, 2}, {2, 1, 0}});
       }},
  };
  return kinds;
}

// Token keys around zero, both signs, and the int64 extremes.
std::vector<int64_t> token_keys() {
  std::vector<int64_t> keys;
  for (int64_t t = -40; t < 40; ++t) keys.push_back(t);
  for (int64_t big : {std::numeric_limits<int64_t>::max(), std::numeric_limits<int64_t>::min(),
                      int64_t{1} << 40, -(int64_t{1} << 40) - 1})
    keys.push_back(big);
  return keys;
}

TEST(ExpertMapLayout, LinearHoldsContiguousBlocks) {
  const ExpertMap m = ExpertMap::linear(8, 2);
  EXPECT_EQ(as_vector(m.local_to_global(0)), (std::vector<int32_t>{0, 1, 2, 3}));
  EXPECT_EQ(as_vector(m.local_to_global(1)), (std::vector<int32_t>{4, 5, 6, 7}));
  EXPECT_EQ(m.local_id(1, 6, 0), 2);
  EXPECT_EQ(m.local_id(0, 6, 0), -1);
  EXPECT_EQ(m.num_local(1), 4);
  EXPECT_FALSE(m.has_replicas());
  EXPECT_EQ(m.str(), "linear(E=8, ranks=2)");
}

TEST(ExpertMapLayout, RoundRobinDealsExpertsInTurn) {
  const ExpertMap m = ExpertMap::round_robin(9, 3);
  EXPECT_EQ(as_vector(m.local_to_global(0)), (std::vector<int32_t>{0, 3, 6}));
  EXPECT_EQ(as_vector(m.local_to_global(1)), (std::vector<int32_t>{1, 4, 7}));
  EXPECT_EQ(as_vector(m.local_to_global(2)), (std::vector<int32_t>{2, 5, 8}));
  EXPECT_EQ(m.local_id(2, 8, 0), 2);
  EXPECT_EQ(m.str(), "round_robin(E=9, ranks=3)");
}

TEST(ExpertMapLayout, TableKeepsSlotOrderAndAllowsEmptyRanks) {
  const ExpertMap m = ExpertMap::table(4, {{3, 1}, {}, {0, 2}});
  EXPECT_EQ(m.num_ranks(), 3);
  EXPECT_EQ(as_vector(m.local_to_global(0)), (std::vector<int32_t>{3, 1}));
  EXPECT_EQ(m.num_local(1), 0);
  EXPECT_EQ(m.local_id(0, 1, 0), 1);
  EXPECT_EQ(m.local_id(2, 0, 0), 0);
  EXPECT_EQ(m.local_id(1, 0, 0), -1);
  EXPECT_EQ(m.str(), "table(E=4, ranks=3)");
}

TEST(ExpertMapLayout, ReplicasAreSortedAndSpreadTokensEvenly) {
  const ExpertMap m = replicated_map();
  EXPECT_TRUE(m.has_replicas());
  EXPECT_EQ(as_vector(m.replicas(0)), (std::vector<int32_t>{0, 1, 2}));
  EXPECT_EQ(as_vector(m.replicas(5)), (std::vector<int32_t>{1, 2}));
  EXPECT_EQ(as_vector(m.replicas(6)), (std::vector<int32_t>{1}));
  EXPECT_EQ(m.str(), "replicated(E=8, ranks=3, replicas=4)");
  // Token t goes to replicas[t mod n], a negative key included.
  EXPECT_EQ(m.serving_rank(0, 4), 1);
  EXPECT_EQ(m.serving_rank(0, -1), 2);
  EXPECT_EQ(m.local_id(2, 0, 5), 1);   // rank 2 slot 1 holds expert 0, and 5 mod 3 == 2
  EXPECT_EQ(m.local_id(1, 0, 5), -1);  // held by rank 1, but rank 2 serves this token
  std::vector<int> served(3, 0);
  for (int64_t t = 0; t < 300; ++t) ++served[m.serving_rank(0, t)];
  EXPECT_EQ(served, (std::vector<int>{100, 100, 100}));
}

TEST(ExpertMapInvariants, ExactlyOneRankServesEachExpertForEachToken) {
  for (const NamedMap& kind : all_kinds()) {
    const ExpertMap m = kind.make();
    for (int64_t key : token_keys()) {
      for (int32_t e = 0; e < m.num_experts(); ++e) {
        int serving = 0;
        for (int r = 0; r < m.num_ranks(); ++r) {
          const int32_t slot = m.local_id(r, e, key);
          if (slot < 0) continue;
          ++serving;
          EXPECT_EQ(r, m.serving_rank(e, key)) << kind.name << " expert " << e << " key " << key;
          ASSERT_LT(slot, m.num_local(r)) << kind.name;
          EXPECT_EQ(m.local_to_global(r)[slot], e) << kind.name << " rank " << r;
        }
        EXPECT_EQ(serving, 1) << kind.name << " expert " << e << " key " << key;
      }
    }
  }
}

TEST(ExpertMapInvariants, LocalTablesAgreeWithReplicas) {
  for (const NamedMap& kind : all_kinds()) {
    const ExpertMap m = kind.make();
    int64_t slots = 0;
    for (int r = 0; r < m.num_ranks(); ++r) {
      const auto experts = m.local_to_global(r);
      EXPECT_EQ(static_cast<int>(experts.size()), m.num_local(r));
      slots += m.num_local(r);
      for (int j = 0; j < m.num_local(r); ++j) {
        const auto ranks = m.replicas(experts[j]);
        EXPECT_TRUE(std::find(ranks.begin(), ranks.end(), r) != ranks.end()) << kind.name;
        // The slot is returned for exactly the tokens this rank serves.
        for (int64_t key : token_keys())
          EXPECT_EQ(m.local_id(r, experts[j], key), m.serving_rank(experts[j], key) == r ? j : -1)
              << kind.name << " rank " << r << " slot " << j << " key " << key;
      }
    }
    int64_t replica_count = 0;
    for (int32_t e = 0; e < m.num_experts(); ++e) {
      const auto ranks = m.replicas(e);
      EXPECT_TRUE(std::is_sorted(ranks.begin(), ranks.end())) << kind.name;
      replica_count += static_cast<int64_t>(ranks.size());
    }
    EXPECT_EQ(replica_count, slots) << kind.name;
    EXPECT_EQ(m.has_replicas(), slots > m.num_experts()) << kind.name;
  }
}

TEST(ExpertMapFingerprint, EqualPlacementsMatchAndDifferentOnesDiffer) {
  const ExpertMap linear = ExpertMap::linear(8, 2);
  EXPECT_EQ(linear.fingerprint(), ExpertMap::linear(8, 2).fingerprint());
  // Same placement written as a table: same fingerprint (it hashes the tables, not the kind).
  EXPECT_EQ(linear.fingerprint(), ExpertMap::table(8, {{0, 1, 2, 3}, {4, 5, 6, 7}}).fingerprint());

  const std::vector<ExpertMap> different = {
      ExpertMap::round_robin(8, 2),
      ExpertMap::linear(8, 4),
      ExpertMap::linear(16, 2),
      ExpertMap::table(8, {{1, 0, 2, 3}, {4, 5, 6, 7}}),      // two slots swapped
      ExpertMap::table(8, {{4, 5, 6, 7}, {0, 1, 2, 3}}),      // ranks swapped
      ExpertMap::table(8, {{0, 1, 2}, {3, 4, 5, 6, 7}}),      // one expert moved
      ExpertMap::table(8, {{0, 1, 2, 3}, {4, 5, 6, 7}, {}}),  // an extra empty rank
      ExpertMap::replicated(8, {{0, 1, 2, 3}, {4, 5, 6, 7, 0}}),
  };
  for (size_t i = 0; i < different.size(); ++i) {
    EXPECT_NE(linear.fingerprint(), different[i].fingerprint()) << different[i].str();
    for (size_t j = i + 1; j < different.size(); ++j)
      EXPECT_NE(different[i].fingerprint(), different[j].fingerprint())
          << different[i].str() << " vs " << different[j].str();
  }
}

struct BadMap {
  std::string what;
  std::function<void()> call;
  std::string message;  // expected substring
};

TEST(ExpertMapErrors, EveryBadPlacementThrowsWithAReason) {
  const std::vector<BadMap> cases = {
      {"linear indivisible", [] { ExpertMap::linear(10, 4); },
       "num_experts 10 is not divisible by num_ranks 4"},
      {"round_robin indivisible", [] { ExpertMap::round_robin(6, 4); }, "not divisible"},
      {"linear 0 ranks", [] { ExpertMap::linear(8, 0); }, "at least one rank"},
      {"round_robin negative ranks", [] { ExpertMap::round_robin(8, -2); }, "at least one rank"},
      {"linear 0 experts", [] { ExpertMap::linear(0, 2); }, "num_experts must be >= 1"},
      {"table 0 ranks", [] { ExpertMap::table(4, {}); }, "ExpertMap::table: needs at least one"},
      {"table 0 experts", [] { ExpertMap::table(0, {{}}); }, "num_experts must be >= 1"},
      {"table id too large",
       [] {
         ExpertMap::table(4, {{0, 1}, {2, 4}});
       },
       "rank 1 slot 1 holds expert 4, outside [0, 4)"},
      {"table negative id",
       [] {
         ExpertMap::table(4, {{0, -1}, {2, 3}});
       },
       "holds expert -1"},
      {"table expert on two ranks",
       [] {
         ExpertMap::table(4, {{0, 1}, {2, 3, 1}});
       },
       "expert 1 is held by ranks 0 and 1; use ExpertMap::replicated"},
      {"table expert twice on a rank",
       [] {
         ExpertMap::table(4, {{0, 1, 0}, {2, 3}});
       },
       "rank 0 holds expert 0 twice (slots 0 and 2)"},
      {"table expert missing",
       [] {
         ExpertMap::table(4, {{0, 1}, {3}});
       },
       "expert 2 is held by no rank"},
      {"replicated 0 ranks", [] { ExpertMap::replicated(4, {}); }, "ExpertMap::replicated"},
      {"replicated expert missing",
       [] {
         ExpertMap::replicated(4, {{0, 1}, {1, 3}});
       },
       "expert 2 is held by no rank"},
      {"replicated twice on a rank",
       [] {
         ExpertMap::replicated(3, {{0, 1, 2}, {2, 1, 2}});
       },
       "rank 1 holds expert 2 twice (slots 0 and 2)"},
      {"replicated id out of range",
       [] {
         ExpertMap::replicated(3, {{0, 1, 2, 3}});
       },
       "outside [0, 3)"},
      {"local_id rank", [] { ExpertMap::linear(4, 2).local_id(2, 0, 0); }, "rank 2 outside [0, 2)"},
      {"local_id expert", [] { ExpertMap::linear(4, 2).local_id(0, 4, 0); },
       "expert 4 outside [0, 4)"},
      {"local_id negative expert", [] { ExpertMap::linear(4, 2).local_id(0, -1, 0); },
       "expert -1 outside"},
      {"num_local rank", [] { ExpertMap::linear(4, 2).num_local(-1); }, "rank -1 outside"},
      {"local_to_global rank", [] { ExpertMap::linear(4, 2).local_to_global(5); },
       "rank 5 outside [0, 2) of linear(E=4, ranks=2)"},
      {"replicas expert", [] { ExpertMap::linear(4, 2).replicas(4); }, "expert 4 outside"},
      {"serving_rank expert", [] { ExpertMap::linear(4, 2).serving_rank(7, 0); }, "expert 7"},
  };
  for (const BadMap& bad : cases) {
    try {
      bad.call();
      ADD_FAILURE() << bad.what << ": expected a throw";
    } catch (const Error& e) {
      EXPECT_NE(e.message().find(bad.message), std::string::npos)
          << bad.what << ": message '" << e.message() << "' lacks '" << bad.message << "'";
    }
  }
}

}  // namespace
}  // namespace moekit
