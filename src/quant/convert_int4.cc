// GPTQ and AWQ (4-bit integer codes with group scales and zero points) into w4a16.
//
// Layout facts relied on (public sources, facts only):
// - GPTQ (AutoGPTQ QuantLinear, GPTQModel): qweight int32 [K/8, N] packs 8 codes of consecutive
//   inputs, input 8r + j in bits 4j..4j+3 of row r; qzeros int32 [ceil(K/g), N/8] packs along N
//   the same way; scales [ceil(K/g), N]; g_idx [K] the group of each input; w = (q - zero) * scale.
//   The v1 format ("gptq") serialized zero - 1 and its dequantizers add 1 to each unpacked nibble
//   (AutoGPTQ's unpack of qzeros; GPTQModel's convert_gptq_v1_to_v2_format_module, whose comment
//   says "v1 checkpoint format used to do `qzeros = qzeros -= 1` before serialization");
//   "gptq_v2" stores the zero itself. Symmetric v1 checkpoints hold 7 in every nibble.
//   With desc_act, GPTQ quantizes inputs in a permuted order and sets g_idx[perm[i]] = i / g, so
//   after a stable sort by g_idx every group is contiguous and g long (the last one ragged).
// - AWQ (AutoAWQ GEMM): qweight int32 [K, N/8] packs 8 codes of consecutive OUTPUTS with the
//   order map [0, 2, 4, 6, 1, 3, 5, 7] (nibble i holds column 8c + order[i]; unpackers use the
//   reverse order [0, 4, 1, 5, 2, 6, 3, 7]), qzeros [K/g, N/8] packed the same way, scales
//   [K/g, N]; w = (q - zero) * scale with the zero as stored.
#include <algorithm>
#include <array>
#include <cstring>
#include <functional>
#include <numeric>
#include <optional>

#include "convert_common.h"
#include "moekit/core/error.h"
#include "moekit/quant/encodings.h"

namespace moekit {

using namespace convert_detail;

namespace {

// One checkpoint linear W [n, k] (out x in) of a 4-bit integer format, validated and with its
// zero points and groups decoded; the codes are decoded on demand (one linear at a time).
struct Int4Linear {
  int64_t n = 0, k = 0, groups = 0;
  std::vector<uint8_t> zero;   // [groups, n], as the checkpoint's dequantizer subtracts it
  std::vector<int32_t> group;  // [k], the checkpoint group of input k
  TensorView scales;           // [groups, n] float
  TensorView bias;             // [n] float or absent
  std::function<void(uint8_t*)> decode_codes;  // writes the codes [n, k], 0..15
};
using Int4Expert = std::array<Int4Linear, 3>;  // gate, up, down

// Nibble `index` (0..7, bits 4*index..) of a packed int32.
inline uint8_t nibble(int32_t word, int index) {
  return uint8_t((uint32_t(word) >> (4 * index)) & 0xFu);
}

int64_t checkpoint_groups(int64_t k, int64_t group_size) {
  return group_size < 0 ? 1 : ceil_div(k, group_size);
}
std::vector<int32_t> contiguous_groups(int64_t k, int64_t group_size) {
  std::vector<int32_t> g(k);
  for (int64_t i = 0; i < k; ++i) g[i] = group_size < 0 ? 0 : int32_t(i / group_size);
  return g;
}

// The w4a16 group (an option of the format) whose groups each lie inside one checkpoint group:
// the checkpoint's own when allowed, else the largest allowed one dividing it.
int64_t output_group(int64_t group_size, const char* convention) {
  MOEKIT_CHECK(group_size == -1 || group_size > 0, convention, ": group_size ", group_size,
               " must be positive or -1 (per channel)");
  if (group_size < 0) return -1;
  for (int64_t g : {128, 64, 32})
    if (group_size % g == 0) return g;
  MOEKIT_FAIL(convention, ": group_size ", group_size,
              " has no exact w4a16 form (w4a16 groups are 32, 64 or 128 long; the checkpoint's "
              "must be a multiple of 32, or -1)");
}

// For every output group of `group_out` inputs (column j of the output reads input cols[j],
// identity when cols is empty), the one checkpoint group all its inputs belong to; nullopt when
// an output group mixes checkpoint groups.
std::optional<std::vector<int32_t>> map_groups(const Int4Linear& l, std::span<const int64_t> cols,
                                               int64_t group_out) {
  const int64_t g = group_out < 0 ? l.k : group_out;
  std::vector<int32_t> map(ceil_div(l.k, g));
  for (int64_t j = 0; j < l.k; ++j) {
    const int32_t c = l.group[cols.empty() ? j : cols[j]];
    if (j % g == 0)
      map[j / g] = c;
    else if (map[j / g] != c)
      return std::nullopt;
  }
  return map;
}

// The order of the intermediate dimension that makes down_proj's groups contiguous: inputs
// sorted by group, stably (the identity for a checkpoint without act-order).
std::vector<int64_t> sorted_by_group(const Int4Linear& down) {
  std::vector<int64_t> order(down.k);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return down.group[a] < down.group[b]; });
  return order;
}

// Output rows [row0, row0 + rows) of expert e of `out` from linear l: output row row0 + r reads
// the linear's row rows[r] (identity when empty, then all n rows) and output column j its input
// cols[j]; group j of the row takes the scale and zero of checkpoint group group_map[j].
// Without a zero point in `out`, codes are stored signed (q - 8; every zero is 8).
void write_rows(const QuantizedWeight& out, int64_t e, int64_t row0, const Int4Linear& l,
                std::span<const int64_t> rows, std::span<const int64_t> cols,
                const std::vector<int32_t>& group_map) {
  const int64_t R = out.data.size(1), K = out.data.size(2), G = out.scale.size(2);
  const int64_t esz = element_bytes(out.scale.dtype());
  const bool zp = out.zero.numel() > 0;
  const uint8_t flip = zp ? 0 : 8;  // (q - 8) as a two's complement nibble is q ^ 8
  std::vector<uint8_t> codes(size_t(l.n * l.k));
  l.decode_codes(codes.data());
  const int64_t count = rows.empty() ? l.n : int64_t(rows.size());
  for (int64_t r = 0; r < count; ++r) {
    const int64_t src = rows.empty() ? r : rows[r], dst = e * R + row0 + r;
    const uint8_t* in = codes.data() + src * l.k;
    uint8_t* packed = out.data.data<uint8_t>() + dst * (K / 2);
    for (int64_t j = 0; j < K; j += 2) {
      const int lo = in[cols.empty() ? j : cols[j]] ^ flip;
      const int hi = in[cols.empty() ? j + 1 : cols[j + 1]] ^ flip;
      packed[j / 2] = pack_int4(lo, hi);
    }
    for (int64_t j = 0; j < G; ++j) {
      const int64_t c = group_map[j];
      std::memcpy(out.scale.data<char>() + (dst * G + j) * esz,
                  static_cast<const char*>(l.scales.data) + (c * l.n + src) * esz, esz);
      if (zp) out.zero.data<uint8_t>()[dst * G + j] = l.zero[c * l.n + src];
    }
  }
}

// A layer of 4-bit integer experts (validated, same H and I) into w4a16. `allow_signed`: drop the
// zero point when every zero is 8.
ConvertedExperts assemble_w4a16(const std::vector<Int4Expert>& experts, int64_t group_size,
                                bool allow_signed, const char* convention) {
  const int64_t E = int64_t(experts.size());
  const int64_t I = experts[0][0].n, H = experts[0][0].k;
  MOEKIT_CHECK(H > 0 && I > 0 && H % 2 == 0 && I % 2 == 0, convention, ": H = ", H, " and I = ", I,
               " must be positive and even (4-bit rows start on whole bytes)");
  const int64_t group_out = output_group(group_size, convention);
  const DType scale_dtype = experts[0][0].scales.dtype;

  // The checks that need every expert decoded, before the outputs are allocated.
  std::vector<std::vector<int64_t>> orders(E);
  std::vector<std::array<std::vector<int32_t>, 3>> maps(E);
  bool all_eight = allow_signed;
  for (int64_t e = 0; e < E; ++e) {
    orders[e] = sorted_by_group(experts[e][2]);
    for (int p = 0; p < 3; ++p) {
      const Int4Linear& l = experts[e][p];
      check_same_dtype(l.scales, scale_dtype, tensor_name(convention, e, kProj[p], "scales"));
      auto map = map_groups(
          l, p == 2 ? std::span<const int64_t>(orders[e]) : std::span<const int64_t>{}, group_out);
      if (!map && p < 2)
        MOEKIT_FAIL(tensor_name(convention, e, kProj[p], "g_idx"),
                    ": groups are not contiguous along H (act-order / desc_act): w13's groups "
                    "run along H, the input's dimension, which cannot be permuted; only "
                    "down_proj's act-order can be absorbed (by reordering I)");
      if (!map)
        MOEKIT_FAIL(tensor_name(convention, e, kProj[p], "g_idx"),
                    ": sorted by group, the groups are not ", group_size,
                    " inputs long each (the last may be shorter), so w4a16 groups of ", group_out,
                    " cannot follow them");
      maps[e][p] = std::move(*map);
      for (uint8_t z : l.zero) all_eight = all_eight && z == 8;
    }
  }
  std::vector<std::vector<TensorView>> b13(E), b2(E);
  std::vector<std::string> b13_names, b2_names;
  for (int64_t e = 0; e < E; ++e) {
    b13[e] = {experts[e][0].bias, experts[e][1].bias};
    b2[e] = {experts[e][2].bias};
    for (int p = 0; p < 2; ++p) b13_names.push_back(tensor_name(convention, e, kProj[p], "bias"));
    b2_names.push_back(tensor_name(convention, e, kProj[2], "bias"));
  }
  const std::vector<std::vector<int64_t>> no_orders(E);

  ConvertedExperts out;
  out.b13 = stack_biases(b13, orders, std::array<int64_t, 2>{I, I}, b13_names);
  out.b2 = stack_biases(b2, no_orders, std::array<int64_t, 1>{H}, b2_names);
  QuantScheme scheme{Format::kW4A16};
  scheme.group = group_out;
  scheme.zero_point = !all_eight;
  auto make = [&](int64_t rows, int64_t k) {
    QuantizedWeight w;
    w.scheme = scheme;
    const int64_t groups = ceil_div(k, scheme.group_size(k));
    w.data = Tensor(scheme.weight_dtype(), {E, rows, k});
    w.scale = Tensor(scale_dtype, {E, rows, groups});
    if (scheme.zero_point) w.zero = Tensor(DType::kU8, {E, rows, groups});
    return w;
  };
  out.w13 = make(2 * I, H);
  out.w2 = make(H, I);
  for (int64_t e = 0; e < E; ++e) {
    write_rows(out.w13, e, 0, experts[e][0], orders[e], {}, maps[e][0]);
    write_rows(out.w13, e, I, experts[e][1], orders[e], {}, maps[e][1]);
    write_rows(out.w2, e, 0, experts[e][2], {}, orders[e], maps[e][2]);
  }
  return out;
}

// The zero points [groups, n] of a qzeros tensor [groups, ceil(n/8)] packed along n, nibble of
// column i at position nibble_of[i % 8], plus `offset`.
std::vector<uint8_t> unpack_zeros(const TensorView& qzeros, int64_t groups, int64_t n,
                                  const std::array<int, 8>& nibble_of, int offset) {
  std::vector<uint8_t> zero(size_t(groups * n));
  const auto* q = qzeros.ptr<const int32_t>();
  const int64_t words = ceil_div(n, 8);
  for (int64_t c = 0; c < groups; ++c)
    for (int64_t i = 0; i < n; ++i)
      zero[c * n + i] = uint8_t(nibble(q[c * words + i / 8], nibble_of[i % 8]) + offset);
  return zero;
}

constexpr std::array<int, 8> kInOrder = {0, 1, 2, 3, 4, 5, 6, 7};

// ---- GPTQ --------------------------------------------------------------------------------------

Int4Linear gptq_linear(const GptqLinear& src, int64_t e, int p, int64_t n, int64_t k,
                       const GptqOptions& o) {
  auto what = [&](const char* t) { return tensor_name("gptq", e, kProj[p], t); };
  MOEKIT_CHECK(k % 8 == 0, what("qweight"), ": K = ", k,
               " must be a multiple of 8 (8 codes per int32 along K)");
  Int4Linear l;
  l.n = n, l.k = k, l.groups = checkpoint_groups(k, o.group_size);
  check_input(src.qweight, what("qweight"), {k / 8, n}, {DType::kI32});
  check_input(src.qzeros, what("qzeros"), {l.groups, ceil_div(n, 8)}, {DType::kI32});
  check_input(src.scales, what("scales"), {l.groups, n}, kFloatTypes);
  l.scales = src.scales;
  l.bias = src.bias;
  if (src.g_idx.present()) {
    check_input(src.g_idx, what("g_idx"), {k}, {DType::kI32});
    const auto* g = src.g_idx.ptr<const int32_t>();
    l.group.assign(g, g + k);
    for (int64_t i = 0; i < k; ++i)
      MOEKIT_CHECK(0 <= g[i] && g[i] < l.groups, what("g_idx"), "[", i, "] = ", g[i],
                   " is not a group (0..", l.groups - 1, ")");
  } else {
    l.group = contiguous_groups(k, o.group_size);
  }
  l.zero = unpack_zeros(src.qzeros, l.groups, n, kInOrder, o.zeros_minus_one ? 1 : 0);
  const auto* qw = src.qweight.ptr<const int32_t>();
  l.decode_codes = [qw, n, k](uint8_t* codes) {
    for (int64_t r = 0; r < k; ++r)
      for (int64_t i = 0; i < n; ++i) codes[i * k + r] = nibble(qw[(r / 8) * n + i], int(r % 8));
  };
  return l;
}

// ---- AWQ ---------------------------------------------------------------------------------------

// Nibble i of a word holds column kAwqOrder[i]; column j sits in nibble kAwqNibbleOf[j].
constexpr std::array<int, 8> kAwqOrder = {0, 2, 4, 6, 1, 3, 5, 7};
constexpr std::array<int, 8> kAwqNibbleOf = [] {
  std::array<int, 8> inv{};
  for (int i = 0; i < 8; ++i) inv[kAwqOrder[i]] = i;
  return inv;
}();

Int4Linear awq_linear(const AwqLinear& src, int64_t e, int p, int64_t n, int64_t k,
                      int64_t group_size) {
  auto what = [&](const char* t) { return tensor_name("awq", e, kProj[p], t); };
  Int4Linear l;
  l.n = n, l.k = k, l.groups = checkpoint_groups(k, group_size);
  const int64_t words = ceil_div(n, 8);
  check_input(src.qweight, what("qweight"), {k, words}, {DType::kI32});
  check_input(src.qzeros, what("qzeros"), {l.groups, words}, {DType::kI32});
  check_input(src.scales, what("scales"), {l.groups, n}, kFloatTypes);
  l.scales = src.scales;
  l.bias = src.bias;
  l.group = contiguous_groups(k, group_size);
  l.zero = unpack_zeros(src.qzeros, l.groups, n, kAwqNibbleOf, 0);
  const auto* qw = src.qweight.ptr<const int32_t>();
  l.decode_codes = [qw, n, k, words](uint8_t* codes) {
    for (int64_t r = 0; r < k; ++r)
      for (int64_t i = 0; i < n; ++i)
        codes[i * k + r] = nibble(qw[r * words + i / 8], kAwqNibbleOf[i % 8]);
  };
  return l;
}

// The experts of a layer with one decoder per linear: gate/up [I, H], down [H, I], where H and I
// come from expert 0's gate_proj (its output count and input count).
template <typename Expert, typename Decode>
std::vector<Int4Expert> decode_experts(std::span<const Expert> experts, int64_t I, int64_t H,
                                       Decode decode) {
  std::vector<Int4Expert> out;
  out.reserve(experts.size());
  for (size_t e = 0; e < experts.size(); ++e)
    out.push_back({decode(experts[e].gate, int64_t(e), 0, I, H),
                   decode(experts[e].up, int64_t(e), 1, I, H),
                   decode(experts[e].down, int64_t(e), 2, H, I)});
  return out;
}

}  // namespace

ConvertedExperts convert_gptq(std::span<const GptqExpert> experts, const GptqOptions& options) {
  check_expert_count(experts.size(), "gptq");
  output_group(options.group_size, "gptq");
  // qweight [H/8, I] of expert 0's gate_proj gives H and I.
  const auto q = extents(experts[0].gate.qweight, 2, tensor_name("gptq", 0, kProj[0], "qweight"));
  const int64_t H = q[0] * 8, I = q[1];
  auto decoded = decode_experts(experts, I, H,
                                [&](const GptqLinear& l, int64_t e, int p, int64_t n, int64_t k) {
                                  return gptq_linear(l, e, p, n, k, options);
                                });
  return assemble_w4a16(decoded, options.group_size, true, "gptq");
}

ConvertedExperts convert_awq(std::span<const AwqExpert> experts, int64_t group_size) {
  check_expert_count(experts.size(), "awq");
  output_group(group_size, "awq");
  // qweight [H, I/8] and scales [G, I] of expert 0's gate_proj give H and I.
  const int64_t H =
      extents(experts[0].gate.qweight, 2, tensor_name("awq", 0, kProj[0], "qweight"))[0];
  const int64_t I =
      extents(experts[0].gate.scales, 2, tensor_name("awq", 0, kProj[0], "scales"))[1];
  auto decoded = decode_experts(experts, I, H,
                                [&](const AwqLinear& l, int64_t e, int p, int64_t n, int64_t k) {
                                  return awq_linear(l, e, p, n, k, group_size);
                                });
  return assemble_w4a16(decoded, group_size, false, "awq");
}

}  // namespace moekit
