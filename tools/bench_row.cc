#include "bench_row.h"

#include <algorithm>
#include <functional>

#include "bench_timer.h"

namespace moekit::cli {
namespace {

// Without --reps, a row takes reps until it has kMinReps and has spent kRowBudgetUs, at most
// kMaxReps: enough for a stable median of a fast row, bounded for a slow one.
constexpr int kMinReps = 3, kMaxReps = 10;
constexpr double kRowBudgetUs = 2e6;

// Times `forward` (warmed up by the caller), flushing caches before each rep; after_rep runs
// after each, outside the timed region. With `comm`, every rank must call this together: rank
// 0's clock decides the number of reps for all (each forward is a collective), and that
// exchange is also the barrier that starts the ranks' reps together.
Timing time_reps(const std::function<void()>& forward, const std::function<void()>& after_rep,
                 CacheFlusher& flusher, int reps, Communicator* comm) {
  std::vector<double> samples;
  const Stopwatch row;
  for (;;) {
    const int n = int(samples.size());
    const bool more =
        reps ? n < reps : n < kMinReps || (n < kMaxReps && row.elapsed_us() < kRowBudgetUs);
    if (!comm && !more) break;
    flusher.flush();
    if (comm && !comm->all_gather(int(more))[0]) break;
    const Stopwatch watch;
    forward();
    samples.push_back(watch.elapsed_us());
    after_rep();
  }
  const auto [lo, hi] = std::minmax_element(samples.begin(), samples.end());
  return {median(samples), *lo, *hi, int(samples.size())};
}

}  // namespace

RowRun run_layer_row(const RowSettings& s, const LayerSpec& spec, BenchLayer& b, int64_t tokens) {
  Communicator* comm = b.ep ? &b.ep->communicator() : nullptr;
  const int rank = comm ? comm->rank() : 0;
  const BenchInputs in = make_bench_inputs(spec, io_dtype(s.format), tokens, s.seed, s.threads, rank);
  RowRun run;
  run.ids = Tensor(DType::kI32, {tokens, int64_t(spec.top_k)});
  run.weights = Tensor(DType::kF32, {tokens, int64_t(spec.top_k)});
  const Tensor y(io_dtype(s.format), {tokens, spec.hidden});

  // Routing runs outside the timed region; its own time is reported beside it.
  std::vector<double> routing_samples;
  for (int r = 0; r < 3; ++r) {
    const Stopwatch watch;
    route(spec.router, in.logits, b.correction_bias, run.ids, run.weights);
    routing_samples.push_back(watch.elapsed_us());
  }
  run.routing_us = median(routing_samples);

  auto forward = [&] { b.layer->forward_routed(in.x, run.ids, run.weights, y); };
  forward();  // warm-up: first-touch of workspaces, code paths
  std::vector<double> dispatch_us, combine_us;
  auto after_rep = [&] {
    if (!b.ep) return;
    // Per rep: the stats count from the last reset.
    dispatch_us.push_back(b.ep->stats().dispatch_seconds * 1e6);
    combine_us.push_back(b.ep->stats().combine_seconds * 1e6);
    run.comm.dispatch_bytes = b.ep->stats().dispatch_bytes_sent;
    run.comm.combine_bytes = b.ep->stats().combine_bytes_sent;
    run.comm.rounds = b.ep->stats().rounds;
    b.ep->reset_stats();
  };
  if (b.ep) b.ep->reset_stats();
  run.timing = time_reps(forward, after_rep, *s.flusher, s.reps, comm);
  if (b.ep) {
    run.comm.dispatch_us = median(dispatch_us);
    run.comm.combine_us = median(combine_us);
  }
  run.check = check_sampled_rows(b, in.x, run.ids, run.weights, y, s.err_tokens, s.threads);
  return run;
}

BenchRow measured_row(const LayerSpec& spec, const QuantScheme& format, int64_t tokens, const BenchLayer& b,
                      const RowRun& run, const RowCost& cost) {
  BenchRow row;
  row.spec = &spec;
  row.format = format;
  row.tokens = tokens;
  row.experts_impl = std::string(b.layer->routed_kernel().experts().name());
  row.cost = cost;
  row.time_us = run.timing.median_us;
  row.time_min_us = run.timing.min_us;
  row.time_max_us = run.timing.max_us;
  row.reps = run.timing.reps;
  row.routing_us = run.routing_us;
  row.max_rel_err = run.check.max_rel_err;
  row.err_tokens_checked = int64_t(run.check.rows.size());
  return row;
}

}  // namespace moekit::cli
