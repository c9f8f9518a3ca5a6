// MoELayer: router + routed-experts kernel + optional shared expert, chunk by chunk.
#include "moekit/layer.h"

#include <algorithm>

#include "layer/device_ops.h"

namespace moekit {

MoELayer::MoELayer(const MoELayerConfig& config, std::shared_ptr<ModularKernel> routed,
                   std::shared_ptr<ModularKernel> shared, const TensorView& correction_bias)
    : config_(config), routed_(std::move(routed)), shared_(std::move(shared)) {
  if (auto r = config_.router.validate()) MOEKIT_FAIL("MoELayer: router: ", *r);
  MOEKIT_CHECK(routed_, "MoELayer: the routed-experts kernel is required");
  const MoEProblem& p = routed_->problem();
  MOEKIT_CHECK(p.num_experts == config_.router.num_experts && p.top_k == config_.router.top_k,
               "MoELayer: kernel computes E=", p.num_experts, " k=", p.top_k,
               " but the router has E=", config_.router.num_experts, " k=",
               config_.router.top_k);
  MOEKIT_CHECK(p.hidden == config_.hidden && p.act_dtype == config_.act_dtype,
               "MoELayer: kernel has H=", p.hidden, " act ", name(p.act_dtype),
               ", layer config H=", config_.hidden, " act ", name(config_.act_dtype));
  MOEKIT_CHECK(config_.chunk_tokens >= 1, "MoELayer: chunk_tokens ", config_.chunk_tokens, " < 1");
  const int64_t chunk = config_.chunk_tokens, k = config_.router.top_k;
  if (config_.router.method == RoutingMethod::kSigmoidGroupedTopK) {
    check_shape(correction_bias, {config_.router.num_experts}, "correction_bias");
    check_data(correction_bias, "correction_bias");
    MOEKIT_CHECK(correction_bias.device.type == DeviceType::kCPU,
                 "MoELayer: correction_bias must be in host memory, got ", correction_bias.str());
    Tensor bias(DType::kF32, {config_.router.num_experts});
    for (int64_t e = 0; e < config_.router.num_experts; ++e)
      bias.data<float>()[e] =
          load_as_float(correction_bias.data, correction_bias.dtype, e * correction_bias.stride[0]);
    correction_bias_ = scratch(DType::kF32, {config_.router.num_experts});
    layer::upload(bias, correction_bias_);
  } else {
    MOEKIT_CHECK(!correction_bias.present(), "MoELayer: correction_bias given but routing ",
                 name(config_.router.method), " does not use one");
  }
  ids_ = scratch(DType::kI32, {chunk, k});
  weights_ = scratch(DType::kF32, {chunk, k});
  if (shared_) {
    const MoEProblem& s = shared_->problem();
    MOEKIT_CHECK(s.num_experts == 1 && s.top_k == 1 && s.hidden == p.hidden &&
                     s.act_dtype == p.act_dtype,
                 "MoELayer: the shared-expert kernel must be E=1, k=1 with the layer's H and "
                 "dtype, got ", s.str());
    MOEKIT_CHECK(shared_->config().device == device(), "MoELayer: the shared-expert kernel runs on ",
                 shared_->config().device.str(), ", the routed one on ", device().str());
    shared_out_ = scratch(config_.act_dtype, {chunk, p.hidden});
    shared_ids_ = scratch(DType::kI32, {chunk, 1});
    shared_weights_ = scratch(DType::kF32, {chunk, 1});
    const Tensor zeros = Tensor::zeros(DType::kI32, {chunk, 1});
    Tensor ones(DType::kF32, {chunk, 1});
    std::fill_n(ones.data<float>(), chunk, 1.0f);
    layer::upload(zeros, shared_ids_);
    layer::upload(ones, shared_weights_);
  }
}

TensorView MoELayer::scratch(DType dtype, std::initializer_list<int64_t> shape) {
  TensorView v(nullptr, dtype, shape, device());
  const KernelConfig& c = routed_->config();
  std::shared_ptr<void> buffer;
  if (c.allocate_workspace) {
    buffer = c.allocate_workspace(size_t(v.nbytes()));
  } else {
    MOEKIT_CHECK(device().type == DeviceType::kCPU, "MoELayer: a kernel on ", device().str(),
                 " needs a workspace allocator (KernelConfig::allocate_workspace)");
    buffer = std::shared_ptr<void>(aligned_alloc_bytes(v.nbytes()), aligned_free_bytes);
  }
  v.data = buffer.get();
  buffers_.push_back(std::move(buffer));
  return v;
}

void MoELayer::forward(const TensorView& x, const TensorView& logits, const TensorView& y,
                       const ExecContext& ctx) {
  MOEKIT_CHECK(x.ndim == 2, "x: expected [M, H=", config_.hidden, "], got ", x.str());
  const int64_t M = x.size(0);
  check_shape(logits, {M, config_.router.num_experts}, "router_logits");
  check_shape(y, {M, config_.hidden}, "y");
  MOEKIT_CHECK(logits.device == device(), "router_logits: expected on ", device().str(), ", got ",
               logits.str());
  // Chunks are checked one by one below; an overlap across chunks must be caught here, before
  // the first chunk writes y.
  MOEKIT_CHECK(!y.overlaps(x), "y overlaps x (in-place is not supported)");
  MOEKIT_CHECK(!y.overlaps(logits), "y overlaps router_logits");
  const int64_t chunk = config_.chunk_tokens;
  for (int64_t begin = 0; begin < M; begin += chunk) {
    const int64_t end = std::min(M, begin + chunk);
    const TensorView ids = ids_.slice0(0, end - begin);
    const TensorView w = weights_.slice0(0, end - begin);
    route(config_.router, logits.slice0(begin, end), correction_bias_, ids, w, ctx);
    run(x.slice0(begin, end), ids, w, y.slice0(begin, end), begin, ctx);
  }
}

void MoELayer::forward_routed(const TensorView& x, const TensorView& topk_ids,
                              const TensorView& topk_weights, const TensorView& y,
                              const ExecContext& ctx) {
  run(x, topk_ids, topk_weights, y, 0, ctx);
}

void MoELayer::run(const TensorView& x, const TensorView& ids, const TensorView& w,
                   const TensorView& y, int64_t token_key_offset, const ExecContext& ctx) {
  routed_->forward({x, ids, w, y, config_.weight_on_input(), token_key_offset}, ctx);
  if (!shared_) return;
  // y += shared(x): the shared expert sees every token with weight 1.
  const int64_t M = x.size(0), chunk = config_.chunk_tokens;
  for (int64_t begin = 0; begin < M; begin += chunk) {
    const int64_t n = std::min(M, begin + chunk) - begin;
    const TensorView out = shared_out_.slice0(0, n);
    shared_->forward({x.slice0(begin, begin + n), shared_ids_.slice0(0, n),
                      shared_weights_.slice0(0, n), out, false, 0},
                     ctx);
    layer::add_rows(y.slice0(begin, begin + n), out, ctx);
  }
}

std::unique_ptr<MoELayer> make_cpu_layer(const MoELayerConfig& config,
                                         const ExpertWeights& routed_weights,
                                         const ExpertWeights* shared_weights,
                                         const TensorView& correction_bias,
                                         const CpuLayerOptions& options) {
  if (auto r = config.router.validate()) MOEKIT_FAIL("make_cpu_layer: router: ", *r);
  const ExpertMap map = options.map ? *options.map : ExpertMap::linear(config.router.num_experts, 1);
  MOEKIT_CHECK(map.num_experts() == config.router.num_experts, "make_cpu_layer: expert map ",
               map.str(), " does not have the router's E=", config.router.num_experts);
  if (auto r = validate_weights(routed_weights, config.activation))
    MOEKIT_FAIL("make_cpu_layer: routed weights: ", *r);
  MOEKIT_CHECK(routed_weights.hidden() == config.hidden &&
                   routed_weights.intermediate() == config.intermediate,
               "make_cpu_layer: weights have H=", routed_weights.hidden(), " I=",
               routed_weights.intermediate(), ", config H=", config.hidden, " I=",
               config.intermediate);
  auto wr = make_cpu_weight_and_reduce(options.cpu.num_threads);
  const ExpertWeights local = ExpertWeights::local_view(routed_weights, map, options.rank);
  auto routed = std::make_shared<ModularKernel>(
      make_local_prepare_finalize(map, options.rank),
      make_cpu_experts(local, config.activation, options.cpu), wr,
      KernelConfig{config.router.top_k, config.act_dtype, config.chunk_tokens});
  std::shared_ptr<ModularKernel> shared;
  if (shared_weights) {
    MOEKIT_CHECK(shared_weights->num_local() == 1, "make_cpu_layer: shared weights hold ",
                 shared_weights->num_local(), " experts; fuse shared experts into one");
    shared = std::make_shared<ModularKernel>(
        make_local_prepare_finalize(ExpertMap::linear(1, 1), 0),
        make_cpu_experts(*shared_weights, config.activation, options.cpu), wr,
        KernelConfig{1, config.act_dtype, config.chunk_tokens});
  }
  return std::make_unique<MoELayer>(config, std::move(routed), std::move(shared), correction_bias);
}

}  // namespace moekit
