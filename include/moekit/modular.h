// The modular MoE kernel: PrepareFinalize x Experts x WeightAndReduce.
//
//   x [M, H], topk_ids [M, k] (global), topk_weights [M, k]
//     --PrepareFinalize::prepare-->  DispatchedBatch (a1, typed scale, LOCAL ids, weights copy)
//     --Experts::apply-->            fused_out ([M', k, H] or [M', H], fp32)
//     --PrepareFinalize::finalize--> y [M, H]   (weight-and-reduce with the CALLER's routing)
//
// Experts only ever see local expert ids: -1 marks "not computed here" (expert on another rank,
// another replica serves this token, or a padding row) and must contribute exactly zero.
#pragma once

#include <cstddef>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "moekit/activation.h"
#include "moekit/core/exec.h"
#include "moekit/core/tensor.h"
#include "moekit/placement.h"
#include "moekit/quant/format.h"

namespace moekit {

// Standard: activations [M', H] with [M', k] ids. Batched: [E_local, max_tokens, H] with a
// count per local expert (the layout of low-latency dispatch).
enum class ActivationFormat { kStandard, kBatched };
std::string_view name(ActivationFormat f);

// What Experts::apply did with the top-k weights; finalize does the rest (contract 3).
//   kNone:               fused_out [M', k, H] unweighted per (token, slot)
//   kWeighted:           fused_out [M', k, H] already multiplied by the slot's weight
//   kWeightedAndReduced: fused_out [M', H]    weighted and summed over the slots
enum class TopKWeightApplied { kNone, kWeighted, kWeightedAndReduced };
std::string_view name(TopKWeightApplied w);

// Typed activation scale (contract 4, ScaleKind in quant/format.h). kTensor: scale is [1] fp32;
// kToken: [M'] fp32; kBlock: [M', ceil(H / group)] fp32 or ue8m0. Quantized formats fill these;
// float activations use kNone.
struct ActivationScale {
  ScaleKind kind = ScaleKind::kNone;
  int64_t group = 0;  // kBlock only
  TensorView scale;
};

// What the experts want a1 to be; prepare converts or quantizes x into it. Dynamic scales are
// computed from the rows (amax / largest code); a static one (kTensor only) is given: [1] fp32,
// host or device memory like x, valid for the experts' lifetime.
struct ActivationSpec {
  DType dtype = DType::kBF16;
  ScaleKind scale = ScaleKind::kNone;
  int64_t group = 0;                    // kBlock
  DType scale_dtype = DType::kF32;      // kBlock may use kUE8M0
  TensorView static_scale;              // absent: dynamic
  // The spec a scheme's experts ask for (static_scale left absent: the experts fill it).
  static ActivationSpec of(const QuantScheme& scheme);
};

// Scales of one quantized weight tensor, laid out as quant/format.h says (absent: unused).
struct WeightScales {
  TensorView scale, zero, global;
};

// Weights of the experts one Experts object computes: LOCAL experts, slot e = local id e.
// w13: [n, w13_rows(I), H]; w2: [n, H, I]; b13: [n, w13_rows(I)] or absent; b2: [n, H] or absent,
// where local slot e lives at index (*source)[e] of dim 0 (no source: identity, n = E_local).
// `source` lets a rank view its experts inside a global [E, ...] tensor without copying; a rank
// may hold no expert at all (source present and empty). Use num_local() and index(), not n.
// Quantized weights set `quant` and the scales s13/s2 of its format (biases stay float); without
// `quant` the weights are float and their dtype is the format.
struct ExpertWeights {
  TensorView w13, w2, b13, b2;
  std::optional<std::vector<int32_t>> source;
  std::optional<QuantScheme> quant;
  WeightScales s13, s2;

  int64_t num_local() const { return source ? int64_t(source->size()) : w13.size(0); }
  int64_t hidden() const { return w13.size(2); }
  int64_t intermediate() const { return w2.size(2); }
  int64_t index(int64_t local) const { return source ? (*source)[local] : local; }
  QuantScheme scheme() const { return quant ? *quant : QuantScheme{float_format(w13.dtype)}; }
  // Views the experts that `map` places on `rank` inside global weights [E, ...].
  static ExpertWeights local_view(const ExpertWeights& global, const ExpertMap& map, int rank);
};
// nullopt when w13/w2/b13/b2/source agree with each other and with `act`, else the reason.
std::optional<std::string> validate_weights(const ExpertWeights& w, const Activation& act);

// Printable problem descriptor; configurations come from it, not from tuning files.
struct MoEProblem {
  int64_t num_experts = 0;        // E, global
  int64_t num_local_experts = 0;  // E_local
  int64_t hidden = 0;             // H
  int64_t intermediate = 0;       // I
  int top_k = 0;                  // k
  int64_t tokens = 0;             // rows handled at once (a chunk, or dispatched rows M')
  DType act_dtype = DType::kBF16;     // x and y
  DType weight_dtype = DType::kBF16;  // stored weight element
  QuantScheme quant;                  // the weights' format
  Activation activation;
  bool has_bias13 = false, has_bias2 = false;
  std::string str() const;
};

// A bump allocator over caller-owned bytes; every take() is 64-byte aligned.
class Workspace {
 public:
  Workspace() = default;
  Workspace(void* data, size_t bytes) : base_(static_cast<std::byte*>(data)), bytes_(bytes) {}
  TensorView take(DType dtype, std::initializer_list<int64_t> shape);
  void* take_bytes(size_t bytes);
  size_t used() const { return used_; }
  static size_t aligned(size_t bytes) { return (bytes + 63) & ~size_t(63); }

 private:
  std::byte* base_ = nullptr;
  size_t bytes_ = 0, used_ = 0;
};

struct DispatchedBatch {
  ActivationFormat format = ActivationFormat::kStandard;
  TensorView a1;                 // standard: [M', H]; batched: [E_local, max_tokens, H]
  ActivationScale a1_scale;
  TensorView topk_ids;           // standard: [M', k] int32 LOCAL ids, -1 = not computed here
  TensorView topk_weights;       // standard: [M', k] fp32 dispatched copy (1 if applied on input)
  TensorView expert_num_tokens;  // batched: [E_local] int32 valid rows per local expert
};

// What an Experts object computes, fixed at its construction.
struct ExpertsInfo {
  int64_t num_local_experts = 0, hidden = 0, intermediate = 0;
  DType weight_dtype = DType::kBF16;
  QuantScheme quant;
  Activation activation;
  bool has_bias13 = false, has_bias2 = false;
  static ExpertsInfo of(const ExpertWeights& w, const Activation& act);
};

// The problem experts of `info` compute for `tokens` dispatched rows of `top_k` slots, as one
// rank that holds every expert (E = E_local); a kernel sets E from its expert map.
MoEProblem problem_for(const ExpertsInfo& info, int64_t tokens, int top_k,
                       DType act_dtype = DType::kBF16);

class Experts {
 public:
  virtual ~Experts() = default;
  virtual std::string_view name() const = 0;
  virtual ActivationFormat activation_format() const = 0;
  virtual ActivationSpec activation_spec() const = 0;
  virtual TopKWeightApplied weight_application() const = 0;
  virtual const ExpertsInfo& info() const = 0;
  // nullopt when this implementation computes `p` (p.tokens = dispatched rows), else the reason.
  virtual std::optional<std::string> can_implement(const MoEProblem& p) const = 0;
  virtual size_t workspace_size(const MoEProblem& p) const = 0;
  // out: see TopKWeightApplied (fp32). Rows/slots with id -1 are written as exact zeros.
  virtual void apply(const DispatchedBatch& batch, const TensorView& out, Workspace& ws,
                     const ExecContext& ctx) const = 0;
};

class WeightAndReduce {
 public:
  virtual ~WeightAndReduce() = default;
  virtual std::string_view name() const = 0;
  // y[t] = sum over slots s in order 0..k-1 whose caller id is valid (>= 0) of
  //        (applied == kNone ? w[t,s] : 1) * fused_out[t,s]   (fp32, then cast to y's dtype);
  // kWeightedAndReduced: y[t] = fused_out[t]. Padding rows (all ids -1) give zeros.
  virtual void apply(const TensorView& fused_out, const TensorView& topk_ids,
                     const TensorView& topk_weights, TopKWeightApplied applied,
                     const TensorView& y, const ExecContext& ctx) const = 0;
};

struct PrepareRequest {
  TensorView x;             // [M, H]
  TensorView topk_ids;      // [M, k] int32 global ids (-1: padding)
  TensorView topk_weights;  // [M, k] fp32
  int64_t token_key_offset = 0;  // global row of x's first row (replica choice)
  bool weight_on_input = false;  // multiply x by its (k = 1) weight before the experts
  ActivationSpec spec;           // from Experts::activation_spec()
};

struct FinalizeRequest {
  TensorView y;             // [M, H]
  TensorView fused_out;     // Experts::apply's output
  TensorView topk_ids;      // the CALLER's [M, k] global ids (contract 2)
  TensorView topk_weights;  // the CALLER's [M, k] weights
  TopKWeightApplied applied;
  const WeightAndReduce* weight_and_reduce = nullptr;
};

class PrepareFinalize {
 public:
  virtual ~PrepareFinalize() = default;
  virtual std::string_view name() const = 0;
  virtual ActivationFormat activation_format() const = 0;
  virtual const ExpertMap& expert_map() const = 0;
  virtual int rank() const = 0;
  virtual std::optional<std::string> can_implement(const MoEProblem& p) const = 0;
  // Upper bound of dispatched rows M' when this rank prepares p.tokens rows.
  virtual int64_t max_dispatched_tokens(const MoEProblem& p) const = 0;
  // How many prepare/finalize rounds a forward of local_tokens rows takes. Ranks that exchange
  // data must all run the same number (a rank with fewer or no tokens runs empty rounds), so
  // distributed implementations agree on the maximum.
  virtual int64_t num_rounds(int64_t local_tokens, int64_t chunk_tokens) {
    return (local_tokens + chunk_tokens - 1) / chunk_tokens;
  }
  virtual size_t workspace_size(const MoEProblem& p) const = 0;
  // nullopt when finalize can combine what experts of this weight application produce.
  virtual std::optional<std::string> can_combine(TopKWeightApplied) const { return std::nullopt; }
  // nullopt when prepare can hand the experts activations as `spec` asks. Unscaled float
  // activations only, until a prepare/finalize quantizes and moves typed scales (contract 4):
  // refusing here is what keeps a scale from being dropped silently.
  virtual std::optional<std::string> can_dispatch(const ActivationSpec& spec) const;
  virtual DispatchedBatch prepare(const PrepareRequest& req, Workspace& ws,
                                  const ExecContext& ctx) = 0;
  virtual void finalize(const FinalizeRequest& req, Workspace& ws, const ExecContext& ctx) = 0;
};

// Single-rank PrepareFinalize (no communication): maps global ids to `rank`'s local ids through
// the expert map (-1 for experts served elsewhere and for padding rows), converts x to the
// experts' activation dtype, and finalizes with the caller's routing. With a map of several
// ranks it computes one rank's share; the shares of all ranks sum to the full layer.
std::shared_ptr<PrepareFinalize> make_local_prepare_finalize(ExpertMap map, int rank);

// Picks `small` when the dispatched rows are <= max_small_tokens, else `large`. Both must agree
// on format, activation spec, weight application and shape (checked at construction).
std::shared_ptr<Experts> make_fallback_experts(std::shared_ptr<Experts> small,
                                               std::shared_ptr<Experts> large,
                                               int64_t max_small_tokens);

// Allocates `bytes` of workspace (64-byte aligned) on a kernel's device; the pointer owns them.
using WorkspaceAllocator = std::function<std::shared_ptr<void>(size_t bytes)>;

struct KernelConfig {
  int top_k = 0;
  DType act_dtype = DType::kBF16;  // x and y
  int64_t chunk_tokens = 1024;     // workspace is sized for this many rows, whatever M is
  // Where forward's x, topk_ids, topk_weights and y live; the workspace is allocated there once,
  // by allocate_workspace (null: host memory, CPU only). CUDA: cuda_workspace_allocator().
  Device device{};
  WorkspaceAllocator allocate_workspace = nullptr;
};

struct ForwardArgs {
  TensorView x;             // [M, H] act_dtype
  TensorView topk_ids;      // [M, k] int32 global, in [0, E) or -1 for padding
  TensorView topk_weights;  // [M, k] fp32
  TensorView y;             // [M, H] act_dtype, must not overlap the inputs
  bool weight_on_input = false;  // requires k == 1
  int64_t token_key_offset = 0;
};

class ModularKernel {
 public:
  // Throws moekit::Error "ModularKernel: <part> <reason>" when the parts cannot compose.
  ModularKernel(std::shared_ptr<PrepareFinalize> pf, std::shared_ptr<Experts> experts,
                std::shared_ptr<WeightAndReduce> wr, KernelConfig config);
  // nullopt when pf, experts and config compose, else the reason naming the part.
  static std::optional<std::string> check_compatible(const PrepareFinalize& pf,
                                                     const Experts& experts,
                                                     const KernelConfig& config);
  // Validates every argument before writing anything (throws moekit::Error), then runs the
  // layer chunk by chunk. Not re-entrant: one forward at a time per ModularKernel.
  // Shapes, dtypes, layouts, overlaps and devices (all on config.device) are checked on the host.
  // The id values ([0, E) or -1) are checked only for CPU tensors: on a device that would need a
  // host synchronisation, so forward enqueues its work on ctx.stream and returns (CUDA-graph
  // capturable), and the device prepare treats bad ids as -1 and counts them
  // (cuda_bad_id_count()).
  void forward(const ForwardArgs& args, const ExecContext& ctx = {});

  const MoEProblem& problem() const { return problem_; }  // tokens = chunk_tokens
  const KernelConfig& config() const { return config_; }
  size_t workspace_bytes() const { return workspace_bytes_; }
  const PrepareFinalize& prepare_finalize() const { return *pf_; }
  const Experts& experts() const { return *experts_; }

 private:
  std::shared_ptr<PrepareFinalize> pf_;
  std::shared_ptr<Experts> experts_;
  std::shared_ptr<WeightAndReduce> wr_;
  KernelConfig config_;
  MoEProblem problem_;
  size_t workspace_bytes_ = 0;
  std::shared_ptr<void> workspace_;  // workspace_bytes_ on config_.device
};

}  // namespace moekit
