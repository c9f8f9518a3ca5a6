// check.h, part 3 (internal): where a case's kernels run. contracts.cc is one code path for every
// device; a CaseDevice gives it the device's copy of the layer's weights, its weight-and-reduce
// and kernel configuration, and runs a kernel on host inputs, returning a host output.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "moekit/check.h"

namespace moekit::check {

std::string_view device_name(DeviceType device);  // "cpu", "cuda"

// The CUDA registry entries (none unless moekit is built with CUDA and a device is present).
// They are named "cuda" or "cuda-...".
void add_cuda_experts(std::vector<ExpertsEntry>& entries);
void add_cuda_prepare_finalize(std::vector<PrepareFinalizeEntry>& entries);
// Why no entry named `name` is registered here when it names a CUDA entry and CUDA is
// unavailable; nullopt otherwise.
std::optional<std::string> why_entry_absent(std::string_view name);

class CaseDevice {
 public:
  virtual ~CaseDevice() = default;
  // The layer's global weights [E, ...] on the device; valid for this object's lifetime, which
  // must cover every kernel built over them.
  virtual const ExpertWeights& weights() const = 0;
  virtual std::shared_ptr<WeightAndReduce> weight_and_reduce() const = 0;
  virtual KernelConfig kernel_config(int top_k, DType act_dtype, int64_t chunk_tokens) const = 0;
  // kernel.forward on host inputs (args.y is not used): returns y [M, H] on the host in x's
  // dtype, NaN where the kernel wrote nothing.
  virtual Tensor forward(ModularKernel& kernel, const ForwardArgs& args) const = 0;
};

// `weights` (host) on `device`; threads: the CPU weight-and-reduce's (0: all).
std::unique_ptr<CaseDevice> make_case_device(DeviceType device, const LayerWeights& weights,
                                             int threads);

}  // namespace moekit::check
