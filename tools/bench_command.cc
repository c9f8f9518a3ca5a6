// `moekit bench`: times MoELayer::forward_routed on random weights against this machine's
// measured ceilings (DESIGN.md §7).
#include <algorithm>
#include <iomanip>
#include <iostream>
#include <optional>
#include <sstream>

#include "bench_cache.h"
#include "bench_layer.h"
#include "bench_oracle.h"
#include "bench_report.h"
#include "bench_timer.h"
#include "commands.h"
#include "option_checks.h"

namespace moekit::cli {
namespace {

// The sweep of a plain `moekit bench`: under a minute on a 2-core machine, generation included.
constexpr const char* kDefaultPreset = "qwen3-30b-a3b";
// Without --reps, a row takes reps until it has kMinReps and has spent kRowBudgetUs, at most
// kMaxReps: enough for a stable median of a fast row, bounded for a slow one.
constexpr int kMinReps = 3, kMaxReps = 10;
constexpr double kRowBudgetUs = 2e6;

struct BenchOptions {
  ShapeOptions shape;
  std::string tokens = "1,32,512";
  std::string dtype = "bf16";
  int threads = 0;
  std::string isa;
  int reps = 0;  // 0: adaptive, see kRowBudgetUs
  std::string json;
  uint64_t seed = 1;
  int err_tokens = 4;
};

// What every row of one sweep shares.
struct Sweep {
  const BenchOptions& options;
  DType dtype;
  BenchMachine machine;
  CacheFlusher& flusher;
};

struct Timing {
  double median_us, min_us, max_us;
  int reps;
};

Timing time_forward(MoELayer& layer, const TensorView& x, const TensorView& ids,
                    const TensorView& weights, const TensorView& y, CacheFlusher& flusher,
                    int reps) {
  layer.forward_routed(x, ids, weights, y);  // warm-up: first-touch of workspaces, code paths
  std::vector<double> samples;
  const Stopwatch row;
  while (reps ? int(samples.size()) < reps
              : int(samples.size()) < kMinReps ||
                    (samples.size() < kMaxReps && row.elapsed_us() < kRowBudgetUs)) {
    flusher.flush();
    const Stopwatch watch;
    layer.forward_routed(x, ids, weights, y);
    samples.push_back(watch.elapsed_us());
  }
  const auto [lo, hi] = std::minmax_element(samples.begin(), samples.end());
  return {median(samples), *lo, *hi, int(samples.size())};
}

BenchRow run_row(const Sweep& sweep, const LayerSpec& spec, BenchLayer& b, int64_t tokens) {
  const int threads = sweep.machine.threads;
  const BenchInputs in = make_bench_inputs(spec, sweep.dtype, tokens, sweep.options.seed, threads);
  const Tensor ids(DType::kI32, {tokens, int64_t(spec.top_k)});
  const Tensor weights(DType::kF32, {tokens, int64_t(spec.top_k)});
  const Tensor y(sweep.dtype, {tokens, spec.hidden});

  // Routing runs outside the timed region; its own time is reported beside it.
  std::vector<double> routing_samples;
  for (int r = 0; r < 3; ++r) {
    const Stopwatch watch;
    route(spec.router, in.logits, b.correction_bias, ids, weights);
    routing_samples.push_back(watch.elapsed_us());
  }
  const Timing t = time_forward(*b.layer, in.x, ids, weights, y, sweep.flusher, sweep.options.reps);
  const OracleCheck check =
      check_sampled_rows(b, in.x, ids, weights, y, sweep.options.err_tokens, threads);

  BenchRow row;
  row.spec = &spec;
  row.dtype = sweep.dtype;
  row.tokens = tokens;
  row.experts_impl = std::string(b.layer->routed_kernel().experts().name());
  row.cost = row_cost(spec, sweep.dtype, ids, sweep.machine.ceilings);
  row.time_us = t.median_us;
  row.time_min_us = t.min_us;
  row.time_max_us = t.max_us;
  row.reps = t.reps;
  row.routing_us = median(routing_samples);
  row.max_rel_err = check.max_rel_err;
  row.err_tokens_checked = int64_t(check.rows.size());
  return row;
}

std::string gigabytes(int64_t bytes) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(2) << bytes * 1e-9 << " GB";
  return os.str();
}

// Refuses, before any allocation, a layer this machine cannot hold.
void check_memory(const LayerSpec& spec, DType dtype, int64_t max_tokens, int64_t flush_bytes) {
  const int64_t need = bench_peak_bytes(spec, dtype, max_tokens) + flush_bytes;
  const int64_t have = available_memory_bytes();
  if (have == 0 || need <= have) return;
  throw CLI::ValidationError(
      "--preset", spec.preset + " (" + spec.str() + ") in " + std::string(name(dtype)) +
                      " needs about " + gigabytes(need) + " (its weights twice, as generated and " +
                      "prepacked, activations and the cache-flush buffer); " + gigabytes(have) +
                      " are available. Pick a smaller preset, fewer tokens, or shrink it with " +
                      "-E/-H/-I");
}

int run_bench(BenchOptions o, const std::string& command_line) {
  const bool no_shape = o.shape.presets.empty() && !o.shape.experts && !o.shape.hidden &&
                        !o.shape.intermediate && !o.shape.top_k;
  if (no_shape) o.shape.presets = {kDefaultPreset};
  const std::vector<LayerSpec> specs = resolve_layer_specs(o.shape);
  const std::vector<int64_t> token_counts = parse_token_list(o.tokens, "--tokens");
  const DType dtype = parse_dtype(o.dtype);  // checked by weight_dtype()
  const CpuExpertsConfig cpu{resolve_threads(o.threads), resolve_isa(o.isa)};
  std::optional<BenchJsonFile> json;
  if (!o.json.empty()) json.emplace(o.json, command_line);

  CacheFlusher flusher(cpu.num_threads);
  const int64_t max_tokens = *std::max_element(token_counts.begin(), token_counts.end());
  for (const LayerSpec& spec : specs) check_memory(spec, dtype, max_tokens, flusher.bytes());
  std::cerr << "measuring this machine's ceilings (DRAM read, SIMD peak)...\n";
  BenchMachine machine{cpu_model_name(),
                       cpu.num_threads,
                       cpu.isa,
                       measure_ceilings(cpu.isa, cpu.num_threads),
                       last_level_cache_bytes(),
                       flusher.bytes()};
  if (json) json->set_machine(machine);
  print_machine(std::cout, machine);
  print_table_header(std::cout);

  const Sweep sweep{o, dtype, machine, flusher};
  const size_t total = specs.size() * token_counts.size();
  size_t step = 0;
  for (const LayerSpec& spec : specs) {
    std::cerr << spec.preset << ": generating " << gigabytes(spec.total_weight_bytes(dtype))
              << " of " << name(dtype) << " weights and prepacking (" << spec.str() << ")\n";
    BenchLayer layer = make_bench_layer(spec, {dtype, cpu, o.seed});
    std::cerr << std::setprecision(3) << spec.preset << ": generated in " << layer.generate_seconds
              << " s, prepacked in " << layer.prepack_seconds << " s\n";
    for (int64_t tokens : token_counts) {
      std::cerr << "[" << ++step << "/" << total << "] " << spec.preset << " tokens=" << tokens
                << " ...\n";
      const BenchRow row = run_row(sweep, spec, layer, tokens);
      print_table_row(std::cout, row);
      std::cout.flush();
      if (json) json->add(row);
    }
  }
  return 0;
}

}  // namespace

Command add_bench_command(CLI::App& app, std::string command_line) {
  auto o = std::make_shared<BenchOptions>();
  CLI::App* cmd = app.add_subcommand(
      "bench",
      "Time the MoE layer on random weights against this machine's measured ceilings.\n"
      "Without arguments: preset " +
          std::string(kDefaultPreset) + ", tokens 1,32,512, bf16, every thread.");
  add_shape_options(*cmd, o->shape, /*preset_list=*/true);
  cmd->add_option("--tokens", o->tokens, "comma list of token counts")->capture_default_str();
  cmd->add_option("--dtype", o->dtype, "weight and activation dtype: bf16 or fp32")
      ->check(weight_dtype())
      ->capture_default_str();
  cmd->add_option("--threads", o->threads, "threads (0: every hardware thread)")
      ->check(non_negative());
  cmd->add_option("--isa", o->isa,
                  "CPU kernel family: scalar, avx2, avx512, avx512bf16 "
                  "(default: the best this CPU runs)");
  cmd->add_option("--reps", o->reps,
                  "timed reps per row (default: 3 to 10, about 2 s of timed runs a row)")
      ->check(positive());
  cmd->add_option("--json", o->json, "write the results as JSON (DESIGN.md §7) to this file");
  cmd->add_option("--seed", o->seed, "seed of the random weights and inputs")
      ->capture_default_str();
  cmd->add_option("--err-tokens", o->err_tokens,
                  "tokens per row checked against the fp64 oracle (0: none)")
      ->check(non_negative())
      ->capture_default_str();
  return {cmd, [o, line = std::move(command_line)] { return run_bench(*o, line); }};
}

}  // namespace moekit::cli
