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

// The rows up to which the small-batch (decode) experts beat the grouped GEMM, from the shape and
// the weights' element type: small-batch streams each active expert's weights once per few rows
// (again for each pass of 4 rows that an expert holds), the grouped GEMM once per tile of rows at a
// fixed cost of sorting and launches. Up to half a (token, expert) pair per local expert for 16-bit
// weights, rows <= max(1, E_local / (2k)); up to a quarter for fp8 weights (DType::kF8E4M3), whose
// small-batch kernels for more than a few pairs per expert are slower, rows <= max(1, E_local /
// (4k)). Measured on an H200 (bench/notes_cuda.md v14), us small-batch vs grouped GEMM, bf16:
// qwen3-30b-a3b 8 tokens 154 vs 168, 16 tokens 257 vs 225; gpt-oss-20b 4 tokens 203 vs 231, 8
// tokens 329 vs 303; deepseek-v3 8 tokens 1126 vs 1147, 32 tokens 3237 vs 2257; but mixtral-8x7b 4
// tokens 525 vs 573. fp8-token: qwen3-30b-a3b 4 tokens 79 vs 87, 8 tokens 118 vs 116; gpt-oss-20b 2
// tokens 105 vs 113, 4 tokens 155 vs 151; mixtral-8x7b 2 tokens 229 vs 215.
int64_t cuda_small_batch_rows(int64_t num_local_experts, int top_k, DType weights = DType::kBF16);

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
