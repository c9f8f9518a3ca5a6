// The CUDA PrepareFinalize (single rank, no communication) and WeightAndReduce: host layers
// that validate shapes, dtypes and devices (never data: no host synchronisation), then launch
// the kernels of parts_kernels.cu on the caller's stream.
#include <algorithm>
#include <vector>

#include "cuda/check.h"
#include "cuda/kernels.h"
#include "modular/dispatch_util.h"
#include "moekit/cuda.h"

namespace moekit {
namespace {

void check_device(const TensorView& t, const char* part, const char* what) {
  MOEKIT_CHECK(t.device.type == DeviceType::kCUDA, part, ": ", what, " must be a CUDA tensor, got ",
               t.str());
  check_row_major(t, what);
  check_data(t, what);
}

class CudaPrepareFinalize final : public PrepareFinalize {
 public:
  CudaPrepareFinalize(ExpertMap map, int rank) : map_(std::move(map)), rank_(rank) {
    MOEKIT_CHECK(rank >= 0 && rank < map_.num_ranks(), "cuda prepare/finalize: rank ", rank,
                 " not in [0, ", map_.num_ranks(), ") of ", map_.str());
    // [E] routes of this rank, the device copy of the expert map's table.
    const int E = map_.num_experts();
    std::vector<cuda::ExpertRoute> routes(E, cuda::ExpertRoute{-1, 1, 0});
    const auto held = map_.local_to_global(rank_);
    for (size_t slot = 0; slot < held.size(); ++slot) {
      const int32_t e = held[slot];
      const auto ranks = map_.replicas(e);
      const auto it = std::find(ranks.begin(), ranks.end(), rank_);
      routes[e] = {static_cast<int32_t>(slot), static_cast<int32_t>(ranks.size()),
                   static_cast<int32_t>(it - ranks.begin())};
    }
    static_assert(sizeof(cuda::ExpertRoute) == 3 * sizeof(int32_t));
    routes_ = CudaTensor(DType::kI32, {E, 3});
    copy_to_device(TensorView(routes.data(), DType::kI32, {E, 3}), routes_);
    bad_count_ = CudaTensor(DType::kI32, {1});
    MOEKIT_CUDA_CHECK(cudaMemset(bad_count_.view().data, 0, sizeof(int32_t)));
  }

  std::string_view name() const override { return "cuda-local"; }
  ActivationFormat activation_format() const override { return ActivationFormat::kStandard; }
  const ExpertMap& expert_map() const override { return map_; }
  int rank() const override { return rank_; }

  std::optional<std::string> can_implement(const MoEProblem& p) const override {
    if (auto r = detail::expert_count_mismatch(p, map_)) return r;
    if (!traits(p.act_dtype).is_float)
      return "activation dtype " + std::string(moekit::name(p.act_dtype)) + " is not a float";
    return std::nullopt;
  }

  // Float activations (converted from x), or e4m3 with a per-tensor (static or dynamic) or
  // per-token fp32 scale (quantized from x on the device).
  std::optional<std::string> can_dispatch(const ActivationSpec& spec) const override {
    if (traits(spec.dtype).is_float && spec.scale == ScaleKind::kNone) return std::nullopt;
    const bool fp8 = spec.dtype == DType::kF8E4M3 && spec.scale_dtype == DType::kF32 &&
                     (spec.scale == ScaleKind::kTensor || spec.scale == ScaleKind::kToken);
    if (!fp8)
      return "activations " + std::string(moekit::name(spec.dtype)) + " with " +
             std::string(moekit::name(spec.scale)) + " scales (" +
             std::string(moekit::name(spec.scale_dtype)) +
             "): cuda prepare produces float activations or fp8 e4m3 with per-tensor or "
             "per-token fp32 scales";
    if (spec.static_scale.present() && spec.scale != ScaleKind::kTensor)
      return "a static activation scale must be per-tensor";
    return std::nullopt;
  }

  int64_t max_dispatched_tokens(const MoEProblem& p) const override { return p.tokens; }

  size_t workspace_size(const MoEProblem& p) const override {
    // ids [M, k] int32 + weights [M, k] fp32 + a1 [M, H] (at most 2 bytes an element) + an
    // activation scale per row + the amax of a dynamic per-tensor scale.
    return 2 * Workspace::aligned(p.tokens * p.top_k * 4) +
           Workspace::aligned(p.tokens * p.hidden * 2) + Workspace::aligned(p.tokens * 4) +
           Workspace::aligned(4);
  }

  DispatchedBatch prepare(const PrepareRequest& req, Workspace& ws,
                          const ExecContext& ctx) override {
    const char* part = "cuda prepare";
    check_device(req.x, part, "x");
    check_device(req.topk_ids, part, "topk_ids");
    check_device(req.topk_weights, part, "topk_weights");
    if (auto r = can_dispatch(req.spec)) MOEKIT_FAIL(part, ": ", *r);
    if (req.spec.static_scale.present()) {
      check_device(req.spec.static_scale, part, "static activation scale");
      check_shape(req.spec.static_scale, {1}, "static activation scale");
      check_dtype(req.spec.static_scale, DType::kF32, "static activation scale");
    }
    const int64_t M = req.x.size(0), H = req.x.size(1), k = req.topk_ids.size(1);
    check_shape(req.topk_weights, {M, k}, "topk_weights");
    check_dtype(req.topk_ids, DType::kI32, "topk_ids");
    check_dtype(req.topk_weights, DType::kF32, "topk_weights");
    MOEKIT_CHECK(!req.weight_on_input || k == 1, part, ": weight_on_input needs k = 1, got ", k);
    const cudaStream_t stream = cuda::stream_of(ctx.stream);
    DispatchedBatch b;
    b.topk_ids = ws.take(DType::kI32, {M, k});
    b.topk_weights = ws.take(DType::kF32, {M, k});
    b.topk_ids.device = b.topk_weights.device = req.x.device;
    cuda::map_ids(req.topk_ids.ptr<int32_t>(), req.topk_ids.stride[0],
                  req.topk_weights.ptr<float>(), req.topk_weights.stride[0], M, static_cast<int>(k),
                  routes_.data<cuda::ExpertRoute>(), map_.num_experts(), req.token_key_offset,
                  req.weight_on_input, b.topk_ids.ptr<int32_t>(), b.topk_weights.ptr<float>(),
                  bad_count_.data<int32_t>(), stream);
    const ActivationSpec& spec = req.spec;
    if (!req.weight_on_input && req.x.dtype == spec.dtype) {
      b.a1 = req.x;  // rows may be strided: the experts take a row stride
      return b;
    }
    b.a1 = ws.take(spec.dtype, {M, H});
    b.a1.device = req.x.device;
    const float* row_scale = req.weight_on_input ? req.topk_weights.ptr<float>() : nullptr;
    if (spec.scale == ScaleKind::kNone) {
      cuda::convert_rows(req.x.data, req.x.dtype, req.x.stride[0], M, H, row_scale,
                         req.topk_weights.stride[0], b.a1.data, spec.dtype, stream);
      return b;
    }
    // e4m3: the typed scale travels with a1 (contract 4).
    TensorView scale = ws.take(DType::kF32, {spec.scale == ScaleKind::kToken ? M : 1});
    scale.device = req.x.device;
    const cuda::Fp8Rows out{
        .q = b.a1.ptr<uint8_t>(),
        .kind = spec.scale,
        .scale = scale.ptr<float>(),
        .static_scale = spec.static_scale.present() ? spec.static_scale.ptr<float>() : nullptr,
        .amax = static_cast<uint32_t*>(ws.take_bytes(4)),
    };
    cuda::quantize_rows_fp8(req.x.data, req.x.dtype, req.x.stride[0], M, H, row_scale,
                            req.topk_weights.stride[0], out, stream);
    b.a1_scale = ActivationScale{spec.scale, 0, scale};
    return b;
  }

  void finalize(const FinalizeRequest& req, Workspace&, const ExecContext& ctx) override {
    req.weight_and_reduce->apply(req.fused_out, req.topk_ids, req.topk_weights, req.applied, req.y,
                                 ctx);
  }

  int64_t take_bad_count() const {
    int32_t n = 0;
    MOEKIT_CUDA_CHECK(cudaMemcpy(&n, bad_count_.view().data, sizeof n, cudaMemcpyDeviceToHost));
    MOEKIT_CUDA_CHECK(cudaMemset(bad_count_.view().data, 0, sizeof n));
    return n;
  }

 private:
  ExpertMap map_;
  int rank_;
  CudaTensor routes_;     // [E, 3] ExpertRoute
  CudaTensor bad_count_;  // [1] ids outside [-1, E) seen by prepare
};

class CudaWeightAndReduce final : public WeightAndReduce {
 public:
  std::string_view name() const override { return "cuda"; }

  void apply(const TensorView& fused_out, const TensorView& topk_ids,
             const TensorView& topk_weights, TopKWeightApplied applied, const TensorView& y,
             const ExecContext& ctx) const override {
    const char* part = "cuda weight-and-reduce";
    for (const auto& [t, what] : {std::pair{&fused_out, "fused_out"},
                                  {&topk_ids, "topk_ids"},
                                  {&topk_weights, "topk_weights"},
                                  {&y, "y"}})
      check_device(*t, part, what);
    const int64_t M = y.size(0), H = y.size(1), k = topk_ids.size(1);
    const bool reduced = applied == TopKWeightApplied::kWeightedAndReduced;
    if (reduced)
      check_shape(fused_out, {M, H}, "fused_out");
    else
      check_shape(fused_out, {M, k, H}, "fused_out");
    MOEKIT_CHECK(fused_out.is_contiguous(), part, ": fused_out must be contiguous, got ",
                 fused_out.str());
    check_dtype(fused_out, DType::kF32, "fused_out");
    check_shape(topk_ids, {M, k}, "topk_ids");
    check_shape(topk_weights, {M, k}, "topk_weights");
    check_dtype(topk_ids, DType::kI32, "topk_ids");
    check_dtype(topk_weights, DType::kF32, "topk_weights");
    cuda::weight_and_reduce(fused_out.ptr<float>(), M, static_cast<int>(k), H, reduced,
                            topk_ids.ptr<int32_t>(), topk_ids.stride[0], topk_weights.ptr<float>(),
                            topk_weights.stride[0], applied == TopKWeightApplied::kNone, y.data,
                            y.dtype, y.stride[0], cuda::stream_of(ctx.stream));
  }
};

}  // namespace

std::shared_ptr<PrepareFinalize> make_cuda_prepare_finalize(ExpertMap map, int rank) {
  return std::make_shared<CudaPrepareFinalize>(std::move(map), rank);
}

int64_t cuda_bad_id_count(const PrepareFinalize& pf) {
  const auto* cuda_pf = dynamic_cast<const CudaPrepareFinalize*>(&pf);
  MOEKIT_CHECK(cuda_pf, "cuda_bad_id_count: '", pf.name(), "' is not a CUDA prepare/finalize");
  return cuda_pf->take_bad_count();
}

std::shared_ptr<WeightAndReduce> make_cuda_weight_and_reduce() {
  return std::make_shared<CudaWeightAndReduce>();
}

}  // namespace moekit
