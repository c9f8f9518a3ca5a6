#include "moekit/quant/format.h"

#include <charconv>
#include <cmath>
#include <sstream>

#include "moekit/core/error.h"

namespace moekit {

namespace {
constexpr DType kNo = DType::kCount;
using L = WeightScaleLayout;
using S = ScaleKind;
// act_unit: bf16 keeps 8 significant bits (2^-8 relative half-spacing); e4m3 keeps 4 (2^-4);
// int8 rounds to a step of amax/127, half of which is 1/254 of the largest value of its scale.
constexpr double kBf16Unit = 1.0 / 256, kE4m3Unit = 1.0 / 16, kInt8Unit = 1.0 / 254;

// clang-format off
constexpr FormatTraits kFormatTraits[] = {
  // format             name          weight          weight_zp   layout       scale           ue8m0  block  group  global act             act_scale   agroup static act_unit
  {Format::kBF16,      "bf16",       DType::kBF16,   kNo,        L::kNone,    kNo,            false, 0,     false, false, DType::kBF16,   S::kNone,   0,     false, kBf16Unit},
  {Format::kFP16,      "fp16",       DType::kF16,    kNo,        L::kNone,    kNo,            false, 0,     false, false, DType::kF16,    S::kNone,   0,     false, 1.0 / 2048},
  {Format::kFP32,      "fp32",       DType::kF32,    kNo,        L::kNone,    kNo,            false, 0,     false, false, DType::kF32,    S::kNone,   0,     false, 1.0 / (1 << 24)},
  {Format::kFP8Tensor, "fp8-tensor", DType::kF8E4M3, kNo,        L::kTensor,  DType::kF32,    false, 0,     false, false, DType::kF8E4M3, S::kTensor, 0,     true,  kE4m3Unit},
  {Format::kFP8Token,  "fp8-token",  DType::kF8E4M3, kNo,        L::kChannel, DType::kF32,    false, 0,     false, false, DType::kF8E4M3, S::kToken,  0,     false, kE4m3Unit},
  {Format::kFP8Block,  "fp8-block",  DType::kF8E4M3, kNo,        L::kBlock,   DType::kF32,    true,  128,   false, false, DType::kF8E4M3, S::kBlock,  128,   false, kE4m3Unit},
  {Format::kInt8,      "int8",       DType::kI8,     kNo,        L::kChannel, DType::kF32,    false, 0,     false, false, DType::kI8,     S::kToken,  0,     false, kInt8Unit},
  {Format::kW4A16,     "w4a16",      DType::kI4,     DType::kU4, L::kGroup,   DType::kBF16,   false, 128,   true,  false, DType::kBF16,   S::kNone,   0,     false, kBf16Unit},
  {Format::kW8A16,     "w8a16",      DType::kI8,     DType::kU8, L::kGroup,   DType::kBF16,   false, 128,   true,  false, DType::kBF16,   S::kNone,   0,     false, kBf16Unit},
  {Format::kW4A8,      "w4a8",       DType::kI4,     kNo,        L::kGroup,   DType::kBF16,   false, 128,   false, true,  DType::kF8E4M3, S::kTensor, 0,     true,  kE4m3Unit},
  {Format::kMXFP4,     "mxfp4",      DType::kF4E2M1, kNo,        L::kGroup,   DType::kUE8M0,  false, 32,    false, false, DType::kBF16,   S::kNone,   0,     false, kBf16Unit},
  {Format::kNVFP4,     "nvfp4",      DType::kF4E2M1, kNo,        L::kGroup,   DType::kF8E4M3, false, 16,    false, true,  DType::kBF16,   S::kNone,   0,     false, kBf16Unit},
};
// clang-format on
static_assert(sizeof(kFormatTraits) / sizeof(kFormatTraits[0]) == size_t(Format::kCount));

std::string known_formats() {
  std::string s;
  for (const auto& t : kFormatTraits) (s += s.empty() ? "" : ", ") += t.name;
  return s;
}
}  // namespace

std::string_view name(ScaleKind k) {
  constexpr std::string_view kNames[] = {"none", "tensor", "token", "block"};
  return kNames[static_cast<int>(k)];
}

const FormatTraits& traits(Format f) {
  MOEKIT_CHECK(f < Format::kCount, "traits: format ", int(f), " out of range");
  return kFormatTraits[static_cast<int>(f)];
}
std::string_view name(Format f) { return traits(f).name; }

Format float_format(DType t) {
  for (const auto& r : kFormatTraits)
    if (r.scale_layout == L::kNone && r.weight == t) return r.format;
  MOEKIT_FAIL("float_format: ", name(t), " weights need a quantized format (QuantScheme)");
}

int64_t QuantScheme::group_size(int64_t k) const {
  switch (traits().scale_layout) {
    case L::kGroup: return group < 0 ? k : group == 0 ? traits().block : group;
    case L::kBlock: return traits().block;
    default: return k;
  }
}

double QuantScheme::bytes_per_weight(int64_t rows, int64_t k) const {
  const double elements = double(rows) * double(k);
  const double data = double(storage_bytes(weight_dtype(), rows * k));
  const int64_t per_row = (k + group_size(k) - 1) / group_size(k);
  double scales = 0;
  switch (traits().scale_layout) {
    case L::kNone: break;
    case L::kTensor: scales = 1; break;
    case L::kChannel: scales = double(rows); break;
    case L::kBlock: scales = double((rows + traits().block - 1) / traits().block) * double(per_row); break;
    case L::kGroup: scales = double(rows) * double(per_row); break;
  }
  const double scale_bytes = scales * double(storage_bytes(scale_dtype(), 1));
  const double zero_bytes = zero_point ? double(rows) * double(per_row) : 0.0;
  return (data + scale_bytes + zero_bytes) / elements;
}

std::optional<std::string> QuantScheme::validate() const {
  const FormatTraits& t = traits();
  const std::string f(t.name);
  if (group != 0 && !t.group_option)
    return "format " + f + " has a fixed " +
           (t.block ? "group of " + std::to_string(t.block) : std::string("scale layout")) +
           " (no group option)";
  if (group != 0 && group != -1 && group != 32 && group != 64 && group != 128)
    return "group " + std::to_string(group) + " of format " + f + " must be 32, 64, 128 or per channel";
  if (zero_point && t.weight_zp == kNo) return "format " + f + " has no zero point option";
  if (ue8m0_scales && !t.ue8m0_option)
    return "format " + f + " has no ue8m0 scale option";
  if (static_act && !t.static_act_option)
    return "format " + f + " has no static activation scale option";
  return std::nullopt;
}

std::string QuantScheme::str() const {
  std::string s(traits().name);
  if (group == -1) s += ":ch";
  if (group > 0) s += ":g" + std::to_string(group);
  if (zero_point) s += ":zp";
  if (ue8m0_scales) s += ":ue8m0";
  if (static_act) s += ":static";
  return s;
}

QuantScheme QuantScheme::parse(std::string_view text) {
  QuantScheme q;
  const size_t colon = text.find(':');
  const std::string_view head = text.substr(0, colon);
  bool found = false;
  for (const auto& t : kFormatTraits)
    if (t.name == head) q.format = t.format, found = true;
  MOEKIT_CHECK(found, "unknown format '", head, "' (known: ", known_formats(), ")");
  std::string_view rest = colon == std::string_view::npos ? "" : text.substr(colon + 1);
  while (!rest.empty()) {
    const size_t next = rest.find(':');
    const std::string_view opt = rest.substr(0, next);
    rest = next == std::string_view::npos ? "" : rest.substr(next + 1);
    if (opt == "zp") q.zero_point = true;
    else if (opt == "ue8m0") q.ue8m0_scales = true;
    else if (opt == "static") q.static_act = true;
    else if (opt == "ch") q.group = -1;
    else if (opt.size() > 1 && opt[0] == 'g') {
      int64_t g = 0;
      auto [p, ec] = std::from_chars(opt.data() + 1, opt.data() + opt.size(), g);
      MOEKIT_CHECK(ec == std::errc() && p == opt.data() + opt.size() && g > 0, "format '", text,
                   "': bad group option '", opt, "'");
      q.group = g;
    } else {
      MOEKIT_FAIL("format '", text, "': unknown option '", opt,
                  "' (options: g32, g64, g128, ch, zp, ue8m0, static)");
    }
  }
  if (auto why = q.validate()) MOEKIT_FAIL("format '", text, "': ", *why);
  return q;
}

}  // namespace moekit
