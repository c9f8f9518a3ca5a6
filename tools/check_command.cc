// `moekit check`: the contract suite of DESIGN.md §2 (moekit/check.h) on a preset or a shape.
#include <cmath>
#include <iostream>

#include "commands.h"
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
  std::vector<std::string> dtypes = {"bf16"};
  std::vector<std::string> experts;
  std::vector<std::string> placements;
  std::vector<int> ranks;
  int threads = 0;
};

int64_t shrink(int64_t size) {
  return std::max(kMinScaledSize, size / kShrink) | 1;
}

// How close a result came to its bound (a bit-exact comparison has bound 0).
double closeness(const check::CaseResult& r) {
  return r.bound > 0 ? r.max_err / r.bound : r.max_err > 0 ? INFINITY : 0;
}

// The suite's own defaults, narrowed to the layer the command line names.
check::CheckOptions suite_options(const CheckCommandOptions& o) {
  check::CheckOptions c;
  const ShapeOptions& s = o.shape;
  if (!s.presets.empty() || s.experts || s.hidden || s.intermediate || s.top_k ||
      !s.routing.empty() || !s.activation.empty()) {
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
  c.dtypes.clear();
  for (const std::string& d : o.dtypes) c.dtypes.push_back(parse_dtype(d));  // weight_dtype()
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

int run_check(const CheckCommandOptions& o) {
  const check::CheckOptions options = suite_options(o);
  const std::vector<check::CheckCase> cases = check::enumerate_cases(options);
  std::cout << "contract suite: E=" << options.num_experts << " H=" << options.hidden
            << " I=" << options.intermediate << " k=" << options.top_k << ", " << cases.size()
            << " cases, each over tokens";
  for (int64_t t : options.tokens) std::cout << " " << t;
  std::cout << "\n";
  if (!o.shape.presets.empty())
    std::cout << "note: a preset gives the suite its shape, routing method, activation and "
                 "biases; grouped-routing parameters are the suite's own, and a shared expert is "
                 "not part of it (moekit bench checks whole layers against the oracle)\n";
  size_t passed = 0, failed = 0;
  for (const check::CheckCase& kase : cases) {
    const std::vector<check::CaseResult> results = check::run_case(kase, options);
    // A case passes when every token count does; its line shows the closest call.
    const check::CaseResult* worst = nullptr;
    bool ok = true;
    for (const check::CaseResult& r : results) {
      ok = ok && r.passed;
      if (!worst || closeness(r) > closeness(*worst)) worst = &r;
    }
    (ok ? passed : failed) += 1;
    std::cout << (ok ? "PASS " : "FAIL ") << kase.name();
    if (worst) std::cout << "  (max err " << worst->max_err << " <= " << worst->bound << ")";
    std::cout << "\n";
    for (const check::CaseResult& r : results)
      if (!r.passed) std::cout << "    " << r.str() << "\n";
    std::cout.flush();
  }
  std::cout << passed << " passed, " << failed << " failed\n";
  return failed ? 1 : 0;
}

}  // namespace

Command add_check_command(CLI::App& app) {
  auto o = std::make_shared<CheckCommandOptions>();
  CLI::App* cmd = app.add_subcommand(
      "check",
      "Run the contract suite (DESIGN.md §2): every Experts x PrepareFinalize x placement x "
      "ranks against the fp64 oracle.\nWithout a preset or shape: the suite's own sweep (every "
      "routing method, a small odd shape). Exits non-zero when a case fails.");
  add_shape_options(*cmd, o->shape, /*preset_list=*/false);
  cmd->add_flag("--scale,!--no-scale", o->scale,
                "shrink a preset's H and I by " + std::to_string(kShrink) +
                    " to odd sizes (default on; explicit -H/-I are kept)");
  cmd->add_option("--tokens", o->tokens, "comma list of token counts (default 1,7,19,99,111)");
  cmd->add_option("--dtype", o->dtypes, "comma list of dtypes: bf16, fp32")
      ->delimiter(',')
      ->check(weight_dtype())
      ->capture_default_str();
  cmd->add_option("--impl", o->experts, "comma list of Experts implementations (default all)")
      ->delimiter(',');
  cmd->add_option("--placement", o->placements,
                  "comma list of linear, round_robin, shuffled, replicated (default all)")
      ->delimiter(',');
  cmd->add_option("--ranks", o->ranks, "comma list of rank counts (default 1,2,4)")
      ->delimiter(',')
      ->check(positive());
  cmd->add_option("--threads", o->threads, "threads (0: every hardware thread)")
      ->check(non_negative());
  return {cmd, [o] { return run_check(*o); }};
}

}  // namespace moekit::cli
