// make_cuda_layer: the CUDA parts of the modular kernel assembled into a MoELayer.
#include "moekit/layer.h"

#include <algorithm>

#include "moekit/cuda.h"

namespace moekit {

int64_t cuda_small_batch_rows(int64_t num_local_experts, int top_k, DType weights) {
  const int64_t per_expert = weights == DType::kF8E4M3 ? 4 : 2;  // local experts per pair
  return std::max<int64_t>(1, num_local_experts / (per_expert * std::max(1, top_k)));
}

std::unique_ptr<MoELayer> make_cuda_layer(const MoELayerConfig& config,
                                          const ExpertWeights& routed_weights,
                                          const ExpertWeights* shared_weights,
                                          const TensorView& correction_bias,
                                          const CudaLayerOptions& options) {
  if (auto r = config.router.validate()) MOEKIT_FAIL("make_cuda_layer: router: ", *r);
  const ExpertMap map =
      options.map ? *options.map : ExpertMap::linear(config.router.num_experts, 1);
  MOEKIT_CHECK(map.num_experts() == config.router.num_experts, "make_cuda_layer: expert map ",
               map.str(), " does not have the router's E=", config.router.num_experts);
  const Device device = routed_weights.w13.device;
  MOEKIT_CHECK(device.type == DeviceType::kCUDA,
               "make_cuda_layer: routed weights must be on a CUDA device, got ",
               routed_weights.w13.str());
  const KernelConfig kernel{config.router.top_k, config.act_dtype, config.chunk_tokens, device,
                            cuda_workspace_allocator(device.id)};
  const ExpertWeights local = ExpertWeights::local_view(routed_weights, map, options.rank);
  auto small_rows = [&](const ExpertWeights& w, int k) {
    return options.max_small_tokens >= 0
               ? options.max_small_tokens
               : cuda_small_batch_rows(w.num_local(), k, w.scheme().weight_dtype());
  };
  auto wr = make_cuda_weight_and_reduce();
  auto routed = std::make_shared<ModularKernel>(
      make_cuda_prepare_finalize(map, options.rank),
      make_cuda_experts(local, config.activation, small_rows(local, config.router.top_k)), wr,
      kernel);
  std::shared_ptr<ModularKernel> shared;
  if (shared_weights) {
    MOEKIT_CHECK(shared_weights->num_local() == 1, "make_cuda_layer: shared weights hold ",
                 shared_weights->num_local(), " experts; fuse shared experts into one");
    KernelConfig one = kernel;
    one.top_k = 1;
    shared = std::make_shared<ModularKernel>(
        make_cuda_prepare_finalize(ExpertMap::linear(1, 1), 0),
        make_cuda_experts(*shared_weights, config.activation, small_rows(*shared_weights, 1)), wr,
        one);
  }
  return std::make_unique<MoELayer>(config, std::move(routed), std::move(shared), correction_bias);
}

}  // namespace moekit
