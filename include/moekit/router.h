// Routing: router logits [M, E] -> topk_ids [M, k] (int32, global expert ids) and
// topk_weights [M, k] (fp32).
//
// Selection rule shared by every method: experts are ranked by their selection score, larger
// first; equal scores go to the lower expert id; NaN ranks below every number (-inf included),
// so a row of NaN/inf logits still yields k distinct ids in [0, E).
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "moekit/core/exec.h"
#include "moekit/core/tensor.h"

namespace moekit {

enum class RoutingMethod {
  // softmax over all E logits, take top-k; weights are the softmax probabilities, divided by
  // their sum when `renormalize` (Mixtral, Qwen3-MoE).
  kSoftmaxTopK,
  // top-k over logits, then softmax over the k chosen logits (gpt-oss).
  kTopKSoftmax,
  // DeepSeek-V3 / Kimi-K2: s = sigmoid(logit); choice score c = s + correction_bias;
  // groups of E/n_group experts are scored by the sum of their top-2 c (the max c when a group
  // has one expert); the best `topk_group` groups are kept; top-k of c among kept experts;
  // weights are s of the chosen ids, divided by their sum when `renormalize`, then times
  // `routed_scaling_factor`.
  kSigmoidGroupedTopK,
  // Llama-4: top-1 by logit, weight sigmoid(logit); the layer applies it to the input (k = 1).
  kLlama4Top1Sigmoid,
};

struct RouterConfig {
  RoutingMethod method = RoutingMethod::kSoftmaxTopK;
  int num_experts = 0;  // E
  int top_k = 0;        // k
  bool renormalize = true;
  int n_group = 1;      // kSigmoidGroupedTopK
  int topk_group = 1;   // kSigmoidGroupedTopK
  float routed_scaling_factor = 1.0f;

  // nullopt when the config is valid, else the reason ("top_k 9 > num_experts 8").
  std::optional<std::string> validate() const;
  std::string str() const;
};

std::string_view name(RoutingMethod m);
RoutingMethod parse_routing_method(std::string_view s);  // "softmax_topk", "topk_softmax", ...

// logits: [M, E] fp32 or bf16 (rows may be strided, last dim contiguous).
// correction_bias: [E] fp32, required for kSigmoidGroupedTopK, absent (ndim 0) otherwise.
// topk_ids: [M, k] int32 out, topk_weights: [M, k] fp32 out; ids in each row are ordered by
// rank (best first). Throws moekit::Error on bad input before writing anything.
// All tensors on one device: host memory runs the CPU router; CUDA memory (a CUDA build) runs
// the CUDA router on ctx.stream without synchronizing (CUDA-graph capturable), choosing the same
// ids as the CPU bit for bit (weights agree to float rounding). The CUDA router takes E <= 1024
// and, for grouped top-k, n_group <= 32; it does not check the bias values (that would need a
// host synchronization): a NaN bias ranks its expert last.
void route(const RouterConfig& config, const TensorView& logits, const TensorView& correction_bias,
           const TensorView& topk_ids, const TensorView& topk_weights,
           const ExecContext& ctx = {});

// The sigmoid the routers use (choice scores and weights): the same bits on the CPU and on CUDA
// devices, within one float rounding of the true value.
float routing_sigmoid(float x);

}  // namespace moekit
