// The single-rank CUDA PrepareFinalize (standard format) and WeightAndReduce, and what the
// single-rank CUDA PrepareFinalize implementations share (local_prepare.h): host layers that
// validate shapes, dtypes and devices (never data: no host synchronisation), then launch the
// kernels of parts_kernels.cu and quantize.cu on the caller's stream.
#include <algorithm>
#include <vector>

#include "cuda/check.h"
#include "cuda/kernels.h"
#include "cuda/local_prepare.h"
#include "modular/dispatch_util.h"
#include "moekit/cuda.h"

namespace moekit {
namespace cuda {

void check_device_tensor(const TensorView& t, const char* part, const char* what) {
  MOEKIT_CHECK(t.device.type == DeviceType::kCUDA, part, ": ", what, " must be a CUDA tensor, got ",
               t.str());
  check_row_major(t, what);
  check_data(t, what);
}

LocalPrepareFinalize::LocalPrepareFinalize(ExpertMap map, int rank, std::string name)
    : map_(std::move(map)), rank_(rank), name_(std::move(name)) {
  MOEKIT_CHECK(rank >= 0 && rank < map_.num_ranks(), name_, ": rank ", rank, " not in [0, ",
               map_.num_ranks(), ") of ", map_.str());
  // [E] routes of this rank, the device copy of the expert map's table.
  const int E = map_.num_experts();
  std::vector<ExpertRoute> routes(E, ExpertRoute{-1, 1, 0});
  const auto held = map_.local_to_global(rank_);
  for (size_t slot = 0; slot < held.size(); ++slot) {
    const int32_t e = held[slot];
    const auto ranks = map_.replicas(e);
    const auto it = std::find(ranks.begin(), ranks.end(), rank_);
    routes[e] = {static_cast<int32_t>(slot), static_cast<int32_t>(ranks.size()),
                 static_cast<int32_t>(it - ranks.begin())};
  }
  static_assert(sizeof(ExpertRoute) == 3 * sizeof(int32_t));
  routes_ = CudaTensor(DType::kI32, {E, 3});
  copy_to_device(TensorView(routes.data(), DType::kI32, {E, 3}), routes_);
  bad_count_ = CudaTensor(DType::kI32, {1});
  MOEKIT_CUDA_CHECK(cudaMemset(bad_count_.view().data, 0, sizeof(int32_t)));
}

std::optional<std::string> LocalPrepareFinalize::can_implement(const MoEProblem& p) const {
  if (auto r = detail::expert_count_mismatch(p, map_)) return r;
  if (!traits(p.act_dtype).is_float)
    return "activation dtype " + std::string(moekit::name(p.act_dtype)) + " is not a float";
  return std::nullopt;
}

std::optional<std::string> LocalPrepareFinalize::can_dispatch(const ActivationSpec& spec) const {
  // The workspace holds converted rows of at most 2 bytes an element (local_workspace).
  if (traits(spec.dtype).is_float && spec.scale == ScaleKind::kNone) {
    if (traits(spec.dtype).bits > 16)
      return "activations " + std::string(moekit::name(spec.dtype)) +
             ": cuda prepare produces bf16 or fp16 activations (or fp8 e4m3)";
    return std::nullopt;
  }
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

int64_t LocalPrepareFinalize::take_bad_count() const {
  int32_t n = 0;
  MOEKIT_CUDA_CHECK(cudaMemcpy(&n, bad_count_.view().data, sizeof n, cudaMemcpyDeviceToHost));
  MOEKIT_CUDA_CHECK(cudaMemset(bad_count_.view().data, 0, sizeof n));
  return n;
}

LocalPrepareFinalize::Sizes LocalPrepareFinalize::check_request(const PrepareRequest& req) const {
  const std::string prepare = name_ + " prepare";
  const char* part = prepare.c_str();
  check_device_tensor(req.x, part, "x");
  check_device_tensor(req.topk_ids, part, "topk_ids");
  check_device_tensor(req.topk_weights, part, "topk_weights");
  if (auto r = can_dispatch(req.spec)) MOEKIT_FAIL(part, ": ", *r);
  if (req.spec.static_scale.present()) {
    check_device_tensor(req.spec.static_scale, part, "static activation scale");
    check_shape(req.spec.static_scale, {1}, "static activation scale");
    check_dtype(req.spec.static_scale, DType::kF32, "static activation scale");
  }
  MOEKIT_CHECK(req.x.ndim == 2 && req.topk_ids.ndim == 2, part,
               ": x must be [M, H] and topk_ids [M, k], got ", req.x.str(), " and ",
               req.topk_ids.str());
  const int64_t M = req.x.size(0), H = req.x.size(1), k = req.topk_ids.size(1);
  MOEKIT_CHECK(traits(req.x.dtype).is_float, part, ": x must be a float tensor, got ", req.x.str());
  check_shape(req.topk_ids, {M, k}, "topk_ids");
  check_shape(req.topk_weights, {M, k}, "topk_weights");
  check_dtype(req.topk_ids, DType::kI32, "topk_ids");
  check_dtype(req.topk_weights, DType::kF32, "topk_weights");
  MOEKIT_CHECK(!req.weight_on_input || k == 1, part, ": weight_on_input needs k = 1, got ", k);
  return {M, H, k};
}

size_t LocalPrepareFinalize::local_workspace(const MoEProblem& p, int64_t rows) {
  // ids [M, k] int32 + weights [M, k] fp32 + a1 [M, H] (at most 2 bytes an element, can_dispatch)
  // + an activation scale per row + the amax of a dynamic per-tensor scale.
  return 2 * Workspace::aligned(rows * p.top_k * 4) + Workspace::aligned(rows * p.hidden * 2) +
         Workspace::aligned(rows * 4) + Workspace::aligned(4);
}

LocalPrepareFinalize::Local LocalPrepareFinalize::take_local(const PrepareRequest& req,
                                                             Workspace& ws) const {
  const int64_t M = req.x.size(0), H = req.x.size(1), k = req.topk_ids.size(1);
  const ActivationSpec& spec = req.spec;
  Local l;
  l.ids = ws.take(DType::kI32, {M, k});
  l.weights = ws.take(DType::kF32, {M, k});
  l.ids.device = l.weights.device = req.x.device;
  if (!req.weight_on_input && req.x.dtype == spec.dtype) {
    l.rows.a1 = req.x;  // rows may be strided: the experts take a row stride
    l.rows.is_x = true;
    return l;
  }
  l.rows.a1 = ws.take(spec.dtype, {M, H});
  l.rows.a1.device = req.x.device;
  if (spec.scale == ScaleKind::kNone) return l;
  // e4m3: the typed scale travels with a1 (contract 4).
  TensorView scale = ws.take(DType::kF32, {spec.scale == ScaleKind::kToken ? M : 1});
  scale.device = req.x.device;
  l.rows.scale = ActivationScale{spec.scale, 0, scale};
  l.rows.amax = static_cast<uint32_t*>(ws.take_bytes(4));
  return l;
}

void LocalPrepareFinalize::map_local(const PrepareRequest& req, const Local& l,
                                     cudaStream_t stream) const {
  const int64_t M = req.x.size(0), H = req.x.size(1), k = req.topk_ids.size(1);
  map_ids(req.topk_ids.ptr<int32_t>(), req.topk_ids.stride[0], req.topk_weights.ptr<float>(),
          req.topk_weights.stride[0], M, static_cast<int>(k), routes_.data<ExpertRoute>(),
          map_.num_experts(), req.token_key_offset, req.weight_on_input, l.ids.ptr<int32_t>(),
          l.weights.ptr<float>(), bad_count(), stream);
  if (l.rows.is_x) return;
  const float* row_scale = req.weight_on_input ? req.topk_weights.ptr<float>() : nullptr;
  if (l.rows.scale.kind == ScaleKind::kNone) {
    convert_rows(req.x.data, req.x.dtype, req.x.stride[0], M, H, row_scale,
                 req.topk_weights.stride[0], l.rows.a1.data, l.rows.a1.dtype, stream);
    return;
  }
  const ActivationSpec& spec = req.spec;
  const Fp8Rows out{
      .q = l.rows.a1.ptr<uint8_t>(),
      .kind = spec.scale,
      .scale = l.rows.scale.scale.ptr<float>(),
      .static_scale = spec.static_scale.present() ? spec.static_scale.ptr<float>() : nullptr,
      .amax = l.rows.amax,
  };
  quantize_rows_fp8(req.x.data, req.x.dtype, req.x.stride[0], M, H, row_scale,
                    req.topk_weights.stride[0], out, stream);
}

}  // namespace cuda

namespace {

class CudaPrepareFinalize final : public cuda::LocalPrepareFinalize {
 public:
  CudaPrepareFinalize(ExpertMap map, int rank)
      : LocalPrepareFinalize(std::move(map), rank, "cuda-local") {}

  std::string_view name() const override { return name_; }
  ActivationFormat activation_format() const override { return ActivationFormat::kStandard; }
  int64_t max_dispatched_tokens(const MoEProblem& p) const override { return p.tokens; }
  size_t workspace_size(const MoEProblem& p) const override { return local_workspace(p, p.tokens); }

  DispatchedBatch prepare(const PrepareRequest& req, Workspace& ws,
                          const ExecContext& ctx) override {
    check_request(req);
    const Local l = take_local(req, ws);
    map_local(req, l, cuda::stream_of(ctx.stream));
    DispatchedBatch b;
    b.topk_ids = l.ids;
    b.topk_weights = l.weights;
    b.a1 = l.rows.a1;
    b.a1_scale = l.rows.scale;
    return b;
  }

  void finalize(const FinalizeRequest& req, Workspace&, const ExecContext& ctx) override {
    req.weight_and_reduce->apply(req.fused_out, req.topk_ids, req.topk_weights, req.applied, req.y,
                                 ctx);
  }
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
      cuda::check_device_tensor(*t, part, what);
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
  const auto* cuda_pf = dynamic_cast<const cuda::LocalPrepareFinalize*>(&pf);
  MOEKIT_CHECK(cuda_pf, "cuda_bad_id_count: '", pf.name(), "' is not a CUDA prepare/finalize");
  return cuda_pf->take_bad_count();
}

std::shared_ptr<WeightAndReduce> make_cuda_weight_and_reduce() {
  return std::make_shared<CudaWeightAndReduce>();
}

}  // namespace moekit
