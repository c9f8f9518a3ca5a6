// Deterministic random tensors from a counter-based generator: element i of a stream is a pure
// function of (seed, stream, i). Any slice (one expert's weights) can therefore be regenerated
// bit-identically without the rest: the oracle check rebuilds only the experts its sample of
// tokens uses, after the bulk weights went to the prepacking layer and were freed.
#pragma once

#include <cstdint>
#include <optional>
#include <span>

#include "moekit/core/tensor.h"
#include "moekit/modular.h"
#include "moekit/quant/quantize.h"

namespace moekit::cli {

struct RandomStream {
  uint64_t seed = 0;
  uint64_t id = 0;  // one per tensor role, so that roles never share values
};

// Fills contiguous fp32/fp16/bf16 `t` with N(0, stddev^2) values, quantized to 2^16 levels
// (plenty for bf16, and cheap: one hash gives four values), using `threads` threads.
void fill_normal(const TensorView& t, RandomStream stream, float stddev, int threads);

// How to (re)generate the weights of a set of experts: slot s of the result holds expert
// experts[s], with values that do not depend on which other experts are generated with it.
struct RandomExpertsSpec {
  uint64_t seed = 0;
  uint64_t stream_base = 0;  // w13, w2, b13, b2 use stream_base + 0..3
  int64_t hidden = 0, intermediate = 0;
  Activation activation;
  bool has_bias = false;
  // Float formats are drawn in their dtype; quantized ones drawn in bf16 and quantized (per
  // expert, so a regenerated subset quantizes to the same values).
  QuantScheme format;
};

// Owning expert weights; W13 ~ N(0, 1/H) and W2 ~ N(0, 1/I) keep every activation O(1) for
// O(1) inputs, whatever the shape.
struct RandomExperts {
  Tensor w13, w2, b13, b2;  // [n, w13_rows(I), H], [n, H, I], [n, w13_rows(I)], [n, H]
  std::optional<QuantizedExpertWeights> quantized;  // of w13 and w2, quantized formats only
  ExpertWeights view() const {
    if (quantized) return quantized->view();
    ExpertWeights w;
    w.w13 = w13;
    w.w2 = w2;
    w.b13 = b13;
    w.b2 = b2;
    return w;
  }
};

RandomExperts make_random_experts(const RandomExpertsSpec& spec, std::span<const int32_t> experts,
                                  int threads);

}  // namespace moekit::cli
