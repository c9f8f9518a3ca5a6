// check.h, part 1: deterministic data, routing, comparisons and the error bounds.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>

#include "moekit/check.h"

namespace moekit::check {
namespace {

uint64_t splitmix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Calls f(i, offset) for every element of t: i its row-major logical index, offset its element
// offset through t's strides.
template <typename F>
void for_each_element(const TensorView& t, F f) {
  std::array<int64_t, kMaxDims> idx{};
  const int64_t n = t.numel();
  for (int64_t i = 0; i < n; ++i) {
    int64_t offset = 0;
    for (int d = 0; d < t.ndim; ++d) offset += idx[d] * t.stride[d];
    f(i, offset);
    for (int d = t.ndim - 1; d >= 0 && ++idx[d] == t.shape[d]; --d) idx[d] = 0;
  }
}

void check_matrix(const TensorView& t, const char* what) {
  MOEKIT_CHECK(t.ndim == 2 && (t.size(1) <= 1 || t.stride[1] == 1), "compare: ", what,
               " must be [M, N] with a contiguous last dimension, got ", t.str());
  MOEKIT_CHECK(t.data != nullptr || t.numel() == 0, "compare: ", what, " has no data");
}

double value(const TensorView& t, int64_t r, int64_t c) {
  const int64_t i = r * t.stride[0] + c;
  switch (t.dtype) {
    case DType::kI32:
      return t.ptr<int32_t>()[i];
    case DType::kI64:
      return static_cast<double>(t.ptr<int64_t>()[i]);
    case DType::kU8:
      return t.ptr<uint8_t>()[i];
    default:
      return load_as_float(t.data, t.dtype, i);
  }
}

// Unit roundoff u = 2^-p of a float format with p significand bits: round-to-nearest moves a
// value by at most u times its magnitude.
double unit_roundoff(DType t) {
  switch (t) {
    case DType::kBF16:
      return std::ldexp(1.0, -8);
    case DType::kF16:
      return std::ldexp(1.0, -11);
    case DType::kF32:
      return std::ldexp(1.0, -24);
    default:
      MOEKIT_FAIL("error_bound: ", name(t), " is not an activation dtype");
  }
}

}  // namespace

uint64_t mix_seed(uint64_t seed, uint64_t value) {
  return splitmix64(seed ^ splitmix64(value));
}

uint64_t mix_seed(uint64_t seed, std::string_view text) {
  for (char c : text) seed = mix_seed(seed, static_cast<uint8_t>(c));
  return seed;
}

void fill_uniform(const TensorView& t, uint64_t seed, double lo, double hi) {
  MOEKIT_CHECK(traits(t.dtype).is_float, "fill_uniform: ", t.str(), " is not a float tensor");
  for_each_element(t, [&](int64_t i, int64_t offset) {
    const double u = static_cast<double>(mix_seed(seed, static_cast<uint64_t>(i)) >> 11) *
                     std::ldexp(1.0, -53);  // [0, 1)
    store_from_float(t.data, t.dtype, offset, static_cast<float>(lo + (hi - lo) * u));
  });
}

ExpertWeights LayerWeights::view() const {
  return ExpertWeights{w13.view(), w2.view(), b13.view(), b2.view(), std::nullopt};
}

LayerWeights make_random_weights(int64_t E, int64_t H, int64_t I, const Activation& act,
                                 DType dtype, bool bias, uint64_t seed) {
  LayerWeights w;
  const int64_t rows = act.w13_rows(I);
  w.w13 = Tensor(dtype, {E, rows, H});
  w.w2 = Tensor(dtype, {E, H, I});
  // x ~ U[-3, 3) has variance 3; W13 ~ U[-b, b) with b = 2.5 / sqrt(H) gives gates of variance
  // H * b^2 / 3 * 3 = 6.25. W2 ~ U[-1/sqrt(I), 1/sqrt(I)) keeps y near the scale of h.
  fill_uniform(w.w13, mix_seed(seed, 13), -2.5 / std::sqrt(double(H)), 2.5 / std::sqrt(double(H)));
  fill_uniform(w.w2, mix_seed(seed, 2), -1 / std::sqrt(double(I)), 1 / std::sqrt(double(I)));
  if (bias) {
    w.b13 = Tensor(dtype, {E, rows});
    w.b2 = Tensor(dtype, {E, H});
    fill_uniform(w.b13, mix_seed(seed, 113), -0.5, 0.5);
    fill_uniform(w.b2, mix_seed(seed, 12), -0.5, 0.5);
  }
  return w;
}

TensorView Routing::bias_view() const {
  return correction_bias.numel() ? correction_bias.view() : TensorView{};
}

RouterConfig router_config(RoutingMethod method, int num_experts, int top_k) {
  RouterConfig c;
  c.method = method;
  c.num_experts = num_experts;
  c.top_k = method == RoutingMethod::kLlama4Top1Sigmoid ? 1 : top_k;
  if (method == RoutingMethod::kSigmoidGroupedTopK) {
    // DeepSeek-like: 4 groups keeping 2 (or more groups when k needs them), scale 2.5.
    c.n_group = num_experts % 4 == 0 ? 4 : 1;
    const int per_group = num_experts / c.n_group;
    c.topk_group =
        std::min(c.n_group, std::max(c.n_group / 2, (c.top_k + per_group - 1) / per_group));
    c.routed_scaling_factor = 2.5f;
  }
  return c;
}

Routing make_random_routing(const RouterConfig& config, int64_t M, uint64_t seed,
                            int64_t padding_period) {
  Routing r;
  r.config = config;
  r.weight_on_input = config.method == RoutingMethod::kLlama4Top1Sigmoid;
  const int64_t E = config.num_experts, k = config.top_k;
  r.logits = Tensor(DType::kF32, {M, E});
  fill_uniform(r.logits, mix_seed(seed, 1), -4.0, 4.0);
  if (config.method == RoutingMethod::kSigmoidGroupedTopK) {
    r.correction_bias = Tensor(DType::kF32, {E});
    fill_uniform(r.correction_bias, mix_seed(seed, 2), -0.5, 0.5);
  }
  r.topk_ids = Tensor(DType::kI32, {M, k});
  r.topk_weights = Tensor(DType::kF32, {M, k});
  route(config, r.logits, r.bias_view(), r.topk_ids, r.topk_weights);
  // Padded slots keep their weight: finalize must skip them by id, not by a zero weight.
  for (int64_t t = 0; padding_period > 0 && t < M; ++t) {
    int32_t* ids = r.topk_ids.data<int32_t>() + t * k;
    if (t % padding_period == padding_period - 1) std::fill_n(ids, k, -1);
    if (k > 1 && t % padding_period == padding_period / 2) ids[k - 1] = -1;
  }
  return r;
}

std::string Comparison::str() const {
  std::ostringstream os;
  os.precision(4);
  if (!first_bad) {
    os << "max err " << max_err << " <= bound " << bound;
    return os.str();
  }
  const Mismatch& m = *first_bad;
  os << "first bad coordinate [" << m.row << ", " << m.col << "]: got " << m.got << ", want "
     << m.want << " (|diff| " << std::abs(m.got - m.want) << " > bound " << bound << " x row scale "
     << m.scale << "); max err " << max_err;
  return os.str();
}

Comparison compare_rows(const TensorView& got, const TensorView& want, double bound,
                        std::span<const double> row_scale) {
  check_matrix(got, "got");
  check_matrix(want, "want");
  MOEKIT_CHECK(got.size(0) == want.size(0) && got.size(1) == want.size(1),
               "compare: shapes differ: ", got.str(), " vs ", want.str());
  const int64_t M = got.size(0), N = got.size(1);
  MOEKIT_CHECK(row_scale.empty() || static_cast<int64_t>(row_scale.size()) == M,
               "compare: ", row_scale.size(), " row scales for ", M, " rows");
  Comparison c;
  c.bound = bound;
  for (int64_t r = 0; r < M; ++r) {
    double scale = 0;
    if (!row_scale.empty()) scale = row_scale[r];
    for (int64_t j = 0; row_scale.empty() && j < N; ++j)
      scale = std::max(scale, std::abs(value(want, r, j)));
    for (int64_t j = 0; j < N; ++j) {
      const double g = value(got, r, j), w = value(want, r, j), d = std::abs(g - w);
      const double err = d == 0                        ? 0
                         : scale > 0 && !std::isnan(d) ? d / scale
                                                       : std::numeric_limits<double>::infinity();
      c.max_err = std::max(c.max_err, err);
      if (!(d <= bound * scale) && !c.first_bad) c.first_bad = Mismatch{r, j, g, w, scale};
    }
  }
  return c;
}

Comparison compare_bits(const TensorView& got, const TensorView& want) {
  check_matrix(got, "got");
  check_matrix(want, "want");
  MOEKIT_CHECK(
      got.dtype == want.dtype && got.size(0) == want.size(0) && got.size(1) == want.size(1),
      "compare_bits: ", got.str(), " vs ", want.str());
  const int64_t eb = element_bytes(got.dtype);
  Comparison c;
  for (int64_t r = 0; r < got.size(0); ++r)
    for (int64_t j = 0; j < got.size(1); ++j) {
      const auto* g = static_cast<const char*>(got.data) + (r * got.stride[0] + j) * eb;
      const auto* w = static_cast<const char*>(want.data) + (r * want.stride[0] + j) * eb;
      if (std::memcmp(g, w, eb) == 0) continue;
      const double gv = value(got, r, j), wv = value(want, r, j);
      const double d = std::abs(gv - wv);
      c.max_err = std::max(c.max_err, std::isnan(d) ? std::numeric_limits<double>::infinity() : d);
      if (!c.first_bad) c.first_bad = Mismatch{r, j, gv, wv, 1.0};
    }
  return c;
}

// The bound on |y - y_ref| relative to the row scale S (the largest |y_ref| of the row, or for
// a sum over ranks the largest sum of the ranks' |share|). Max-abs over a row normalised by the
// row's scale: unlike NMSE it catches one bad coordinate or one bad token; unlike an
// element-wise relative error it does not blow up where a sum cancels to near zero; and a row
// whose expected value is exactly zero (padding, tokens another rank serves) must be exactly
// zero. With u the unit roundoff of the activation dtype (bf16 2^-8, fp16 2^-11, fp32 2^-24):
//   * each rank rounds its y once to the activation dtype: <= u |y_r| <= u S per rank;
//   * a kernel rounding the intermediate act(gate) * up to the activation dtype perturbs each
//     h_j by <= u |h_j|, independently; through GEMM2 that is a sum of I terms of random sign,
//     standard deviation about u / sqrt(3) times the row's rms (< S / 2 for our data); 3u
//     covers the largest of ~10^4 coordinates at more than 4 sigma;
//   * weight on input rounds w * x to the activation dtype: the same argument through GEMM1,
//     the activation (slope <= ~2) and GEMM2, another 3u;
//   * fp32 accumulation of dot products of length H and I: errors of random sign grow as
//     sqrt(n) u32 relative to the sum of |terms|; 16 u32 (sqrt(H) + sqrt(I)) bounds it with
//     room for the activation's float math. Negligible for bf16, the whole bound for fp32.
// For bf16 on one rank this is 4u = 1.6% of S; dropping one of I = 45 intermediate columns or
// a wrong bias moves a row by several percent and is caught.
double error_bound(DType dtype, int num_ranks, bool weight_on_input, int64_t hidden,
                   int64_t intermediate) {
  const double u = unit_roundoff(dtype);
  const double u32 = std::ldexp(1.0, -24);
  return u * (num_ranks + 3 + (weight_on_input ? 3 : 0)) +
         16 * u32 * (std::sqrt(double(hidden)) + std::sqrt(double(intermediate)));
}

}  // namespace moekit::check
