// ModularKernel: composes PrepareFinalize x Experts x WeightAndReduce, checks at construction
// that they fit (contract 5), validates every call before writing (contract 8), and runs the
// batch in chunks so the workspace is sized by chunk_tokens alone (contract 6).
#include <algorithm>

#include "modular/dispatch_util.h"
#include "moekit/modular.h"

namespace moekit {

namespace {

MoEProblem make_problem(const PrepareFinalize& pf, const Experts& ex, const KernelConfig& c) {
  MoEProblem p = problem_for(ex.info(), c.chunk_tokens, c.top_k, c.act_dtype);
  p.num_experts = pf.expert_map().num_experts();
  return p;
}

// Experts' output: standard [M', k, H] or, once reduced over top-k, [M', H]; batched
// [E_local, rows, H] (M' counts all batched rows).
int64_t fused_out_elements(const MoEProblem& dispatched, ActivationFormat format,
                           TopKWeightApplied applied) {
  const int64_t rows = dispatched.tokens * dispatched.hidden;
  const bool per_slot = format == ActivationFormat::kStandard &&
                        applied != TopKWeightApplied::kWeightedAndReduced;
  return per_slot ? rows * dispatched.top_k : rows;
}

TensorView take_fused_out(Workspace& ws, const DispatchedBatch& b, const MoEProblem& p,
                          TopKWeightApplied applied) {
  const TensorView& a1 = b.a1;
  if (b.format == ActivationFormat::kBatched)
    return ws.take(DType::kF32, {a1.size(0), a1.size(1), p.hidden});
  if (applied == TopKWeightApplied::kWeightedAndReduced)
    return ws.take(DType::kF32, {a1.size(0), p.hidden});
  return ws.take(DType::kF32, {a1.size(0), p.top_k, p.hidden});
}

}  // namespace

std::optional<std::string> ModularKernel::check_compatible(const PrepareFinalize& pf,
                                                           const Experts& experts,
                                                           const KernelConfig& config) {
  const std::string ex = "experts '" + std::string(experts.name()) + "'";
  const std::string pfn = "prepare/finalize '" + std::string(pf.name()) + "'";
  if (pf.activation_format() != experts.activation_format())
    return pfn + " produces " + std::string(name(pf.activation_format())) +
           " activations but " + ex + " consumes " +
           std::string(name(experts.activation_format()));
  const ExpertMap& map = pf.expert_map();
  if (config.top_k < 1 || config.top_k > map.num_experts())
    return "config: top_k " + std::to_string(config.top_k) + " not in [1, E=" +
           std::to_string(map.num_experts()) + "]";
  if (config.chunk_tokens < 1)
    return "config: chunk_tokens " + std::to_string(config.chunk_tokens) + " < 1";
  if (config.device.type != DeviceType::kCPU && !config.allocate_workspace)
    return "config: a workspace on " + config.device.str() +
           " needs allocate_workspace (cuda_workspace_allocator())";
  if (!traits(config.act_dtype).is_float)
    return "config: activation dtype " + std::string(name(config.act_dtype)) + " is not a float";
  const int64_t local = map.num_local(pf.rank());
  if (experts.info().num_local_experts != local)
    return ex + " holds " + std::to_string(experts.info().num_local_experts) +
           " experts but the expert map " + map.str() + " places " + std::to_string(local) +
           " on rank " + std::to_string(pf.rank());
  const ActivationSpec spec = experts.activation_spec();
  if (auto r = pf.can_dispatch(spec)) return pfn + " cannot feed " + ex + ": " + *r;
  // Scaled activations are laid out as the experts' format says (DESIGN.md 4): prepare/finalize
  // size their workspaces and exchanges from the format.
  const ActivationSpec format = ActivationSpec::of(experts.info().quant);
  if (spec.scale != ScaleKind::kNone &&
      (spec.dtype != format.dtype || spec.scale != format.scale || spec.group != format.group ||
       spec.scale_dtype != format.scale_dtype))
    return ex + " asks for " + detail::describe(spec) + " activations, but its format " +
           experts.info().quant.str() + " has " + detail::describe(format) + " ones";
  if (auto r = pf.can_combine(experts.weight_application()))
    return pfn + " cannot combine " + ex + " (top-k weights " +
           std::string(name(experts.weight_application())) + "): " + *r;
  MoEProblem p = make_problem(pf, experts, config);
  if (auto r = pf.can_implement(p)) return pfn + ": " + *r;
  p.tokens = pf.max_dispatched_tokens(p);
  if (auto r = experts.can_implement(p)) return ex + ": " + *r;
  return std::nullopt;
}

ModularKernel::ModularKernel(std::shared_ptr<PrepareFinalize> pf, std::shared_ptr<Experts> experts,
                             std::shared_ptr<WeightAndReduce> wr, KernelConfig config)
    : pf_(std::move(pf)), experts_(std::move(experts)), wr_(std::move(wr)), config_(config) {
  MOEKIT_CHECK(pf_ && experts_ && wr_, "ModularKernel: prepare/finalize, experts and "
                                       "weight-and-reduce are all required");
  if (auto reason = check_compatible(*pf_, *experts_, config_))
    MOEKIT_FAIL("ModularKernel: ", *reason);
  problem_ = make_problem(*pf_, *experts_, config_);
  MoEProblem dispatched = problem_;
  dispatched.tokens = pf_->max_dispatched_tokens(problem_);
  workspace_bytes_ =
      Workspace::aligned(pf_->workspace_size(problem_)) +
      Workspace::aligned(experts_->workspace_size(dispatched)) +
      Workspace::aligned(fused_out_elements(dispatched, experts_->activation_format(),
                                            experts_->weight_application()) *
                         4);
  if (config_.allocate_workspace) {
    workspace_ = config_.allocate_workspace(workspace_bytes_);
  } else {
    workspace_ = std::shared_ptr<void>(aligned_alloc_bytes(static_cast<int64_t>(workspace_bytes_)),
                                       aligned_free_bytes);
  }
}

namespace {

void validate(const ForwardArgs& a, const MoEProblem& p, const Device& device) {
  check_data(a.x, "x");
  check_data(a.topk_ids, "topk_ids");
  check_data(a.topk_weights, "topk_weights");
  check_data(a.y, "y");
  MOEKIT_CHECK(a.x.ndim == 2, "x: expected [M, H=", p.hidden, "], got ", a.x.str());
  const int64_t M = a.x.size(0);
  check_shape(a.x, {M, p.hidden}, "x");
  check_shape(a.topk_ids, {M, p.top_k}, "topk_ids");
  check_shape(a.topk_weights, {M, p.top_k}, "topk_weights");
  check_shape(a.y, {M, p.hidden}, "y");
  check_dtype(a.x, p.act_dtype, "x");
  check_dtype(a.y, p.act_dtype, "y");
  check_dtype(a.topk_ids, DType::kI32, "topk_ids");
  check_dtype(a.topk_weights, DType::kF32, "topk_weights");
  for (const auto& [t, what] : {std::pair{&a.x, "x"}, {&a.topk_ids, "topk_ids"},
                                {&a.topk_weights, "topk_weights"}, {&a.y, "y"}}) {
    check_row_major(*t, what);
    MOEKIT_CHECK(t->device == device, what, ": expected a tensor on ", device.str(), ", got ",
                 t->str());
  }
  MOEKIT_CHECK(!a.y.overlaps(a.x), "y overlaps x (in-place is not supported)");
  MOEKIT_CHECK(!a.y.overlaps(a.topk_ids), "y overlaps topk_ids");
  MOEKIT_CHECK(!a.y.overlaps(a.topk_weights), "y overlaps topk_weights");
  MOEKIT_CHECK(!a.weight_on_input || p.top_k == 1, "weight_on_input needs top_k 1, got ",
               p.top_k);
  if (device.type != DeviceType::kCPU) return;  // ids on a device: see forward's comment
  for (int64_t t = 0; t < M; ++t) {
    const int32_t* ids = a.topk_ids.row<int32_t>(t);
    for (int s = 0; s < p.top_k; ++s)
      MOEKIT_CHECK(ids[s] >= -1 && ids[s] < p.num_experts, "topk_ids[", t, ", ", s, "] = ",
                   ids[s], " is not an expert id in [0, ", p.num_experts, ") or -1 (padding)");
  }
}

}  // namespace

void ModularKernel::forward(const ForwardArgs& a, const ExecContext& ctx) {
  validate(a, problem_, config_.device);
  const int64_t M = a.x.size(0);
  TopKWeightApplied applied = experts_->weight_application();
  // Weights applied on the input count as applied once; finalize must only sum (contract 3).
  if (a.weight_on_input && applied == TopKWeightApplied::kNone)
    applied = TopKWeightApplied::kWeighted;
  const int64_t rounds = pf_->num_rounds(M, config_.chunk_tokens);
  for (int64_t round = 0; round < rounds; ++round) {
    const int64_t begin = std::min(M, round * config_.chunk_tokens);
    const int64_t end = std::min(M, begin + config_.chunk_tokens);
    Workspace ws(workspace_.get(), workspace_bytes_);
    PrepareRequest req{a.x.slice0(begin, end), a.topk_ids.slice0(begin, end),
                       a.topk_weights.slice0(begin, end), a.token_key_offset + begin,
                       a.weight_on_input, experts_->activation_spec()};
    DispatchedBatch batch = pf_->prepare(req, ws, ctx);
    TensorView out = take_fused_out(ws, batch, problem_, experts_->weight_application());
    out.device = config_.device;
    experts_->apply(batch, out, ws, ctx);
    pf_->finalize({a.y.slice0(begin, end), out, req.topk_ids, req.topk_weights, applied, wr_.get()},
                  ws, ctx);
  }
}

}  // namespace moekit

