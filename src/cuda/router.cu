// CUDA routing: one warp per row, the row's selection scores staged in shared memory. The
// selection is the CPU router's (router.cc) rule exactly -- larger score first, equal scores to
// the lower id, NaN below every number -- applied as k rounds of a warp arg-best, so the ids are
// the CPU's bit for bit: the scores are the same floats (logits, or routing_sigmoid + bias, whose
// sigmoid is bit-identical on both sides, see router/sigmoid.h).
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/check.h"
#include "cuda/device.cuh"
#include "cuda/router.h"
#include "router/sigmoid.h"

namespace moekit::cuda {
namespace {

constexpr int kMaxExperts = 1024;  // 32 experts per lane: one chosen-bit word per lane
constexpr int kMaxGroups = 32;     // one group per lane
constexpr int kWarpsPerBlock = 4;

struct RouteParams {
  const void* logits;
  bool logits_bf16;
  int64_t logits_stride;
  const float* bias;  // [E] or null
  int32_t* ids;
  int64_t ids_stride;
  float* weights;
  int64_t weights_stride;
  int64_t rows;
  RouterConfig config;
};

__device__ __forceinline__ bool ranks_before(float a, int32_t ia, float b, int32_t ib) {
  const bool a_nan = a != a, b_nan = b != b;
  if (a_nan || b_nan) return a_nan == b_nan ? ia < ib : b_nan;
  return a > b || (a == b && ia < ib);
}

// A candidate (score, id); id < 0: none (ranks after every real candidate).
struct Candidate {
  float score;
  int32_t id;
};

__device__ __forceinline__ Candidate better(Candidate a, Candidate b) {
  if (a.id < 0) return b;
  if (b.id < 0) return a;
  return ranks_before(a.score, a.id, b.score, b.id) ? a : b;
}

__device__ __forceinline__ Candidate warp_best(Candidate c) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) {
    Candidate other{__shfl_xor_sync(0xffffffffu, c.score, o),
                    __shfl_xor_sync(0xffffffffu, c.id, o)};
    c = better(c, other);
  }
  return c;
}

// k rounds of arg-best over experts [0, E) whose `allowed` bit is set (experts e = lane + 32 j
// map to bit j of the lane's words); the chosen ids land in ids_out[0..k) (lane 0 writes).
__device__ void select_top(const float* scores, int E, int k, uint32_t allowed, int32_t* chosen) {
  const int lane = threadIdx.x % kWarp;
  uint32_t taken = 0;
  for (int r = 0; r < k; ++r) {
    Candidate c{0.f, -1};
    for (int j = 0; lane + kWarp * j < E; ++j) {
      const int e = lane + kWarp * j;
      if ((allowed >> j & 1u) && !(taken >> j & 1u)) c = better(c, {scores[e], e});
    }
    c = warp_best(c);
    if (c.id % kWarp == lane) taken |= 1u << (c.id / kWarp);
    chosen[r] = c.id;  // every lane keeps the list (k is small)
  }
}

__device__ float load_logit(const RouteParams& p, int64_t row, int e) {
  if (p.logits_bf16)
    return bf16_bits_to_float(static_cast<const uint16_t*>(p.logits)[row * p.logits_stride + e]);
  return static_cast<const float*>(p.logits)[row * p.logits_stride + e];
}

__device__ double warp_sum_double(double v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Softmax of logits[chosen...] over the set `over` (all E, or the k chosen), the CPU's rules:
// a NaN in the set makes every weight NaN; a +inf (or all -inf) maximum shares the mass among the
// logits equal to it. The denominator accumulates in double.
__device__ void softmax_weights(const float* logits, int E, const int32_t* chosen, int k,
                                bool over_all, float* w) {
  const int lane = threadIdx.x % kWarp;
  const int n = over_all ? E : k;
  auto value = [&](int i) { return logits[over_all ? i : chosen[i]]; };
  float mx = -INFINITY;
  int nan = 0;
  for (int i = lane; i < n; i += kWarp) {
    const float x = value(i);
    nan |= x != x;
    mx = x > mx ? x : mx;
  }
  nan = __any_sync(0xffffffffu, nan);
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  const bool inf_max = isinf(mx);
  auto numer = [&](float x) { return inf_max ? (x == mx ? 1.0 : 0.0) : exp(double(x) - mx); };
  double denom = 0;
  for (int i = lane; i < n; i += kWarp) denom += numer(value(i));
  denom = warp_sum_double(denom);
  for (int i = 0; i < k; ++i)
    w[i] = nan ? __int_as_float(0x7fc00000) : float(numer(logits[chosen[i]]) / denom);
}

__device__ void renormalize(float* w, int k) {
  double sum = 0;
  for (int i = 0; i < k; ++i) sum += w[i];
  if (sum > 0)
    for (int i = 0; i < k; ++i) w[i] = float(w[i] / sum);
}

__global__ void route_kernel(RouteParams p) {
  extern __shared__ float smem[];  // [warps, 2, E]: logits, then choice scores
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + warp;
  if (row >= p.rows) return;
  const RouterConfig& c = p.config;
  const int E = c.num_experts, k = c.top_k;
  float* logits = smem + size_t(warp) * 2 * E;
  float* scores = logits + E;
  const bool grouped = c.method == RoutingMethod::kSigmoidGroupedTopK;
  for (int e = lane; e < E; e += kWarp) {
    logits[e] = load_logit(p, row, e);
    scores[e] = grouped ? detail::routing_sigmoid_impl(logits[e]) + p.bias[e] : logits[e];
  }
  __syncwarp();

  uint32_t allowed = 0xffffffffu;
  if (grouped && c.topk_group < c.n_group) {
    // Group score: the sum of its best two choice scores (its only one for single-expert
    // groups), in the CPU's order of addition; groups ranked by the same rule as experts.
    const int per_group = E / c.n_group;
    float group_score = 0.f;
    if (lane < c.n_group) {
      Candidate b0{0.f, -1}, b1{0.f, -1};
      for (int e = lane * per_group; e < (lane + 1) * per_group; ++e) {
        const Candidate x{scores[e], e};
        if (better(x, b0).id == x.id) {
          b1 = b0;
          b0 = x;
        } else if (better(x, b1).id == x.id) {
          b1 = x;
        }
      }
      group_score = per_group >= 2 ? b0.score + b1.score : b0.score;
    }
    __shared__ float group_scores[kWarpsPerBlock][kMaxGroups];
    group_scores[warp][lane] = group_score;
    __syncwarp();
    uint32_t kept_groups = 0;
    int32_t kept[kMaxGroups];
    select_top(group_scores[warp], c.n_group, c.topk_group, 0xffffffffu, kept);
    for (int g = 0; g < c.topk_group; ++g) kept_groups |= 1u << kept[g];
    allowed = 0;
    for (int j = 0; lane + kWarp * j < E; ++j)
      allowed |= uint32_t((kept_groups >> ((lane + kWarp * j) / per_group)) & 1u) << j;
  }

  int32_t chosen[kMaxExperts / kWarp];  // k <= E; k is small in practice
  float w[kMaxExperts / kWarp];
  select_top(scores, E, k, allowed, chosen);
  switch (c.method) {
    case RoutingMethod::kSoftmaxTopK:
      softmax_weights(logits, E, chosen, k, /*over_all=*/true, w);
      if (c.renormalize) renormalize(w, k);
      break;
    case RoutingMethod::kTopKSoftmax:
      softmax_weights(logits, E, chosen, k, /*over_all=*/false, w);
      break;
    case RoutingMethod::kLlama4Top1Sigmoid:
      w[0] = detail::routing_sigmoid_impl(logits[chosen[0]]);
      break;
    case RoutingMethod::kSigmoidGroupedTopK:
      for (int i = 0; i < k; ++i) w[i] = detail::routing_sigmoid_impl(logits[chosen[i]]);
      if (c.renormalize) renormalize(w, k);
      for (int i = 0; i < k; ++i) w[i] *= c.routed_scaling_factor;
      break;
  }
  for (int i = lane; i < k; i += kWarp) {
    p.ids[row * p.ids_stride + i] = chosen[i];
    p.weights[row * p.weights_stride + i] = w[i];
  }
}

}  // namespace

std::optional<std::string> route_unsupported(const RouterConfig& config) {
  if (config.num_experts > kMaxExperts)
    return "num_experts " + std::to_string(config.num_experts) + " > " +
           std::to_string(kMaxExperts);
  if (config.top_k > kMaxExperts / kWarp)
    return "top_k " + std::to_string(config.top_k) + " > " + std::to_string(kMaxExperts / kWarp);
  if (config.method == RoutingMethod::kSigmoidGroupedTopK && config.n_group > kMaxGroups)
    return "n_group " + std::to_string(config.n_group) + " > " + std::to_string(kMaxGroups);
  return std::nullopt;
}

void route(const RouterConfig& config, const TensorView& logits, const TensorView& bias,
           const TensorView& ids, const TensorView& weights, void* stream) {
  const int64_t rows = logits.size(0);
  if (rows == 0) return;
  RouteParams p{logits.data,   logits.dtype == DType::kBF16, logits.stride[0],
                bias.present() ? bias.ptr<const float>() : nullptr,
                ids.ptr<int32_t>(), ids.stride[0], weights.ptr<float>(), weights.stride[0], rows,
                config};
  const size_t smem = size_t(kWarpsPerBlock) * 2 * config.num_experts * sizeof(float);
  route_kernel<<<blocks_for(rows, kWarpsPerBlock), kWarpsPerBlock * kWarp, smem,
                 static_cast<cudaStream_t>(stream)>>>(p);
  MOEKIT_CUDA_CHECK(cudaGetLastError());
}

}  // namespace moekit::cuda
