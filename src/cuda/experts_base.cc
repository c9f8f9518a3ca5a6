#include "cuda/experts_base.h"

#include <cstdint>

namespace moekit::cuda {
namespace {

// Rows of bf16 weights are read 16 bytes at a time by every kernel.
constexpr int64_t kAlignElements = 8;

std::optional<std::string> check_tensor(const TensorView& t, const char* what) {
  if (!t.present()) return std::nullopt;
  if (t.device.type != DeviceType::kCUDA)
    return std::string(what) + " is not on a CUDA device: " + t.str();
  if (t.dtype != DType::kBF16) return std::string(what) + " must be bf16, got " + t.str();
  if (t.stride[t.ndim - 1] != 1) return std::string(what) + " rows must be contiguous: " + t.str();
  for (int d = 0; d + 1 < t.ndim; ++d)
    if (t.stride[d] % kAlignElements != 0)
      return std::string(what) + " strides must be multiples of 8 elements: " + t.str();
  if (reinterpret_cast<uintptr_t>(t.data) % 16 != 0)
    return std::string(what) + " must be 16-byte aligned";
  return std::nullopt;
}

}  // namespace

CudaExpertsBase::CudaExpertsBase(std::string name, const ExpertWeights& w, const Activation& act)
    : name_(std::move(name)) {
  if (auto r = validate_weights(w, act)) MOEKIT_FAIL(name_, ": ", *r);
  for (const auto& [t, what] :
       {std::pair{&w.w13, "w13"}, {&w.w2, "w2"}, {&w.b13, "b13"}, {&w.b2, "b2"}})
    if (auto r = check_tensor(*t, what)) MOEKIT_FAIL(name_, ": ", *r);
  const int64_t H = w.hidden(), I = w.intermediate();
  MOEKIT_CHECK(H % kAlignElements == 0 && I % kAlignElements == 0, name_, ": hidden ", H,
               " and intermediate ", I,
               " must be multiples of 8 (16-byte rows for vector loads and TMA)");
  info_ = ExpertsInfo::of(w, act);
  weights_ = DeviceWeights{
      .w13 = w.w13.ptr<uint16_t>(),
      .w2 = w.w2.ptr<uint16_t>(),
      .b13 = w.b13.present() ? w.b13.ptr<uint16_t>() : nullptr,
      .b2 = w.b2.present() ? w.b2.ptr<uint16_t>() : nullptr,
      .w13_expert_stride = w.w13.stride[0],
      .w13_row_stride = w.w13.stride[1],
      .w2_expert_stride = w.w2.stride[0],
      .w2_row_stride = w.w2.stride[1],
      .b13_expert_stride = w.b13.present() ? w.b13.stride[0] : 0,
      .b2_expert_stride = w.b2.present() ? w.b2.stride[0] : 0,
      .index = nullptr,
      .num_local = static_cast<int>(w.num_local()),
      .hidden = H,
      .intermediate = I,
      .activation = act,
  };
  if (w.source && !w.source->empty()) {
    const int64_t n = static_cast<int64_t>(w.source->size());
    index_ = CudaTensor::copy_of(
        TensorView(const_cast<int32_t*>(w.source->data()), DType::kI32, {n}), w.w13.device.id);
    weights_.index = index_.data<int32_t>();
  }
}

std::optional<std::string> CudaExpertsBase::can_implement(const MoEProblem& p) const {
  if (p.hidden != info_.hidden || p.intermediate != info_.intermediate)
    return "problem H=" + std::to_string(p.hidden) + ", I=" + std::to_string(p.intermediate) +
           " but the weights have H=" + std::to_string(info_.hidden) +
           ", I=" + std::to_string(info_.intermediate);
  if (p.weight_dtype != DType::kBF16) return "weights must be bf16";
  return std::nullopt;
}

void CudaExpertsBase::check_apply(const DispatchedBatch& b, const TensorView& out,
                                  bool reduced) const {
  MOEKIT_CHECK(b.format == ActivationFormat::kStandard, name_, ": expects standard activations");
  const int64_t M = b.a1.size(0), k = b.topk_ids.size(1), H = info_.hidden;
  check_shape(b.a1, {M, H}, "a1");
  check_dtype(b.a1, DType::kBF16, "a1");
  check_shape(b.topk_ids, {M, k}, "topk_ids");
  check_dtype(b.topk_ids, DType::kI32, "topk_ids");
  check_shape(b.topk_weights, {M, k}, "topk_weights");
  check_dtype(b.topk_weights, DType::kF32, "topk_weights");
  if (reduced)
    check_shape(out, {M, H}, "fused_out");
  else
    check_shape(out, {M, k, H}, "fused_out");
  check_dtype(out, DType::kF32, "fused_out");
  MOEKIT_CHECK(out.is_contiguous(), name_, ": fused_out must be contiguous, got ", out.str());
  for (const auto& [t, what] : {std::pair{&b.a1, "a1"},
                                {&b.topk_ids, "topk_ids"},
                                {&b.topk_weights, "topk_weights"},
                                {&out, "fused_out"}})
    MOEKIT_CHECK(t->device.type == DeviceType::kCUDA && t->stride[t->ndim - 1] == 1, name_, ": ",
                 what, " must be a CUDA tensor with contiguous rows, got ", t->str());
  MOEKIT_CHECK(b.a1.stride[0] % 8 == 0 && reinterpret_cast<uintptr_t>(b.a1.data) % 16 == 0, name_,
               ": a1 rows must be 16-byte aligned (row stride ", b.a1.stride[0], ")");
}

}  // namespace moekit::cuda
