// Expert parallelism across real MPI ranks (run by CTest under mpiexec with 2 and 4 ranks):
// every EP PrepareFinalize x experts x placement x routing x format must equal the single-rank
// layer, bit for bit where the arithmetic is the same, and the oracle within the format's
// bound; quantized activations travel with their typed scales.
#include <gtest/gtest.h>

#include <set>

#include "moekit/cpu.h"
#include "moekit/dist/ep.h"
#include "mpi/mpi_gtest.h"
#include "mpi/quant_dispatch.h"
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

// Quantized formats across ranks: typed scales travel with their rows (per-tensor ones agreed
// over the ranks), bit for bit as on one rank where the suite demands it.
check::CheckOptions ep_format_options() {
  check::CheckOptions o = ep_options();
  o.dtypes = {};
  o.formats = {};
  for (const char* f : {"fp8-tensor", "fp8-token", "fp8-block", "int8", "w8a16:g32:zp"})
    o.formats.push_back(QuantScheme::parse(f));
  o.routing = {RoutingMethod::kSoftmaxTopK, RoutingMethod::kLlama4Top1Sigmoid};
  o.tokens = {7, 41};
  return o;
}

struct EpCase {
  check::CheckCase kase;
  bool formats = false;  // from ep_format_options
};
void PrintTo(const EpCase& c, std::ostream* os) {
  *os << c.kase.name();
}

std::vector<EpCase> ep_cases() {
  std::vector<EpCase> cases;
  for (auto& c : check::enumerate_cases(ep_options())) cases.push_back({std::move(c), false});
  for (auto& c : check::enumerate_cases(ep_format_options())) cases.push_back({std::move(c), true});
  return cases;
}

class EpContracts : public ::testing::TestWithParam<EpCase> {};

// Experts that refuse a format at construction skip the case (on every rank), with the reason.
TEST_P(EpContracts, MatchesOracleAndSingleRank) {
  const check::CheckOptions o = GetParam().formats ? ep_format_options() : ep_options();
  std::string not_applicable;
  for (const check::CaseResult& r : check::run_case(GetParam().kase, o)) {
    if (r.not_applicable) not_applicable = r.detail;
    EXPECT_TRUE(r.passed) << "rank " << g_comm->rank() << ": " << r.str();
  }
  if (!not_applicable.empty()) GTEST_SKIP() << "not applicable: " << not_applicable;
}

INSTANTIATE_TEST_SUITE_P(AllCompositions, EpContracts, ::testing::ValuesIn(ep_cases()),
                         [](const ::testing::TestParamInfo<EpCase>& info) {
                           return test_name(info.param.kase.name());
                         });

// Rows [begin, end) of `total` split over the ranks (check::split_rows), and the most any rank
// passes.
struct RankRows {
  int64_t begin = 0, end = 0, most = 0;
};
RankRows rank_rows(int64_t total) {
  const std::vector<int64_t> rows = check::split_rows(total, g_comm->size());
  RankRows r;
  for (int i = 0; i < g_comm->rank(); ++i) r.begin += rows[i];
  r.end = r.begin + rows[g_comm->rank()];
  r.most = *std::max_element(rows.begin(), rows.end());
  return r;
}

// Contract 4 across ranks: each rank's experts see rows of the whole batch quantized with their
// own scale -- a per-tensor scale the same on every rank: the static one, or the scale of the
// amax of all ranks' rows -- and the ranks compute the oracle (the sum of its shares: a
// per-tensor intermediate scale covers each rank's call).
TEST(EpMpi, ScaledActivationsTravelWithTheirScales) {
  const int R = g_comm->size();
  const ExpertMap map = ExpertMap::linear(8, R);
  for (const char* format : {"fp8-tensor", "fp8-tensor:static", "fp8-token", "fp8-block", "int8"})
    for (bool woi : {false, true}) {
      const QuantLayer layer(format, woi, 37);
      const std::vector<ScaledRow> want = layer.expected();
      std::vector<Tensor> shares;
      for (int r = 0; r < R; ++r) shares.push_back(layer.reference(&map, r));
      const RankRows rows = rank_rows(layer.x.size(0));
      for (const auto& pe : check::prepare_finalize_registry()) {
        if (!pe.distributed) continue;
        SCOPED_TRACE(std::string(format) + (woi ? " (weight on input) " : " ") + pe.name +
                     " rank " + std::to_string(g_comm->rank()));
        const Dispatched d = dispatch(layer, pe.make(map, g_comm->rank(), g_comm, rows.most), map,
                                      g_comm->rank(), rows.begin, rows.end, rows.most);
        EXPECT_TRUE(rows_arrived_with_their_scales(*d.experts, want, layer.spec().scale));
        Tensor sum(DType::kF32, {rows.end - rows.begin, 160});
        for (int64_t t = rows.begin; t < rows.end; ++t)
          for (int64_t c = 0; c < 160; ++c) {
            double v = 0;
            for (const Tensor& s : shares) v += s.data<float>()[t * 160 + c];
            sum.data<float>()[(t - rows.begin) * 160 + c] = static_cast<float>(v);
          }
        EXPECT_TRUE(rows_match(d.y, sum, layer.bound(R)));
      }
    }
}

// CommStats count what a prepare sends other ranks: codes, scale rows and routing, and the
// amax agreement of a dynamic per-tensor scale (a float to each other rank).
TEST(EpMpi, DispatchBytesCountCodesAndScales) {
  const int R = g_comm->size(), me = g_comm->rank();
  const ExpertMap map = ExpertMap::linear(8, R);
  const int64_t H = 160, k = 2;
  for (const char* format : {"fp8-token", "fp8-tensor", "fp8-block:ue8m0", "int8"}) {
    const QuantLayer layer(format, false, 29);
    const ActivationSpec spec = layer.spec();
    // One row: H one-byte codes and its scale row (per-tensor: none).
    const int64_t scale = spec.scale == ScaleKind::kToken   ? 4
                          : spec.scale == ScaleKind::kBlock ? (H + spec.group - 1) / spec.group *
                                                                  storage_bytes(spec.scale_dtype, 1)
                                                            : 0;
    const int64_t row = H + scale;
    const int64_t agree = spec.scale == ScaleKind::kTensor ? 4 * (R - 1) : 0;
    const RankRows rows = rank_rows(layer.x.size(0));
    const int64_t M = rows.end - rows.begin;
    for (const auto& pe : check::prepare_finalize_registry()) {
      if (!pe.distributed) continue;
      auto pf = std::static_pointer_cast<DistributedPrepareFinalize>(
          pe.make(map, me, g_comm, rows.most));
      dispatch(layer, pf, map, me, rows.begin, rows.end, rows.most);
      int64_t want = agree;
      if (pe.name == "naive") want += (R - 1) * M * (row + 8 * k);
      if (pe.name == "low_latency")  // fixed slabs: counts, then max rows per local expert
        for (int d = 0; d < R; ++d)
          if (d != me)
            want += (map.num_local(d) * 4 + 63) / 64 * 64 + map.num_local(d) * rows.most * row;
      if (pe.name == "all_to_all") {  // one record per (token, serving rank)
        const int64_t record = (8 * k + row + 15) / 16 * 16;
        for (int64_t t = rows.begin; t < rows.end; ++t) {
          std::set<int> to;
          for (int64_t s = 0; s < k; ++s)
            if (const int32_t e = layer.routing.topk_ids.data<int32_t>()[t * k + s]; e >= 0)
              to.insert(map.serving_rank(e, (int64_t(me) << 32) + t));
          want += record * int64_t(to.size() - to.count(me));
        }
      }
      EXPECT_EQ(pf->stats().dispatch_bytes_sent, want) << format << " " << pe.name;
    }
  }
}

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
