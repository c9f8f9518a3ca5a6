// A MoE layer of random weights for benchmarking, and the random inputs it runs on.
#pragma once

#include <cstdint>
#include <memory>

#include "bench_random.h"
#include "layer_spec.h"
#include "moekit/layer.h"

namespace moekit::cli {

struct BenchLayerConfig {
  DType dtype = DType::kBF16;  // weights, x and y
  CpuExpertsConfig cpu;        // num_threads resolved (> 0)
  uint64_t seed = 0;
};

// The layer plus what is needed to regenerate any of its experts (see bench_random.h); the
// generated weights themselves are freed once the layer has prepacked them.
struct BenchLayer {
  std::unique_ptr<MoELayer> layer;
  RandomExpertsSpec routed, shared;  // shared.intermediate == 0: no shared expert
  Tensor correction_bias;            // [E] fp32 for grouped sigmoid routing, else empty
  double generate_seconds = 0, prepack_seconds = 0;
};

// Peak host memory of make_bench_layer (the generated weights and their prepacked copy coexist)
// plus the inputs and outputs of a run of `max_tokens` tokens.
int64_t bench_peak_bytes(const LayerSpec& spec, DType dtype, int64_t max_tokens);
BenchLayer make_bench_layer(const LayerSpec& spec, const BenchLayerConfig& config);

// Random inputs for `tokens` rows: x ~ N(0, 1) [M, H], router logits ~ N(0, 1) [M, E] fp32.
// Row r is the same for every M, so rows can be compared across token counts.
struct BenchInputs {
  Tensor x, logits;
};
BenchInputs make_bench_inputs(const LayerSpec& spec, DType dtype, int64_t tokens, uint64_t seed,
                              int threads);

}  // namespace moekit::cli
