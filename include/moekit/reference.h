// The oracle: plain loops, every element dequantized to double, fp64 accumulation. Slow on
// purpose and independent of the modular kernel; tests and `moekit check` compare against it.
//
// Quantized formats (quant/format.h): weights are dequantized row by row
// (dequantize_weight_row). Where the format's activations are quantized, the oracle rounds what
// a kernel of the format rounds, with the library's quantizers, so that only the arithmetic
// order differs between them:
//   a1: x (times its top-1 weight when applied on the input, an fp32 product) quantized as
//       ActivationSpec::of(format) says over all M rows -- dynamic per tensor (one amax over the
//       rows), per token or per 1 x group, or with the static per-tensor scale -- then
//       dequantized;
//   a2: the intermediate act(gate) * up of every pair summed, rounded to fp32 and requantized as
//       intermediate_spec() says, then dequantized;
// and everything else is computed in double.
#pragma once

#include <memory>

#include "moekit/modular.h"

namespace moekit {

struct ReferenceArgs {
  TensorView x;             // [M, H] any float dtype
  TensorView topk_ids;      // [M, k] int32 GLOBAL ids, -1 padding
  TensorView topk_weights;  // [M, k] fp32
  ExpertWeights weights;    // global: slot e of `weights` is global expert e; float or quantized
  Activation activation;
  bool weight_on_input = false;
  // When set, only the (token, slot) pairs that map->local_id(rank, e, token_key_offset + t)
  // serves are summed: one rank's share.
  const ExpertMap* map = nullptr;
  int rank = 0;
  int64_t token_key_offset = 0;
  // Round the intermediate activation to bf16 before GEMM2, as a kernel with a bf16
  // intermediate does (to tell rounding from real error in tests); false: keep it in double.
  // Formats with quantized activations requantize it instead (intermediate_spec).
  bool round_intermediate_to_bf16 = false;
  // [1] fp32 host: the static activation scale of a format with the "static" option (required
  // there, refused elsewhere).
  TensorView static_act_scale = {};
};

// y: [M, H] fp32 output of the double accumulation (DType has no fp64 yet).
void reference_moe(const ReferenceArgs& args, const TensorView& y);

// How a format with quantized activations requantizes the intermediate a2 = act(gate) * up
// before GEMM2 -- what the oracle does and what the format's kernels must do: dynamically, like
// its activations (ActivationSpec::of, without a static scale): one scale per token row of a2
// for per-token formats, per 1 x group along I for per-block formats, and for per-tensor formats
// one scale over every row of a2 that one Experts::apply call computes (every (token, slot) pair
// of the dispatched batch; the oracle: every pair it sums). A per-tensor intermediate therefore
// depends on the batch: a token's result changes with the other rows of its call, and with how
// rows are split between ranks and chunks (the contract suite compares such formats with the
// oracle's share of each rank, one round per forward). Formats with float activations: scale
// kNone (a2 is not requantized).
ActivationSpec intermediate_spec(const QuantScheme& scheme);

// Plain-loop Experts (standard format, kNone) over any float or quantized weights: a second,
// independent Experts implementation for the contract suite, computing what reference_moe
// computes. Activation spec: ActivationSpec::of(format) where the format quantizes activations
// (static_act_scale, [1] fp32 host, is required by formats with the static option and copied),
// fp32 otherwise. apply() dequantizes a1 with the batch's typed scale and throws moekit::Error
// when the scale is not the kind the spec asks for.
std::shared_ptr<Experts> make_reference_experts(const ExpertWeights& weights,
                                                const Activation& act,
                                                const TensorView& static_act_scale = {});

}  // namespace moekit
