// Facts about the machine the tool runs on: CPU model, threads, memory, and its measured
// ceilings (DRAM read bandwidth, SIMD peak per dtype) that roofline times are computed from.
#pragma once

#include <cstdint>
#include <string>

#include "moekit/core/dtype.h"
#include "moekit/cpu.h"
#include "moekit/quant/format.h"

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
  double peak_gops_int8 = 0;  // int8 dot products (VNNI where present), 2 ops per multiply-add
  double peak_gflops_fp8 = 0;  // fp8 tensor cores (CUDA); on the CPU fp8 is widened: the bf16 peak
  double measure_seconds = 0;  // what measuring them cost

  // What the experts of `format` compute with: int8 dot products for int8 activations, fp8
  // for fp8 ones, fp32 for fp32, and bf16 for the rest (weight-only formats dequantize to the
  // activations' bf16).
  double peak_gflops(const QuantScheme& format) const {
    const DType act = format.traits().act;
    if (act == DType::kF8E4M3) return peak_gflops_fp8;
    return act == DType::kI8 ? peak_gops_int8 : act == DType::kF32 ? peak_gflops_fp32
                                                                   : peak_gflops_bf16;
  }
};

// Measures the ceilings the CPU experts can reach with `threads` threads of `isa`.
MachineCeilings measure_ceilings(CpuIsa isa, int threads);

}  // namespace moekit::cli
