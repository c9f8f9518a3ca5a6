#include "machine.h"

#include <CLI/CLI.hpp>
#include <fstream>
#include <thread>

#include "bench_timer.h"
#include "moekit/core/error.h"
#include "option_checks.h"

namespace moekit::cli {

std::string cpu_model_name() {
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("model name", 0) != 0) continue;
    const size_t colon = line.find(':');
    if (colon != std::string::npos && colon + 2 <= line.size()) return line.substr(colon + 2);
  }
  return "unknown cpu";
}

int resolve_threads(int requested) {
  return requested > 0 ? requested : std::max(1u, std::thread::hardware_concurrency());
}

int64_t available_memory_bytes() {
  std::ifstream in("/proc/meminfo");
  for (std::string key; in >> key;) {
    int64_t kib = 0;
    if (key == "MemAvailable:" && in >> kib) return kib << 10;
    in.ignore(1 << 10, '\n');
  }
  return 0;
}

CpuIsa resolve_isa(const std::string& requested) {
  if (requested.empty()) return detect_cpu_isa();
  const CpuIsa isa = parse_option("--isa", [&] { return parse_cpu_isa(requested); });
  if (!cpu_supports(isa))
    throw CLI::ValidationError("--isa", "this CPU cannot run " + requested +
                                            "; the best it runs is " +
                                            std::string(name(detect_cpu_isa())));
  return isa;
}

MachineCeilings measure_ceilings(CpuIsa isa, int threads) {
  Stopwatch watch;
  MachineCeilings c;
  c.read_gbps = measure_dram_read_gbps(threads);
  c.peak_gflops_bf16 = measure_cpu_peak_gflops(isa, DType::kBF16, threads);
  c.peak_gflops_fp32 = measure_cpu_peak_gflops(isa, DType::kF32, threads);
  c.peak_gops_int8 = measure_cpu_peak_gflops(isa, DType::kI8, threads);
  c.peak_gflops_fp8 = c.peak_gflops_bf16;  // the CPU experts widen fp8 and FMA
  c.measure_seconds = watch.elapsed_us() * 1e-6;
  return c;
}

}  // namespace moekit::cli
