#include "bench_layer.h"

#include <numeric>
#include <vector>

#include "bench_timer.h"

namespace moekit::cli {
namespace {

// Stream ids of bench_random.h: expert specs take 4 consecutive ids from their base.
enum StreamId : uint64_t { kRoutedBase = 0, kSharedBase = 4, kCorrectionBias = 8, kX, kLogits };

}  // namespace

int64_t bench_peak_bytes(const LayerSpec& spec, DType dtype, int64_t max_tokens) {
  // x and y in dtype; logits fp32; ids int32 and weights fp32 per slot.
  const int64_t per_token =
      2 * spec.hidden * element_bytes(dtype) + 4 * spec.num_experts + 8 * spec.top_k;
  return 2 * spec.total_weight_bytes(dtype) + max_tokens * per_token;
}

BenchLayer make_bench_layer(const LayerSpec& spec, const BenchLayerConfig& config) {
  Stopwatch watch;
  const int threads = config.cpu.num_threads;
  BenchLayer b;
  b.routed = {config.seed,     kRoutedBase,   spec.hidden, spec.intermediate,
              spec.activation, spec.has_bias, config.dtype};
  std::vector<int32_t> all(spec.num_experts);
  std::iota(all.begin(), all.end(), 0);
  const RandomExperts routed = make_random_experts(b.routed, all, threads);

  RandomExperts shared;
  if (spec.num_shared_experts) {
    b.shared = {config.seed,     kSharedBase, spec.hidden, spec.shared_intermediate(),
                spec.activation, false,       config.dtype};
    const int32_t only[] = {0};
    shared = make_random_experts(b.shared, only, threads);
  }
  if (spec.router.method == RoutingMethod::kSigmoidGroupedTopK) {
    // DeepSeek-style load-balancing bias: small next to the spread of sigmoid scores.
    b.correction_bias = Tensor(DType::kF32, {spec.num_experts});
    fill_normal(b.correction_bias, {config.seed, kCorrectionBias}, 0.1f, 1);
  }

  b.generate_seconds = watch.elapsed_us() * 1e-6;

  MoELayerConfig lc;
  lc.router = spec.router;
  lc.activation = spec.activation;
  lc.hidden = spec.hidden;
  lc.intermediate = spec.intermediate;
  lc.act_dtype = config.dtype;
  CpuLayerOptions options;
  options.cpu = config.cpu;
  const ExpertWeights shared_view = shared.view();
  b.layer = make_cpu_layer(lc, routed.view(), spec.num_shared_experts ? &shared_view : nullptr,
                           b.correction_bias.view(), options);
  b.prepack_seconds = watch.elapsed_us() * 1e-6 - b.generate_seconds;
  return b;
}

BenchInputs make_bench_inputs(const LayerSpec& spec, DType dtype, int64_t tokens, uint64_t seed,
                              int threads) {
  BenchInputs in{Tensor(dtype, {tokens, spec.hidden}),
                 Tensor(DType::kF32, {tokens, int64_t(spec.num_experts)})};
  fill_normal(in.x, {seed, kX}, 1.0f, threads);
  fill_normal(in.logits, {seed, kLogits}, 1.0f, threads);
  return in;
}

}  // namespace moekit::cli
