#include "bench_plan.h"

#include <algorithm>
#include <iomanip>
#include <iostream>
#include <sstream>

#include "bench_layer.h"
#include "machine.h"
#include "option_checks.h"

namespace moekit::cli {
int64_t BenchPlan::max_tokens() const {
  return *std::max_element(token_counts.begin(), token_counts.end());
}

BenchPlan resolve_bench_plan(const BenchOptions& o) {
  ShapeOptions shape = o.shape;
  const bool no_shape = shape.presets.empty() && !shape.experts && !shape.hidden &&
                        !shape.intermediate && !shape.top_k;
  if (no_shape) shape.presets = {kDefaultPreset};
  std::vector<QuantScheme> formats;
  for (const std::string& f : o.formats)
    formats.push_back(parse_option("--format", [&] { return QuantScheme::parse(f); }));
  if (formats.empty()) throw CLI::ValidationError("--format", "no format given");
  if (o.ep && formats.size() > 1)
    throw CLI::ValidationError("--format", "one format at a time with --ep");
  return {resolve_layer_specs(shape), parse_token_list(o.tokens, "--tokens"), std::move(formats),
          o.device == "cuda", resolve_isa(o.isa)};
}

std::string format_list(const std::vector<QuantScheme>& formats) {
  std::string s;
  for (const QuantScheme& f : formats) s += (s.empty() ? "" : ",") + f.str();
  return s;
}

std::string gigabytes(int64_t bytes) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(2) << bytes * 1e-9 << " GB";
  return os.str();
}

void check_memory(const LayerSpec& spec, const std::vector<QuantScheme>& formats,
                  int64_t max_tokens, int64_t flush_bytes, int ranks_on_host) {
  // The layers built before the last one hold their prepacked weights; the one being built holds
  // its generation peak.
  int64_t kept = 0, transient = 0;
  for (const QuantScheme& f : formats) {
    const int64_t peak = bench_peak_bytes(spec, f, max_tokens, ranks_on_host);
    kept += spec.total_weight_bytes(f);
    transient = std::max(transient, peak - spec.total_weight_bytes(f));
  }
  const int64_t need = kept + transient + ranks_on_host * flush_bytes;
  const int64_t have = available_memory_bytes();
  if (have == 0 || need <= have) return;
  const std::string ranks =
      ranks_on_host > 1 ? ", for the " + std::to_string(ranks_on_host) + " ranks on this host" : "";
  throw CLI::ValidationError(
      "--preset",
      spec.preset + " (" + spec.str() + ") in " + format_list(formats) + " needs about " +
          gigabytes(need) + " (its weights twice, as generated and " +
          "prepacked, activations and the cache-flush buffer" + ranks + "); " + gigabytes(have) +
          " are available. Pick a smaller preset, fewer tokens, or shrink it with " + "-E/-H/-I");
}

void log_generating(const LayerSpec& spec, const QuantScheme& format, int64_t bytes,
                    const std::string& share) {
  std::cerr << spec.preset << ": generating " << gigabytes(bytes) << " of " << format.str()
            << " weights" << share << " and prepacking (" << spec.str() << ")\n";
}

void log_generated(const LayerSpec& spec, const BenchLayer& layer) {
  std::cerr << std::setprecision(3) << spec.preset << ": generated in " << layer.generate_seconds
            << " s, prepacked in " << layer.prepack_seconds << " s\n";
}

}  // namespace moekit::cli
