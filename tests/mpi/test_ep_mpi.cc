// Expert parallelism across real MPI ranks (run by CTest under mpiexec with 2 and 4 ranks):
// every EP PrepareFinalize x experts x placement x routing must equal the single-rank layer,
// bit for bit where the arithmetic is the same, and the oracle within the dtype bound.
#include <gtest/gtest.h>

#include <numeric>

#include "moekit/cpu.h"
#include "moekit/dist/ep.h"
#include "support/test_support.h"

namespace moekit::test {
namespace {

std::shared_ptr<Communicator> g_comm;

enum class EpKind { kNaive, kAllToAll, kLowLatency };
constexpr std::string_view kEpNames[] = {"naive", "all_to_all", "low_latency"};

// How the batch is spread over the ranks.
enum class Split { kUneven, kOneRankExperts };

struct EpCase {
  EpKind kind;
  check::Placement placement;
  std::string experts;
  RoutingMethod routing;
  Split split;
};

std::string case_name(const ::testing::TestParamInfo<EpCase>& info) {
  const EpCase& c = info.param;
  return test_name(std::string(kEpNames[static_cast<int>(c.kind)]) + "_" +
                   std::string(check::name(c.placement)) + "_" + c.experts + "_" +
                   std::string(name(c.routing)) +
                   (c.split == Split::kUneven ? "_uneven" : "_one_rank_experts"));
}

// Rows of rank r: uneven counts (rank r gets 3 + 9 r of every 3R + 9R(R-1)/2 rows; the last
// rank gets none when there are 3+ ranks).
std::vector<int64_t> split_rows(int64_t total, int R) {
  std::vector<int64_t> weight(R);
  for (int r = 0; r < R; ++r) weight[r] = (R >= 3 && r == R - 1) ? 0 : 3 + 9 * r;
  const int64_t sum = std::accumulate(weight.begin(), weight.end(), int64_t{0});
  std::vector<int64_t> rows(R);
  int64_t given = 0;
  for (int r = 0; r < R; ++r) given += rows[r] = total * weight[r] / sum;
  rows[0] += total - given;
  return rows;
}

class EpMpi : public ::testing::TestWithParam<EpCase> {};

TEST_P(EpMpi, EqualsSingleRankAndOracle) {
  const EpCase& c = GetParam();
  Communicator& comm = *g_comm;
  const int R = comm.size(), me = comm.rank();
  if (!check::placement_applies(c.placement, 8, R)) GTEST_SKIP() << "placement n/a";
  LayerSpec spec;
  spec.num_experts = 8;
  spec.hidden = 67;
  spec.intermediate = 45;
  spec.top_k = 2;
  spec.tokens = 41;
  spec.routing = c.routing;
  spec.padding_period = 7;
  TestLayer layer(spec);
  const ExpertMap map = check::make_placement(c.placement, 8, R, 11);
  const int k = layer.routing.config.top_k;

  if (c.split == Split::kOneRankExperts) {  // every slot picks an expert rank 0 holds
    const auto mine = map.local_to_global(0);
    if (static_cast<int>(mine.size()) < k) GTEST_SKIP() << "rank 0 holds fewer than k experts";
    for (int64_t t = 0; t < spec.tokens; ++t)
      for (int s = 0; s < k; ++s)
        layer.routing.topk_ids.data<int32_t>()[t * k + s] = mine[(t + s) % mine.size()];
  }
  const std::vector<int64_t> rows = split_rows(spec.tokens, R);
  const int64_t begin = std::accumulate(rows.begin(), rows.begin() + me, int64_t{0});
  const int64_t M = rows[me];

  // Single-rank layer on the whole batch (every rank computes it).
  const check::ExpertsEntry& entry = experts_entry(c.experts);
  auto single = layer.kernel(entry, 16);
  const Tensor y_single = layer.forward(*single);
  const Tensor ref = layer.reference();

  // This rank's kernel.
  std::shared_ptr<Experts> experts = entry.make(
      ExpertWeights::local_view(layer.weights.view(), map, me), spec.activation, 1);
  std::shared_ptr<PrepareFinalize> pf;
  int64_t chunk = 16;
  switch (c.kind) {
    case EpKind::kNaive: pf = make_naive_prepare_finalize(g_comm, map); break;
    case EpKind::kAllToAll: pf = make_all_to_all_prepare_finalize(g_comm, map); break;
    case EpKind::kLowLatency:
      chunk = *std::max_element(rows.begin(), rows.end());
      pf = make_low_latency_prepare_finalize(g_comm, map, chunk);
      experts = make_batched_experts(experts);
      break;
  }
  ModularKernel kernel(pf, experts, make_cpu_weight_and_reduce(1),
                       {k, spec.dtype, std::max<int64_t>(chunk, 1)});
  const TensorView x = layer.x.view().slice0(begin, begin + M);
  const TensorView ids = layer.routing.topk_ids.view().slice0(begin, begin + M);
  const TensorView w = layer.routing.topk_weights.view().slice0(begin, begin + M);
  const Tensor y = forward(kernel, x, ids, w, layer.routing.weight_on_input, begin);

  const TensorView want = y_single.view().slice0(begin, begin + M);
  // Same per-(token, slot) arithmetic and slot-order reduction: bit-exact unless the naive
  // path sums per-rank partials, or the experts' rows depend on the rest of the batch.
  if (entry.batch_invariant && c.kind != EpKind::kNaive)
    EXPECT_TRUE(bits_equal(y, want)) << "rank " << me;
  else
    EXPECT_TRUE(rows_match(y, want, layer.bound(R))) << "rank " << me;
  EXPECT_TRUE(rows_match(y, ref.view().slice0(begin, begin + M), layer.bound(R))) << "rank " << me;
}

std::vector<EpCase> all_cases() {
  std::vector<EpCase> cases;
  for (EpKind kind : {EpKind::kNaive, EpKind::kAllToAll, EpKind::kLowLatency})
    for (check::Placement p : {check::Placement::kLinear, check::Placement::kRoundRobin,
                               check::Placement::kShuffledTable, check::Placement::kReplicated})
      for (const std::string& experts :
           {std::string("reference"), "cpu-" + std::string(name(detect_cpu_isa()))})
        for (RoutingMethod r : {RoutingMethod::kSoftmaxTopK, RoutingMethod::kSigmoidGroupedTopK,
                                RoutingMethod::kLlama4Top1Sigmoid})
          for (Split s : {Split::kUneven, Split::kOneRankExperts}) cases.push_back({kind, p, experts, r, s});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(AllCompositions, EpMpi, ::testing::ValuesIn(all_cases()), case_name);

TEST(EpMpi, AgreementCheckRefusesADifferentLayer) {
  // Rank 1 builds H = 68 while the others build 67: every rank must refuse at construction.
  Communicator& comm = *g_comm;
  const int64_t H = comm.rank() == 1 ? 68 : 67;
  const check::LayerWeights wts =
      check::make_random_weights(8, H, 45, Activation{}, DType::kBF16, false, 5);
  const ExpertMap map = ExpertMap::linear(8, comm.size());
  auto experts = make_cpu_experts(ExpertWeights::local_view(wts.view(), map, comm.rank()),
                                  Activation{}, {1});
  EXPECT_TRUE(error_mentions(
      [&] {
        ModularKernel k(make_all_to_all_prepare_finalize(g_comm, map), experts,
                        make_cpu_weight_and_reduce(1), {2, DType::kBF16, 16});
      },
      "rank 1 differs from rank 0 in H"));
}

TEST(EpMpi, LowLatencyRefusesMoreTokensThanItsSlabs) {
  const check::LayerWeights wts =
      check::make_random_weights(8, 16, 8, Activation{}, DType::kBF16, false, 5);
  const ExpertMap map = ExpertMap::linear(8, g_comm->size());
  auto experts = make_batched_experts(make_cpu_experts(
      ExpertWeights::local_view(wts.view(), map, g_comm->rank()), Activation{}, {1}));
  ModularKernel kernel(make_low_latency_prepare_finalize(g_comm, map, 4), experts,
                       make_cpu_weight_and_reduce(1), {2, DType::kBF16, 4});
  const Tensor x = random_tensor(DType::kBF16, {5, 16}, 1);
  Tensor ids(DType::kI32, {5, 2}), w(DType::kF32, {5, 2});
  for (int i = 0; i < 10; ++i) {
    ids.data<int32_t>()[i] = i % 8;
    w.data<float>()[i] = 0.5f;
  }
  Tensor y = sentinel_tensor(DType::kBF16, {5, 16});
  const Snapshot before(y);
  EXPECT_TRUE(error_mentions([&] { kernel.forward({x, ids, w, y}); }, "exceed max_tokens_per_rank"));
  EXPECT_TRUE(before.unchanged());
}

}  // namespace
}  // namespace moekit::test

// gtest under mpiexec: every rank runs every test; only rank 0 prints the full report, the
// others print their failures (prefixed with the rank). The exit code is non-zero on any
// failing rank, which mpiexec passes on.
class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (r.failed())
      std::fprintf(stderr, "[rank %d] %s:%d: %s\n", rank_, r.file_name() ? r.file_name() : "?",
                   r.line_number(), r.message());
  }

 private:
  int rank_;
};

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  moekit::test::g_comm = moekit::make_mpi_communicator();
  moekit::test::g_comm->set_timeout(std::chrono::seconds(120));
  const int rank = moekit::test::g_comm->rank();
  if (rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailurePrinter(rank));
  }
  const int rc = RUN_ALL_TESTS();
  moekit::test::g_comm.reset();
  return rc;
}
