// Quantization formats (DESIGN.md section 4): one traits row per format, and QuantScheme, a
// format with its options (group size, zero point, ue8m0 scales, static activation scale).
// Nothing outside kFormatTraits switches on the format to learn element types or scale layouts.
//
// A quantized weight [n, R, K] (n experts, R output rows, K the reduction: w13 [n, rows, H],
// w2 [n, H, I]) is stored as
//   data   [n, R, K]   element traits.weight (traits.weight_zp with a zero point), packed 4-bit
//                      types two per byte along K (element 2i in the low nibble);
//   scale  by traits.scale_layout, element scheme.scale_dtype():
//            kTensor  [n]                           kChannel [n, R]
//            kBlock   [n, ceil(R/B), ceil(K/B)]     kGroup   [n, R, ceil(K/g)]   (B, g: block)
//   zero   [n, R, ceil(K/g)] uint8, with a zero point only;
//   global [n] fp32, formats with a global scale only;
// and its value is  w = (q - zero) * scale * global  (zero 0 and global 1 where absent).
// Activations of a format are `act` with a scale of kind `act_scale` (modular.h ActivationSpec).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "moekit/core/dtype.h"

namespace moekit {

enum class Format : uint8_t {
  kBF16,
  kFP16,
  kFP32,
  kFP8Tensor,
  kFP8Token,
  kFP8Block,
  kInt8,
  kW4A16,
  kW8A16,
  kW4A8,
  kMXFP4,
  kNVFP4,
  kCount,  // keep last
};

enum class WeightScaleLayout : uint8_t { kNone, kTensor, kChannel, kBlock, kGroup };

// Activation scale kinds (contract 4). kTensor: [1] fp32; kToken: [M'] fp32; kBlock:
// [M', ceil(H / group)] fp32 (or ue8m0).
enum class ScaleKind : uint8_t { kNone, kTensor, kToken, kBlock };
std::string_view name(ScaleKind k);

struct FormatTraits {
  Format format;
  std::string_view name;  // --format and JSON "format"
  DType weight;           // stored element without a zero point (signed, symmetric)
  DType weight_zp;        // stored element with a zero point; kCount: the format has none
  WeightScaleLayout scale_layout;
  DType scale;            // scale element; a float one (fp32/bf16) also accepts any float dtype
  bool ue8m0_option;      // the "ue8m0" option stores power-of-two scales instead
  int64_t block;          // kBlock: block edge; kGroup: default group
  bool group_option;      // the group size is an option (32, 64, 128, or 0 = per channel)
  bool global_scale;      // an fp32 scale per expert weight tensor multiplies every element
  DType act;              // a1/a2 element; bf16 for weight-only formats (activations as they are)
  ScaleKind act_scale;
  int64_t act_group;      // kBlock activation scales: elements per group
  bool static_act_option; // a calibrated per-tensor activation scale may replace the dynamic one
  // Half the spacing of activation codes relative to the value (or, for int8, to the largest
  // value under one scale): one rounding of a1 or of the intermediate a2 moves an element by at
  // most this. The contract suite's error bound per format (check::error_bound) is built on it.
  double act_unit;
};

const FormatTraits& traits(Format f);
std::string_view name(Format f);
// The float format of bf16/fp16/fp32 weights; throws for other dtypes.
Format float_format(DType t);

// A format and its options. Parsed from "name[:option...]" with options "g32"/"g64"/"g128"/"ch"
// (group size or per channel), "zp" (zero point), "ue8m0" (power-of-two scales), "static"
// (static per-tensor activation scale): "w4a16:g64:zp", "fp8-block:ue8m0". str() prints the
// same form with the defaults left out.
struct QuantScheme {
  Format format = Format::kBF16;
  int64_t group = 0;         // kGroup formats: 0 = the format's default; -1 = per channel
  bool zero_point = false;
  bool ue8m0_scales = false;
  bool static_act = false;

  const FormatTraits& traits() const { return moekit::traits(format); }
  bool is_float() const { return traits().scale_layout == WeightScaleLayout::kNone; }
  DType weight_dtype() const { return zero_point ? traits().weight_zp : traits().weight; }
  DType scale_dtype() const { return ue8m0_scales ? DType::kUE8M0 : traits().scale; }
  // Elements of K sharing one scale: the group (kGroup), the block edge (kBlock), K otherwise.
  int64_t group_size(int64_t k) const;
  // Bytes per weight element including scales and zero points, for rooflines ([R, K] of one
  // expert weight; the global scale is negligible).
  double bytes_per_weight(int64_t rows, int64_t k) const;
  // nullopt when the options suit the format, else the reason.
  std::optional<std::string> validate() const;
  std::string str() const;
  static QuantScheme parse(std::string_view s);  // throws moekit::Error naming what is wrong
  bool operator==(const QuantScheme&) const = default;
};

}  // namespace moekit
