// CPU routing: validation, the selection rule and the four routing methods of router.h.
//
// Choices the header leaves open, written down here:
// - kSoftmaxTopK ranks experts by the logit itself. Softmax is monotonic, so this is the ranking
//   of the probabilities, except that probabilities rounded (or underflowed) to the same float
//   still rank by their logits instead of falling back to the lower id.
// - Softmax follows IEEE arithmetic: a NaN among the logits it covers makes every weight NaN.
//   When the largest logit is +inf (or every logit is -inf), the logits equal to it share the
//   mass equally and the others get 0, the limit of softmax as those logits grow together.
// - Renormalization divides by the sum of the chosen weights unless that sum is 0 (sigmoids
//   that underflowed), which leaves the weights at 0 instead of turning them into NaN.
// - `renormalize` applies to kSoftmaxTopK and kSigmoidGroupedTopK; kTopKSoftmax weights already
//   sum to 1 and kLlama4Top1Sigmoid weights are the sigmoid itself. `n_group`, `topk_group` and
//   `routed_scaling_factor` must keep their defaults for the other methods, so that a setting
//   that would be ignored is refused instead.
#include "moekit/router.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <span>
#include <vector>

#include "moekit/core/error.h"
#include "router/sigmoid.h"
#ifdef MOEKIT_HAS_CUDA
#include "cuda/router.h"
#endif

namespace moekit {
namespace {

struct MethodName {
  RoutingMethod method;
  std::string_view name;
};
constexpr MethodName kMethodNames[] = {
    {RoutingMethod::kSoftmaxTopK, "softmax_topk"},
    {RoutingMethod::kTopKSoftmax, "topk_softmax"},
    {RoutingMethod::kSigmoidGroupedTopK, "sigmoid_grouped_topk"},
    {RoutingMethod::kLlama4Top1Sigmoid, "llama4_top1_sigmoid"},
};

std::string known_method_names() {
  std::string s;
  for (const MethodName& m : kMethodNames) s += detail::concat(s.empty() ? "" : ", ", m.name);
  return s;
}

// The selection rule: larger score first, equal scores to the lower id, NaN below everything.
inline bool ranks_before(float a, int32_t id_a, float b, int32_t id_b) {
  const bool a_nan = std::isnan(a);
  const bool b_nan = std::isnan(b);
  if (a_nan || b_nan) return a_nan == b_nan ? id_a < id_b : b_nan;
  return a > b || (a == b && id_a < id_b);
}

// The k best (score, id) pairs offered so far, best first, in caller-owned arrays [k]. A
// candidate that loses to the current k-th costs one comparison, so a row of E candidates costs
// O(E) plus O(k) per accepted one, O(E k) at worst; no row is ever sorted whole.
class TopK {
 public:
  TopK(int k, float* scores, int32_t* ids) : k_(k), scores_(scores), ids_(ids) {}

  void offer(float score, int32_t id) {
    if (size_ == k_ && !ranks_before(score, id, scores_[k_ - 1], ids_[k_ - 1])) return;
    int pos = size_ < k_ ? size_++ : k_ - 1;
    for (; pos > 0 && ranks_before(score, id, scores_[pos - 1], ids_[pos - 1]); --pos) {
      scores_[pos] = scores_[pos - 1];
      ids_[pos] = ids_[pos - 1];
    }
    scores_[pos] = score;
    ids_[pos] = id;
  }

 private:
  int k_;
  int size_ = 0;
  float* scores_;
  int32_t* ids_;
};

// Softmax over a set of logits (see the file comment for NaN and infinities); the denominator
// is accumulated in double.
class Softmax {
 public:
  explicit Softmax(std::span<const float> logits) {
    for (float x : logits) {
      has_nan_ = has_nan_ || std::isnan(x);
      max_ = std::max(max_, x);  // std::max keeps max_ when x is NaN
    }
    if (has_nan_) return;
    for (float x : logits) {
      if (std::isinf(max_))
        denom_ += x == max_ ? 1.0 : 0.0;
      else
        denom_ += std::exp(x - max_);
    }
  }

  float operator()(float x) const {
    if (has_nan_) return std::numeric_limits<float>::quiet_NaN();
    const double numer = std::isinf(max_) ? (x == max_ ? 1.0 : 0.0) : std::exp(x - max_);
    return static_cast<float>(numer / denom_);
  }

 private:
  bool has_nan_ = false;
  float max_ = -std::numeric_limits<float>::infinity();
  double denom_ = 0.0;
};

inline float sigmoid(float x) { return detail::routing_sigmoid_impl(x); }

void renormalize(std::span<float> w) {
  double sum = 0.0;
  for (float v : w) sum += v;
  if (sum > 0.0)
    for (float& v : w) v = static_cast<float>(v / sum);
}

// Routes one row at a time with scratch sized once per route() call.
class RowRouter {
 public:
  RowRouter(const RouterConfig& config, const float* correction_bias)
      : cfg_(config),
        bias_(correction_bias),
        scores_(config.method == RoutingMethod::kSigmoidGroupedTopK ? config.num_experts : 0),
        group_scores_(config.topk_group),
        kept_groups_(config.topk_group) {}

  // logits [E] -> ids [k], weights [k] (weights doubles as the chosen-score scratch).
  void operator()(const float* logits, int32_t* ids, float* weights) {
    switch (cfg_.method) {
      case RoutingMethod::kSoftmaxTopK:
        return softmax_topk(logits, ids, weights);
      case RoutingMethod::kTopKSoftmax:
        return topk_softmax(logits, ids, weights);
      case RoutingMethod::kSigmoidGroupedTopK:
        return sigmoid_grouped_topk(logits, ids, weights);
      case RoutingMethod::kLlama4Top1Sigmoid:
        return llama4_top1_sigmoid(logits, ids, weights);
    }
  }

 private:
  void select(const float* scores, int32_t begin, int32_t end, TopK& top) const {
    for (int32_t e = begin; e < end; ++e) top.offer(scores[e], e);
  }

  void softmax_topk(const float* logits, int32_t* ids, float* weights) const {
    const int E = cfg_.num_experts;
    TopK top(cfg_.top_k, weights, ids);
    select(logits, 0, E, top);
    const Softmax softmax({logits, static_cast<size_t>(E)});
    const std::span<float> w(weights, cfg_.top_k);
    for (int i = 0; i < cfg_.top_k; ++i) w[i] = softmax(logits[ids[i]]);
    if (cfg_.renormalize) renormalize(w);
  }

  void topk_softmax(const float* logits, int32_t* ids, float* weights) const {
    TopK top(cfg_.top_k, weights, ids);
    select(logits, 0, cfg_.num_experts, top);
    const std::span<float> w(weights, cfg_.top_k);
    const Softmax softmax(w);  // over the chosen logits, read before being overwritten
    for (float& v : w) v = softmax(v);
  }

  void llama4_top1_sigmoid(const float* logits, int32_t* ids, float* weights) const {
    TopK top(1, weights, ids);
    select(logits, 0, cfg_.num_experts, top);
    weights[0] = sigmoid(weights[0]);
  }

  void sigmoid_grouped_topk(const float* logits, int32_t* ids, float* weights) {
    const int E = cfg_.num_experts;
    const int per_group = E / cfg_.n_group;
    for (int e = 0; e < E; ++e) scores_[e] = sigmoid(logits[e]) + bias_[e];  // choice scores c

    TopK top(cfg_.top_k, weights, ids);
    if (cfg_.topk_group == cfg_.n_group) {
      select(scores_.data(), 0, E, top);
    } else {
      // Group score: sum of the group's best two c (its only c when it has one expert).
      TopK groups(cfg_.topk_group, group_scores_.data(), kept_groups_.data());
      for (int g = 0; g < cfg_.n_group; ++g) {
        float best[2];
        int32_t best_ids[2];
        const int n_best = std::min(2, per_group);
        TopK pair(n_best, best, best_ids);
        select(scores_.data(), g * per_group, (g + 1) * per_group, pair);
        groups.offer(n_best == 2 ? best[0] + best[1] : best[0], g);
      }
      for (int32_t g : kept_groups_)
        select(scores_.data(), g * per_group, (g + 1) * per_group, top);
    }

    // Weights are the unbiased sigmoids of the chosen experts.
    const std::span<float> w(weights, cfg_.top_k);
    for (int i = 0; i < cfg_.top_k; ++i) w[i] = sigmoid(logits[ids[i]]);
    if (cfg_.renormalize) renormalize(w);
    for (float& v : w) v *= cfg_.routed_scaling_factor;
  }

  const RouterConfig& cfg_;
  const float* bias_;
  std::vector<float> scores_;         // [E] sigmoid + bias
  std::vector<float> group_scores_;   // [topk_group] scores of the kept groups
  std::vector<int32_t> kept_groups_;  // [topk_group]
};

// [rows, cols], last dim contiguous, rows not overlapping, on `device`, data unless empty.
void check_matrix(const TensorView& t, int64_t rows, int64_t cols, const Device& device,
                  const char* what) {
  check_shape(t, {rows, cols}, what);
  check_row_major(t, what);
  check_data(t, what);
  MOEKIT_CHECK(t.device == device, what, ": expected on ", device.str(), " like the logits, got ",
               t.str());
}

void check_route_args(const RouterConfig& config, const TensorView& logits, const TensorView& bias,
                      const TensorView& ids, const TensorView& weights) {
  const std::optional<std::string> reason = config.validate();
  MOEKIT_CHECK(!reason, "route: invalid config ", config.str(), ": ", reason.value_or(""));
  const int64_t E = config.num_experts;
  const int64_t k = config.top_k;

  MOEKIT_CHECK(logits.ndim == 2, "route: logits: expected [M, ", E, "], got ", logits.str());
  MOEKIT_CHECK(logits.dtype == DType::kF32 || logits.dtype == DType::kBF16,
               "route: logits: expected dtype fp32 or bf16, got ", logits.str());
  const int64_t M = logits.size(0);
  MOEKIT_CHECK(M >= 0, "route: logits: negative row count in ", logits.str());
  const Device device = logits.device;
#ifdef MOEKIT_HAS_CUDA
  if (device.type == DeviceType::kCUDA)
    if (auto why = cuda::route_unsupported(config))
      MOEKIT_FAIL("route: the CUDA router cannot run ", config.str(), ": ", *why);
#else
  MOEKIT_CHECK(device.type == DeviceType::kCPU, "route: logits on ", device.str(),
               " but moekit was built without CUDA");
#endif
  check_matrix(logits, M, E, device, "route: logits");

  if (config.method == RoutingMethod::kSigmoidGroupedTopK) {
    MOEKIT_CHECK(bias.present(), "route: correction_bias [", E, "] fp32 is required by ",
                 name(config.method));
    check_shape(bias, {E}, "route: correction_bias");
    check_dtype(bias, DType::kF32, "route: correction_bias");
    check_row_major(bias, "route: correction_bias");
    check_data(bias, "route: correction_bias");
    MOEKIT_CHECK(bias.device == device, "route: correction_bias: expected on ", device.str(),
                 " like the logits, got ", bias.str());
    // Values are checked on the host only: reading device memory would synchronize.
    const float* b = bias.ptr<const float>();
    for (int64_t e = 0; device.type == DeviceType::kCPU && e < E; ++e)
      MOEKIT_CHECK(std::isfinite(b[e]), "route: correction_bias[", e, "] is ", b[e]);
  } else {
    MOEKIT_CHECK(!bias.present(), "route: correction_bias is only used by ",
                 name(RoutingMethod::kSigmoidGroupedTopK), ", not ", name(config.method),
                 "; pass an absent view");
  }

  check_matrix(ids, M, k, device, "route: topk_ids");
  check_dtype(ids, DType::kI32, "route: topk_ids");
  check_matrix(weights, M, k, device, "route: topk_weights");
  check_dtype(weights, DType::kF32, "route: topk_weights");

  MOEKIT_CHECK(!ids.overlaps(logits), "route: topk_ids overlaps logits");
  MOEKIT_CHECK(!weights.overlaps(logits), "route: topk_weights overlaps logits");
  MOEKIT_CHECK(!ids.overlaps(weights), "route: topk_ids overlaps topk_weights");
  MOEKIT_CHECK(!ids.overlaps(bias), "route: topk_ids overlaps correction_bias");
  MOEKIT_CHECK(!weights.overlaps(bias), "route: topk_weights overlaps correction_bias");
}

}  // namespace

std::optional<std::string> RouterConfig::validate() const {
  if (num_experts < 1) return detail::concat("num_experts must be >= 1, got ", num_experts);
  if (top_k < 1) return detail::concat("top_k must be >= 1, got ", top_k);
  if (top_k > num_experts) return detail::concat("top_k ", top_k, " > num_experts ", num_experts);
  if (method == RoutingMethod::kLlama4Top1Sigmoid && top_k != 1)
    return detail::concat(name(method), " needs top_k 1, got ", top_k);
  if (method != RoutingMethod::kSigmoidGroupedTopK) {
    if (n_group != 1 || topk_group != 1 || routed_scaling_factor != 1.0f)
      return detail::concat("n_group, topk_group and routed_scaling_factor are only used by ",
                            name(RoutingMethod::kSigmoidGroupedTopK), "; ", name(method),
                            " needs 1, 1, 1");
    return std::nullopt;
  }
  if (n_group < 1) return detail::concat("n_group must be >= 1, got ", n_group);
  if (num_experts % n_group != 0)
    return detail::concat("num_experts ", num_experts, " is not divisible by n_group ", n_group);
  if (topk_group < 1 || topk_group > n_group)
    return detail::concat("topk_group ", topk_group, " outside [1, n_group ", n_group, "]");
  const int kept = topk_group * (num_experts / n_group);
  if (top_k > kept)
    return detail::concat("top_k ", top_k, " > ", kept, " experts in the ", topk_group,
                          " kept groups");
  if (!std::isfinite(routed_scaling_factor) || routed_scaling_factor <= 0.0f)
    return detail::concat("routed_scaling_factor must be finite and > 0, got ",
                          routed_scaling_factor);
  return std::nullopt;
}

std::string RouterConfig::str() const {
  std::string s = detail::concat(name(method), "(E=", num_experts, ", k=", top_k);
  if (method == RoutingMethod::kSoftmaxTopK || method == RoutingMethod::kSigmoidGroupedTopK)
    s += detail::concat(", renormalize=", renormalize ? "true" : "false");
  if (method == RoutingMethod::kSigmoidGroupedTopK)
    s += detail::concat(", n_group=", n_group, ", topk_group=", topk_group,
                        ", routed_scaling_factor=", routed_scaling_factor);
  return s + ")";
}

std::string_view name(RoutingMethod m) {
  for (const MethodName& entry : kMethodNames)
    if (entry.method == m) return entry.name;
  return "unknown";
}

RoutingMethod parse_routing_method(std::string_view s) {
  for (const MethodName& entry : kMethodNames)
    if (entry.name == s) return entry.method;
  MOEKIT_FAIL("unknown routing method '", s, "' (known: ", known_method_names(), ")");
}

float routing_sigmoid(float x) { return sigmoid(x); }

void route(const RouterConfig& config, const TensorView& logits, const TensorView& correction_bias,
           const TensorView& topk_ids, const TensorView& topk_weights, const ExecContext& ctx) {
  check_route_args(config, logits, correction_bias, topk_ids, topk_weights);
#ifdef MOEKIT_HAS_CUDA
  if (logits.device.type == DeviceType::kCUDA)
    return cuda::route(config, logits, correction_bias, topk_ids, topk_weights, ctx.stream);
#else
  (void)ctx;
#endif
  const bool grouped = config.method == RoutingMethod::kSigmoidGroupedTopK;
  RowRouter route_row(config, grouped ? correction_bias.ptr<const float>() : nullptr);
  std::vector<float> converted(logits.dtype == DType::kBF16 ? config.num_experts : 0);  // [E]
  for (int64_t m = 0; m < logits.size(0); ++m) {
    const float* row;
    if (logits.dtype == DType::kBF16) {
      const uint16_t* src = logits.row<const uint16_t>(m);
      for (int e = 0; e < config.num_experts; ++e) converted[e] = bf16_to_float(src[e]);
      row = converted.data();
    } else {
      row = logits.row<const float>(m);
    }
    route_row(row, topk_ids.row<int32_t>(m), topk_weights.row<float>(m));
  }
}

}  // namespace moekit
