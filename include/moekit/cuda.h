// CUDA backend (Hopper, sm_90a): device buffers, and the CUDA PrepareFinalize, Experts and
// WeightAndReduce of the modular kernel. Every forward-path call runs on ExecContext::stream
// (a cudaStream_t; null: the legacy default stream), never synchronizes the host and is
// CUDA-graph capturable. Tensors passed to them live on the device (Device{kCUDA, id}).
//
// Declared only when moekit was built with MOEKIT_CUDA (MOEKIT_HAS_CUDA is then defined).
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "moekit/modular.h"

namespace moekit {

// Number of CUDA devices usable by this process (0 when there is no driver or no device).
int cuda_device_count();
// "NVIDIA H100 80GB HBM3, sm_90, 132 SMs, 50 MB L2" of the current device, for logs and JSON.
std::string cuda_device_name();

// Owning, contiguous device tensor (cudaMalloc on device `device`; -1: the current device).
// Copies to and from the host are synchronous: they are for set-up and checks, not the forward.
class CudaTensor {
 public:
  CudaTensor() = default;
  CudaTensor(DType dtype, std::initializer_list<int64_t> shape, int device = -1);
  // An empty device tensor of `like`'s dtype and shape.
  static CudaTensor empty_like(const TensorView& like, int device = -1);
  // A device copy of a contiguous host tensor.
  static CudaTensor copy_of(const TensorView& host, int device = -1);

  const TensorView& view() const { return view_; }
  operator const TensorView&() const { return view_; }
  template <typename T>
  T* data() const {
    return static_cast<T*>(view_.data);
  }
  int64_t numel() const { return view_.numel(); }
  DType dtype() const { return view_.dtype; }
  // Contiguous host copy, flat [numel] (reshape its view as needed); waits for the device.
  Tensor to_host() const;

 private:
  struct Free {
    void operator()(void* p) const;
  };
  std::unique_ptr<void, Free> storage_;
  TensorView view_;
};

// Device copies of host expert weights: every present view of `host` (w13, w2, b13, b2, and the
// scale, zero and global of s13 and s2; each contiguous) copied to device `device` (-1: the
// current one) and owned here; absent views stay absent, `source` and `quant` are kept. view() is
// `host` with its views on the device, valid for this object's lifetime (moving it keeps the
// device memory in place). Copies synchronously, at set-up.
class DeviceExpertWeights {
 public:
  DeviceExpertWeights() = default;
  explicit DeviceExpertWeights(const ExpertWeights& host, int device = -1);
  const ExpertWeights& view() const { return view_; }

 private:
  std::vector<CudaTensor> copies_;
  ExpertWeights view_;
};

// The workspace allocator of a ModularKernel whose tensors live on CUDA device `device` (-1: the
// current one): KernelConfig{..., .device = {DeviceType::kCUDA, id},
// .allocate_workspace = cuda_workspace_allocator(id)}. Allocates (cudaMalloc) when the kernel is
// built, never in forward.
WorkspaceAllocator cuda_workspace_allocator(int device = -1);

// Host <-> device copies between views of equal shape and dtype (contiguous), synchronous.
void copy_to_device(const TensorView& host, const TensorView& device);
void copy_to_host(const TensorView& device, const TensorView& host);

// Single-rank PrepareFinalize on the device: maps global ids to `rank`'s local ids through a
// device copy of the expert map's table (-1 for experts served elsewhere and for padding),
// brings x into the experts' activation spec (a float dtype: converted; fp8 e4m3 with a
// per-token or per-tensor fp32 scale: quantized on the device, a dynamic per-tensor scale
// reduced over all rows on the device, a static one read from its device tensor) and applies
// the weight on the input first; it finalizes with the caller's routing. Ids outside [-1, E)
// are treated as -1 and counted in a device flag instead of stopping the stream;
// cuda_bad_id_count() reads it.
std::shared_ptr<PrepareFinalize> make_cuda_prepare_finalize(ExpertMap map, int rank);
// Single-rank PrepareFinalize on the device in the batched format (the layout of low-latency
// dispatch on one rank, no communication), for make_cuda_batched_experts: ids mapped and x
// brought into the experts' activation spec as make_cuda_prepare_finalize does (bad ids
// counted alike), then every (token, slot) served by local expert e takes row j of e's
// N = max_tokens rows, j counting e's pairs before it in (token, slot) order (deterministic):
// a1 [E_local, N, H] (fp8 per-token scales [E_local * N] in a1's row order; a per-tensor [1]
// scale as is), expert_num_tokens [E_local] int32. Rows past a count are left unwritten. Where
// each pair landed stays on the device, in the workspace, until finalize:
// y[t] = sum over slots s = 0..k-1 served here of w[t, s] * fused_out[e, j] (the caller's
// weights; 1 when applied on the input; fp32, slots in order, then y's dtype). The experts
// must leave the top-k weights to finalize (kNone). No host synchronisation: CUDA-graph
// capturable. A round holds at most max_tokens tokens: forward refuses (moekit::Error, before
// enqueueing anything) M > max_tokens unless chunk_tokens <= max_tokens, and prepare refuses
// more than max_tokens rows. A token naming one expert in two slots may overflow its N rows:
// such pairs are dropped and counted with the bad ids.
std::shared_ptr<PrepareFinalize> make_cuda_batched_prepare_finalize(ExpertMap map, int rank,
                                                                    int64_t max_tokens);
// Ids outside [-1, E) seen by prepare() since the last call (synchronizes with the device, so
// call it outside the forward path), and pairs a batched prepare dropped; resets the count.
// `pf` must come from make_cuda_prepare_finalize or make_cuda_batched_prepare_finalize.
int64_t cuda_bad_id_count(const PrepareFinalize& pf);

// Deterministic weight-and-reduce (slots summed in order 0..k-1), fp32 accumulation.
std::shared_ptr<WeightAndReduce> make_cuda_weight_and_reduce();

// Experts over device weights in format bf16, fp16 (activations in the weights' dtype),
// fp8-tensor (e4m3 weights with an fp32 scale per expert, e4m3 activations with one fp32 scale:
// dynamic, or static with the format option "static": pass `static_act_scale`, a [1] fp32 CUDA
// tensor valid for the experts' lifetime) or fp8-token (e4m3 weights with an fp32 scale per
// output channel, e4m3 activations with a dynamic fp32 scale per token). Standard format, fp32
// fused_out. The intermediate between the GEMMs is requantized to e4m3 as intermediate_spec
// (reference.h) says, which is what the oracle does: a dynamic scale per (token, slot) row for
// both fp8 formats (a static a1 scale does not extend to it). H and I must be
// multiples of 8 (bf16, fp16) or 16 (fp8): 16-byte rows. Other formats, shapes, dtypes or host
// weights are refused at construction with the reason. The caller's weight memory must outlive
// the object (it is not copied; biases and weight scales are copied to fp32 device tensors at
// construction, which synchronizes).
//
// Small-batch experts for decode: each active expert's weights are streamed once across all
// SMs (GEMM1 + activation in one launch, GEMM2 in a second; e4m3 weights are dequantized in
// registers, and the intermediate is requantized in a launch between). Any M is computed (in
// chunks of 4096 (token, slot) pairs), but beyond a few tokens per expert the grouped GEMM
// wins. `applied`: kNone writes [M', k, H] and leaves the weights to finalize (fewest launches);
// kWeightedAndReduced reduces here (one more launch).
std::shared_ptr<Experts> make_cuda_small_batch_experts(
    const ExpertWeights& weights, const Activation& act,
    TopKWeightApplied applied = TopKWeightApplied::kNone, const TensorView& static_act_scale = {});
// Grouped-GEMM experts for many tokens: tokens sorted by local expert on the device, CUTLASS sm90
// grouped GEMM (TMA, warp-specialized) with per-expert sizes kept on the device (fp8: e4m3 x
// e4m3 with the scales applied in the GEMM epilogue); kWeightedAndReduced (each token's rows are
// weighted and summed while unpermuting).
std::shared_ptr<Experts> make_cuda_grouped_gemm_experts(const ExpertWeights& weights,
                                                        const Activation& act,
                                                        const TensorView& static_act_scale = {});
// Small-batch experts (kWeightedAndReduced) up to `max_small_tokens` dispatched rows, grouped
// GEMM above.
std::shared_ptr<Experts> make_cuda_experts(const ExpertWeights& weights, const Activation& act,
                                           int64_t max_small_tokens = 16,
                                           const TensorView& static_act_scale = {});
// Experts of the batched activation format (the layout of low-latency dispatch), in the formats
// and with the weight rules of the experts above: a1 [E_local, N, H] contiguous in the format's
// activation dtype (fp8: with a [1] per-tensor scale, or a per-token scale [E_local * N] in a1's
// row order), expert_num_tokens [E_local] int32 on the device; out [E_local, N, H] fp32
// contiguous, row j of expert e = expert e's MLP of a1[e, j] (+ biases) for j below the
// expert's count and +0 beyond (kNone: top-k weights are left to finalize). Counts are read on
// the device only (no host synchronisation, CUDA-graph capturable); a count outside [0, N] is
// clamped into it, not reported. Per call, by the rows offered (E_local * N; the counts are not
// known on the host): up to `max_small_rows` the small-batch kernels run over the rows as top-1
// tokens (padding rows -1), above them the grouped GEMM reads a1 and writes out in place, expert
// e's rows at offset e * N (no sort). max_small_rows -1: E_local (at least 1), i.e. one row per
// local expert; 0: always the grouped GEMM. MOEKIT_LOG_CHOICES=1
// (read when the experts are built) logs each call's choice to stderr. apply() validates shapes,
// dtypes, devices, contiguity and alignment before enqueueing anything (throws moekit::Error).
std::shared_ptr<Experts> make_cuda_batched_experts(const ExpertWeights& weights,
                                                   const Activation& act,
                                                   int64_t max_small_rows = -1,
                                                   const TensorView& static_act_scale = {});

}  // namespace moekit
