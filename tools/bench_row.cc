#include "bench_row.h"

#include <algorithm>
#include <cstring>
#include <functional>

#include "bench_timer.h"

namespace moekit::cli {
namespace {

// Without --reps, a row takes reps until it has kMinReps and has spent kRowBudgetUs, at most
// kMaxReps: enough for a stable median of a fast row, bounded for a slow one.
constexpr int kMinReps = 3, kMaxReps = 10;
constexpr double kRowBudgetUs = 2e6;

// Times each of `forwards` (warmed up by the caller), flushing caches before each run; a rep
// runs them all in turn, so that they share the machine's drifts. after_rep runs after each
// rep, outside the timed region. With `comm` (one forward), every rank must call this together:
// rank 0's clock decides the number of reps for all (each forward is a collective), and that
// exchange is also the barrier that starts the ranks' reps together.
std::vector<Timing> time_reps(const std::vector<std::function<void()>>& forwards,
                              const std::function<void()>& after_rep, CacheFlusher& flusher,
                              int reps, Communicator* comm) {
  std::vector<std::vector<double>> samples(forwards.size());
  const Stopwatch row;
  for (;;) {
    const int n = int(samples[0].size());
    const bool more =
        reps ? n < reps : n < kMinReps || (n < kMaxReps && row.elapsed_us() < kRowBudgetUs);
    if (!comm && !more) break;
    bool stop = false;
    for (size_t i = 0; i < forwards.size(); ++i) {
      flusher.flush();
      stop = comm && !comm->all_gather(int(more))[0];
      if (stop) break;
      const Stopwatch watch;
      forwards[i]();
      samples[i].push_back(watch.elapsed_us());
    }
    if (stop) break;
    after_rep();
  }
  std::vector<Timing> timings;
  for (std::vector<double>& s : samples) {
    const auto [lo, hi] = std::minmax_element(s.begin(), s.end());
    timings.push_back({median(s), *lo, *hi, int(s.size())});
  }
  return timings;
}

// An owning copy of a contiguous 2-D host tensor.
Tensor copy_2d(const Tensor& t) {
  Tensor c(t.dtype(), {t.view().size(0), t.view().size(1)});
  std::memcpy(c.view().data, t.view().data, t.view().nbytes());
  return c;
}

}  // namespace

std::vector<RowRun> run_layer_rows(const RowSettings& s, const LayerSpec& spec,
                                   const std::vector<BenchLayer*>& layers, int64_t tokens) {
  Communicator* comm = layers[0]->ep ? &layers[0]->ep->communicator() : nullptr;
  MOEKIT_CHECK(!comm || layers.size() == 1, "bench: one layer at a time with EP");
  const int rank = comm ? comm->rank() : 0;
  // One routing for every layer (the same logits); inputs in each layer's activation dtype.
  RowRun routed;
  routed.ids = Tensor(DType::kI32, {tokens, int64_t(spec.top_k)});
  routed.weights = Tensor(DType::kF32, {tokens, int64_t(spec.top_k)});
  std::vector<BenchInputs> inputs;
  std::vector<Tensor> outputs;
  for (BenchLayer* b : layers) {
    const DType io = b->layer->config().act_dtype;
    inputs.push_back(make_bench_inputs(spec, io, tokens, s.seed, s.threads, rank));
    outputs.emplace_back(io, std::initializer_list<int64_t>{tokens, spec.hidden});
  }

  // Routing runs outside the timed region; its own time is reported beside it.
  std::vector<double> routing_samples;
  for (int r = 0; r < 3; ++r) {
    const Stopwatch watch;
    route(spec.router, inputs[0].logits, layers[0]->correction_bias, routed.ids, routed.weights);
    routing_samples.push_back(watch.elapsed_us());
  }
  routed.routing_us = median(routing_samples);

  std::vector<std::function<void()>> forwards;
  for (size_t i = 0; i < layers.size(); ++i)
    forwards.push_back([&, i] {
      layers[i]->layer->forward_routed(inputs[i].x, routed.ids, routed.weights, outputs[i]);
    });
  for (const auto& forward : forwards) forward();  // warm-up: first-touch of workspaces, code
  BenchLayer& b = *layers[0];
  std::vector<double> dispatch_us, combine_us;
  auto after_rep = [&] {
    if (!b.ep) return;
    // Per rep: the stats count from the last reset.
    dispatch_us.push_back(b.ep->stats().dispatch_seconds * 1e6);
    combine_us.push_back(b.ep->stats().combine_seconds * 1e6);
    routed.comm.dispatch_bytes = b.ep->stats().dispatch_bytes_sent;
    routed.comm.combine_bytes = b.ep->stats().combine_bytes_sent;
    routed.comm.rounds = b.ep->stats().rounds;
    b.ep->reset_stats();
  };
  if (b.ep) b.ep->reset_stats();
  const std::vector<Timing> timings = time_reps(forwards, after_rep, *s.flusher, s.reps, comm);
  if (b.ep) {
    routed.comm.dispatch_us = median(dispatch_us);
    routed.comm.combine_us = median(combine_us);
  }
  std::vector<RowRun> runs;
  for (size_t i = 0; i < layers.size(); ++i) {
    RowRun& run = runs.emplace_back();
    run.ids = copy_2d(routed.ids);
    run.weights = copy_2d(routed.weights);
    run.routing_us = routed.routing_us;
    run.comm = routed.comm;
    run.timing = timings[i];
    run.check = check_sampled_rows(*layers[i], inputs[i].x, run.ids, run.weights, outputs[i],
                                   s.err_tokens, s.threads);
  }
  return runs;
}

RowRun run_layer_row(const RowSettings& s, const LayerSpec& spec, BenchLayer& layer,
                     int64_t tokens) {
  return std::move(run_layer_rows(s, spec, {&layer}, tokens).front());
}

BenchRow measured_row(const LayerSpec& spec, const QuantScheme& format, int64_t tokens,
                      const BenchLayer& b, const RowRun& run, const RowCost& cost) {
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
