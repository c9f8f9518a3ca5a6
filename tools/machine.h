// Facts about the machine the tool runs on: CPU model, threads, memory, and its measured
// ceilings (DRAM read bandwidth, SIMD peak per dtype) that roofline times are computed from.
#pragma once

#include <cstdint>
#include <string>

#include "moekit/core/dtype.h"
#include "moekit/cpu.h"

namespace moekit::cli {

std::string cpu_model_name();        // "model name" of /proc/cpuinfo, or "unknown cpu"
int resolve_threads(int requested);  // 0: every hardware thread
int64_t available_memory_bytes();    // MemAvailable of /proc/meminfo (0 when unknown)
// Which ISA a --isa value names; "" is the best this CPU runs. Throws CLI::ValidationError for
// unknown names and for families this CPU cannot run.
CpuIsa resolve_isa(const std::string& requested);

struct MachineCeilings {
  double read_gbps = 0;
  double peak_gflops_bf16 = 0, peak_gflops_fp32 = 0;
  double measure_seconds = 0;  // what measuring them cost

  double peak_gflops(DType weights) const {
    return weights == DType::kF32 ? peak_gflops_fp32 : peak_gflops_bf16;
  }
};

// Measures the ceilings the CPU experts can reach with `threads` threads of `isa`.
MachineCeilings measure_ceilings(CpuIsa isa, int threads);

}  // namespace moekit::cli
