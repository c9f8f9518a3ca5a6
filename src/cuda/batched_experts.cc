// Batched-format experts on the device: a1 [E_local, N, H] (rows e * N + j) with per-expert
// counts on the device, out [E_local, N, H] fp32. Two paths, chosen per call by the rows offered
// R = E_local * N (the counts are never read on the host):
//   small-batch (R <= max_small_rows): the rows as R top-1 tokens, ids e or -1 written on the
//     device (batched_top1_ids), through the small-batch experts (kNone), whose [R, 1, H] output
//     is out and whose -1 rows are zeros;
//   grouped GEMM: no sort, because the layout already groups rows by expert --
//     a1 [R, H] T --GEMM1 (count[e] rows at offset e * N)--> c1 [R, w13_rows]
//     --activation--> a2 [R, I] T --GEMM2--> out [R, H] fp32 (in place)
//     --batched_bias_and_padding--> + b2 on valid rows, +0 past the counts
//   with T bf16, fp16 or e4m3 as in grouped_gemm_experts.cc (fp8: a1's per-tensor scale, or its
//   per-row scale [R] read at offset e * N, dequantized in the GEMM epilogue; a2 requantized by
//   the activation as intermediate_spec says, over the valid rows only).
// The small-batch path goes through the standard small-batch Experts rather than its launcher,
// so that the sizing of its intermediate buffers stays in one place (small_batch_experts.cc).
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "cuda/check.h"
#include "cuda/experts_base.h"
#include "cuda/grouped_gemm.h"

namespace moekit::cuda {
namespace {

// a1 and out are read and written by TMA and 16-byte vector accesses.
constexpr uintptr_t kAlignBytes = 16;

class BatchedExperts final : public CudaExpertsBase {
 public:
  BatchedExperts(const ExpertWeights& w, const Activation& act, int64_t max_small_rows,
                 const TensorView& static_act_scale)
      : CudaExpertsBase("cuda-batched", w, act, static_act_scale),
        // Default: one row per local expert (N <= 1). Measured on H100 (bf16, every expert
        // active, qwen3-30b-a3b's H and I, 16 experts): at N = 1 small-batch wins (63 vs 92 us;
        // so it does for 8 to 128 experts); for larger N it wins only while most rows are padding
        // (N = 8 with one valid row each: 73 vs 92 us) and loses by 30x and more when they are not,
        // while the grouped GEMM's time hardly moves with the counts (92 to 112 us up to N = 128).
        max_small_(max_small_rows >= 0 ? max_small_rows
                                       : std::max<int64_t>(1, info_.num_local_experts)),
        log_choices_(std::getenv("MOEKIT_LOG_CHOICES") != nullptr) {
    MOEKIT_CHECK(max_small_rows >= -1, name_, ": max_small_rows ", max_small_rows,
                 " < -1 (-1: from the shape)");
    if (max_small_ > 0)
      small_ = make_cuda_small_batch_experts(w, act, TopKWeightApplied::kNone, static_act_scale);
    name_ += "(small-batch <= " + std::to_string(max_small_) + " rows < grouped-gemm)";
  }

  std::string_view name() const override { return name_; }
  ActivationFormat activation_format() const override { return ActivationFormat::kBatched; }
  TopKWeightApplied weight_application() const override { return TopKWeightApplied::kNone; }

  // p.tokens counts every batched row (E_local * N); top_k plays no part.
  std::optional<std::string> can_implement(const MoEProblem& p) const override {
    if (auto r = CudaExpertsBase::can_implement(p)) return r;
    if (p.tokens > INT32_MAX)
      return "batched rows " + std::to_string(p.tokens) + " exceed int32 (grouped-GEMM offsets)";
    return std::nullopt;
  }

  size_t workspace_size(const MoEProblem& p) const override {
    const int64_t R = p.tokens;
    size_t bytes = small_ ? small_bytes(p, std::min(R, max_small_)) : 0;
    if (R > max_small_) bytes = std::max(bytes, grouped_bytes(R));
    return bytes;
  }

  void apply(const DispatchedBatch& b, const TensorView& out, Workspace& ws,
             const ExecContext& ctx) const override {
    check_batched(b, out);
    const int64_t El = info_.num_local_experts, N = b.a1.size(1), R = El * N;
    if (R == 0) return;  // out is empty
    const bool small = R <= max_small_;
    if (log_choices_)
      std::fprintf(stderr, "moekit: %s -> %s (%lld rows = %lld experts x %lld)\n", name_.c_str(),
                   small ? "cuda-small-batch" : "cuda-grouped-gemm", static_cast<long long>(R),
                   static_cast<long long>(El), static_cast<long long>(N));
    if (small)
      apply_small(b, out, ws, ctx);
    else
      apply_grouped(b, out, ws, stream_of(ctx.stream));
  }

 private:
  // Throws "<name>: <what is wrong>" before anything is enqueued.
  void check_batched(const DispatchedBatch& b, const TensorView& out) const {
    MOEKIT_CHECK(b.format == ActivationFormat::kBatched, name_,
                 ": expects batched activations (a1 [E_local, N, H] with expert_num_tokens), got ",
                 moekit::name(b.format));
    const int64_t El = info_.num_local_experts, H = info_.hidden;
    MOEKIT_CHECK(b.a1.ndim == 3 && b.a1.size(0) == El && b.a1.size(2) == H, name_,
                 ": a1 must be [E_local=", El, ", N, H=", H, "], got ", b.a1.str());
    const int64_t N = b.a1.size(1);
    auto expect = [&](const TensorView& t, std::initializer_list<int64_t> shape, DType dtype,
                      const char* what) {
      const std::string part = name_ + ": " + what;
      check_shape(t, shape, part.c_str());
      check_dtype(t, dtype, part.c_str());
      MOEKIT_CHECK(t.device.type == DeviceType::kCUDA && t.is_contiguous() &&
                       (t.data != nullptr || t.numel() == 0),
                   part, " must be a contiguous CUDA tensor, got ", t.str());
    };
    expect(b.a1, {El, N, H}, spec_.dtype, "a1");
    expect(b.expert_num_tokens, {El}, DType::kI32, "expert_num_tokens");
    expect(out, {El, N, H}, DType::kF32, "out");
    MOEKIT_CHECK(b.a1_scale.kind == spec_.scale, name_, ": a1 carries ",
                 moekit::name(b.a1_scale.kind), " scales, format ", info_.quant.str(), " needs ",
                 moekit::name(spec_.scale));
    if (quantized())
      expect(b.a1_scale.scale, {spec_.scale == ScaleKind::kToken ? El * N : 1}, DType::kF32,
             "a1 scale");
    for (const auto& [t, what] : {std::pair{&b.a1, "a1"}, {&out, "out"}})
      MOEKIT_CHECK(reinterpret_cast<uintptr_t>(t->data) % kAlignBytes == 0, name_, ": ", what,
                   " must be 16-byte aligned, got ", t->data);
    MOEKIT_CHECK(El * N <= INT32_MAX, name_, ": ", El, " x ", N,
                 " batched rows exceed int32 (grouped-GEMM offsets)");
  }

  // ---- small-batch path ----

  // The small-batch experts' workspace for `rows` top-1 rows, and the ids and weights [rows].
  size_t small_bytes(MoEProblem p, int64_t rows) const {
    p.tokens = rows;
    p.top_k = 1;
    return small_->workspace_size(p) + 2 * Workspace::aligned(rows * 4);
  }

  void apply_small(const DispatchedBatch& b, const TensorView& out, Workspace& ws,
                   const ExecContext& ctx) const {
    const int64_t El = info_.num_local_experts, N = b.a1.size(1), R = El * N, H = info_.hidden;
    DispatchedBatch rows;
    rows.format = ActivationFormat::kStandard;
    rows.a1 = b.a1.reshaped({R, H});
    rows.a1_scale = b.a1_scale;
    rows.topk_ids = ws.take(DType::kI32, {R, 1});
    rows.topk_weights = ws.take(DType::kF32, {R, 1});
    rows.topk_ids.device = rows.topk_weights.device = b.a1.device;
    batched_top1_ids(b.expert_num_tokens.ptr<int32_t>(), static_cast<int>(El), N,
                     rows.topk_ids.ptr<int32_t>(), rows.topk_weights.ptr<float>(),
                     stream_of(ctx.stream));
    small_->apply(rows, out.reshaped({R, 1, H}), ws, ctx);
  }

  // ---- grouped-GEMM path ----

  // Workspace over R rows: counts, offsets [E_local] int32; c1 [R, w13_rows] (gemm1_out: T, or
  // fp32 for e4m3); a2 [R, I] T; e4m3 only: a2_scale [R] (or [1]) and the amax of a
  // dynamic per-tensor a2 scale; the GEMMs' argument arrays.
  struct GroupedBuffers {
    int32_t *counts, *offsets;
    void *c1, *a2;
    float* a2_scale;
    uint32_t* amax;
    void* gemm;
    size_t gemm_bytes;
  };
  std::array<size_t, 7> grouped_sizes(int64_t R) const {
    const int64_t G = info_.num_local_experts, I = info_.intermediate;
    const int64_t rows13 = info_.activation.w13_rows(I);
    const size_t scaled = quantized() ? 1 : 0;
    return {size_t(G * 4),
            size_t(G * 4),
            size_t(R * rows13 * gemm1_out_bytes(weights_.elem)),
            size_t(R * I * elem_bytes()),
            scaled * R * 4,
            scaled * 4,
            expert_gemms_workspace(weights_.elem, int(G))};
  }
  size_t grouped_bytes(int64_t R) const {
    size_t bytes = 0;
    for (size_t s : grouped_sizes(R)) bytes += Workspace::aligned(s);
    return bytes;
  }
  GroupedBuffers take_grouped(Workspace& ws, int64_t R) const {
    const std::array<size_t, 7> s = grouped_sizes(R);
    GroupedBuffers b;
    b.counts = static_cast<int32_t*>(ws.take_bytes(s[0]));
    b.offsets = static_cast<int32_t*>(ws.take_bytes(s[1]));
    b.c1 = ws.take_bytes(s[2]);
    b.a2 = ws.take_bytes(s[3]);
    b.a2_scale = static_cast<float*>(ws.take_bytes(s[4]));
    b.amax = static_cast<uint32_t*>(ws.take_bytes(s[5]));
    b.gemm_bytes = s[6];
    b.gemm = ws.take_bytes(b.gemm_bytes);
    return b;
  }

  void apply_grouped(const DispatchedBatch& b, const TensorView& out, Workspace& ws,
                     cudaStream_t stream) const {
    const int G = static_cast<int>(info_.num_local_experts);
    const int64_t N = b.a1.size(1), R = G * N;
    const GroupedBuffers buf = take_grouped(ws, R);
    batched_groups(b.expert_num_tokens.ptr<int32_t>(), G, N, buf.counts, buf.offsets, stream);
    run_expert_gemms(weights_, G, R,
                     {.counts = buf.counts,
                      .offsets = buf.offsets,
                      .a = b.a1.data,
                      .a_scale = a1_scale(b),
                      .c1 = buf.c1,
                      .a2 = buf.a2,
                      .a2_scale = buf.a2_scale,
                      .amax = buf.amax,
                      .d = out.ptr<float>(),
                      .d_rounded = false,
                      .gemm = buf.gemm,
                      .gemm_bytes = buf.gemm_bytes},
                     stream);
    batched_bias_and_padding(weights_, buf.counts, N, out.ptr<float>(), stream);
  }

  int64_t max_small_;
  bool log_choices_;
  std::shared_ptr<Experts> small_;  // null when max_small_ is 0
};

}  // namespace
}  // namespace moekit::cuda

namespace moekit {

std::shared_ptr<Experts> make_cuda_batched_experts(const ExpertWeights& weights,
                                                   const Activation& act, int64_t max_small_rows,
                                                   const TensorView& static_act_scale) {
  return std::make_shared<cuda::BatchedExperts>(weights, act, max_small_rows, static_act_scale);
}

}  // namespace moekit
