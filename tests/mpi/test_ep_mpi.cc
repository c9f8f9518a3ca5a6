// Expert parallelism across real MPI ranks (run by CTest under mpiexec with 2 and 4 ranks):
// every EP PrepareFinalize x experts x placement x routing must equal the single-rank layer,
// bit for bit where the arithmetic is the same, and the oracle within the dtype bound.
#include <gtest/gtest.h>

#include "moekit/cpu.h"
#include "moekit/dist/ep.h"
#include "mpi/mpi_gtest.h"
#include "support/test_support.h"

namespace moekit::test {
namespace {

// The contract suite across real ranks: every distributed prepare/finalize x experts x placement
// x routing; each rank checks its own tokens against the oracle and a single-rank kernel.
check::CheckOptions ep_options() {
  check::CheckOptions o;
  o.communicator = g_comm;
  o.experts = {"reference", "cpu-" + std::string(name(detect_cpu_isa()))};
  o.routing = {RoutingMethod::kSoftmaxTopK, RoutingMethod::kSigmoidGroupedTopK,
               RoutingMethod::kLlama4Top1Sigmoid};
  o.tokens = {1, 7, 19, 41, 111};
  o.chunk_tokens = 16;  // several rounds, different per rank
  o.threads = 1;
  return o;
}

class EpContracts : public ::testing::TestWithParam<check::CheckCase> {};

TEST_P(EpContracts, MatchesOracleAndSingleRank) {
  for (const check::CaseResult& r : check::run_case(GetParam(), ep_options()))
    EXPECT_TRUE(r.passed) << "rank " << g_comm->rank() << ": " << r.str();
}

INSTANTIATE_TEST_SUITE_P(
    AllCompositions, EpContracts, ::testing::ValuesIn(check::enumerate_cases(ep_options())),
    [](const ::testing::TestParamInfo<check::CheckCase>& info) {
      return test_name(info.param.name());
    });

// Every slot picks an expert that rank 0 holds: all traffic converges on one rank, the others
// compute nothing. Reference experts and per-slot returns keep it bit-exact with one rank.
TEST(EpMpi, AllTokensToOneRanksExperts) {
  const int R = g_comm->size(), me = g_comm->rank();
  LayerSpec spec;
  spec.tokens = 37;
  spec.padding_period = 5;
  TestLayer layer(spec);
  const ExpertMap map = ExpertMap::round_robin(spec.num_experts, R);
  const auto mine = map.local_to_global(0);
  const int k = layer.routing.config.top_k;
  ASSERT_GE(static_cast<int>(mine.size()), k);
  int32_t* ids = layer.routing.topk_ids.data<int32_t>();
  for (int64_t i = 0; i < spec.tokens * k; ++i)
    if (ids[i] >= 0) ids[i] = mine[(i / k + i % k) % mine.size()];
  const check::ExpertsEntry& entry = experts_entry("reference");
  auto single = layer.kernel(entry, 16);
  const Tensor want = layer.forward(*single);

  const std::vector<int64_t> rows = check::split_rows(spec.tokens, R);
  int64_t begin = 0;
  for (int r = 0; r < me; ++r) begin += rows[r];
  const int64_t end = begin + rows[me], most = *std::max_element(rows.begin(), rows.end());
  for (const auto& pe : check::prepare_finalize_registry()) {
    if (!pe.distributed) continue;
    auto pf = pe.make(map, me, g_comm, most);
    auto experts = entry.make(ExpertWeights::local_view(layer.weights.view(), map, me),
                              spec.activation, 1);
    const bool batched = pf->activation_format() == ActivationFormat::kBatched;
    if (batched) experts = make_batched_experts(experts);
    ModularKernel kernel(pf, experts, make_cpu_weight_and_reduce(1),
                         {k, spec.dtype, batched ? most : 16});
    const Tensor y = forward(kernel, layer.x.view().slice0(begin, end),
                             layer.routing.topk_ids.view().slice0(begin, end),
                             layer.routing.topk_weights.view().slice0(begin, end), false, begin);
    if (pe.name == "naive")  // sums per-rank partials: within the bound, not bit for bit
      EXPECT_TRUE(rows_match(y, want.view().slice0(begin, end), layer.bound(R))) << pe.name;
    else
      EXPECT_TRUE(bits_equal(y, want.view().slice0(begin, end))) << pe.name << " rank " << me;
  }
}

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

namespace moekit::test {
namespace {

TEST(MpiCommunicator, SubCommunicatorOfTheFirstRanks) {
  const int world = g_comm->size(), me = g_comm->rank(), n = std::max(1, world - 1);
  auto sub = make_mpi_communicator(n);
  ASSERT_EQ(sub != nullptr, me < n);
  if (sub) {
    EXPECT_EQ(sub->size(), n);
    EXPECT_EQ(sub->rank(), me);
    const std::vector<int> ranks = sub->all_gather(me * 10);
    for (int r = 0; r < n; ++r) EXPECT_EQ(ranks[r], r * 10);
    EXPECT_EQ(sub->all_reduce_max(me), n - 1);
  }
  g_comm->barrier();
  EXPECT_TRUE(error_mentions([&] { make_mpi_communicator(world + 1); }, "ranks requested"));
}

}  // namespace
}  // namespace moekit::test
