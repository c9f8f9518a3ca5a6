// A MoE layer of random weights for benchmarking, and the random inputs it runs on.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>

#include "bench_random.h"
#include "ep_job.h"
#include "layer_spec.h"
#include "moekit/layer.h"

namespace moekit::cli {

// Expert parallelism: the layer is this rank's share, its routed experts behind a distributed
// prepare/finalize; the shared expert (if any) is replicated and runs on the rank's own tokens.
struct BenchEpConfig {
  std::shared_ptr<Communicator> comm;
  ExpertMap map;
  EpMode mode = EpMode::kAllToAll;
  int64_t max_tokens = 0;  // rows per rank and forward, at most
};

struct BenchLayerConfig {
  QuantScheme format;  // of the routed and shared experts' weights; x and y in io_dtype(format)
  CpuExpertsConfig cpu;        // num_threads resolved (> 0)
  uint64_t seed = 0;
  std::optional<BenchEpConfig> ep;  // absent: the whole layer in this process
  bool cuda = false;                // the layer on the current CUDA device (no EP)
  int64_t chunk_tokens = 1024;      // rows per chunk of the layer's forward
};

// The layer plus what is needed to regenerate any of its experts (see bench_random.h); the
// generated weights themselves are freed once the layer has prepacked them.
struct BenchLayer {
  std::unique_ptr<MoELayer> layer;
  RandomExpertsSpec routed, shared;  // shared.intermediate == 0: no shared expert
  Tensor correction_bias;            // [E] fp32 for grouped sigmoid routing, else empty
  std::shared_ptr<DistributedPrepareFinalize> ep;  // the routed kernel's, with EP; else null
  std::shared_ptr<void> device_weights;            // CUDA: the device copies the layer views
  double generate_seconds = 0, prepack_seconds = 0;
};

// Peak host memory of make_bench_layer (the generated weights and their prepacked copy coexist;
// with EP the ranks split them) plus the inputs and outputs of a run of `max_tokens` tokens on
// each of `ranks` ranks.
int64_t bench_peak_bytes(const LayerSpec& spec, const QuantScheme& format, int64_t max_tokens, int ranks = 1);
// With config.ep, generates only this rank's experts (each from its own random stream, so they
// equal the same experts of a whole layer of the same seed).
BenchLayer make_bench_layer(const LayerSpec& spec, const BenchLayerConfig& config);

// Random inputs for `tokens` rows: x ~ N(0, 1) [M, H], router logits ~ N(0, 1) [M, E] fp32.
// Row r is the same for every M, so rows can be compared across token counts; each EP rank
// draws its own rows (rank 0 those of the single-process bench).
struct BenchInputs {
  Tensor x, logits;
};
BenchInputs make_bench_inputs(const LayerSpec& spec, DType dtype, int64_t tokens, uint64_t seed,
                              int threads, int rank = 0);

}  // namespace moekit::cli
