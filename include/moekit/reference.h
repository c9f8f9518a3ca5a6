// The oracle: plain loops, every element dequantized to double, fp64 accumulation. Slow on
// purpose and independent of the modular kernel; tests and `moekit check` compare against it.
#pragma once

#include <memory>

#include "moekit/modular.h"

namespace moekit {

struct ReferenceArgs {
  TensorView x;             // [M, H] any float dtype
  TensorView topk_ids;      // [M, k] int32 GLOBAL ids, -1 padding
  TensorView topk_weights;  // [M, k] fp32
  ExpertWeights weights;    // global: slot e of `weights` is global expert e
  Activation activation;
  bool weight_on_input = false;
  // When set, only the (token, slot) pairs that map->local_id(rank, e, token_key_offset + t)
  // serves are summed: one rank's share.
  const ExpertMap* map = nullptr;
  int rank = 0;
  int64_t token_key_offset = 0;
  // Round the intermediate activation to bf16 before GEMM2, as a kernel with a bf16
  // intermediate does (to tell rounding from real error in tests); false: keep it in double.
  bool round_intermediate_to_bf16 = false;
};

// y: [M, H] fp32 output of the double accumulation (DType has no fp64 yet).
void reference_moe(const ReferenceArgs& args, const TensorView& y);

// Plain-loop Experts (standard format, kNone) over any float weights: a second, independent
// Experts implementation for the contract suite. Activation spec fp32.
std::shared_ptr<Experts> make_reference_experts(const ExpertWeights& weights,
                                                const Activation& act);

}  // namespace moekit
