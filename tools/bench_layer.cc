#include "bench_layer.h"

#include <numeric>
#include <vector>

#include "bench_cuda.h"
#include "bench_timer.h"

namespace moekit::cli {
namespace {

// Stream ids of bench_random.h: expert specs take 4 consecutive ids from their base; rank r of
// an EP run draws x and logits from kX + 2 r and kLogits + 2 r.
enum StreamId : uint64_t { kRoutedBase = 0, kSharedBase = 4, kCorrectionBias = 8, kX, kLogits };

// This rank's share of the layer: routed experts `local` ([E_local, ...], slot s holding global
// expert map.local_to_global(rank)[s]) behind the EP prepare/finalize.
std::unique_ptr<MoELayer> make_ep_layer(MoELayerConfig config, const ExpertWeights& local,
                                        const ExpertWeights* shared,
                                        const TensorView& correction_bias,
                                        const BenchLayerConfig& c, BenchLayer& b) {
  const BenchEpConfig& ep = *c.ep;
  b.ep = make_ep_prepare_finalize(ep.mode, ep.comm, ep.map, ep.max_tokens);
  std::shared_ptr<Experts> experts = make_cpu_experts(local, config.activation, c.cpu);
  if (b.ep->activation_format() == ActivationFormat::kBatched) {
    experts = make_batched_experts(experts);
    // Low-latency dispatch takes one round per forward: a chunk is the whole batch.
    config.chunk_tokens = ep.max_tokens;
  }
  auto wr = make_cpu_weight_and_reduce(c.cpu.num_threads);
  auto routed = std::make_shared<ModularKernel>(
      b.ep, experts, wr, KernelConfig{config.router.top_k, config.act_dtype, config.chunk_tokens});
  std::shared_ptr<ModularKernel> shared_kernel;
  if (shared)
    shared_kernel =
        std::make_shared<ModularKernel>(make_local_prepare_finalize(ExpertMap::linear(1, 1), 0),
                                        make_cpu_experts(*shared, config.activation, c.cpu), wr,
                                        KernelConfig{1, config.act_dtype, config.chunk_tokens});
  return std::make_unique<MoELayer>(config, std::move(routed), std::move(shared_kernel),
                                    correction_bias);
}

}  // namespace

int64_t bench_peak_bytes(const LayerSpec& spec, const QuantScheme& format, int64_t max_tokens,
                         int ranks) {
  // x and y in io dtype; logits fp32; ids int32 and weights fp32 per slot.
  const int64_t per_token =
      2 * spec.hidden * element_bytes(io_dtype(format)) + 4 * spec.num_experts + 8 * spec.top_k;
  // Quantized weights are generated in bf16, quantized, then prepacked.
  const QuantScheme generated{format.is_float() ? format.format : Format::kBF16};
  const int64_t quantized = format.is_float() ? 0 : 2 * spec.total_weight_bytes(format);
  return 2 * spec.total_weight_bytes(generated) + quantized + ranks * max_tokens * per_token;
}

BenchLayer make_bench_layer(const LayerSpec& spec, const BenchLayerConfig& config) {
  Stopwatch watch;
  const int threads = config.cpu.num_threads;
  BenchLayer b;
  b.routed = {config.seed,     kRoutedBase,   spec.hidden, spec.intermediate,
              spec.activation, spec.has_bias, config.format};
  std::vector<int32_t> experts(spec.num_experts);
  std::iota(experts.begin(), experts.end(), 0);
  if (config.ep) {
    const auto mine = config.ep->map.local_to_global(config.ep->comm->rank());
    experts.assign(mine.begin(), mine.end());
  }
  const RandomExperts routed = make_random_experts(b.routed, experts, threads);

  RandomExperts shared;
  if (spec.num_shared_experts) {
    b.shared = {config.seed,     kSharedBase, spec.hidden, spec.shared_intermediate(),
                spec.activation, false,       config.format};
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
  lc.act_dtype = io_dtype(config.format);
  lc.chunk_tokens = config.chunk_tokens;
  const ExpertWeights shared_view = shared.view();
  const ExpertWeights* shared_weights = spec.num_shared_experts ? &shared_view : nullptr;
  if (config.ep) {
    b.layer = make_ep_layer(lc, routed.view(), shared_weights, b.correction_bias.view(), config, b);
  } else if (config.cuda) {
    b.layer = make_cuda_bench_layer(lc, routed.view(), shared_weights, b.correction_bias.view(),
                                    b.device_weights);
  } else {
    CpuLayerOptions options;
    options.cpu = config.cpu;
    b.layer = make_cpu_layer(lc, routed.view(), shared_weights, b.correction_bias.view(), options);
  }
  b.prepack_seconds = watch.elapsed_us() * 1e-6 - b.generate_seconds;
  return b;
}

BenchInputs make_bench_inputs(const LayerSpec& spec, DType dtype, int64_t tokens, uint64_t seed,
                              int threads, int rank) {
  BenchInputs in{Tensor(dtype, {tokens, spec.hidden}),
                 Tensor(DType::kF32, {tokens, int64_t(spec.num_experts)})};
  fill_normal(in.x, {seed, kX + 2 * uint64_t(rank)}, 1.0f, threads);
  fill_normal(in.logits, {seed, kLogits + 2 * uint64_t(rank)}, 1.0f, threads);
  return in;
}

}  // namespace moekit::cli
