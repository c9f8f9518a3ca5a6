// `moekit bench`: times MoELayer::forward_routed on random weights against this machine's
// measured ceilings (DESIGN.md §7); with --ep, across MPI ranks (bench_ep.h).
#include <iostream>
#include <optional>

#include "bench_ep.h"
#include "bench_plan.h"
#include "bench_row.h"
#include "commands.h"
#include "option_checks.h"

namespace moekit::cli {
namespace {

int run_bench(const BenchOptions& o, const std::string& command_line) {
  const BenchPlan plan = resolve_bench_plan(o);
  const CpuExpertsConfig cpu{resolve_threads(o.threads), plan.isa};
  std::optional<BenchJsonFile> json;
  if (!o.json.empty()) json.emplace(o.json, command_line);

  CacheFlusher flusher(cpu.num_threads);
  for (const LayerSpec& spec : plan.specs)
    check_memory(spec, plan.dtype, plan.max_tokens(), flusher.bytes(), 1);
  std::cerr << "measuring this machine's ceilings (DRAM read, SIMD peak)...\n";
  const BenchMachine machine{cpu_model_name(),
                             cpu.num_threads,
                             cpu.isa,
                             measure_ceilings(cpu.isa, cpu.num_threads),
                             last_level_cache_bytes(),
                             flusher.bytes()};
  if (json) json->set_machine(machine);
  print_machine(std::cout, machine);
  print_table_header(std::cout, false);

  const RowSettings settings{plan.dtype, cpu.num_threads, o.seed, o.reps, o.err_tokens, &flusher};
  const size_t total = plan.specs.size() * plan.token_counts.size();
  size_t step = 0;
  for (const LayerSpec& spec : plan.specs) {
    log_generating(spec, plan.dtype, spec.total_weight_bytes(plan.dtype), "");
    BenchLayer layer = make_bench_layer(spec, {plan.dtype, cpu, o.seed, std::nullopt});
    log_generated(spec, layer);
    for (int64_t tokens : plan.token_counts) {
      std::cerr << "[" << ++step << "/" << total << "] " << spec.preset << " tokens=" << tokens
                << " ...\n";
      const RowRun run = run_layer_row(settings, spec, layer, tokens);
      const RowCost cost = row_cost(spec, plan.dtype, expert_loads(run.ids, spec.num_experts),
                                    tokens, machine.ceilings);
      const BenchRow row = measured_row(spec, plan.dtype, tokens, layer, run, cost);
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
  cmd->add_option("--tokens", o->tokens, "comma list of token counts (with --ep: per rank)")
      ->capture_default_str();
  cmd->add_option("--dtype", o->dtype, "weight and activation dtype: bf16 or fp32")
      ->check(weight_dtype())
      ->capture_default_str();
  cmd->add_option("--threads", o->threads,
                  "threads (0: every hardware thread; with --ep, per rank: 0 splits this host's "
                  "threads among its ranks)")
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
  CLI::Option* ep = add_ep_option(
      *cmd, o->ep,
      "each rank builds its own experts and times the layer on --tokens tokens of its own, "
      "for ep = 1, 2, 4, ... and N ranks (the others wait), and rank 0 reports");
  cmd->add_option("--ep-mode", o->ep_mode,
                  "EP dispatch: all_to_all, naive (all-gather, reduce-scatter) or low_latency "
                  "(fixed-size buffers for the largest --tokens)")
      ->transform(one_of(ep_modes()))
      ->type_name("TEXT")
      ->default_str("all_to_all")
      ->needs(ep);
  cmd->add_option("--placement", o->placement, "EP expert placement: linear or round_robin")
      ->transform(one_of(ep_placements()))
      ->type_name("TEXT")
      ->default_str("linear")
      ->needs(ep);
  return {cmd, [o, line = std::move(command_line)] {
            return o->ep ? run_ep_bench(*o, line) : run_bench(*o, line);
          }};
}

}  // namespace moekit::cli
