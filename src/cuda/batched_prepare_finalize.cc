// The single-rank CUDA PrepareFinalize of the batched format ("cuda-batched-local"): the layout
// of low-latency dispatch on one rank without communication, for the batched-format experts
// (make_cuda_batched_experts). Every size and position stays on the device; the host checks
// shapes, dtypes and devices only, so prepare and finalize are CUDA-graph capturable.
//
//   prepare:  x [M, H] --map_ids, convert or quantize (local_prepare.h)--> local ids [M, k],
//             rows [M, H] in the experts' spec
//             --batched_place--> pair_row [M, k] (e * N + j, or -1), expert_num_tokens [E_local]
//             --batched_scatter_rows--> a1 [E_local, N, H] (+ per-token scales [E_local * N])
//   finalize: y[t] = sum over slots s in order of w[t, s] * fused_out[pair_row[t, s]]
//             (gather_weight_reduce; the experts added b2 to their rows already)
//
// pair_row lives in the workspace prepare takes from: ModularKernel hands the same workspace,
// untouched, to the experts (which take after it) and then to finalize.
#include <algorithm>
#include <climits>

#include "cuda/check.h"
#include "cuda/kernels.h"
#include "cuda/local_prepare.h"
#include "moekit/cuda.h"

namespace moekit {
namespace {

class CudaBatchedPrepareFinalize final : public cuda::LocalPrepareFinalize {
 public:
  CudaBatchedPrepareFinalize(ExpertMap map, int rank, int64_t max_tokens)
      : LocalPrepareFinalize(std::move(map), rank, "cuda-batched-local"), max_(max_tokens) {
    MOEKIT_CHECK(max_ >= 1, name_, ": max_tokens ", max_, " < 1");
    const int64_t El = map_.num_local(rank_);
    MOEKIT_CHECK(El * max_ <= INT32_MAX, name_, ": ", El, " local experts x max_tokens ", max_,
                 " batched rows exceed int32");
  }

  std::string_view name() const override { return name_; }
  ActivationFormat activation_format() const override { return ActivationFormat::kBatched; }

  // Each expert has N = max_tokens rows: a round may carry at most that many tokens. Rounds
  // need no agreement (one rank), so a batch runs in chunks of chunk_tokens <= max_tokens.
  int64_t num_rounds(int64_t local_tokens, int64_t chunk) override {
    MOEKIT_CHECK(std::min(local_tokens, chunk) <= max_, name_, ": a round of ",
                 std::min(local_tokens, chunk), " tokens (", local_tokens, " tokens in chunks of ",
                 chunk, ") exceeds max_tokens ", max_, ", the rows each local expert holds");
    return PrepareFinalize::num_rounds(local_tokens, chunk);
  }

  // All batched rows: [E_local, N] flattened.
  int64_t max_dispatched_tokens(const MoEProblem&) const override {
    return map_.num_local(rank_) * max_;
  }

  size_t workspace_size(const MoEProblem& p) const override {
    // local ids, weights and rows in the spec; pair_row [M, k]; a1 [E_local * N, H] (at most 2
    // bytes an element, can_dispatch) with a per-token scale per row; expert_num_tokens.
    const int64_t M = std::min(max_, p.tokens), rows = map_.num_local(rank_) * max_;
    return local_workspace(p, M) + Workspace::aligned(M * p.top_k * 4) +
           Workspace::aligned(rows * p.hidden * 2) + Workspace::aligned(rows * 4) +
           Workspace::aligned(map_.num_local(rank_) * 4);
  }

  std::optional<std::string> can_combine(TopKWeightApplied applied) const override {
    if (applied != TopKWeightApplied::kNone)
      return "batched rows carry no top-k weights; finalize applies them";
    return std::nullopt;
  }

  DispatchedBatch prepare(const PrepareRequest& req, Workspace& ws,
                          const ExecContext& ctx) override {
    const auto [M, H, k] = check_request(req);
    MOEKIT_CHECK(M <= max_, name_, " prepare: ", M, " tokens exceed max_tokens ", max_);
    const int64_t El = map_.num_local(rank_), N = max_;
    // Everything is taken before anything is enqueued.
    const Local l = take_local(req, ws);
    TensorView pair_row = ws.take(DType::kI32, {M, k});
    DispatchedBatch b;
    b.format = ActivationFormat::kBatched;
    b.a1 = ws.take(req.spec.dtype, {El, N, H});
    b.a1_scale = l.rows.scale;  // kTensor: the one [1] scale as is
    if (l.rows.scale.kind == ScaleKind::kToken)
      b.a1_scale.scale = ws.take(DType::kF32, {El * N});  // a1's rows, flattened
    b.expert_num_tokens = ws.take(DType::kI32, {El});
    for (TensorView* t : {&pair_row, &b.a1, &b.a1_scale.scale, &b.expert_num_tokens})
      t->device = req.x.device;
    pair_row_ = pair_row;

    const cudaStream_t stream = cuda::stream_of(ctx.stream);
    map_local(req, l, stream);
    cuda::batched_place(l.ids.ptr<int32_t>(), M * k, static_cast<int>(El), N,
                        pair_row_.ptr<int32_t>(), b.expert_num_tokens.ptr<int32_t>(), bad_count(),
                        stream);
    const int64_t row_bytes = storage_bytes(req.spec.dtype, H);
    const TensorView& rows = l.rows.a1;
    cuda::batched_scatter_rows(
        pair_row_.ptr<int32_t>(), M * k, static_cast<int>(k), rows.data,
        rows.byte_offset(rows.stride[0]), row_bytes,
        l.rows.scale.kind == ScaleKind::kToken ? l.rows.scale.scale.ptr<float>() : nullptr,
        b.a1.data, b.a1_scale.scale.ptr<float>(), stream);
    return b;
  }

  void finalize(const FinalizeRequest& req, Workspace&, const ExecContext& ctx) override {
    const std::string finalize = name_ + " finalize";
    const char* part = finalize.c_str();
    for (const auto& [t, what] : {std::pair{&req.y, "y"},
                                  {&req.fused_out, "fused_out"},
                                  {&req.topk_ids, "topk_ids"},
                                  {&req.topk_weights, "topk_weights"}})
      cuda::check_device_tensor(*t, part, what);
    MOEKIT_CHECK(req.y.ndim == 2 && traits(req.y.dtype).is_float, part,
                 ": y must be [M, H] of a float dtype, got ", req.y.str());
    const int64_t M = req.y.size(0), H = req.y.size(1);
    MOEKIT_CHECK(pair_row_.present() && pair_row_.size(0) == M, part, ": no prepare of these ", M,
                 " tokens to finalize");
    const int64_t k = pair_row_.size(1), El = map_.num_local(rank_);
    check_shape(req.fused_out, {El, max_, H}, "fused_out");
    check_dtype(req.fused_out, DType::kF32, "fused_out");
    MOEKIT_CHECK(req.fused_out.is_contiguous(), part, ": fused_out must be contiguous, got ",
                 req.fused_out.str());
    check_shape(req.topk_ids, {M, k}, "topk_ids");
    check_shape(req.topk_weights, {M, k}, "topk_weights");
    check_dtype(req.topk_ids, DType::kI32, "topk_ids");
    check_dtype(req.topk_weights, DType::kF32, "topk_weights");
    MOEKIT_CHECK(req.applied != TopKWeightApplied::kWeightedAndReduced, part, ": ",
                 *can_combine(req.applied));
    // The caller's weights (contract 2); kWeighted (applied on the input): each slot's row once.
    const bool weigh = req.applied == TopKWeightApplied::kNone;
    cuda::gather_weight_reduce(req.fused_out.ptr<float>(), H, pair_row_.ptr<int32_t>(),
                               weigh ? req.topk_weights.ptr<float>() : nullptr,
                               req.topk_weights.stride[0], M, static_cast<int>(k), req.y.data,
                               req.y.dtype, req.y.stride[0], cuda::stream_of(ctx.stream));
  }

 private:
  int64_t max_;          // N: rows per local expert, and the most tokens of one prepare
  TensorView pair_row_;  // [M, k] of the last prepare: row e * N + j of each pair, or -1
};

}  // namespace

std::shared_ptr<PrepareFinalize> make_cuda_batched_prepare_finalize(ExpertMap map, int rank,
                                                                    int64_t max_tokens) {
  return std::make_shared<CudaBatchedPrepareFinalize>(std::move(map), rank, max_tokens);
}

}  // namespace moekit
