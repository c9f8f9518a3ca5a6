#include "cuda/experts_base.h"

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "cuda/check.h"
#include "moekit/reference.h"

namespace moekit::cuda {
namespace {

// Rows are read 16 bytes at a time by every kernel (and by TMA in the grouped GEMMs).
constexpr int64_t kRowAlignBytes = 16;

bool supported(Format f) {
  return f == Format::kBF16 || f == Format::kFP16 || f == Format::kFP8Tensor ||
         f == Format::kFP8Token;
}

std::optional<std::string> check_device(const TensorView& t, const char* what) {
  if (t.device.type != DeviceType::kCUDA)
    return std::string(what) + " is not on a CUDA device: " + t.str();
  return std::nullopt;
}

// Weights: `elems` elements of 16 bytes per row chunk, rows and experts 16-byte aligned.
std::optional<std::string> check_weight(const TensorView& t, const char* what, int64_t elems) {
  if (auto r = check_device(t, what)) return r;
  for (int d = 0; d + 1 < t.ndim; ++d)
    if (t.stride[d] % elems != 0)
      return std::string(what) + " strides must be multiples of " + std::to_string(elems) +
             " elements (16 bytes): " + t.str();
  if (reinterpret_cast<uintptr_t>(t.data) % kRowAlignBytes != 0)
    return std::string(what) + " must be 16-byte aligned";
  return std::nullopt;
}

// A device float tensor [n] or [n, R] (last dim contiguous, validated) as host fp32 [n * R].
std::vector<float> host_floats(const TensorView& t) {
  const int64_t rows = t.ndim == 1 ? 1 : t.size(0), cols = t.size(t.ndim - 1);
  const size_t bytes = traits(t.dtype).bits / 8;
  std::vector<char> raw(rows * cols * bytes);
  const size_t pitch = t.ndim == 1 ? cols * bytes : t.stride[0] * bytes;
  MOEKIT_CUDA_CHECK(cudaMemcpy2D(raw.data(), cols * bytes, t.data, pitch, cols * bytes, rows,
                                 cudaMemcpyDeviceToHost));
  std::vector<float> out(rows * cols);
  for (size_t i = 0; i < out.size(); ++i) out[i] = load_as_float(raw.data(), t.dtype, i);
  return out;
}

// A device fp32 copy [n, R] of `values` (n * R floats, or n per-tensor values repeated R times).
CudaTensor device_rows(const std::vector<float>& values, int64_t n, int64_t R, int device) {
  Tensor host(DType::kF32, {n, R});
  const bool per_tensor = static_cast<int64_t>(values.size()) == n && R != 1;
  for (int64_t i = 0; i < n * R; ++i) host.data<float>()[i] = values[per_tensor ? i / R : i];
  return CudaTensor::copy_of(host.view(), device);
}

}  // namespace

CudaExpertsBase::CudaExpertsBase(std::string name, const ExpertWeights& w, const Activation& act,
                                 const TensorView& static_act_scale)
    : name_(std::move(name)) {
  if (auto r = validate_weights(w, act)) MOEKIT_FAIL(name_, ": ", *r);
  const QuantScheme q = w.scheme();
  MOEKIT_CHECK(supported(q.format), name_, ": format ", q.str(),
               " is not supported (bf16, fp16, fp8-tensor, fp8-token)");
  const DType elem = q.weight_dtype();
  const int64_t elems = kRowAlignBytes / (traits(elem).bits / 8);
  for (const auto& [t, what] : {std::pair{&w.w13, "w13"}, {&w.w2, "w2"}})
    if (auto r = check_weight(*t, what, elems)) MOEKIT_FAIL(name_, ": ", *r);
  for (const auto& [t, what] : {std::pair{&w.b13, "b13"},
                                {&w.b2, "b2"},
                                {&w.s13.scale, "w13 scale"},
                                {&w.s2.scale, "w2 scale"}})
    if (t->present())
      if (auto r = check_device(*t, what)) MOEKIT_FAIL(name_, ": ", *r);
  const int64_t H = w.hidden(), I = w.intermediate();
  MOEKIT_CHECK(H % elems == 0 && I % elems == 0, name_, ": hidden ", H, " and intermediate ", I,
               " must be multiples of ", elems, " for format ", q.str(),
               " (16-byte rows for vector loads and TMA)");
  spec_ = ActivationSpec::of(q);
  if (q.static_act) {
    const TensorView& s = static_act_scale;
    MOEKIT_CHECK(s.present(), name_, ": format ", q.str(),
                 " needs a static activation scale ([1] fp32 on the device)");
    MOEKIT_CHECK(s.device.type == DeviceType::kCUDA && s.dtype == DType::kF32 && s.ndim == 1 &&
                     s.size(0) == 1 && s.data != nullptr,
                 name_, ": the static activation scale must be a [1] fp32 CUDA tensor, got ",
                 s.str());
    spec_.static_scale = s;
  } else {
    MOEKIT_CHECK(!static_act_scale.present(), name_,
                 ": a static activation scale was given but format ", q.str(),
                 " scales activations dynamically (use fp8-tensor:static)");
  }

  info_ = ExpertsInfo::of(w, act);
  const int device = w.w13.device.id;
  const int64_t n = w.w13.size(0), rows13 = act.w13_rows(I);
  if (w.b13.present()) b13_ = device_rows(host_floats(w.b13), n, rows13, device);
  if (w.b2.present()) b2_ = device_rows(host_floats(w.b2), n, H, device);
  if (w.quant) {
    s13_ = device_rows(host_floats(w.s13.scale), n, rows13, device);
    s2_ = device_rows(host_floats(w.s2.scale), n, H, device);
  }
  weights_ = DeviceWeights{
      .w13 = w.w13.data,
      .w2 = w.w2.data,
      .b13 = w.b13.present() ? b13_.data<float>() : nullptr,
      .b2 = w.b2.present() ? b2_.data<float>() : nullptr,
      .s13 = w.quant ? s13_.data<float>() : nullptr,
      .s2 = w.quant ? s2_.data<float>() : nullptr,
      .elem = elem,
      .a2_scale = intermediate_spec(q).scale,
      .w13_expert_stride = w.w13.stride[0],
      .w13_row_stride = w.w13.stride[1],
      .w2_expert_stride = w.w2.stride[0],
      .w2_row_stride = w.w2.stride[1],
      .index = nullptr,
      .num_local = static_cast<int>(w.num_local()),
      .hidden = H,
      .intermediate = I,
      .activation = act,
  };
  if (w.source && !w.source->empty()) {
    const int64_t count = static_cast<int64_t>(w.source->size());
    index_ = CudaTensor::copy_of(
        TensorView(const_cast<int32_t*>(w.source->data()), DType::kI32, {count}), device);
    weights_.index = index_.data<int32_t>();
  }
}

std::optional<std::string> CudaExpertsBase::can_implement(const MoEProblem& p) const {
  if (p.hidden != info_.hidden || p.intermediate != info_.intermediate)
    return "problem H=" + std::to_string(p.hidden) + ", I=" + std::to_string(p.intermediate) +
           " but the weights have H=" + std::to_string(info_.hidden) +
           ", I=" + std::to_string(info_.intermediate);
  if (!(p.quant == info_.quant))
    return "problem format " + p.quant.str() + " but the weights have format " + info_.quant.str();
  return std::nullopt;
}

void CudaExpertsBase::check_apply(const DispatchedBatch& b, const TensorView& out,
                                  bool reduced) const {
  MOEKIT_CHECK(b.format == ActivationFormat::kStandard, name_, ": expects standard activations");
  const int64_t M = b.a1.size(0), k = b.topk_ids.size(1), H = info_.hidden;
  check_shape(b.a1, {M, H}, "a1");
  check_dtype(b.a1, spec_.dtype, "a1");
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
  MOEKIT_CHECK(b.a1_scale.kind == spec_.scale, name_, ": a1 carries ",
               moekit::name(b.a1_scale.kind), " scales, format ", info_.quant.str(), " needs ",
               moekit::name(spec_.scale));
  std::vector<std::pair<const TensorView*, const char*>> device_tensors = {
      {&b.a1, "a1"},
      {&b.topk_ids, "topk_ids"},
      {&b.topk_weights, "topk_weights"},
      {&out, "fused_out"}};
  if (quantized()) {
    const TensorView& s = b.a1_scale.scale;
    check_shape(s, {spec_.scale == ScaleKind::kToken ? M : 1}, "a1 scale");
    check_dtype(s, DType::kF32, "a1 scale");
    device_tensors.push_back({&s, "a1 scale"});
  }
  for (const auto& [t, what] : device_tensors)
    MOEKIT_CHECK(t->device.type == DeviceType::kCUDA && t->stride[t->ndim - 1] == 1, name_, ": ",
                 what, " must be a CUDA tensor with contiguous rows, got ", t->str());
  MOEKIT_CHECK((b.a1.stride[0] * elem_bytes()) % kRowAlignBytes == 0 &&
                   reinterpret_cast<uintptr_t>(b.a1.data) % kRowAlignBytes == 0,
               name_, ": a1 rows must be 16-byte aligned (row stride ", b.a1.stride[0], ")");
}

RowScale CudaExpertsBase::a1_scale(const DispatchedBatch& b) const {
  if (!quantized()) return {};
  return {b.a1_scale.scale.ptr<float>(), spec_.scale == ScaleKind::kToken ? 1 : 0};
}

}  // namespace moekit::cuda
