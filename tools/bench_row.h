// One row of a bench sweep as one process runs it: random inputs, routing (timed apart), the
// timed forwards and the oracle check. With expert parallelism every rank of the layer's
// communicator runs the row at the same time, each on its own tokens, and measures its share.
#pragma once

#include <cstdint>
#include <vector>

#include "bench_cache.h"
#include "bench_layer.h"
#include "bench_oracle.h"
#include "bench_report.h"  // CommPerForward, BenchRow

namespace moekit::cli {

// What every row of a sweep shares.
struct RowSettings {
  int threads = 1;
  uint64_t seed = 0;
  int reps = 0;  // 0: adaptive, kMinReps to kMaxReps within kRowBudgetUs
  int err_tokens = 0;
  CacheFlusher* flusher = nullptr;
  bool cuda_graph = true;  // GPU rows: replay the forward captured in a CUDA graph, or launch it
};

struct Timing {
  double median_us = 0, min_us = 0, max_us = 0;
  int reps = 0;
};

struct RowRun {
  Tensor ids, weights;  // the routing the forwards ran: [M, k] int32 global ids, fp32
  double routing_us = 0;
  Timing timing;
  CommPerForward comm;  // zero without EP
  OracleCheck check;
};

RowRun run_layer_row(const RowSettings& settings, const LayerSpec& spec, BenchLayer& layer,
                     int64_t tokens);
// The same row on several layers of one shape (one per format, no EP), on the same routing:
// each rep runs every layer in turn (bench_row.cc), so that their ratios share the machine's
// noise. One RowRun per layer, in order.
std::vector<RowRun> run_layer_rows(const RowSettings& settings, const LayerSpec& spec,
                                   const std::vector<BenchLayer*>& layers, int64_t tokens);

// The fields of a row that one process measured; an EP sweep then merges its ranks' results.
BenchRow measured_row(const LayerSpec& spec, const QuantScheme& format, int64_t tokens,
                      const BenchLayer& layer, const RowRun& run, const RowCost& cost);

}  // namespace moekit::cli
