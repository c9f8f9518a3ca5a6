// check.h, part 2: placements, the registry, and the contract suite's runner.
#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <limits>

#include "moekit/check.h"
#include "moekit/cpu.h"
#include "moekit/dist/ep.h"
#include "moekit/reference.h"
#include "reference/contracts_device.h"

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
  if (auto why = why_entry_absent(name)) MOEKIT_FAIL("check: ", what, " '", name, "': ", *why);
  MOEKIT_FAIL("check: unknown ", what, " '", name, "' (registered: ", known, ")");
}

// The names of the entries of `device` (every device's when nullopt) that `wanted` names (all
// when empty).
template <typename Entry>
std::vector<std::string> selected(const std::vector<Entry>& entries,
                                  const std::vector<std::string>& wanted,
                                  std::optional<DeviceType> device, const char* what) {
  std::vector<std::string> names;
  for (const Entry& e : entries)
    if (!device || e.device == *device) names.push_back(e.name);
  if (wanted.empty()) return names;
  for (const std::string& w : wanted) {
    const DeviceType d = find_entry(entries, w, what).device;
    MOEKIT_CHECK(!device || d == *device, "check: ", what, " '", w, "' runs on ", device_name(d),
                 ", not on the selected device ", device_name(*device));
  }
  return wanted;
}

template <typename Entry>
std::vector<Entry> on_device(std::vector<Entry> entries, std::optional<DeviceType> device) {
  if (device) std::erase_if(entries, [&](const Entry& e) { return e.device != *device; });
  return entries;
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

std::vector<ExpertsEntry> experts_registry(std::optional<DeviceType> device) {
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
  add_cuda_experts(entries);
  return on_device(std::move(entries), device);
}

std::vector<PrepareFinalizeEntry> prepare_finalize_registry(std::optional<DeviceType> device) {
  using Comm = std::shared_ptr<Communicator>;
  std::vector<PrepareFinalizeEntry> entries = {
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
  add_cuda_prepare_finalize(entries);
  return on_device(std::move(entries), device);
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
                        format.is_float() ? std::string(moekit::name(dtype)) : format.str());
}

std::string CaseResult::str() const {
  if (not_applicable) return detail::concat("N/A ", kase.name(), " M=", tokens, ": ", detail);
  if (!passed) return detail::concat("FAIL ", kase.name(), " M=", tokens, ": ", detail);
  return detail::concat("PASS ", kase.name(), " M=", tokens, ": max err ", max_err, " (bound ",
                        bound, ")");
}

size_t CheckReport::passed() const {
  return std::count_if(results.begin(), results.end(),
                       [](const auto& r) { return r.passed && !r.not_applicable; });
}
size_t CheckReport::failed() const {
  return std::count_if(results.begin(), results.end(), [](const auto& r) { return !r.passed; });
}
size_t CheckReport::not_applicable() const {
  return std::count_if(results.begin(), results.end(),
                       [](const auto& r) { return r.not_applicable; });
}

namespace {
// The registry's experts of every device, and the options' extra ones.
std::vector<ExpertsEntry> all_experts(const CheckOptions& o) {
  std::vector<ExpertsEntry> entries = experts_registry(std::nullopt);
  entries.insert(entries.end(), o.extra_experts.begin(), o.extra_experts.end());
  return entries;
}
}  // namespace

std::vector<CheckCase> enumerate_cases(const CheckOptions& o) {
  if (o.device)
    if (auto why = device_unavailable(*o.device))
      MOEKIT_FAIL("check: device ", device_name(*o.device), ": ", *why);
  const std::vector<ExpertsEntry> experts_entries = all_experts(o);
  const auto experts = selected(experts_entries, o.experts, o.device, "experts");
  const auto registry = prepare_finalize_registry(std::nullopt);
  const auto pfs = selected(registry, o.prepare_finalize, o.device, "prepare/finalize");
  auto device_of = [&](const std::string& e) {
    return find_entry(experts_entries, e, "experts").device;
  };
  // Experts named explicitly must pair with a selected prepare/finalize of their device.
  for (const std::string& e : o.experts) {
    const DeviceType d = device_of(e);
    const bool paired = std::any_of(pfs.begin(), pfs.end(), [&](const std::string& pf) {
      return find_entry(registry, pf, "prepare/finalize").device == d;
    });
    MOEKIT_CHECK(paired, "check: experts '", e, "' run on ", device_name(d),
                 " and no selected prepare/finalize does");
  }
  // In one process, distributed entries run as one rank; under MPI only they run, over all.
  const int world = o.communicator ? o.communicator->size() : 0;
  auto applies = [&](const std::string& e, const std::string& pf, int ranks) {
    const PrepareFinalizeEntry& entry = find_entry(registry, pf, "prepare/finalize");
    if (entry.device != device_of(e)) return false;
    return world ? entry.distributed && ranks == world : !entry.distributed || ranks == 1;
  };
  const std::vector<int> rank_counts = world ? std::vector<int>{world} : o.ranks;
  for (RoutingMethod m : o.routing)
    if (auto r = router_config(m, o.num_experts, o.top_k).validate())
      MOEKIT_FAIL("check: routing ", moekit::name(m), ": ", *r);
  // (format, x and y dtype): the float formats of `dtypes`, then `formats`.
  std::vector<std::pair<QuantScheme, DType>> formats;
  for (DType dtype : o.dtypes) formats.push_back({QuantScheme{float_format(dtype)}, dtype});
  for (const QuantScheme& f : o.formats) {
    if (auto why = f.validate()) MOEKIT_FAIL("check: format ", f.str(), ": ", *why);
    MOEKIT_CHECK(!f.static_act, "check: format ", f.str(),
                 ": a static activation scale reaches experts at their construction, which the "
                 "registry does not carry");
    formats.push_back({f, f.is_float() ? f.weight_dtype() : DType::kBF16});
  }
  std::vector<CheckCase> cases;
  for (const auto& [format, dtype] : formats)
    for (const Activation& act : o.activations)
      for (bool bias : o.biases)
        for (RoutingMethod routing : o.routing)
          for (Placement placement : o.placements)
            for (int ranks : rank_counts) {
              if (!placement_applies(placement, o.num_experts, ranks)) continue;
              for (const std::string& e : experts)
                for (const std::string& pf : pfs)
                  if (applies(e, pf, ranks))
                    cases.push_back({e, pf, placement, ranks, routing, act, bias, dtype, format,
                                     device_of(e)});
            }
  return cases;
}

// ---- running one case -------------------------------------------------------------------

namespace {

// The case's kernels, built once and run for every token count.
struct CaseKernels {
  // Where they run; declared first, so that it outlives the kernels over its weights.
  std::unique_ptr<CaseDevice> device;
  // In process: one per rank of the case's map. Under MPI: this process's rank only.
  std::vector<std::unique_ptr<ModularKernel>> ranks;
  std::unique_ptr<ModularKernel> single;  // local PF over linear(E, 1); null for 1 rank in process
  bool bit_exact = false;                 // the distributed output must equal `single` bit for bit
};

// Keeps the first failure and the row comparison closest to its bound.
class Verdict {
 public:
  explicit Verdict(CaseResult& r) : r_(r) { r_.passed = true; }
  void add(const std::string& what, const Comparison& c) {
    const double ratio = c.bound > 0 ? c.max_err / c.bound
                         : c.ok()    ? 0
                                     : std::numeric_limits<double>::infinity();
    if (ratio > worst_ && !c.systematic) {
      worst_ = ratio;
      r_.max_err = c.max_err;
      r_.bound = c.bound;
    }
    if (!c.ok() && r_.passed) {
      r_.passed = false;
      r_.detail = what + ": " + c.str();
    }
  }
  // A kernel's output against the oracle: within the row bound and, for formats with quantized
  // activations, without a systematic error.
  void add_vs_oracle(const std::string& what, const CheckCase& c, int ranks, const TensorView& got,
                     const TensorView& want, double bound) {
    add(what, compare_rows(got, want, bound));
    if (const auto s = systematic_error_bound(c.format, c.dtype, ranks))
      add(what + " (systematic)", compare_systematic(got, want, *s));
  }

 private:
  CaseResult& r_;
  double worst_ = -1;
};

// Formats with per-tensor activation scales: kernels run all tokens in one round
// (CheckOptions::chunk_tokens) -- a dynamic a1 scale covers the rows of a round, and the
// intermediate's scale the rows of an Experts::apply call (intermediate_spec).
bool one_round(const QuantScheme& format) {
  return ActivationSpec::of(format).scale == ScaleKind::kTensor;
}
bool per_call_intermediate(const QuantScheme& format) {
  return intermediate_spec(format).scale == ScaleKind::kTensor;
}

// Element-wise sum (in double) of [M, H] fp32 tensors.
Tensor sum_of(const std::vector<Tensor>& parts) {
  Tensor s(DType::kF32, {parts.front().size(0), parts.front().size(1)});
  for (int64_t i = 0; i < s.numel(); ++i) {
    double v = 0;
    for (const Tensor& p : parts) v += p.data<float>()[i];
    s.data<float>()[i] = static_cast<float>(v);
  }
  return s;
}
int64_t max_tokens_of(const CheckOptions& o) {
  int64_t m = 1;
  for (int64_t M : o.tokens) m = std::max(m, M);
  return m;
}

// Experts refuse a case they do not compute with a moekit::Error at construction: its shape,
// asking for sizes that are "multiples of N" -- believed only where H or I is not one, so that a
// kernel refusing a shape it claims to take fails -- or else its format (the message says
// "format"). Returns the not-applicable reason, or nullopt where the error is a failure.
std::optional<std::string> refusal(std::string_view message, int64_t H, int64_t I) {
  std::string lower(message);
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
  constexpr std::string_view kMultiples = "multiples of ";
  if (const size_t at = lower.find(kMultiples); at != std::string::npos) {
    int64_t n = 0;
    const char* digits = lower.data() + at + kMultiples.size();
    const auto [end, ec] = std::from_chars(digits, lower.data() + lower.size(), n);
    if (ec != std::errc() || n < 2 || (H % n == 0 && I % n == 0)) return std::nullopt;
    return detail::concat("the experts refuse the shape H=", H, ", I=", I,
                          " (they need multiples of ", n, "): ", message);
  }
  if (lower.find("format") != std::string::npos)
    return "the experts refuse the format: " + std::string(message);
  return std::nullopt;
}

// Fits experts to the activation format of the prepare/finalize they run behind: batched
// experts as they are, standard ones behind a batched prepare/finalize through
// make_batched_experts -- on the host only, where it reads the counts. Returns why the two
// cannot meet (the case is then not applicable), or nullopt.
std::optional<std::string> fit_format(const PrepareFinalize& pf, DeviceType device,
                                      std::shared_ptr<Experts>& ex) {
  const ActivationFormat produced = pf.activation_format(), taken = ex->activation_format();
  if (produced == taken) return std::nullopt;
  const bool adaptable = produced == ActivationFormat::kBatched && device == DeviceType::kCPU;
  if (adaptable) {
    ex = make_batched_experts(ex);
    return std::nullopt;
  }
  return detail::concat(
      "the activation formats do not meet: prepare/finalize '", pf.name(), "' produces ",
      name(produced), " activations, experts '", ex->name(), "' take ", name(taken),
      produced == ActivationFormat::kBatched ? " (make_batched_experts adapts host experts only)"
                                             : "");
}

Tensor run_kernel(const CaseKernels& k, ModularKernel& kernel, const Tensor& x,
                  const Routing& rt, int64_t key_offset) {
  return k.device->forward(kernel, {x.view(), rt.topk_ids.view(), rt.topk_weights.view(), {},
                                    rt.weight_on_input, key_offset});
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
  const Tensor x = make_activations(c.format, c.dtype, M, H, mix_seed(seed, ~uint64_t(M)));
  const bool woi = rt.weight_on_input;
  const int R = c.ranks;
  Verdict verdict(result);

  std::vector<Tensor> share(R), y(R);
  for (int r = 0; r < R; ++r) {
    share[r] = reference(w, c.activation, x, rt, &map, r, o.token_key_offset);
    y[r] = run_kernel(kernels, *kernels.ranks[r], x, rt, o.token_key_offset);
    verdict.add_vs_oracle(detail::concat("rank ", r, " of ", map.str(), " vs the oracle's share"),
                          c, 1, y[r], share[r], error_bound(c.format, c.dtype, 1, woi, H, I));
  }
  if (R == 1) return;  // its share is the whole layer

  const Tensor whole = reference(w, c.activation, x, rt, nullptr, 0, o.token_key_offset);
  // A per-tensor intermediate scale covers each rank's call: the ranks add up to the sum of the
  // oracle's shares, not to the whole layer (whose one call covers every pair).
  const bool per_call = per_call_intermediate(c.format);

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
  const double bound_r = error_bound(c.format, c.dtype, R, woi, H, I),
               bound_1 = error_bound(c.format, c.dtype, 1, woi, H, I);
  if (per_call)
    verdict.add(detail::concat("sum of the ", R, " ranks vs the sum of the oracle's shares"),
                compare_rows(sum, sum_of(share), bound_r, scale));
  else
    verdict.add(detail::concat("sum of the ", R, " ranks vs the whole layer"),
                compare_rows(sum, whole, bound_r, scale));
  const Tensor single = run_kernel(kernels, *kernels.single, x, rt, o.token_key_offset);
  verdict.add_vs_oracle("linear(E, 1) vs the whole layer", c, 1, single, whole, bound_1);
  if (per_call) return;  // the ranks' intermediates are other batches than linear(E, 1)'s
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
// match the single-rank kernel on the whole batch and the oracle (for a per-tensor
// intermediate scale, the sum of the oracle's shares of the ranks, each rank's call covering
// the pairs it serves).
void run_tokens_distributed(const CheckCase& c, const CheckOptions& o, CaseKernels& kernels,
                            const LayerWeights& w, const ExpertMap& map, uint64_t seed,
                            CaseResult& result) {
  const int64_t M = result.tokens, H = o.hidden, I = o.intermediate;
  const RouterConfig rc = router_config(c.routing, o.num_experts, o.top_k);
  const Routing rt = make_random_routing(rc, M, mix_seed(seed, uint64_t(M)), o.padding_period);
  const Tensor x = make_activations(c.format, c.dtype, M, H, mix_seed(seed, ~uint64_t(M)));
  const int me = o.communicator->rank();
  const std::vector<int64_t> rows = split_rows(M, c.ranks);
  int64_t begin = 0;
  for (int r = 0; r < me; ++r) begin += rows[r];
  const int64_t end = begin + rows[me];

  const Tensor y = kernels.device->forward(
      *kernels.ranks[0],
      {x.view().slice0(begin, end), rt.topk_ids.view().slice0(begin, end),
       rt.topk_weights.view().slice0(begin, end), {}, rt.weight_on_input,
       o.token_key_offset + begin});
  const bool per_call = per_call_intermediate(c.format);
  std::vector<Tensor> shares;
  for (int r = 0; per_call && r < c.ranks; ++r)
    shares.push_back(reference(w, c.activation, x, rt, &map, r, o.token_key_offset));
  const Tensor whole = per_call ? sum_of(shares)
                                : reference(w, c.activation, x, rt, nullptr, 0, o.token_key_offset);
  const double bound = error_bound(c.format, c.dtype, c.ranks, rt.weight_on_input, H, I);
  Verdict verdict(result);
  verdict.add_vs_oracle(
      detail::concat("rank ", me, "'s rows [", begin, ", ", end, ") vs the oracle"), c, c.ranks, y,
      whole.view().slice0(begin, end), bound);
  if (per_call) return;  // linear(E, 1)'s intermediate is another batch than the ranks'
  const Tensor single = run_kernel(kernels, *kernels.single, x, rt, o.token_key_offset);
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
  std::string refused;  // why the experts refuse the case
  try {
    const std::vector<ExpertsEntry> entries = all_experts(o);
    const ExpertsEntry& ee = find_entry(entries, c.experts, "experts");
    const std::vector<PrepareFinalizeEntry> registry = prepare_finalize_registry(std::nullopt);
    const PrepareFinalizeEntry& pe = find_entry(registry, c.prepare_finalize, "prepare/finalize");
    MOEKIT_CHECK(pe.device == ee.device, "check: experts '", ee.name, "' run on ",
                 device_name(ee.device), ", prepare/finalize '", pe.name, "' on ",
                 device_name(pe.device));
    // The single-rank kernel's: the first in-process entry of the device whose activation
    // format the experts take ("local", "cuda-local"; "cuda-batched-local" for batched experts).
    std::vector<const PrepareFinalizeEntry*> in_process;
    for (const PrepareFinalizeEntry& e : registry)
      if (!e.distributed && e.device == ee.device) in_process.push_back(&e);
    MOEKIT_CHECK(!in_process.empty(), "check: no in-process prepare/finalize on ",
                 device_name(ee.device));
    const RouterConfig rc = router_config(c.routing, o.num_experts, o.top_k);
    weights = make_random_weights(o.num_experts, o.hidden, o.intermediate, c.activation, c.format,
                                  c.bias, seed);
    map = make_placement(c.placement, o.num_experts, c.ranks, seed);
    exact_split = ee.batch_invariant && rc.top_k == 1 && !per_call_intermediate(c.format);
    kernels.device = make_case_device(ee.device, weights, o.threads);
    auto wr = kernels.device->weight_and_reduce();
    // The most rows one rank passes to forward: what low-latency slabs (and its one round) hold.
    int64_t max_tokens = 1;
    for (int64_t M : o.tokens)
      for (int64_t rows : split_rows(M, c.ranks)) max_tokens = std::max(max_tokens, rows);
    const int64_t chunk = one_round(c.format) ? max_tokens_of(o) : o.chunk_tokens;
    auto comm = o.communicator ? o.communicator : make_single_communicator();
    // The experts of every kernel first: a refusal of the case makes it not applicable (on
    // every rank of an MPI job, agreed before any kernel's collective construction).
    auto make_experts = [&](const ExpertMap& m, int rank) -> std::shared_ptr<Experts> {
      try {
        return ee.make(ExpertWeights::local_view(kernels.device->weights(), m, rank),
                       c.activation, o.threads);
      } catch (const Error& e) {
        const auto why = refusal(e.message(), o.hidden, o.intermediate);
        if (!why) throw;
        refused = *why;
        return nullptr;
      }
    };
    const ExpertMap single_map = ExpertMap::linear(o.num_experts, 1);
    std::vector<int> kernel_ranks;
    for (int r = 0; r < c.ranks; ++r)
      if (!o.communicator || r == o.communicator->rank()) kernel_ranks.push_back(r);
    std::vector<std::shared_ptr<Experts>> experts;
    for (int r : kernel_ranks) experts.push_back(make_experts(*map, r));
    const bool single = o.communicator || c.ranks > 1;
    std::shared_ptr<Experts> single_experts = single ? make_experts(single_map, 0) : nullptr;
    // Each kernel's prepare/finalize, with its experts fitted to its activation format; a pair
    // whose formats cannot meet makes the case not applicable. An in-process entry's kernels
    // take every row of a forward (at most max_tokens_of(o)).
    struct Part {
      std::shared_ptr<PrepareFinalize> pf;
      std::shared_ptr<Experts> experts;
      bool one_round_of_max;  // low-latency: one round of at most max_tokens rows
    };
    auto pair = [&](const PrepareFinalizeEntry& entry, const ExpertMap& m, int rank,
                    std::shared_ptr<Experts> ex, std::string& why) -> std::optional<Part> {
      auto pf = entry.make(m, rank, entry.distributed ? comm : nullptr,
                           entry.distributed ? max_tokens : max_tokens_of(o));
      if (auto r = fit_format(*pf, ee.device, ex)) {
        why = *r;
        return std::nullopt;
      }
      const bool batched = pf->activation_format() == ActivationFormat::kBatched;
      return Part{pf, ex, entry.distributed && batched};
    };
    std::vector<Part> parts;
    std::optional<Part> single_part;
    for (size_t i = 0; i < kernel_ranks.size() && refused.empty(); ++i)
      if (auto part = pair(pe, *map, kernel_ranks[i], experts[i], refused))
        parts.push_back(*part);
    if (single && refused.empty()) {
      std::string why, first_why;  // the first entry's reason, when no entry fits
      for (const PrepareFinalizeEntry* entry : in_process) {
        if ((single_part = pair(*entry, single_map, 0, single_experts, why))) break;
        if (first_why.empty()) first_why = why;
      }
      if (!single_part) refused = first_why;
    }
    if (o.communicator) {
      int refused_ranks = 0;
      for (int refusing : o.communicator->all_gather(int(!refused.empty())))
        refused_ranks += refusing;
      if (refused_ranks && refused.empty()) refused = "another rank refused the case";
    }
    if (!refused.empty()) {
      for (CaseResult& r : results) {
        r.passed = r.not_applicable = true;
        r.detail = refused;
      }
      return results;
    }
    auto build = [&](const Part& part) {
      return std::make_unique<ModularKernel>(
          part.pf, part.experts, wr,
          kernels.device->kernel_config(rc.top_k, c.dtype,
                                        part.one_round_of_max ? max_tokens : chunk));
    };
    for (const Part& part : parts) kernels.ranks.push_back(build(part));
    if (single_part) kernels.single = build(*single_part);
    // Naive EP sums per-rank partials; the others reduce every token's slots on its owner.
    kernels.bit_exact = ee.batch_invariant && c.prepare_finalize != "naive" &&
                        !per_call_intermediate(c.format);
  } catch (const std::exception& e) {
    for (CaseResult& r : results) r.detail = std::string("setup threw: ") + e.what();
    return results;
  }
  for (CaseResult& r : results) {
    try {
      if (o.communicator)
        run_tokens_distributed(c, o, kernels, weights, *map, seed, r);
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
