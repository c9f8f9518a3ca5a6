// check.h, part 3: the CUDA registry entries, and where a case's kernels run
// (contracts_device.h): host tensors, or copies on the CUDA device.
#include "reference/contracts_device.h"

#include <cstring>

#include "moekit/cpu.h"
#ifdef MOEKIT_HAS_CUDA
#include "moekit/cuda.h"
#endif

namespace moekit::check {
namespace {

// y [M, H] in x's dtype, every byte 0xff (NaN): rows the kernel leaves unwritten fail.
Tensor nan_output(const TensorView& x) {
  Tensor y(x.dtype, {x.size(0), x.size(1)});
  std::memset(y.data<char>(), 0xff, y.view().nbytes());
  return y;
}

class HostDevice final : public CaseDevice {
 public:
  HostDevice(const LayerWeights& w, int threads) : weights_(w.view()), threads_(threads) {}
  const ExpertWeights& weights() const override { return weights_; }
  std::shared_ptr<WeightAndReduce> weight_and_reduce() const override {
    return make_cpu_weight_and_reduce(threads_);
  }
  KernelConfig kernel_config(int top_k, DType act_dtype, int64_t chunk_tokens) const override {
    return {top_k, act_dtype, chunk_tokens};
  }
  Tensor forward(ModularKernel& kernel, const ForwardArgs& args) const override {
    Tensor y = nan_output(args.x);
    ForwardArgs a = args;
    a.y = y.view();
    kernel.forward(a);
    return y;
  }

 private:
  ExpertWeights weights_;
  int threads_;
};

#ifdef MOEKIT_HAS_CUDA

// Small-batch experts up to this many dispatched rows, grouped GEMM above: between the 7 and 19
// tokens of the suite's sweep, so one case runs both.
constexpr int64_t kCudaFallbackSmallTokens = 8;
// Batched experts take their path from the rows offered, E_local x N, where N (rows per expert)
// is fixed when the kernel is built (the suite's largest token count), not by a forward's
// tokens: "cuda-batched" takes the small-batch path up to this many rows -- above all the
// suite's shapes give (E = 8 x 111 tokens = 888) -- and "cuda-batched-grouped" always the
// grouped GEMM.
constexpr int64_t kCudaBatchedSmallRows = int64_t{1} << 16;

// The layer on the current CUDA device: each host tensor of the weights (codes, scales, biases)
// copied once; the kernels' inputs and outputs copied per forward. Copies are synchronous, and
// forward runs on the legacy default stream, which they wait for.
class CudaDevice final : public CaseDevice {
 public:
  explicit CudaDevice(const LayerWeights& w)
      : weights_(w.view()), device_(weights_.view().w13.device.id) {}
  const ExpertWeights& weights() const override { return weights_.view(); }
  std::shared_ptr<WeightAndReduce> weight_and_reduce() const override {
    return make_cuda_weight_and_reduce();
  }
  KernelConfig kernel_config(int top_k, DType act_dtype, int64_t chunk_tokens) const override {
    return {top_k, act_dtype, chunk_tokens, Device{DeviceType::kCUDA, device_},
            cuda_workspace_allocator(device_)};
  }
  Tensor forward(ModularKernel& kernel, const ForwardArgs& args) const override {
    const CudaTensor x = CudaTensor::copy_of(args.x, device_),
                     ids = CudaTensor::copy_of(args.topk_ids, device_),
                     weights = CudaTensor::copy_of(args.topk_weights, device_);
    Tensor y = nan_output(args.x);
    const CudaTensor device_y = CudaTensor::copy_of(y, device_);
    kernel.forward({x, ids, weights, device_y, args.weight_on_input, args.token_key_offset});
    copy_to_host(device_y, y);
    return y;
  }

 private:
  DeviceExpertWeights weights_;
  int device_ = 0;
};

#endif  // MOEKIT_HAS_CUDA

}  // namespace

std::string_view device_name(DeviceType device) {
  return device == DeviceType::kCUDA ? "cuda" : "cpu";
}

std::optional<std::string> device_unavailable(DeviceType device) {
  if (device == DeviceType::kCPU) return std::nullopt;
#ifdef MOEKIT_HAS_CUDA
  static const int devices = cuda_device_count();
  if (devices == 0) return std::string("no CUDA device");
  return std::nullopt;
#else
  return std::string("moekit built without CUDA");
#endif
}

std::optional<std::string> why_entry_absent(std::string_view name) {
  const bool cuda = name == "cuda" || name.starts_with("cuda-");
  return cuda ? device_unavailable(DeviceType::kCUDA) : std::nullopt;
}

void add_cuda_experts(std::vector<ExpertsEntry>& entries) {
#ifdef MOEKIT_HAS_CUDA
  if (device_unavailable(DeviceType::kCUDA)) return;
  using Make = std::shared_ptr<Experts> (*)(const ExpertWeights&, const Activation&);
  auto add = [&entries](const char* name, bool batch_invariant, Make make) {
    entries.push_back({name,
                       [make](const ExpertWeights& w, const Activation& act, int) {
                         return make(w, act);
                       },
                       batch_invariant, DeviceType::kCUDA});
  };
  // Small-batch: each (row, output) dot product runs over K in one fixed order whatever the
  // other rows and the chunking, so a token's row does not depend on the batch.
  add("cuda-small-batch", true, [](const ExpertWeights& w, const Activation& act) {
    return make_cuda_small_batch_experts(w, act, TopKWeightApplied::kNone);
  });
  add("cuda-small-batch-reduced", true, [](const ExpertWeights& w, const Activation& act) {
    return make_cuda_small_batch_experts(w, act, TopKWeightApplied::kWeightedAndReduced);
  });
  // Grouped GEMM: rows are sorted by expert and tiled by the batch's sizes; per-row results
  // with a fixed K order are likely but not established, so not claimed.
  add("cuda-grouped-gemm", false, [](const ExpertWeights& w, const Activation& act) {
    return make_cuda_grouped_gemm_experts(w, act);
  });
  add("cuda", false, [](const ExpertWeights& w, const Activation& act) {
    return make_cuda_experts(w, act, kCudaFallbackSmallTokens);
  });
  // Batched format, behind cuda-batched-local: on the small-batch path each row is computed on
  // its own, as above; the grouped GEMM's rows are not claimed batch-invariant.
  add("cuda-batched", true, [](const ExpertWeights& w, const Activation& act) {
    return make_cuda_batched_experts(w, act, kCudaBatchedSmallRows);
  });
  add("cuda-batched-grouped", false, [](const ExpertWeights& w, const Activation& act) {
    return make_cuda_batched_experts(w, act, 0);
  });
#else
  (void)entries;
#endif
}

void add_cuda_prepare_finalize(std::vector<PrepareFinalizeEntry>& entries) {
#ifdef MOEKIT_HAS_CUDA
  if (device_unavailable(DeviceType::kCUDA)) return;
  entries.push_back({"cuda-local",
                     [](const ExpertMap& map, int rank, std::shared_ptr<Communicator>, int64_t) {
                       return make_cuda_prepare_finalize(map, rank);
                     },
                     false, DeviceType::kCUDA});
  entries.push_back({"cuda-batched-local",
                     [](const ExpertMap& map, int rank, std::shared_ptr<Communicator>,
                        int64_t max_tokens) {
                       return make_cuda_batched_prepare_finalize(map, rank, max_tokens);
                     },
                     false, DeviceType::kCUDA});
#else
  (void)entries;
#endif
}

std::unique_ptr<CaseDevice> make_case_device(DeviceType device, const LayerWeights& weights,
                                             int threads) {
  if (device == DeviceType::kCPU) return std::make_unique<HostDevice>(weights, threads);
#ifdef MOEKIT_HAS_CUDA
  if (!device_unavailable(device)) return std::make_unique<CudaDevice>(weights);
#endif
  MOEKIT_FAIL("check: no ", device_name(device), " kernels here: ",
              device_unavailable(device).value_or("unknown device"));
}

}  // namespace moekit::check
