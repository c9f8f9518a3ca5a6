#include "layer_spec.h"

#include <charconv>
#include <sstream>

#include "moekit/core/error.h"
#include "moekit/presets.h"
#include "option_checks.h"

namespace moekit::cli {
namespace {

LayerSpec spec_of_preset(const Preset& p) {
  LayerSpec s;
  s.preset = std::string(p.name);
  s.num_experts = p.num_experts;
  s.hidden = p.hidden;
  s.intermediate = p.intermediate;
  s.top_k = p.top_k;
  s.router = p.router;
  s.activation = p.activation;
  s.has_bias = p.has_bias;
  s.num_shared_experts = p.num_shared_experts;
  return s;
}

// An explicit shape alone: the common case of the presets (softmax top-k, renormalized, SiLU).
LayerSpec custom_spec(const ShapeOptions& o) {
  if (o.experts == 0 || o.hidden == 0 || o.intermediate == 0 || o.top_k == 0)
    throw CLI::ValidationError("--preset", "give --preset NAME, or all of -E -H -I -k");
  LayerSpec s;
  s.preset = "custom";
  s.router.method = RoutingMethod::kSoftmaxTopK;
  s.router.renormalize = true;
  return s;
}

void apply_overrides(const ShapeOptions& o, LayerSpec& s) {
  s.shape_overridden = s.preset != "custom" && (o.experts || o.hidden || o.intermediate || o.top_k);
  if (o.experts) s.num_experts = o.experts;
  if (o.hidden) s.hidden = o.hidden;
  if (o.intermediate) s.intermediate = o.intermediate;
  if (o.top_k) s.top_k = o.top_k;
  if (!o.routing.empty())
    s.router.method = parse_option("--routing", [&] { return parse_routing_method(o.routing); });
  if (!o.activation.empty())
    s.activation = parse_option("--activation", [&] { return parse_activation(o.activation); });
  s.router.num_experts = s.num_experts;
  s.router.top_k = s.top_k;
  if (auto reason = s.router.validate())
    throw CLI::ValidationError("-E/-k/--routing", s.preset + ": " + *reason);
}

}  // namespace

void add_shape_options(CLI::App& cmd, ShapeOptions& o, bool preset_list) {
  std::string known;
  for (const Preset& p : presets()) known += (known.empty() ? "" : ", ") + std::string(p.name);
  auto* preset = cmd.add_option(
      "--preset", o.presets,
      "model preset (DESIGN.md §5): " + known + (preset_list ? "; a comma list runs several" : ""));
  if (preset_list)
    preset->delimiter(',');
  else
    preset->expected(1);
  cmd.add_option("-E,--experts", o.experts, "number of experts (overrides the preset)")
      ->check(positive());
  cmd.add_option("-H,--hidden", o.hidden, "hidden size")->check(positive());
  cmd.add_option("-I,--intermediate", o.intermediate, "expert intermediate size")
      ->check(positive());
  cmd.add_option("-k,--top-k", o.top_k, "experts per token")->check(positive());
  cmd.add_option("--routing", o.routing,
                 "softmax_topk, topk_softmax, sigmoid_grouped_topk or llama4_top1_sigmoid");
  cmd.add_option(
      "--activation", o.activation,
      "silu, gelu, gelu_tanh, relu2, swiglu_oai; suffix _nogate (non-gated) or _interleaved "
      "(gate/up rows alternate)");
}

std::vector<LayerSpec> resolve_layer_specs(const ShapeOptions& o) {
  std::vector<LayerSpec> specs;
  if (o.presets.empty()) specs.push_back(custom_spec(o));
  for (const std::string& name : o.presets)
    specs.push_back(spec_of_preset(
        parse_option("--preset", [&]() -> const Preset& { return find_preset(name); })));
  for (LayerSpec& s : specs) apply_overrides(o, s);
  return specs;
}

int64_t LayerSpec::expert_elements() const {
  const int64_t rows = activation.w13_rows(intermediate);
  return rows * hidden + hidden * intermediate + (has_bias ? rows + hidden : 0);
}

namespace {
// w13 [rows, H] and w2 [H, inter] of one expert in `f`.
int64_t gated_mlp_bytes(const QuantScheme& f, int64_t rows, int64_t hidden, int64_t inter) {
  return int64_t(f.bytes_per_weight(rows, hidden) * double(rows * hidden) +
                 f.bytes_per_weight(hidden, inter) * double(hidden * inter));
}
}  // namespace

DType io_dtype(const QuantScheme& format) {
  return format.is_float() ? format.weight_dtype() : DType::kBF16;
}

int64_t LayerSpec::expert_bytes(const QuantScheme& f) const {
  const int64_t rows = activation.w13_rows(intermediate);
  return gated_mlp_bytes(f, rows, hidden, intermediate) +
         (has_bias ? (rows + hidden) * element_bytes(io_dtype(f)) : 0);
}

int64_t LayerSpec::shared_bytes(const QuantScheme& f) const {
  if (num_shared_experts == 0) return 0;
  const int64_t is = shared_intermediate();
  return gated_mlp_bytes(f, activation.w13_rows(is), hidden, is);
}

int64_t LayerSpec::total_weight_bytes(const QuantScheme& f) const {
  return num_experts * expert_bytes(f) + shared_bytes(f);
}

double LayerSpec::flops(int64_t tokens, int64_t slots) const {
  // Per token and expert: GEMM1 [w13_rows x H] and GEMM2 [H x I], 2 FLOPs per multiply-add.
  auto expert_flops = [&](int64_t inter) {
    return 2.0 * double(activation.w13_rows(inter) * hidden + hidden * inter);
  };
  const double shared =
      num_shared_experts ? double(tokens) * expert_flops(shared_intermediate()) : 0;
  return double(slots) * expert_flops(intermediate) + shared;
}

std::string LayerSpec::str() const {
  std::ostringstream os;
  os << "E=" << num_experts << " H=" << hidden << " I=" << intermediate << " k=" << top_k << " "
     << router.str() << " " << activation.str();
  if (has_bias) os << " +bias";
  if (num_shared_experts) os << " +" << num_shared_experts << " shared";
  return os.str();
}

std::vector<int64_t> parse_token_list(const std::string& text, const std::string& option) {
  constexpr int64_t kMaxTokens = int64_t(1) << 24;
  std::vector<int64_t> tokens;
  std::istringstream is(text);
  std::string item;
  auto bad = [&](const std::string& why) {
    return CLI::ValidationError(option, "'" + text + "': " + why + " (expected e.g. 1,32,512)");
  };
  while (std::getline(is, item, ',')) {
    int64_t v = 0;
    auto [end, ec] = std::from_chars(item.data(), item.data() + item.size(), v);
    if (item.empty() || ec != std::errc() || end != item.data() + item.size())
      throw bad("'" + item + "' is not a whole number");
    if (v <= 0 || v > kMaxTokens)
      throw bad("token counts must be in [1, " + std::to_string(kMaxTokens) + "], got " + item);
    tokens.push_back(v);
  }
  if (tokens.empty() || text.back() == ',') throw bad("empty item");
  return tokens;
}

}  // namespace moekit::cli
