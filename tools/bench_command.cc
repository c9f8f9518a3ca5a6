// `moekit bench`: times MoELayer::forward_routed on random weights against this machine's
// measured ceilings (DESIGN.md §7); with --ep, across MPI ranks (bench_ep.h).
#include <iostream>
#include <optional>

#include "bench_cuda.h"
#include "bench_ep.h"
#include "bench_plan.h"
#include "bench_row.h"
#include "commands.h"
#include "option_checks.h"

namespace moekit::cli {
namespace {

BenchMachine measure_cpu_machine(const CpuExpertsConfig& cpu, const CacheFlusher& flusher) {
  return {cpu_model_name(),
          "cpu",
          cpu.num_threads,
          cpu.isa,
          measure_ceilings(cpu.isa, cpu.num_threads),
          last_level_cache_bytes(),
          flusher.bytes(),
          ""};
}

int run_bench(const BenchOptions& o, const std::string& command_line) {
  const BenchPlan plan = resolve_bench_plan(o);
  const CpuExpertsConfig cpu{resolve_threads(o.threads), plan.isa};
  std::optional<BenchJsonFile> json;
  if (!o.json.empty()) json.emplace(o.json, command_line);

  // The host flush buffer is for CPU rows; the GPU rows flush the card's L2 (bench_cuda.h).
  std::optional<CacheFlusher> flusher;
  if (!plan.cuda) flusher.emplace(cpu.num_threads);
  for (const LayerSpec& spec : plan.specs)
    check_memory(spec, plan.formats, plan.max_tokens(), flusher ? flusher->bytes() : 0, 1);
  std::cerr << "measuring this machine's ceilings ("
            << (plan.cuda ? "device copy, cuBLAS GEMM" : "DRAM read, SIMD peak") << ")...\n";
  const BenchMachine machine =
      plan.cuda ? measure_cuda_machine() : measure_cpu_machine(cpu, *flusher);
  if (json) json->set_machine(machine);
  print_machine(std::cout, machine);
  print_table_header(std::cout, false);

  const RowSettings settings{
      cpu.num_threads, o.seed, o.reps, o.err_tokens, flusher ? &*flusher : nullptr, !o.no_graph};
  // A GPU row runs as one chunk (its workspace fits the card; chunks would re-read the weights);
  // the CPU keeps the library's default chunk, which bounds host memory.
  const int64_t chunk = plan.cuda ? plan.max_tokens() : MoELayerConfig{}.chunk_tokens;
  const size_t total = plan.specs.size() * plan.token_counts.size();
  size_t step = 0;
  for (const LayerSpec& spec : plan.specs) {
    std::vector<BenchLayer> layers;  // one per format
    std::vector<BenchLayer*> pointers;
    for (const QuantScheme& format : plan.formats) {
      log_generating(spec, format, spec.total_weight_bytes(format), "");
      layers.push_back(
          make_bench_layer(spec, {format, cpu, o.seed, std::nullopt, plan.cuda, chunk}));
      log_generated(spec, layers.back());
    }
    for (BenchLayer& layer : layers) pointers.push_back(&layer);
    for (int64_t tokens : plan.token_counts) {
      std::cerr << "[" << ++step << "/" << total << "] " << spec.preset << " tokens=" << tokens
                << " ...\n";
      // GPU rows run one layer after the other (CUDA graphs, events: their noise is small).
      std::vector<RowRun> runs;
      if (plan.cuda)
        for (BenchLayer& layer : layers)
          runs.push_back(run_cuda_row(settings, spec, layer, tokens));
      else
        runs = run_layer_rows(settings, spec, pointers, tokens);
      for (size_t i = 0; i < layers.size(); ++i) {
        const QuantScheme& format = plan.formats[i];
        const RowCost cost = row_cost(spec, format, expert_loads(runs[i].ids, spec.num_experts),
                                      tokens, machine.ceilings);
        BenchRow row = measured_row(spec, format, tokens, layers[i], runs[i], cost);
        row.device = machine.kind;
        row.graph = plan.cuda && settings.cuda_graph;
        print_table_row(std::cout, row);
        std::cout.flush();
        if (json) json->add(row);
      }
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
          std::string(kDefaultPreset) + ", tokens 1,32,512, format bf16, every thread.");
  add_shape_options(*cmd, o->shape, /*preset_list=*/true);
  cmd->add_option("--tokens", o->tokens, "comma list of token counts (with --ep: per rank)")
      ->capture_default_str();
  cmd->add_option("--format", o->formats,
                  "comma list of weight/activation formats (DESIGN.md section 4): bf16, fp16, "
                  "fp32, fp8-tensor, fp8-token, fp8-block, int8, w4a16, w8a16, w4a8, mxfp4, "
                  "nvfp4, with options after colons: g32/g64/g128/ch (group), zp, ue8m0, static "
                  "(e.g. w4a16:g64:zp). With several, every format's layer is built and each "
                  "rep of a CPU row runs them in turn, so that their ratios share the machine's "
                  "noise (not with --ep)")
      ->delimiter(',')
      ->capture_default_str();
  CLI::Option* device =
      cmd->add_option("--device", o->device,
                      "cpu, or cuda: the layer on the current GPU, timed as CUDA-graph replays "
                      "with CUDA events and L2 flushed before each, against the card's measured "
                      "copy bandwidth and cuBLAS GEMM rates")
          ->check(CLI::IsMember({"cpu", "cuda"}))
          ->capture_default_str();
  cmd->add_flag("--no-graph", o->no_graph,
                "GPU rows: launch the forward's kernels on the stream for each rep instead of "
                "replaying a CUDA graph (what profilers such as ncu see kernel by kernel)")
      ->needs(device);
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
  ep->excludes(device);
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
