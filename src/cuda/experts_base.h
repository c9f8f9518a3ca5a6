// What the CUDA Experts share: validation of device bf16 weights at construction (contract 5),
// the device view of the weights the kernels take, and the checks of each apply() call.
#pragma once

#include <string>

#include "cuda/kernels.h"
#include "moekit/cuda.h"

namespace moekit::cuda {

class CudaExpertsBase : public Experts {
 public:
  ActivationFormat activation_format() const override { return ActivationFormat::kStandard; }
  ActivationSpec activation_spec() const override { return {DType::kBF16, ScaleKind::kNone, 0}; }
  const ExpertsInfo& info() const override { return info_; }
  std::optional<std::string> can_implement(const MoEProblem& p) const override;

 protected:
  // Throws moekit::Error "<name>: <reason>" when the weights or the activation don't fit.
  CudaExpertsBase(std::string name, const ExpertWeights& weights, const Activation& act);
  // Checks a batch and its output (out: [M, k, H], or [M, H] when `reduced`) before any launch.
  void check_apply(const DispatchedBatch& batch, const TensorView& out, bool reduced) const;

  std::string name_;
  ExpertsInfo info_;
  DeviceWeights weights_{};
  CudaTensor index_;  // [E_local] int32 device copy of ExpertWeights::source
};

}  // namespace moekit::cuda
