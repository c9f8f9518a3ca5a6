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
  if (quantized) return quantized->view();
  ExpertWeights w;
  w.w13 = w13.view();
  w.w2 = w2.view();
  w.b13 = b13.view();
  w.b2 = b2.view();
  return w;
}

namespace {
// b13 [E, w13 rows], b2 [E, H] in [-0.5, 0.5).
void add_biases(LayerWeights& w, DType dtype, uint64_t seed) {
  const int64_t E = w.w13.size(0), rows = w.w13.size(1), H = w.w2.size(1);
  w.b13 = Tensor(dtype, {E, rows});
  w.b2 = Tensor(dtype, {E, H});
  fill_uniform(w.b13, mix_seed(seed, 113), -0.5, 0.5);
  fill_uniform(w.b2, mix_seed(seed, 12), -0.5, 0.5);
}
}  // namespace

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
  if (bias) add_biases(w, dtype, seed);
  return w;
}

namespace {

// Which of the power-of-two magnitudes of the test data element [r, c] of a weight [R, K] gets:
// the index changes from one scale group of `q` to the next (see make_random_weights).
int64_t scale_group(const QuantScheme& q, int64_t r, int64_t c, int64_t K) {
  switch (q.traits().scale_layout) {
    case WeightScaleLayout::kBlock:
      return r / q.traits().block + c / q.traits().block;
    case WeightScaleLayout::kGroup:
      return r + c / q.group_size(K);
    default:
      return r;
  }
}

// 2^-1, 1 or 2 by index, times `norm`.
double magnitude(int64_t index, double norm) {
  constexpr double kFactor[] = {0.5, 1.0, 2.0};
  return kFactor[index % 3] * norm;
}

// w [E, R, K] fp32 (contiguous): every element times the magnitude of its scale group, with
// the mean square of the magnitudes divided out so the layer's statistics stay as they were.
void vary_by_group(const Tensor& w, const QuantScheme& q) {
  const int64_t E = w.size(0), R = w.size(1), K = w.size(2);
  const double norm = 1.0 / std::sqrt((0.25 + 1.0 + 4.0) / 3.0);
  float* p = w.data<float>();
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < K; ++c)
        p[(e * R + r) * K + c] *= static_cast<float>(magnitude(scale_group(q, r, c, K), norm));
}

}  // namespace

LayerWeights make_random_weights(int64_t E, int64_t H, int64_t I, const Activation& act,
                                 const QuantScheme& format, bool bias, uint64_t seed) {
  if (format.is_float())
    return make_random_weights(E, H, I, act, format.weight_dtype(), bias, seed);
  if (auto why = format.validate())
    MOEKIT_FAIL("make_random_weights: format ", format.str(), ": ", *why);
  // fp32 source weights (the quantizer rounds once), bf16 biases (as checkpoints keep them).
  LayerWeights w = make_random_weights(E, H, I, act, DType::kF32, false, seed);
  vary_by_group(w.w13, format);
  vary_by_group(w.w2, format);
  if (bias) add_biases(w, DType::kBF16, seed);
  w.quantized = quantize_expert_weights(w.view(), format);
  return w;
}

Tensor make_activations(const QuantScheme& format, DType dtype, int64_t M, int64_t H,
                        uint64_t seed) {
  Tensor x(dtype, {M, H});
  fill_uniform(x, seed, -3.0, 3.0);
  if (ActivationSpec::of(format).scale == ScaleKind::kNone) return x;
  // Powers of two: exact in every float dtype.
  for (int64_t t = 0; t < M; ++t)
    for (int64_t c = 0; c < H; ++c) {
      const int64_t i = t * H + c;
      const double v = load_as_float(x.data<void>(), dtype, i) * magnitude(t + c / 128, 1.0);
      store_from_float(x.data<void>(), dtype, i, static_cast<float>(v));
    }
  return x;
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
    os << (systematic ? "systematic err " : "max err ") << max_err << " <= bound " << bound;
    return os.str();
  }
  const Mismatch& m = *first_bad;
  if (systematic) {
    os << "systematic error " << max_err << " > bound " << bound << " (largest |diff| at ["
       << m.row << ", " << m.col << "]: got " << m.got << ", want " << m.want << ")";
    return os.str();
  }
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

Comparison compare_systematic(const TensorView& got, const TensorView& want, double bound,
                              int64_t min_rows) {
  check_matrix(got, "got");
  check_matrix(want, "want");
  MOEKIT_CHECK(got.size(0) == want.size(0) && got.size(1) == want.size(1),
               "compare: shapes differ: ", got.str(), " vs ", want.str());
  Comparison c;
  c.systematic = true;
  c.bound = bound;
  double dot = 0, norm = 0, worst = -1;
  int64_t rows = 0;  // not all zero in want
  Mismatch largest;
  for (int64_t r = 0; r < got.size(0); ++r) {
    bool nonzero = false;
    for (int64_t j = 0; j < got.size(1); ++j) {
      const double g = value(got, r, j), w = value(want, r, j), d = g - w;
      dot += d * w;
      norm += w * w;
      nonzero = nonzero || w != 0;
      if (std::abs(d) > worst || (std::isnan(d) && !std::isnan(worst)))
        worst = std::abs(d), largest = Mismatch{r, j, g, w, 1.0};
    }
    rows += nonzero;
  }
  c.max_err = norm > 0 ? std::abs(dot) / norm
              : worst == 0 || worst < 0 ? 0
                                        : std::numeric_limits<double>::infinity();
  if (!(c.max_err <= bound) && rows >= min_rows) c.first_bad = largest;
  return c;
}

// The bound on |y - y_ref| relative to the row scale S (the largest |y_ref| of the row, or for
// a sum over ranks the largest sum of the ranks' |share|). Max-abs over a row normalised by the
// row's scale: unlike NMSE it catches one bad coordinate or one bad token; unlike an
// element-wise relative error it does not blow up where a sum cancels to near zero; and a row
// whose expected value is exactly zero (padding, tokens another rank serves) must be exactly
// zero. u_y is the unit roundoff of y's dtype (bf16 2^-8, fp16 2^-11, fp32 2^-24), u32 fp32's.
// Every kernel:
//   * each rank rounds its y once to y's dtype: <= u_y |y_r| <= u_y S per rank;
//   * fp32 accumulation of dot products of length H and I: errors of random sign grow as
//     sqrt(n) u32 relative to the sum of |terms|; 16 u32 (sqrt(H) + sqrt(I)) bounds it with
//     room for the activation's float math. Negligible for bf16, the whole bound for fp32.
// Formats with float activations (float formats, and weight-only formats, whose activations are
// bf16), with u the act_unit of the format (the unit roundoff of its activation dtype):
//   * a kernel rounding the intermediate act(gate) * up to the activation dtype perturbs each
//     h_j by <= u |h_j|, independently; through GEMM2 that is a sum of I terms of random sign,
//     standard deviation about u / sqrt(3) times the row's rms (< S / 2 for our data); 3u
//     covers the largest of ~10^4 coordinates at more than 4 sigma;
//   * weight on input rounds w * x to the activation dtype: the same argument through GEMM1,
//     the activation (slope <= ~2) and GEMM2, another 3u.
//   (Dequantized weights are the same numbers in kernel and oracle: dequantize_weight_row's
//   fp32 product, or the scale folded into an fp32 accumulation, within the u32 term.)
//   For bf16 on one rank this is 4u = 1.6% of S; dropping one of I = 45 intermediate columns or
//   a wrong bias moves a row by several percent and is caught.
// Formats with quantized activations (act_unit u: half a code's spacing relative to the value,
// fp8 e4m3 2^-4; int8 1/254 of the largest value under the scale): kernel and oracle round the
// same numbers with the same quantizer, so a1 -- x, or the fp32 product w * x -- gets the same
// codes and scales on both sides (a per-tensor scale: the same rows, see CheckOptions::
// chunk_tokens). What differs is the fp32 h (the u32 term) and, through it, a2's
// requantization: where the kernel's and the oracle's h_j straddle a rounding boundary the code
// differs by one step, <= 2u |h_j| (int8: 2u amax of h's scale group), and y_i moves by
// |W2_ij| times that. A flip needs the two values within ~2^-20 of their magnitude of the
// boundary (about 10^-5 of the elements of an fp32 kernel, a few per run of the suite) and
// lands on a random term: most |W2_ij h_j| (int8: |W2_ij| amax) are a small fraction of S, the
// few largest reach ~1.3 S where a row's terms cancel. The budget 2u is one step on a term as
// large as S. No intermediate or weight-on-input rounding term: both sides round identically.
// For fp8 on one rank the bound is u_y + 2u = 12.9% of S, int8 1.2%: measured, the CPU
// experts' flips reach 0.2 of it for fp8 and 0.55 for int8, and everything else is y's
// rounding. It catches a scale inverted or read from the wrong row or group (off by 2x or more
// in the test data, make_activations) and a dropped zero point (CheckSuiteCatchesQuantized,
// test_check.cc); truncation instead of rounding to nearest moves a coordinate by about u, and
// is caught by its systematic error (systematic_error_bound).
double error_bound(const QuantScheme& format, DType dtype, int num_ranks, bool weight_on_input,
                   int64_t hidden, int64_t intermediate) {
  const double u_y = unit_roundoff(dtype), u = format.traits().act_unit;
  const double u32 = std::ldexp(1.0, -24);
  const double accumulation =
      16 * u32 * (std::sqrt(double(hidden)) + std::sqrt(double(intermediate)));
  if (ActivationSpec::of(format).scale != ScaleKind::kNone)
    return u_y * num_ranks + 2 * u + accumulation;
  return u_y * num_ranks + u * (3 + (weight_on_input ? 3 : 0)) + accumulation;
}

// The systematic error (compare_systematic) of a kernel of a format with quantized activations
// against the oracle. Both round the same numbers to nearest (see error_bound), so what differs
// has no preferred sign:
//   * y's rounding to its dtype: the slope is a mean of the coordinates' relative errors,
//     weighted by y_i^2, so <= u_y per rank (about u_y / sqrt(3 n) over n comparable
//     coordinates);
//   * the rare flip of one intermediate code moves one token's y by W2[:, j] 2u h_j, in a
//     direction unrelated to y: a slope of about 0.15u over one token's coordinates (H = 67,
//     I = 45), and 1 / n of that over n tokens -- hence at least 16 rows (compare_systematic),
//     where even ten flips stay below u / 8.
// Rounding toward zero instead shrinks every a2 element by half a code spacing on average; with
// the large elements weighing most, y's slope moves by about u / 3 for fp8 (measured: 1.1% to
// 3.2%, against the bound's 1.2%; int8's truncation already breaks the row bound), and a scale
// off by a constant factor moves it by that factor. Formats with float activations: nullopt
// (their kernels round the intermediate where the oracle does not; the row bound covers them).
std::optional<double> systematic_error_bound(const QuantScheme& format, DType dtype,
                                             int num_ranks) {
  if (ActivationSpec::of(format).scale == ScaleKind::kNone) return std::nullopt;
  return unit_roundoff(dtype) * num_ranks + format.traits().act_unit / 8;
}

double error_bound(DType dtype, int num_ranks, bool weight_on_input, int64_t hidden,
                   int64_t intermediate) {
  return error_bound(QuantScheme{float_format(dtype)}, dtype, num_ranks, weight_on_input, hidden,
                     intermediate);
}

}  // namespace moekit::check
