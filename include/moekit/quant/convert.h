// Checkpoint importers: the expert tensors of quantized MoE checkpoints, as their producers store
// them, into moekit's quantized expert weights (quant/format.h, ExpertWeights in modular.h).
//
// Exact: every element of the result, read with format.h's formula w = (q - zero) * scale *
// global, is the value the checkpoint's own dequantizer gives; nothing is requantized (the one
// exception is an opt-in, see NvFp4Options). What a format cannot hold exactly is refused with a
// moekit::Error that names the expert, projection and tensor and says why.
//
// Inputs are host tensors, contiguous, in the checkpoint's dtypes (packed codes as the integer
// dtype they are stored in); outputs are owning host tensors. Each converter validates its
// inputs (shapes, dtypes, contiguity, host memory, agreement across experts) before converting.
// Projections are named as in the checkpoints: gate_proj and up_proj [I, H] (out x in) become
// w13 rows [0, I) (gate) and [I, 2I) (up), i.e. GateUpLayout kSplit, unless
// ConvertedExperts::layout says otherwise; down_proj [H, I] becomes w2. Checkpoints that store
// experts one by one are passed as a span of E per-expert structs, expert e first.
#pragma once

#include <cstdint>
#include <span>

#include "moekit/activation.h"
#include "moekit/core/tensor.h"
#include "moekit/modular.h"
#include "moekit/quant/quantize.h"

namespace moekit {

// A converted layer: w13 [E, 2I, H] and w2 [E, H, I] with their scales; biases (float, the
// checkpoint's dtype) empty where the checkpoint has none.
struct ConvertedExperts {
  QuantizedWeight w13, w2;  // w13.scheme == w2.scheme
  Tensor b13, b2;
  GateUpLayout layout = GateUpLayout::kSplit;  // the row order of w13: give the Activation this
  ExpertWeights view() const;                  // quant set, no source table
};

// ---- GPTQ (AutoGPTQ / GPTQModel, 4 bits) -> w4a16 ----------------------------------------------
// One linear y = W x, W [N, K]:
struct GptqLinear {
  TensorView qweight;  // int32 [K/8, N]: 8 codes per int32 along K, code k at bits 4*(k%8)
  TensorView qzeros;   // int32 [G, ceil(N/8)]: zero points packed along N the same way
  TensorView scales;   // float (fp16 in checkpoints) [G, N]
  TensorView g_idx;    // int32 [K], the group of each input; absent: k / group_size
  TensorView bias;     // float [N]; absent: none
};
struct GptqExpert {
  GptqLinear gate, up, down;
};
struct GptqOptions {
  int64_t group_size = 128;  // quantize_config "group_size"; -1: one group per row
  // checkpoint_format "gptq" (v1) stores zero - 1 in qzeros (a symmetric checkpoint holds 7; a
  // stored 15 reads as zero 16, as v1's dequantizers add 1 per nibble); "gptq_v2" stores the
  // zero itself (8 when symmetric): pass false.
  bool zeros_minus_one = true;
};
// w4a16 with a zero point (uint4 codes, uint8 zeros), or signed int4 (q - 8, so [-8, 7]) without
// one when every zero point is 8. Scales keep the checkpoint's dtype. The group is the checkpoint's
// when it is 32, 64 or 128, else the largest of those dividing it (its scales repeated); -1 stays
// per channel. Act-order (desc_act: g_idx is not k / group_size):
//   down_proj: absorbed exactly by sorting the intermediate dimension by group, the same order
//     for w13's gate and up rows, b13 and w2's columns (each expert its own order);
//   gate_proj / up_proj: cannot be represented (groups must be contiguous along K = H, and H is
//     the input's dimension): throws.
ConvertedExperts convert_gptq(std::span<const GptqExpert> experts, const GptqOptions& options = {});

// ---- AWQ (AutoAWQ GEMM, 4 bits) -> w4a16 with a zero point -------------------------------------
struct AwqLinear {
  TensorView qweight;  // int32 [K, ceil(N/8)]: 8 codes per int32 along N, interleaved: nibble i
                       //   (bits 4i..4i+3) of word c holds column 8c + [0,2,4,6,1,3,5,7][i]
  TensorView qzeros;   // int32 [G, ceil(N/8)], packed like qweight
  TensorView scales;   // float (fp16 in checkpoints) [G, N]
  TensorView bias;     // float [N]; absent: none
};
struct AwqExpert {
  AwqLinear gate, up, down;
};
ConvertedExperts convert_awq(std::span<const AwqExpert> experts, int64_t group_size = 128);

// ---- DeepSeek-V3 style fp8 with 128x128 block scales -> fp8-block ------------------------------
struct Fp8BlockLinear {
  TensorView weight;            // fp8 e4m3 [N, K]
  TensorView weight_scale_inv;  // float [ceil(N/128), ceil(K/128)]; value = q * scale_inv
};
struct Fp8BlockExpert {
  Fp8BlockLinear gate, up, down;
};
// Scales become fp32 (exact). I must be a multiple of 128 so that w13's blocks do not straddle
// gate and up rows; H and I are otherwise free (ragged last blocks).
ConvertedExperts convert_fp8_block(std::span<const Fp8BlockExpert> experts);

// ---- gpt-oss mxfp4 (Hugging Face layout, experts stacked) -> mxfp4 -----------------------------
struct GptOssMxfp4Layer {
  TensorView gate_up_blocks;  // uint8 [E, 2I, H/32, 16]: e2m1 codes, low nibble first
  TensorView gate_up_scales;  // uint8 (or ue8m0) [E, 2I, H/32]: 2^(s - 127)
  TensorView gate_up_bias;    // float [E, 2I]; absent: none
  TensorView down_blocks;     // uint8 [E, H, I/32, 16]
  TensorView down_scales;     // uint8 (or ue8m0) [E, H, I/32]
  TensorView down_bias;       // float [E, H]; absent: none
};
// gpt-oss interleaves gate and up by row (row 2j gate j, row 2j+1 up j). The rows are kept as
// they are: the result's layout is GateUpLayout::kInterleaved (with swiglu_oai).
ConvertedExperts convert_gpt_oss_mxfp4(const GptOssMxfp4Layer& layer);

// ---- NVIDIA ModelOpt nvfp4 -> nvfp4 ------------------------------------------------------------
struct NvFp4Linear {
  TensorView weight;          // uint8 [N, K/2]: e2m1 codes, low nibble first
  TensorView weight_scale;    // fp8 e4m3 [N, ceil(K/16)]
  TensorView weight_scale_2;  // fp32 scalar ([] or [1]): the global scale
  // input_scale (the activation scale of fp4 activations) is not needed: moekit's nvfp4 keeps
  // activations in bf16 (weight-only).
};
struct NvFp4Expert {
  NvFp4Linear gate, up, down;
};
struct NvFp4Options {
  // w13 has one global scale per expert. When gate_proj's and up_proj's weight_scale_2 differ,
  // false throws; true moves both onto the larger one, re-rounding the smaller projection's
  // block scales to e4m3 (not exact: up to 2^-4 relative per block, more where they underflow).
  bool requantize_gate_up_global = false;
};
ConvertedExperts convert_modelopt_nvfp4(std::span<const NvFp4Expert> experts,
                                        const NvFp4Options& options = {});

}  // namespace moekit
