#include "bench_ep.h"

#include <chrono>
#include <iostream>
#include <optional>

#include "bench_row.h"

namespace moekit::cli {
namespace {

// Ranks of each step of the scaling sweep: 1, 2, 4, ... below n, then n.
std::vector<int> ep_sizes(int n) {
  std::vector<int> sizes;
  for (int s = 1; s < n; s *= 2) sizes.push_back(s);
  sizes.push_back(n);
  return sizes;
}

// Refuses, before anything runs, a layer whose experts do not split evenly over a step's ranks.
void check_splits(const BenchPlan& plan, const std::vector<int>& sizes) {
  for (const LayerSpec& spec : plan.specs)
    for (int n : sizes)
      if (spec.num_experts % n)
        throw CLI::ValidationError(
            "--ep", spec.preset + " has E=" + std::to_string(spec.num_experts) +
                        " experts, which do not split evenly over " + std::to_string(n) +
                        " ranks (the sweep runs ep = 1, 2, 4, ... and --ep); pick an --ep whose "
                        "steps all divide E, or set -E");
}

// One step of the scaling sweep, as this rank sees it.
struct EpStep {
  int ep = 1;
  std::shared_ptr<Communicator> comm;  // ranks [0, ep); null on the ranks that wait
  MachineCeilings ceilings;            // this rank's share, measured with the step's ranks
};

// Builds every step's communicator (collectives over the world) and has each step's ranks
// measure their ceilings at once, so that ranks on one host each get their share of its
// bandwidth and cores. `info` gets every rank's ceilings (complete on rank 0, in every step).
std::vector<EpStep> make_steps(const EpJob& job, const CpuExpertsConfig& cpu, BenchEpInfo& info) {
  std::vector<EpStep> steps;
  for (int n : ep_sizes(job.size())) {
    EpStep& s = steps.emplace_back(EpStep{n, make_mpi_communicator(n), {}});
    if (s.comm) {
      s.comm->barrier();
      s.ceilings = measure_ceilings(cpu.isa, cpu.num_threads);
      info.steps.push_back({n, s.comm->all_gather(s.ceilings)});
    }
    job.world->barrier();
  }
  return steps;
}

// This rank's result of a row. The cost is that of its local experts with the slots that every
// rank routed to them: each rank knows only its own routing, so the loads are gathered.
EpRankResult rank_result(const LayerSpec& spec, const QuantScheme& format, const ExpertMap& map,
                         const EpStep& step, int64_t tokens, const RowRun& run) {
  Communicator& comm = *step.comm;
  const int64_t num_experts = spec.num_experts;
  const std::vector<int64_t> mine = expert_loads(run.ids, spec.num_experts);
  std::vector<int64_t> all(num_experts * comm.size());
  const std::vector<size_t> bytes(comm.size(), num_experts * sizeof(int64_t));
  comm.all_gather_v(mine.data(), bytes[0], all.data(), bytes);
  std::vector<int64_t> local;
  for (int32_t e : map.local_to_global(comm.rank())) {
    int64_t slots = 0;
    for (int r = 0; r < comm.size(); ++r) slots += all[r * num_experts + e];
    local.push_back(slots);
  }
  EpRankResult r;
  r.time_us = run.timing.median_us;
  r.time_min_us = run.timing.min_us;
  r.time_max_us = run.timing.max_us;
  r.routing_us = run.routing_us;
  r.reps = run.timing.reps;
  r.comm = run.comm;
  r.cost = row_cost(spec, format, local, tokens, step.ceilings);
  r.read_gbps = step.ceilings.read_gbps;
  r.max_rel_err = run.check.max_rel_err;
  r.err_tokens_checked = int64_t(run.check.rows.size());
  return r;
}

// The row of every rank's results: the slowest rank's time, the roofline rank's roofline, the
// work of all ranks, the worst error. `row` comes with the fields every rank shares.
BenchRow merge_ranks(BenchRow row, EpRow ep) {
  const EpRankResult& slow = ep.ranks[ep.slowest_rank()];
  row.time_us = slow.time_us;
  row.time_min_us = slow.time_min_us;
  row.time_max_us = slow.time_max_us;
  row.reps = slow.reps;
  RowCost work;  // summed over ranks
  row.routing_us = row.max_rel_err = 0;
  row.err_tokens_checked = 0;
  for (const EpRankResult& r : ep.ranks) {
    work.active_experts += r.cost.active_experts;
    work.slots += r.cost.slots;
    work.weight_bytes += r.cost.weight_bytes;
    work.flops += r.cost.flops;
    row.routing_us = std::max(row.routing_us, r.routing_us);
    row.max_rel_err = std::max(row.max_rel_err, r.max_rel_err);
    row.err_tokens_checked += r.err_tokens_checked;
  }
  work.memory_us = ep.ranks[ep.roofline_rank()].cost.memory_us;
  work.compute_us = ep.ranks[ep.roofline_rank()].cost.compute_us;
  row.cost = work;
  row.ep = std::move(ep);
  return row;
}

struct EpSweep {
  const BenchOptions& options;
  const BenchPlan& plan;
  const EpJob& job;
  CpuExpertsConfig cpu;
  RowSettings settings;
  size_t done = 0, total = 0;  // rows, for progress lines
};

// One step's rows of `spec`, on the step's ranks; rank 0 prints them and returns them.
std::vector<BenchRow> run_step(EpSweep& sweep, const LayerSpec& spec, const EpStep& step,
                               std::optional<BenchJsonFile>& json) {
  const BenchOptions& o = sweep.options;
  const QuantScheme& format = sweep.plan.formats.front();  // one with --ep (resolve_bench_plan)
  const bool leader = sweep.job.leader();
  const ExpertMap map = make_ep_placement(o.placement, spec.num_experts, step.ep);
  if (leader)
    log_generating(spec, format,
                   map.num_local(0) * spec.expert_bytes(format) + spec.shared_bytes(format),
                   " (rank 0's " + std::to_string(map.num_local(0)) +
                       " experts at ep=" + std::to_string(step.ep) + ")");
  BenchLayer layer =
      make_bench_layer(spec, {format, sweep.cpu, o.seed,
                              BenchEpConfig{step.comm, map, o.ep_mode, sweep.plan.max_tokens()}});
  if (leader) log_generated(spec, layer);
  std::vector<BenchRow> rows;
  for (int64_t tokens : sweep.plan.token_counts) {
    if (leader)
      std::cerr << "[" << ++sweep.done << "/" << sweep.total << "] " << spec.preset
                << " ep=" << step.ep << " tokens=" << tokens << " per rank ...\n";
    const RowRun run = run_layer_row(sweep.settings, spec, layer, tokens);
    EpRow ep{step.ep, std::string(name(o.ep_mode)), std::string(name(o.placement)),
             step.comm->all_gather(rank_result(spec, format, map, step, tokens, run))};
    if (!leader) continue;
    rows.push_back(merge_ranks(measured_row(spec, format, tokens, layer, run, {}), std::move(ep)));
    print_table_row(std::cout, rows.back());
    std::cout.flush();
    if (json) json->add(rows.back());
  }
  return rows;
}

}  // namespace

int run_ep_bench(const BenchOptions& o, const std::string& command_line) {
  const BenchPlan plan = resolve_bench_plan(o);
  check_splits(plan, ep_sizes(o.ep));
  const EpJob job = join_ep_job(o.ep, "bench");
  // Ranks outside a step wait for it on the world communicator as long as its rows take; the
  // forwards' collectives run on the steps' communicators, with their default timeout.
  job.world->set_timeout(std::chrono::hours(24));
  const CpuExpertsConfig cpu{job.threads(o.threads), plan.isa};
  std::optional<BenchJsonFile> json;
  if (job.leader() && !o.json.empty()) json.emplace(o.json, command_line);

  CacheFlusher flusher(cpu.num_threads);
  for (const LayerSpec& spec : plan.specs)
    check_memory(spec, plan.formats, plan.max_tokens(), flusher.bytes(), job.ranks_on_host);
  if (job.leader())
    std::cerr << "measuring the ceilings of each ep step, its ranks at once (DRAM read, SIMD "
                 "peak)...\n";
  BenchEpInfo info{job.size(),
                   job.ranks_on_host,
                   cpu.num_threads,
                   std::string(name(o.ep_mode)),
                   std::string(name(o.placement)),
                   {}};
  const std::vector<EpStep> steps = make_steps(job, cpu, info);
  if (job.leader()) {
    const BenchMachine machine{cpu_model_name(),       "cpu",
                               cpu.num_threads,        cpu.isa,
                               steps.front().ceilings, last_level_cache_bytes(),
                               flusher.bytes(),        ""};
    if (json) {
      json->set_machine(machine);
      json->set_ep(info);
    }
    print_machine(std::cout, machine);
    print_ep_info(std::cout, info);
    print_table_header(std::cout, true);
  }

  EpSweep sweep{o,
                plan,
                job,
                cpu,
                {cpu.num_threads, o.seed, o.reps, o.err_tokens, &flusher},
                0,
                plan.specs.size() * steps.size() * plan.token_counts.size()};
  std::vector<std::vector<BenchRow>> scaling;  // rank 0: per layer, the rows of every step
  for (const LayerSpec& spec : plan.specs) {
    std::vector<BenchRow>& rows = scaling.emplace_back();
    for (const EpStep& step : steps) {
      if (step.comm) {
        std::vector<BenchRow> step_rows = run_step(sweep, spec, step, json);
        rows.insert(rows.end(), step_rows.begin(), step_rows.end());
      }
      job.world->barrier();
    }
  }
  for (const std::vector<BenchRow>& rows : scaling) print_ep_scaling(std::cout, rows);
  return 0;
}

}  // namespace moekit::cli
