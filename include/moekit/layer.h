// MoELayer: the front door. Router + modular kernel over the routed experts + optional shared
// expert(s), processed in chunks of tokens so memory stays bounded.
#pragma once

#include <memory>
#include <optional>
#include <vector>

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

// The layer runs where its kernels run (KernelConfig::device): its tensors live there, and on
// a CUDA device forward enqueues everything (routing included) on ctx.stream without
// synchronizing the host, so a whole forward can be captured in a CUDA graph.
class MoELayer {
 public:
  // routed: kernel over this rank's experts; shared: kernel over one always-on expert (E = 1,
  // k = 1, same device) or null; correction_bias: [E] fp32 for kSigmoidGroupedTopK, in host
  // memory (copied to the kernels' device), else absent.
  MoELayer(const MoELayerConfig& config, std::shared_ptr<ModularKernel> routed,
           std::shared_ptr<ModularKernel> shared, const TensorView& correction_bias);

  // x [M, H], router_logits [M, E] (fp32 or bf16), y [M, H]; throws moekit::Error on bad input
  // before writing y.
  void forward(const TensorView& x, const TensorView& router_logits, const TensorView& y,
               const ExecContext& ctx = {});
  // With routing computed by the caller (topk_ids [M, k] int32 global, topk_weights fp32).
  void forward_routed(const TensorView& x, const TensorView& topk_ids,
                      const TensorView& topk_weights, const TensorView& y,
                      const ExecContext& ctx = {});

  const MoELayerConfig& config() const { return config_; }
  const ModularKernel& routed_kernel() const { return *routed_; }
  Device device() const { return routed_->config().device; }

 private:
  void run(const TensorView& x, const TensorView& ids, const TensorView& w, const TensorView& y,
           int64_t token_key_offset, const ExecContext& ctx);
  // A contiguous scratch tensor on the layer's device, owned by the layer.
  TensorView scratch(DType dtype, std::initializer_list<int64_t> shape);

  MoELayerConfig config_;
  std::shared_ptr<ModularKernel> routed_, shared_;
  std::vector<std::shared_ptr<void>> buffers_;  // owns the scratch below
  TensorView correction_bias_;                  // [E] fp32 or absent
  TensorView ids_, weights_, shared_out_, shared_ids_, shared_weights_;  // [chunk, ...]
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

#ifdef MOEKIT_HAS_CUDA
struct CudaLayerOptions {
  std::optional<ExpertMap> map;  // default: linear over 1 rank
  int rank = 0;
  // Small-batch experts up to this many dispatched rows, grouped GEMM above; -1: from the shape
  // (cuda_small_batch_rows). MOEKIT_LOG_CHOICES=1 logs each forward's choice.
  int64_t max_small_tokens = -1;
};

// The rows up to which the small-batch (decode) experts beat the grouped GEMM, from the shape:
// small-batch streams each active expert's weights once per few rows, the grouped GEMM once per
// tile of rows at a fixed cost of sorting and launches, so the crossover is at about one row per
// expert on average: rows * k <= E_local, i.e. rows <= max(1, E_local / k). Measured on H100
// (bench/notes_cuda_v1-v7.md): one row per expert (qwen3 at 16 tokens) favours small-batch; two
// (deepseek-v3 at 64 tokens: 3.9 per active expert, 6.75 ms vs 6.0 ms grouped at 256 tokens) and
// four (mixtral at 16 tokens) the grouped GEMM.
int64_t cuda_small_batch_rows(int64_t num_local_experts, int top_k);

// A layer on the CUDA device that holds the weights: routed weights global [E, ...] on the
// device (the rank's experts are viewed, not copied: they must outlive the layer), shared (if
// non-null) one expert [1, ...] on the same device; correction_bias in host memory. Routing,
// experts, weight-and-reduce and the shared expert all run on the forward's stream.
std::unique_ptr<MoELayer> make_cuda_layer(const MoELayerConfig& config,
                                          const ExpertWeights& routed_weights,
                                          const ExpertWeights* shared_weights,
                                          const TensorView& correction_bias,
                                          const CudaLayerOptions& options = {});
#endif

}  // namespace moekit
