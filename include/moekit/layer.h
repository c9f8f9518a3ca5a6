// MoELayer: the front door. Router + modular kernel over the routed experts + optional shared
// expert(s), processed in chunks of tokens so memory stays bounded.
#pragma once

#include <memory>
#include <optional>

#include "moekit/cpu.h"
#include "moekit/modular.h"
#include "moekit/router.h"

namespace moekit {

struct MoELayerConfig {
  RouterConfig router;
  Activation activation;
  int64_t hidden = 0, intermediate = 0;
  DType act_dtype = DType::kBF16;
  int64_t chunk_tokens = 1024;
  // Llama-4 applies the top-1 weight to the input; derived from the routing method.
  bool weight_on_input() const { return router.method == RoutingMethod::kLlama4Top1Sigmoid; }
};

class MoELayer {
 public:
  // routed: kernel over this rank's experts; shared: kernel over one always-on expert (E = 1,
  // k = 1) or null; correction_bias: [E] fp32 for kSigmoidGroupedTopK (copied), else absent.
  MoELayer(const MoELayerConfig& config, std::shared_ptr<ModularKernel> routed,
           std::shared_ptr<ModularKernel> shared, const TensorView& correction_bias);

  // x [M, H], router_logits [M, E] (fp32 or bf16), y [M, H]; throws moekit::Error on bad input
  // before writing y.
  void forward(const TensorView& x, const TensorView& router_logits, const TensorView& y);
  // With routing computed by the caller (topk_ids [M, k] int32 global, topk_weights fp32).
  void forward_routed(const TensorView& x, const TensorView& topk_ids,
                      const TensorView& topk_weights, const TensorView& y);

  const MoELayerConfig& config() const { return config_; }
  const ModularKernel& routed_kernel() const { return *routed_; }

 private:
  void run(const TensorView& x, const TensorView& ids, const TensorView& w, const TensorView& y,
           int64_t token_key_offset);

  MoELayerConfig config_;
  std::shared_ptr<ModularKernel> routed_, shared_;
  Tensor correction_bias_;
  Tensor ids_, weights_, shared_out_, shared_ids_, shared_weights_;  // [chunk, ...] scratch
};

struct CpuLayerOptions {
  std::optional<ExpertMap> map;  // default: linear over 1 rank
  int rank = 0;
  CpuExpertsConfig cpu;
};

// A CPU layer for `rank`: routed weights are global [E, ...] (the rank's experts are packed),
// shared (if non-null) holds one expert [1, ...]. Throws moekit::Error on bad input.
std::unique_ptr<MoELayer> make_cpu_layer(const MoELayerConfig& config,
                                         const ExpertWeights& routed_weights,
                                         const ExpertWeights* shared_weights,
                                         const TensorView& correction_bias,
                                         const CpuLayerOptions& options = {});

}  // namespace moekit
