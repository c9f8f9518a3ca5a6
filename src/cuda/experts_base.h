// What the CUDA Experts share: validation of device weights at construction (contract 5), the
// device view of the weights the kernels take (fp32 copies of biases and per-row weight scales),
// the activation spec of the weights' format, and the checks of each apply() call.
//
// Formats: bf16 and fp16 (weights and activations as they are), fp8-tensor and fp8-token (e4m3
// weights and activations with fp32 scales, quant/format.h).
#pragma once

#include <string>

#include "cuda/kernels.h"
#include "moekit/cuda.h"

namespace moekit::cuda {

class CudaExpertsBase : public Experts {
 public:
  ActivationFormat activation_format() const override { return ActivationFormat::kStandard; }
  ActivationSpec activation_spec() const override { return spec_; }
  const ExpertsInfo& info() const override { return info_; }
  std::optional<std::string> can_implement(const MoEProblem& p) const override;

 protected:
  // Throws moekit::Error "<name>: <reason>" when the weights, their format, the static
  // activation scale or the activation don't fit.
  CudaExpertsBase(std::string name, const ExpertWeights& weights, const Activation& act,
                  const TensorView& static_act_scale);
  // Checks a batch and its output (out: [M, k, H], or [M, H] when `reduced`) before any launch.
  void check_apply(const DispatchedBatch& batch, const TensorView& out, bool reduced) const;
  // The scale of a1's rows as the kernels read it (null for float activations).
  RowScale a1_scale(const DispatchedBatch& batch) const;
  bool quantized() const { return spec_.scale != ScaleKind::kNone; }
  // Bytes of one weight/activation element (e4m3: 1, bf16/fp16: 2).
  int64_t elem_bytes() const { return traits(weights_.elem).bits / 8; }

  std::string name_;
  ExpertsInfo info_;
  ActivationSpec spec_;
  DeviceWeights weights_{};
  CudaTensor index_;     // [E_local] int32 device copy of ExpertWeights::source
  CudaTensor b13_, b2_;  // fp32 copies of the biases
  CudaTensor s13_, s2_;  // fp32 per-row weight scales (per-tensor ones expanded)
};

}  // namespace moekit::cuda
