// check.h, part 2: placements, the registry, and the contract suite's runner.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "moekit/check.h"
#include "moekit/cpu.h"
#include "moekit/dist/ep.h"
#include "moekit/reference.h"

namespace moekit::check {
namespace {

struct PlacementName {
  Placement placement;
  std::string_view name;
};
constexpr PlacementName kPlacementNames[] = {
    {Placement::kLinear, "linear"},
    {Placement::kRoundRobin, "round_robin"},
    {Placement::kShuffledTable, "shuffled"},
    {Placement::kReplicated, "replicated"},
};

// Fallback experts switch from the small-batch to the large-batch implementation above this
// many dispatched rows: below the suite's chunk of 64, so both sides run.
constexpr int64_t kFallbackSmallTokens = 16;

template <typename Entry>
const Entry& find_entry(const std::vector<Entry>& entries, std::string_view name,
                        const char* what) {
  std::string known;
  for (const Entry& e : entries) {
    if (e.name == name) return e;
    known += (known.empty() ? "" : ", ") + e.name;
  }
  MOEKIT_FAIL("check: unknown ", what, " '", name, "' (registered: ", known, ")");
}

// The registry entries that `wanted` names (all when empty).
template <typename Entry>
std::vector<std::string> selected(const std::vector<Entry>& entries,
                                  const std::vector<std::string>& wanted, const char* what) {
  std::vector<std::string> names;
  for (const Entry& e : entries) names.push_back(e.name);
  if (wanted.empty()) return names;
  for (const std::string& w : wanted) find_entry(entries, w, what);
  return wanted;
}

}  // namespace

// ---- placements -------------------------------------------------------------------------

std::string_view name(Placement p) {
  for (const PlacementName& n : kPlacementNames)
    if (n.placement == p) return n.name;
  return "?";
}

Placement parse_placement(std::string_view s) {
  std::string known;
  for (const PlacementName& n : kPlacementNames) {
    if (n.name == s) return n.placement;
    known += (known.empty() ? "" : ", ") + std::string(n.name);
  }
  MOEKIT_FAIL("unknown placement '", s, "' (known: ", known, ")");
}

bool placement_applies(Placement p, int E, int R) {
  if (E < 1 || R < 1) return false;
  switch (p) {
    case Placement::kLinear:
      return E % R == 0;
    case Placement::kRoundRobin:
      return R > 1 && E % R == 0;
    case Placement::kShuffledTable:
      return true;
    case Placement::kReplicated:
      return R > 1 && E % R == 0;
  }
  return false;
}

ExpertMap make_placement(Placement p, int E, int R, uint64_t seed) {
  MOEKIT_CHECK(placement_applies(p, E, R), "make_placement: ", name(p), " does not apply to E=", E,
               " over ", R, " ranks");
  switch (p) {
    case Placement::kLinear:
      return ExpertMap::linear(E, R);
    case Placement::kRoundRobin:
      return ExpertMap::round_robin(E, R);
    case Placement::kShuffledTable: {
      std::vector<int> order(E);
      for (int e = 0; e < E; ++e) order[e] = e;
      for (int i = E - 1; i > 0; --i)  // Fisher-Yates
        std::swap(order[i], order[mix_seed(seed, uint64_t(i)) % uint64_t(i + 1)]);
      // Uneven on purpose: with 3+ ranks the last one holds nothing (its share is all zeros);
      // with 2 ranks the first holds one more than its even share.
      std::vector<int> count(R, E / R);
      for (int r = 0; r < E % R; ++r) ++count[r];
      if (R >= 3) {
        count[0] += count[R - 1];
        count[R - 1] = 0;
      } else if (R == 2 && count[1] > 1) {
        ++count[0];
        --count[1];
      }
      std::vector<std::vector<int>> table(R);
      for (int r = 0, next = 0; r < R; next += count[r++])
        table[r].assign(order.begin() + next, order.begin() + next + count[r]);
      return ExpertMap::table(E, std::move(table));
    }
    case Placement::kReplicated: {
      // Linear, plus the hot expert 0 on every rank and a replica of the successor's first
      // expert: experts with 1, 2 and R holders, served in turn by token key.
      std::vector<std::vector<int>> table(R);
      const int local = E / R;
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < local; ++j) table[r].push_back(r * local + j);
      for (int r = 0; r < R; ++r)
        for (int extra : {0, ((r + 1) % R) * local})
          if (std::find(table[r].begin(), table[r].end(), extra) == table[r].end())
            table[r].push_back(extra);
      return ExpertMap::replicated(E, std::move(table));
    }
  }
  MOEKIT_FAIL("make_placement: unknown placement");
}

// ---- registry ---------------------------------------------------------------------------

std::vector<ExpertsEntry> experts_registry() {
  std::vector<ExpertsEntry> entries;
  entries.push_back({"reference",
                     [](const ExpertWeights& w, const Activation& act, int) {
                       return make_reference_experts(w, act);
                     },
                     true});
  auto cpu = [](CpuIsa isa) {
    return [isa](const ExpertWeights& w, const Activation& act, int threads) {
      return make_cpu_experts(w, act, CpuExpertsConfig{threads, isa});
    };
  };
  CpuIsa best = CpuIsa::kScalar;
  for (CpuIsa isa : {CpuIsa::kScalar, CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAvx512Bf16}) {
    if (!cpu_supports(isa)) continue;
    // Each output element comes from one tile with the same K order whatever the batch: a
    // token's row does not depend on the others (Contract9BatchInvariance checks it).
    entries.push_back({"cpu-" + std::string(name(isa)), cpu(isa), true});
    best = isa;
  }
  entries.push_back({"fallback",
                     [cpu, best](const ExpertWeights& w, const Activation& act, int threads) {
                       return make_fallback_experts(cpu(best)(w, act, threads),
                                                    cpu(CpuIsa::kScalar)(w, act, threads),
                                                    kFallbackSmallTokens);
                     },
                     false});
  return entries;
}

std::vector<PrepareFinalizeEntry> prepare_finalize_registry() {
  using Comm = std::shared_ptr<Communicator>;
  return {
      {"local",
       [](const ExpertMap& map, int rank, Comm, int64_t) {
         return make_local_prepare_finalize(map, rank);
       }},
      {"naive",
       [](const ExpertMap& map, int, Comm comm, int64_t) {
         return make_naive_prepare_finalize(comm, map);
       },
       true},
      {"all_to_all",
       [](const ExpertMap& map, int, Comm comm, int64_t) {
         return make_all_to_all_prepare_finalize(comm, map);
       },
       true},
      {"low_latency",
       [](const ExpertMap& map, int, Comm comm, int64_t max_tokens) {
         return make_low_latency_prepare_finalize(comm, map, max_tokens);
       },
       true},
  };
}

std::vector<int64_t> split_rows(int64_t total, int ranks) {
  std::vector<int64_t> weight(ranks), rows(ranks);
  int64_t sum = 0, given = 0;
  for (int r = 0; r < ranks; ++r) sum += weight[r] = (ranks >= 3 && r == ranks - 1) ? 0 : 3 + 9 * r;
  for (int r = 0; r < ranks; ++r) given += rows[r] = total * weight[r] / sum;
  rows[0] += total - given;
  return rows;
}

// ---- cases ------------------------------------------------------------------------------

std::string CheckCase::name() const {
  return detail::concat(experts, "/", prepare_finalize, "/", check::name(placement), " x", ranks,
                        "/", moekit::name(routing), "/", activation.str(), bias ? "/bias" : "", "/",
                        moekit::name(dtype));
}

std::string CaseResult::str() const {
  if (!passed) return detail::concat("FAIL ", kase.name(), " M=", tokens, ": ", detail);
  return detail::concat("PASS ", kase.name(), " M=", tokens, ": max err ", max_err, " (bound ",
                        bound, ")");
}

size_t CheckReport::passed() const {
  return std::count_if(results.begin(), results.end(), [](const auto& r) { return r.passed; });
}
size_t CheckReport::failed() const {
  return results.size() - passed();
}

namespace {
std::vector<ExpertsEntry> all_experts(const CheckOptions& o) {
  std::vector<ExpertsEntry> entries = experts_registry();
  entries.insert(entries.end(), o.extra_experts.begin(), o.extra_experts.end());
  return entries;
}
}  // namespace

std::vector<CheckCase> enumerate_cases(const CheckOptions& o) {
  const auto experts = selected(all_experts(o), o.experts, "experts");
  const auto registry = prepare_finalize_registry();
  const auto pfs = selected(registry, o.prepare_finalize, "prepare/finalize");
  // In one process, distributed entries run as one rank; under MPI only they run, over all.
  const int world = o.communicator ? o.communicator->size() : 0;
  auto applies = [&](const std::string& pf, int ranks) {
    const bool distributed = find_entry(registry, pf, "prepare/finalize").distributed;
    return world ? distributed && ranks == world : !distributed || ranks == 1;
  };
  const std::vector<int> rank_counts = world ? std::vector<int>{world} : o.ranks;
  for (RoutingMethod m : o.routing)
    if (auto r = router_config(m, o.num_experts, o.top_k).validate())
      MOEKIT_FAIL("check: routing ", moekit::name(m), ": ", *r);
  std::vector<CheckCase> cases;
  for (DType dtype : o.dtypes)
    for (const Activation& act : o.activations)
      for (bool bias : o.biases)
        for (RoutingMethod routing : o.routing)
          for (Placement placement : o.placements)
            for (int ranks : rank_counts) {
              if (!placement_applies(placement, o.num_experts, ranks)) continue;
              for (const std::string& e : experts)
                for (const std::string& pf : pfs)
                  if (applies(pf, ranks))
                    cases.push_back({e, pf, placement, ranks, routing, act, bias, dtype});
            }
  return cases;
}

// ---- running one case -------------------------------------------------------------------

namespace {

// The case's kernels, built once and run for every token count.
struct CaseKernels {
  // In process: one per rank of the case's map. Under MPI: this process's rank only.
  std::vector<std::unique_ptr<ModularKernel>> ranks;
  std::unique_ptr<ModularKernel> single;  // local PF over linear(E, 1); null for 1 rank in process
  bool bit_exact = false;                 // the distributed output must equal `single` bit for bit
};

// Keeps the first failure and the comparison closest to its bound.
class Verdict {
 public:
  explicit Verdict(CaseResult& r) : r_(r) { r_.passed = true; }
  void add(const std::string& what, const Comparison& c) {
    const double ratio = c.bound > 0 ? c.max_err / c.bound
                         : c.ok()    ? 0
                                     : std::numeric_limits<double>::infinity();
    if (ratio > worst_) {
      worst_ = ratio;
      r_.max_err = c.max_err;
      r_.bound = c.bound;
    }
    if (!c.ok() && r_.passed) {
      r_.passed = false;
      r_.detail = what + ": " + c.str();
    }
  }

 private:
  CaseResult& r_;
  double worst_ = -1;
};

Tensor run_kernel(ModularKernel& kernel, const Tensor& x, const Routing& rt, int64_t key_offset) {
  Tensor y(x.dtype(), {x.size(0), x.size(1)});
  std::memset(y.data<char>(), 0xff, y.view().nbytes());  // NaN: rows left unwritten fail
  kernel.forward({x.view(), rt.topk_ids.view(), rt.topk_weights.view(), y.view(),
                  rt.weight_on_input, key_offset});
  return y;
}

Tensor reference(const LayerWeights& w, const Activation& act, const Tensor& x, const Routing& rt,
                 const ExpertMap* map, int rank, int64_t key_offset) {
  Tensor y(DType::kF32, {x.size(0), x.size(1)});
  ReferenceArgs a{x.view(), rt.topk_ids.view(), rt.topk_weights.view(), w.view(),
                  act,      rt.weight_on_input};
  a.map = map;
  a.rank = rank;
  a.token_key_offset = key_offset;
  reference_moe(a, y);
  return y;
}

void run_tokens(const CheckCase& c, const CheckOptions& o, CaseKernels& kernels,
                const LayerWeights& w, const ExpertMap& map, bool exact_split, uint64_t seed,
                CaseResult& result) {
  const int64_t M = result.tokens, H = o.hidden, I = o.intermediate;
  const RouterConfig rc = router_config(c.routing, o.num_experts, o.top_k);
  const Routing rt = make_random_routing(rc, M, mix_seed(seed, uint64_t(M)), o.padding_period);
  Tensor x(c.dtype, {M, H});
  fill_uniform(x, mix_seed(seed, ~uint64_t(M)), -3.0, 3.0);
  const bool woi = rt.weight_on_input;
  const int R = c.ranks;
  Verdict verdict(result);

  std::vector<Tensor> share(R), y(R);
  for (int r = 0; r < R; ++r) {
    share[r] = reference(w, c.activation, x, rt, &map, r, o.token_key_offset);
    y[r] = run_kernel(*kernels.ranks[r], x, rt, o.token_key_offset);
    verdict.add(detail::concat("rank ", r, " of ", map.str(), " vs the oracle's share"),
                compare_rows(y[r], share[r], error_bound(c.dtype, 1, woi, H, I)));
  }
  if (R == 1) return;  // its share is the whole layer

  const Tensor whole = reference(w, c.activation, x, rt, nullptr, 0, o.token_key_offset);

  // The ranks' outputs summed in double; the row scale is the largest sum of |share| so that
  // each rank's own rounding is measured against what it rounded.
  Tensor sum(DType::kF32, {M, H});
  std::vector<double> scale(M, 0.0);
  for (int64_t t = 0; t < M; ++t)
    for (int64_t i = 0; i < H; ++i) {
      double s = 0, mag = 0;
      for (int r = 0; r < R; ++r) {
        s += load_as_float(y[r].view().data, c.dtype, t * H + i);
        mag += std::abs(share[r].data<float>()[t * H + i]);
      }
      sum.data<float>()[t * H + i] = static_cast<float>(s);
      scale[t] = std::max(scale[t], mag);
    }
  const double bound_r = error_bound(c.dtype, R, woi, H, I),
               bound_1 = error_bound(c.dtype, 1, woi, H, I);
  verdict.add(detail::concat("sum of the ", R, " ranks vs the whole layer"),
              compare_rows(sum, whole, bound_r, scale));
  const Tensor single = run_kernel(*kernels.single, x, rt, o.token_key_offset);
  verdict.add("linear(E, 1) vs the whole layer", compare_rows(single, whole, bound_1));
  // With k = 1 every row comes from one rank, the others add exact zeros: batch-invariant
  // experts must then reproduce the single-rank result bit for bit.
  if (exact_split)
    verdict.add("sum of the ranks vs linear(E, 1) (must be bit-exact)",
                compare_rows(sum, single, 0.0, std::vector<double>(M, 1.0)));
  else
    verdict.add("sum of the ranks vs linear(E, 1)",
                compare_rows(sum, single, bound_r + bound_1, scale));
}

// One MPI rank's share of a distributed case: its rows (split_rows) through the EP kernel must
// match the single-rank kernel on the whole batch and the oracle.
void run_tokens_distributed(const CheckCase& c, const CheckOptions& o, CaseKernels& kernels,
                            const LayerWeights& w, uint64_t seed, CaseResult& result) {
  const int64_t M = result.tokens, H = o.hidden, I = o.intermediate;
  const RouterConfig rc = router_config(c.routing, o.num_experts, o.top_k);
  const Routing rt = make_random_routing(rc, M, mix_seed(seed, uint64_t(M)), o.padding_period);
  Tensor x(c.dtype, {M, H});
  fill_uniform(x, mix_seed(seed, ~uint64_t(M)), -3.0, 3.0);
  const int me = o.communicator->rank();
  const std::vector<int64_t> rows = split_rows(M, c.ranks);
  int64_t begin = 0;
  for (int r = 0; r < me; ++r) begin += rows[r];
  const int64_t end = begin + rows[me];

  Tensor y(x.dtype(), {rows[me], H});
  std::memset(y.data<char>(), 0xff, y.view().nbytes());
  kernels.ranks[0]->forward({x.view().slice0(begin, end), rt.topk_ids.view().slice0(begin, end),
                             rt.topk_weights.view().slice0(begin, end), y.view(),
                             rt.weight_on_input, o.token_key_offset + begin});
  const Tensor single = run_kernel(*kernels.single, x, rt, o.token_key_offset);
  const Tensor whole = reference(w, c.activation, x, rt, nullptr, 0, o.token_key_offset);
  const double bound = error_bound(c.dtype, c.ranks, rt.weight_on_input, H, I);
  Verdict verdict(result);
  verdict.add(detail::concat("rank ", me, "'s rows [", begin, ", ", end, ") vs the oracle"),
              compare_rows(y, whole.view().slice0(begin, end), bound));
  if (kernels.bit_exact)
    verdict.add(detail::concat("rank ", me, " vs linear(E, 1) (must be bit-exact)"),
                compare_bits(y, single.view().slice0(begin, end)));
  else
    verdict.add(detail::concat("rank ", me, " vs linear(E, 1)"),
                compare_rows(y, single.view().slice0(begin, end), 2 * bound));
}

}  // namespace

std::vector<CaseResult> run_case(const CheckCase& c, const CheckOptions& o) {
  std::vector<CaseResult> results;
  for (int64_t M : o.tokens) {
    results.emplace_back();
    results.back().kase = c;
    results.back().tokens = M;
  }
  const uint64_t seed = mix_seed(o.seed, c.name());
  LayerWeights weights;
  std::optional<ExpertMap> map;
  CaseKernels kernels;
  bool exact_split = false;
  try {
    const std::vector<ExpertsEntry> entries = all_experts(o);
    const ExpertsEntry& ee = find_entry(entries, c.experts, "experts");
    const std::vector<PrepareFinalizeEntry> registry = prepare_finalize_registry();
    const PrepareFinalizeEntry& pe = find_entry(registry, c.prepare_finalize, "prepare/finalize");
    const RouterConfig rc = router_config(c.routing, o.num_experts, o.top_k);
    weights = make_random_weights(o.num_experts, o.hidden, o.intermediate, c.activation, c.dtype,
                                  c.bias, seed);
    map = make_placement(c.placement, o.num_experts, c.ranks, seed);
    exact_split = ee.batch_invariant && rc.top_k == 1;
    auto wr = make_cpu_weight_and_reduce(o.threads);
    // The most rows one rank passes to forward: what low-latency slabs (and its one round) hold.
    int64_t max_tokens = 1;
    for (int64_t M : o.tokens)
      for (int64_t rows : split_rows(M, c.ranks)) max_tokens = std::max(max_tokens, rows);
    auto comm = o.communicator ? o.communicator : make_single_communicator();
    auto build = [&](const PrepareFinalizeEntry& entry, const ExpertMap& m, int rank) {
      auto pf = entry.make(m, rank, entry.distributed ? comm : nullptr, max_tokens);
      auto experts =
          ee.make(ExpertWeights::local_view(weights.view(), m, rank), c.activation, o.threads);
      const bool batched = pf->activation_format() == ActivationFormat::kBatched;
      if (batched) experts = make_batched_experts(experts);
      const KernelConfig kc{rc.top_k, c.dtype, batched ? max_tokens : o.chunk_tokens};
      return std::make_unique<ModularKernel>(pf, experts, wr, kc);
    };
    const PrepareFinalizeEntry& local = find_entry(registry, "local", "prepare/finalize");
    if (o.communicator) {
      kernels.ranks.push_back(build(pe, *map, o.communicator->rank()));
      kernels.single = build(local, ExpertMap::linear(o.num_experts, 1), 0);
      // Naive EP sums per-rank partials; the others reduce every token's slots on its owner.
      kernels.bit_exact = ee.batch_invariant && c.prepare_finalize != "naive";
    } else {
      for (int r = 0; r < c.ranks; ++r) kernels.ranks.push_back(build(pe, *map, r));
      if (c.ranks > 1) kernels.single = build(local, ExpertMap::linear(o.num_experts, 1), 0);
    }
  } catch (const std::exception& e) {
    for (CaseResult& r : results) r.detail = std::string("setup threw: ") + e.what();
    return results;
  }
  for (CaseResult& r : results) {
    try {
      if (o.communicator)
        run_tokens_distributed(c, o, kernels, weights, seed, r);
      else
        run_tokens(c, o, kernels, weights, *map, exact_split, seed, r);
    } catch (const std::exception& e) {
      r.passed = false;
      r.detail = std::string("threw: ") + e.what();
    }
  }
  return results;
}

CheckReport run_contract_suite(const CheckOptions& o) {
  CheckReport report;
  const std::vector<CheckCase> cases = enumerate_cases(o);
  const size_t total = cases.size() * o.tokens.size();
  for (const CheckCase& c : cases)
    for (CaseResult& r : run_case(c, o)) {
      report.results.push_back(std::move(r));
      if (o.progress) o.progress(report.results.back(), report.results.size(), total);
    }
  return report;
}

}  // namespace moekit::check
