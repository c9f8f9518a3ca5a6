// Contract checks (DESIGN.md section 2) shared by the GoogleTest suite and `moekit check`:
// deterministic test data (float and quantized formats), comparisons that name the first bad
// coordinate, the error bounds of each format, the placements, the registry of PrepareFinalize
// and Experts implementations (CPU, and CUDA where a device is present), and a runner that checks
// every composition against the oracle.
//
//   CheckOptions opts;                      // E, H, I, k, tokens, what to sweep
//   CheckReport report = run_contract_suite(opts);
//   for (const CaseResult& r : report.results) if (!r.passed) print(r.str());
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "moekit/activation.h"
#include "moekit/dist/communicator.h"
#include "moekit/modular.h"
#include "moekit/placement.h"
#include "moekit/quant/quantize.h"
#include "moekit/router.h"

namespace moekit::check {

// ---- deterministic data -----------------------------------------------------------------

// Seeds derived from a base seed and a value or a name, so each case draws its own data.
uint64_t mix_seed(uint64_t seed, uint64_t value);
uint64_t mix_seed(uint64_t seed, std::string_view text);

// Uniform values in [lo, hi), rounded to t's float dtype. Element i (row-major logical index)
// depends only on (seed, i): the same on every platform and whatever t's strides.
void fill_uniform(const TensorView& t, uint64_t seed, double lo, double hi);

// Global weights [E, ...] and the ExpertWeights viewing them.
struct LayerWeights {
  Tensor w13, w2, b13, b2;  // float; b13, b2 empty when the layer has no biases
  // Quantized formats: w13 and w2 quantized (the float tensors above are their source, and the
  // biases stay float).
  std::optional<QuantizedExpertWeights> quantized;
  ExpertWeights view() const;
};
// Scaled so that gates have a standard deviation of about 2.5 for x in [-3, 3) (SwiGLU-OAI's
// clamp at 7 is hit by about 1% of them) and y is of order 1.
LayerWeights make_random_weights(int64_t num_experts, int64_t hidden, int64_t intermediate,
                                 const Activation& act, DType dtype, bool bias, uint64_t seed);
// Weights of `format`: float formats as above (dtype = the format's); quantized ones from fp32
// weights (bf16 biases) whose magnitude changes by powers of two from one scale group to the next
// -- each output row for per-channel scales, each group of K for group scales, each 128 x 128
// block for block scales -- and then quantize_expert_weights: a scale read from the wrong
// group is then off by 2x or 4x, not by the few percent two random groups' amax differ.
LayerWeights make_random_weights(int64_t num_experts, int64_t hidden, int64_t intermediate,
                                 const Activation& act, const QuantScheme& format, bool bias,
                                 uint64_t seed);

// Hidden states x [M, H] in [-3, 3) (dtype; seed as fill_uniform). For formats whose activations
// are quantized, rows and 128-column blocks are further scaled by powers of two (row t, block j:
// by 2^-1, 1 or 2 as (t + j) mod 3) so that a per-token or per-block scale taken from the wrong
// row or group is visibly wrong.
Tensor make_activations(const QuantScheme& format, DType dtype, int64_t tokens, int64_t hidden,
                        uint64_t seed);

// Routing drawn through the real router (route()).
struct Routing {
  RouterConfig config;
  bool weight_on_input = false;  // the layer applies the weight to x (Llama-4)
  Tensor logits;                 // [M, E] fp32
  Tensor correction_bias;        // [E] fp32, kSigmoidGroupedTopK only
  Tensor topk_ids;               // [M, k] int32 global ids, -1 padding
  Tensor topk_weights;           // [M, k] fp32
  TensorView bias_view() const;  // absent when the method uses none
};
// The router configuration the checks use for `method` over E experts (E divisible by 4 for
// grouped top-k: 4 groups, keep 2, scale 2.5); k is forced to 1 for Llama-4.
RouterConfig router_config(RoutingMethod method, int num_experts, int top_k);
// Routes M rows of random logits. padding_period p > 0 makes row t a padding row (all ids -1)
// when t % p == p - 1, and pads the last slot of row t when t % p == p / 2 (k > 1).
Routing make_random_routing(const RouterConfig& config, int64_t tokens, uint64_t seed,
                            int64_t padding_period = 0);

// ---- comparisons ------------------------------------------------------------------------

struct Mismatch {
  int64_t row = 0, col = 0;
  double got = 0, want = 0, scale = 0;
};

struct Comparison {
  double max_err = 0;  // max |got - want| / row scale (0/0 counts 0, x/0 counts +inf)
  double bound = 0;
  std::optional<Mismatch> first_bad;  // row-major first coordinate beyond the bound
  // compare_systematic: max_err is the systematic error, first_bad (when it is beyond the
  // bound) the coordinate of the largest |got - want|.
  bool systematic = false;
  bool ok() const { return !first_bad; }
  std::string str() const;  // "max err 0.0012 <= 0.0156" or the first bad coordinate
};

// got, want: [M, N] float views (any float dtypes, last dim contiguous). A coordinate is bad
// when !(|got - want| <= bound * scale[row]) -- NaN is always bad. row_scale: [M] (empty: the
// max |want| of each row, so a row that should be zero must be exactly zero).
Comparison compare_rows(const TensorView& got, const TensorView& want, double bound,
                        std::span<const double> row_scale = {});
// Same dtype and shape ([M, N], last dim contiguous), equal bit for bit.
Comparison compare_bits(const TensorView& got, const TensorView& want);
// The systematic error of got against want: |sum (got - want) want| / sum want^2 over every
// coordinate, the least-squares slope of the error on want (0 when both are all zero, +inf when
// only want is). Rounding to nearest leaves it near zero however the roundings fall, sparse
// outliers barely move it, and a bias that every coordinate shares -- truncation instead of
// rounding, a scale off by a constant factor -- shows in full. Where want has fewer than
// `min_rows` rows that are not all zero the slope is one outlier's: it is reported, never bad.
Comparison compare_systematic(const TensorView& got, const TensorView& want, double bound,
                              int64_t min_rows = 16);

// ---- error bounds -----------------------------------------------------------------------

// Allowed |y - y_ref| / row scale for a kernel of `format` with x and y in `dtype` whose output
// is the sum of `num_ranks` ranks' outputs; the derivation is next to the definition
// (check_data.cc). Built on FormatTraits::act_unit.
double error_bound(const QuantScheme& format, DType dtype, int num_ranks, bool weight_on_input,
                   int64_t hidden, int64_t intermediate);
// The float format of `dtype` (bf16, fp16, fp32; throws moekit::Error for other dtypes).
double error_bound(DType dtype, int num_ranks, bool weight_on_input, int64_t hidden,
                   int64_t intermediate);
// Allowed compare_systematic error of a kernel of `format` (x and y in `dtype`, the sum of
// `num_ranks` ranks) against the oracle: formats with quantized activations only (their kernels
// and the oracle round the same numbers, so a systematic error beyond y's rounding is a bug);
// nullopt for the others, whose bound on rows covers it.
std::optional<double> systematic_error_bound(const QuantScheme& format, DType dtype,
                                             int num_ranks);

// ---- placements -------------------------------------------------------------------------

enum class Placement { kLinear, kRoundRobin, kShuffledTable, kReplicated };
std::string_view name(Placement p);
Placement parse_placement(std::string_view s);  // "linear", "round_robin", "shuffled", "replicated"
// False for combinations that do not exist (E not divisible by the ranks; replicas on 1 rank;
// round-robin on 1 rank, which is linear).
bool placement_applies(Placement p, int num_experts, int num_ranks);
// Deterministic from seed. kShuffledTable: a shuffled, uneven table (with 3+ ranks the last
// rank holds no expert). kReplicated: linear, plus expert 0 on every rank and each rank a
// replica of its successor's first expert.
ExpertMap make_placement(Placement p, int num_experts, int num_ranks, uint64_t seed);

// ---- registry ---------------------------------------------------------------------------

struct ExpertsEntry {
  std::string name;
  // Builds the Experts of one rank from its local weights, which live on `device`; threads 0:
  // all hardware threads (CPU experts).
  std::function<std::shared_ptr<Experts>(const ExpertWeights&, const Activation&, int threads)>
      make;
  // A token's output does not depend on the other rows of the batch; the checks then demand
  // bit-exact agreement where arithmetic allows (rank split with k = 1, chunking).
  bool batch_invariant = false;
  // Where its weights, inputs and outputs live; a case pairs it with prepare/finalize entries of
  // the same device.
  DeviceType device = DeviceType::kCPU;
};

struct PrepareFinalizeEntry {
  std::string name;
  // Builds rank `rank`'s PrepareFinalize of `map`. In-process entries (distributed false) get no
  // communicator and compute one rank's share; distributed ones move tokens through `comm` (a
  // single-process one when the suite runs in one process) and take at most max_tokens rows per
  // rank and forward.
  std::function<std::shared_ptr<PrepareFinalize>(const ExpertMap& map, int rank,
                                                 std::shared_ptr<Communicator> comm,
                                                 int64_t max_tokens)>
      make;
  bool distributed = false;
  DeviceType device = DeviceType::kCPU;
};

// The entries of `device` (nullopt: of every device). The default is the CPU's, whose entries
// take host tensors, as the tests that build kernels from the registry give them.
// CPU: reference; cpu-<isa> for each ISA family this CPU supports; fallback (the best CPU ISA
// for <= 16 rows, scalar above).
// CUDA, present only when moekit is built with CUDA and a CUDA device is present (else absent,
// and naming one is an error that says why): cuda-small-batch (kNone: the top-k weights applied
// by the CUDA weight-and-reduce), cuda-small-batch-reduced (kWeightedAndReduced),
// cuda-grouped-gemm, and cuda (small-batch up to 8 dispatched rows, grouped GEMM above); of the
// batched format, cuda-batched (make_cuda_batched_experts on its small-batch path for every
// shape of the suite's sizes) and cuda-batched-grouped (on its grouped-GEMM path).
std::vector<ExpertsEntry> experts_registry(std::optional<DeviceType> device = DeviceType::kCPU);
// CPU: local (single process; one rank's share of a multi-rank map); naive, all_to_all and
// low_latency (distributed: over MPI ranks, or one rank in process; low_latency is batched).
// CUDA (as above): cuda-local (standard) and cuda-batched-local (batched, N = the largest
// token count rows per expert), each one rank's share, in process. Batched experts run as they
// are behind a batched prepare/finalize; standard ones are wrapped with make_batched_experts
// there on the CPU, where that adapter runs. Other pairs are not applicable (CaseResult).
std::vector<PrepareFinalizeEntry> prepare_finalize_registry(
    std::optional<DeviceType> device = DeviceType::kCPU);
// Why `device` has no registry entries here ("moekit built without CUDA", "no CUDA device");
// nullopt when it has them (always for the CPU).
std::optional<std::string> device_unavailable(DeviceType device);

// Rows of each of `ranks` ranks when `total` tokens are spread unevenly (rank r weighs 3 + 9 r;
// with 3+ ranks the last one gets none), as the distributed checks spread them.
std::vector<int64_t> split_rows(int64_t total, int ranks);

// ---- the suite --------------------------------------------------------------------------

// One composition: the sweep runs it for every token count of CheckOptions::tokens.
struct CheckCase {
  std::string experts, prepare_finalize;
  Placement placement = Placement::kLinear;
  int ranks = 1;
  RoutingMethod routing = RoutingMethod::kSoftmaxTopK;
  Activation activation;
  bool bias = false;
  DType dtype = DType::kBF16;  // x and y (the float format's dtype, or bf16 for quantized ones)
  QuantScheme format;          // the weights' (and activations') format
  DeviceType device = DeviceType::kCPU;  // where its entries run
  // "cpu-avx2/local/round_robin x2/softmax_topk/silu/bf16" (+ "/bias"); a quantized format ends
  // the name instead of the dtype ("/fp8-block:ue8m0").
  std::string name() const;
};

struct CaseResult {
  CheckCase kase;
  int64_t tokens = 0;
  // True when nothing failed -- also for a case that is not applicable.
  bool passed = false;
  // The experts refused the case when built -- its format (a moekit::Error naming the
  // "format"), or its shape (an error asking for "multiples of N" where H or I is not one) -- or
  // their activation format cannot meet the prepare/finalize's (batched experts behind a
  // standard one; standard CUDA experts behind a batched one): the case did not run, and detail
  // says why ("the experts refuse the format: <error>", "the experts refuse the shape H=67,
  // I=45 (they need multiples of 8): <error>", "the activation formats do not meet: ...").
  // Counted apart from passed and failed cases.
  bool not_applicable = false;
  double max_err = 0, bound = 0;  // of the row comparison closest to its bound
  std::string detail;             // the failing check and its first bad coordinate, or errors
  std::string str() const;        // "PASS ...", "FAIL ...", or "N/A ...: <reason>"
};

struct CheckOptions {
  int num_experts = 8;
  int64_t hidden = 67, intermediate = 45;  // odd: every SIMD tail is exercised
  int top_k = 2;                           // Llama-4 routing always uses 1
  std::vector<int64_t> tokens = {1, 7, 19, 99, 111};
  std::vector<DType> dtypes = {DType::kBF16};  // float formats (x, y and weights in the dtype)
  // Further formats (quant/format.h), quantized ones with x and y in bf16. Formats with the
  // static activation option need their scale at the experts' construction, which the registry
  // does not carry: the suite rejects them.
  std::vector<QuantScheme> formats;
  std::vector<Activation> activations = {Activation{}};
  std::vector<RoutingMethod> routing = {RoutingMethod::kSoftmaxTopK, RoutingMethod::kTopKSoftmax,
                                        RoutingMethod::kSigmoidGroupedTopK,
                                        RoutingMethod::kLlama4Top1Sigmoid};
  std::vector<Placement> placements = {Placement::kLinear, Placement::kRoundRobin,
                                       Placement::kShuffledTable, Placement::kReplicated};
  std::vector<int> ranks = {1, 2, 4};
  std::vector<bool> biases = {false};
  // Run only the registry entries of this device (nullopt: of every device present); a device
  // without entries here (no GPU, or moekit built without CUDA) is an error.
  std::optional<DeviceType> device;
  std::vector<std::string> experts;  // registry names; empty: all (of `device`)
  // Checked alongside the registry (an implementation under development, or a deliberately
  // broken one that the suite must catch); selected by `experts` like the registered ones.
  std::vector<ExpertsEntry> extra_experts;
  std::vector<std::string> prepare_finalize;  // registry names; empty: all
  // Set when every rank of an MPI job runs the suite: the cases then use the distributed
  // prepare/finalize entries over communicator->size() ranks, each process computing its own
  // tokens (split_rows), compared with the oracle and with a single-rank kernel.
  std::shared_ptr<Communicator> communicator;
  int threads = 0;                            // CPU experts and weight-and-reduce; 0: all
  // < max tokens, so chunking is exercised. Formats with per-tensor activation scales run one
  // round of all tokens instead: a dynamic a1 scale covers the rows of one round (of all ranks)
  // and the intermediate's the rows of one Experts::apply call, the oracle's the whole batch
  // (or the pairs of one rank's share).
  int64_t chunk_tokens = 64;
  int64_t token_key_offset = 3;               // replica choice must follow the global row
  int64_t padding_period = 6;                 // see make_random_routing
  uint64_t seed = 0x6d6f656b6974;
  // Called after each (case, tokens) result; done counts results so far, total all of them.
  std::function<void(const CaseResult&, size_t done, size_t total)> progress;
};

struct CheckReport {
  std::vector<CaseResult> results;
  size_t passed() const;  // passed and applicable
  size_t failed() const;
  size_t not_applicable() const;
  bool ok() const { return failed() == 0; }
};

// The cases the options select (the cross product, less combinations that do not apply; experts
// and prepare/finalize entries of the same device only); throws moekit::Error naming an unknown
// registry name, an entry of a device absent here (and why), or an experts entry named in
// `experts` that no selected prepare/finalize entry pairs with.
std::vector<CheckCase> enumerate_cases(const CheckOptions& options);
// Runs one case for every token count, its kernels where its entries' device is (CUDA: the
// weights, x and routing copied to the device, y copied back; the comparisons are the same).
// Never throws: errors become failed results, and experts that refuse the case at construction,
// or whose activation format cannot meet the prepare/finalize's (CaseResult::not_applicable),
// make every result not applicable.
// Per token count it checks, against reference_moe on the same inputs (within error_bound, and
// for formats with quantized activations within systematic_error_bound):
//   each rank's output vs the oracle's share of that rank (rows it does not serve: exact 0);
//   the sum of the ranks vs the whole layer; one rank over linear(E, 1) vs the whole layer;
//   the rank sum vs that single-rank result (bit-exact for batch-invariant experts with k = 1).
// Formats whose intermediate has a per-tensor scale (intermediate_spec: it covers one call's
// rows) compare the sum of the ranks with the sum of the oracle's shares instead, and skip the
// comparisons of the ranks with linear(E, 1), which computes another batch.
std::vector<CaseResult> run_case(const CheckCase& kase, const CheckOptions& options);
CheckReport run_contract_suite(const CheckOptions& options);

}  // namespace moekit::check
