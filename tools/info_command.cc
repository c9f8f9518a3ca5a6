// `moekit info`: what this build and this machine offer, and the model presets.
#include <iomanip>
#include <iostream>

#include "bench_cache.h"
#include "build_info.h"
#include "commands.h"
#include "layer_spec.h"
#include "machine.h"
#include "moekit/presets.h"
#if defined(MOEKIT_HAS_CUDA)
#include "moekit/cuda.h"
#endif

namespace moekit::cli {
namespace {

void print_presets(std::ostream& os) {
  os << "presets (weights in bf16; active = routed top-k plus shared, per token):\n"
     << std::left << std::setw(17) << "  name" << std::right << std::setw(5) << "E" << std::setw(6)
     << "H" << std::setw(7) << "I" << std::setw(3) << "k" << std::setw(11) << "weights_GB"
     << std::setw(11) << "active_MB"
     << "  routing, activation\n";
  for (const Preset& p : presets()) {
    ShapeOptions one;
    one.presets = {std::string(p.name)};
    const LayerSpec s = resolve_layer_specs(one).front();
    const QuantScheme bf16{Format::kBF16};
    const int64_t active = s.top_k * s.expert_bytes(bf16) + s.shared_bytes(bf16);
    os << "  " << std::left << std::setw(15) << s.preset << std::right << std::setw(5)
       << s.num_experts << std::setw(6) << s.hidden << std::setw(7) << s.intermediate
       << std::setw(3) << s.top_k << std::fixed << std::setprecision(2) << std::setw(11)
       << s.total_weight_bytes(bf16) / 1e9 << std::setprecision(1) << std::setw(11)
       << active / 1e6 << "  " << s.router.str() << ", " << s.activation.str()
       << (s.has_bias ? ", biases" : "")
       << (s.num_shared_experts ? ", " + std::to_string(s.num_shared_experts) + " shared" : "")
       << "\n";
  }
}

int run_info() {
  std::cout << "moekit " << kMoekitVersion << "\n"
            << "build: " << kCompiler << ", x86 kernels " << (kX86Kernels ? "on" : "off")
            << ", CUDA " << (kCudaBackend ? "on" : "off") << "\n"
            << "cpu: " << cpu_model_name() << ", " << resolve_threads(0) << " threads, "
            << (last_level_cache_bytes() >> 20) << " MiB last-level cache, "
            << (available_memory_bytes() >> 20) << " MiB memory available\n"
            << "isa:";
  for (CpuIsa isa : {CpuIsa::kScalar, CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAvx512Bf16})
    std::cout << " " << name(isa) << (cpu_supports(isa) ? " (yes)" : " (no)");
  std::cout << "; chosen " << name(detect_cpu_isa()) << "\n";
#if defined(MOEKIT_HAS_CUDA)
  const int devices = cuda_device_count();
  std::cout << "cuda: " << devices << " device(s)" << (devices ? ", " + cuda_device_name() : "")
            << "\n";
#endif
  print_presets(std::cout);
  return 0;
}

}  // namespace

Command add_info_command(CLI::App& app) {
  CLI::App* cmd = app.add_subcommand(
      "info", "Print the version, build features, CPU and its kernel families, and the presets.");
  return {cmd, [] { return run_info(); }};
}

}  // namespace moekit::cli
