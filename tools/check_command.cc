// `moekit check`: the contract suite of DESIGN.md §2 (moekit/check.h) on a preset or a shape;
// with --ep, across the ranks of an MPI job.
#include <cmath>
#include <iostream>
#include <optional>

#include "commands.h"
#include "ep_job.h"
#include "layer_spec.h"
#include "moekit/check.h"
#include "option_checks.h"

namespace moekit::cli {
namespace {

// Presets are shrunk by this factor in H and I (E, k, routing and activation kept), so a check
// of a large model takes seconds; odd sizes then exercise every SIMD tail.
constexpr int64_t kShrink = 32;
constexpr int64_t kMinScaledSize = 17;

struct CheckCommandOptions {
  ShapeOptions shape;
  bool scale = true;
  std::string tokens;
  std::vector<std::string> formats = {"bf16"};
  std::string device = "all";
  std::vector<std::string> experts;
  std::vector<std::string> placements;
  std::vector<int> ranks;
  int threads = 0;
  int ep = 0;
};

int64_t shrink(int64_t size) {
  return std::max(kMinScaledSize, size / kShrink) | 1;
}

// How the suite words a refusal of the shape (CaseResult::detail).
constexpr std::string_view kShapeRefusal = "the experts refuse the shape";

// Where the suite picks every device's entries: which run, and why CUDA's do not.
std::string cuda_note() {
  const auto why = check::device_unavailable(DeviceType::kCUDA);
  return why ? " (CPU entries only: " + *why + ")" : " (CPU and CUDA entries)";
}

// How close a result came to its bound (a bit-exact comparison has bound 0).
double closeness(const check::CaseResult& r) {
  return r.bound > 0 ? r.max_err / r.bound : r.max_err > 0 ? INFINITY : 0;
}

// The suite's own defaults, narrowed to the layer the command line names.
check::CheckOptions suite_options(const CheckCommandOptions& o) {
  check::CheckOptions c;
  ShapeOptions s = o.shape;
  if (!s.presets.empty() || s.experts || s.hidden || s.intermediate || s.top_k ||
      !s.routing.empty() || !s.activation.empty()) {
    // Without a preset, the sizes not given are the suite's own (-H 96 -I 48: E = 8, k = 2).
    if (s.presets.empty()) {
      if (!s.experts) s.experts = c.num_experts;
      if (!s.hidden) s.hidden = c.hidden;
      if (!s.intermediate) s.intermediate = c.intermediate;
      if (!s.top_k) s.top_k = c.top_k;
    }
    const LayerSpec spec = resolve_layer_specs(s).front();
    c.num_experts = spec.num_experts;
    c.top_k = spec.top_k;
    // Explicit -H/-I are taken as given; only sizes that come from a preset are shrunk.
    c.hidden = o.scale && !s.hidden ? shrink(spec.hidden) : spec.hidden;
    c.intermediate = o.scale && !s.intermediate ? shrink(spec.intermediate) : spec.intermediate;
    c.routing = {spec.router.method};
    c.activations = {spec.activation};
    c.biases = {spec.has_bias};
  }
  if (!o.tokens.empty()) c.tokens = parse_token_list(o.tokens, "--tokens");
  // Float formats go to the dtype axis (x, y and weights in that dtype), the others to formats.
  c.dtypes.clear();
  for (const std::string& f : o.formats) {
    const QuantScheme q = parse_option("--format", [&] { return QuantScheme::parse(f); });
    if (q.is_float())
      c.dtypes.push_back(q.weight_dtype());
    else
      c.formats.push_back(q);
  }
  if (o.device != "all") {
    c.device = o.device == "cuda" ? DeviceType::kCUDA : DeviceType::kCPU;
    if (auto why = check::device_unavailable(*c.device))
      throw CLI::ValidationError("--device", o.device + ": " + *why);
  }
  if (!o.experts.empty()) c.experts = o.experts;
  if (!o.placements.empty()) {
    c.placements.clear();
    for (const std::string& p : o.placements)
      c.placements.push_back(
          parse_option("--placement", [&] { return check::parse_placement(p); }));
  }
  if (!o.ranks.empty()) c.ranks = o.ranks;
  c.threads = o.threads;
  return c;
}

// A case's verdict over the ranks that ran it (trivially copyable: the ranks gather theirs).
struct CaseOutcome {
  int passed = 0, failed = 0, not_applicable = 0;  // ranks
  double max_err = 0, bound = 0, closeness = -1;   // of the closest call

  void add(const CaseOutcome& o) {
    passed += o.passed;
    failed += o.failed;
    not_applicable += o.not_applicable;
    if (o.closeness > closeness) max_err = o.max_err, bound = o.bound, closeness = o.closeness;
  }
};

// A case passes on a rank when every token count does; its line shows the closest call.
CaseOutcome outcome(const std::vector<check::CaseResult>& results) {
  CaseOutcome c;
  bool ok = true, applies = true;
  for (const check::CaseResult& r : results) {
    ok = ok && r.passed;
    applies = applies && !r.not_applicable;
    if (&r == &results.front() || closeness(r) > c.closeness)
      c.max_err = r.max_err, c.bound = r.bound, c.closeness = closeness(r);
  }
  (!ok ? c.failed : applies ? c.passed : c.not_applicable) = 1;
  return c;
}

int run_check(const CheckCommandOptions& o) {
  check::CheckOptions options = suite_options(o);
  std::optional<EpJob> job;
  if (o.ep) {
    job = join_ep_job(o.ep, "check");
    options.communicator = job->world;
    options.threads = job->threads(o.threads);
  }
  const bool leader = !job || job->leader();
  const std::vector<check::CheckCase> cases = check::enumerate_cases(options);
  if (leader) {
    std::cout << "contract suite: E=" << options.num_experts << " H=" << options.hidden
              << " I=" << options.intermediate << " k=" << options.top_k << ", " << cases.size()
              << " cases";
    if (job)
      std::cout << " of the distributed prepare/finalize over " << job->size()
                << " MPI ranks, each checking its own tokens";
    std::cout << ", each over tokens";
    for (int64_t t : options.tokens) std::cout << " " << t;
    const bool every_device = !options.device && !job && options.experts.empty();
    std::cout << (every_device ? cuda_note() : "") << "\n";
    if (!o.shape.presets.empty())
      std::cout << "note: a preset gives the suite its shape, routing method, activation and "
                   "biases; grouped-routing parameters are the suite's own, and a shared expert "
                   "is not part of it (moekit bench checks whole layers against the oracle)\n";
  }
  // Rank results: with --ep each case counts once per rank.
  CaseOutcome total;
  bool shape_refused = false;
  for (const check::CheckCase& kase : cases) {
    const std::vector<check::CaseResult> results = check::run_case(kase, options);
    CaseOutcome all;
    if (job)
      for (const CaseOutcome& rank : job->world->all_gather(outcome(results))) all.add(rank);
    else
      all = outcome(results);
    total.add(all);
    shape_refused = shape_refused || (!results.empty() && results.front().not_applicable &&
                                      results.front().detail.find(kShapeRefusal) == 0);
    if (leader) {
      std::cout << (all.failed ? "FAIL " : all.not_applicable ? "N/A  " : "PASS ") << kase.name();
      if (all.not_applicable && !results.empty())
        std::cout << "  (" << results.front().detail << ")";
      else if (!results.empty())
        std::cout << "  (max err " << all.max_err << " <= " << all.bound << ")";
      if (job && all.failed) std::cout << " on " << all.failed << " of " << job->size() << " ranks";
      std::cout << "\n";
    }
    // Every rank prints its own failures.
    const std::string prefix = job ? "[rank " + std::to_string(job->rank()) + "] " : "    ";
    for (const check::CaseResult& r : results)
      if (!r.passed) std::cout << prefix << r.str() << "\n";
    std::cout.flush();
  }
  if (leader) {
    std::cout << total.passed << " passed, " << total.failed << " failed";
    if (total.not_applicable)
      std::cout << ", " << total.not_applicable
                << " not applicable (the experts refuse the format or the shape, or their "
                   "activation format does not meet the prepare/finalize's)";
    if (job) std::cout << " (each case counted on each of the " << job->size() << " ranks)";
    std::cout << "\n";
    if (shape_refused)
      std::cout << "note: experts refused the shape H=" << options.hidden
                << " I=" << options.intermediate
                << "; give -H and -I multiples of what they need (the CUDA experts: 8 for "
                   "16-bit formats, 16 for fp8, e.g. -H 96 -I 48)\n";
  }
  return total.failed ? 1 : 0;
}

}  // namespace

Command add_check_command(CLI::App& app) {
  auto o = std::make_shared<CheckCommandOptions>();
  CLI::App* cmd = app.add_subcommand(
      "check",
      "Run the contract suite (DESIGN.md §2): every Experts x PrepareFinalize x placement x "
      "ranks against the fp64 oracle.\nWithout a preset or shape: the suite's own sweep (every "
      "routing method, a small odd shape); without a preset, sizes not given are the suite's "
      "(E=8 H=67 I=45 k=2). Exits non-zero when a case fails.");
  add_shape_options(*cmd, o->shape, /*preset_list=*/false);
  cmd->add_flag("--scale,!--no-scale", o->scale,
                "shrink a preset's H and I by " + std::to_string(kShrink) +
                    " to odd sizes (default on; explicit -H/-I are kept)");
  cmd->add_option("--tokens", o->tokens, "comma list of token counts (default 1,7,19,99,111)");
  cmd->add_option("--format", o->formats,
                  "comma list of formats (DESIGN.md section 4): bf16, fp16, fp32, fp8-tensor, "
                  "fp8-token, fp8-block, int8, w4a16, w8a16, w4a8, mxfp4, nvfp4, options after "
                  "colons (w4a16:g32:zp); 4-bit formats need even H and I")
      ->delimiter(',')
      ->capture_default_str();
  CLI::Option* device =
      cmd->add_option("--device", o->device,
                      "cpu, cuda or all: the registry entries of that device (cuda ones exist "
                      "when moekit is built with CUDA and a GPU is present; their experts need H "
                      "and I multiples of 8, 16 for fp8, e.g. -H 96 -I 48)")
          ->check(CLI::IsMember({"cpu", "cuda", "all"}))
          ->capture_default_str();
  cmd->add_option("--impl", o->experts, "comma list of Experts implementations (default all)")
      ->delimiter(',');
  cmd->add_option("--placement", o->placements,
                  "comma list of linear, round_robin, shuffled, replicated (default all)")
      ->delimiter(',');
  CLI::Option* ranks =
      cmd->add_option("--ranks", o->ranks, "comma list of rank counts (default 1,2,4)")
          ->delimiter(',')
          ->check(positive());
  cmd->add_option("--threads", o->threads,
                  "threads (0: every hardware thread; with --ep, per rank: 0 splits this host's "
                  "threads among its ranks)")
      ->check(non_negative());
  add_ep_option(*cmd, o->ep,
                "the distributed prepare/finalize cases run across the ranks, each checking its "
                "own tokens; rank 0 prints the cases and the totals, every rank its failures")
      ->excludes(ranks)
      ->excludes(device);  // the CUDA entries run in one process
  return {cmd, [o] { return run_check(*o); }};
}

}  // namespace moekit::cli
