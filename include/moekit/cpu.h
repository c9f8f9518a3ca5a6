// CPU backend: SIMD experts over prepacked weights, with runtime ISA dispatch.
#pragma once

#include <memory>
#include <string_view>

#include "moekit/modular.h"

namespace moekit {

// Micro-kernel families, slowest to fastest; kScalar is always built (and is the only one on
// non-x86 targets).
enum class CpuIsa { kScalar, kAvx2, kAvx512, kAvx512Bf16 };
std::string_view name(CpuIsa isa);
// "scalar", "avx2", "avx512", "avx512bf16"; throws moekit::Error listing these on other names.
CpuIsa parse_cpu_isa(std::string_view s);
CpuIsa detect_cpu_isa();  // best one this CPU runs
bool cpu_supports(CpuIsa isa);

struct CpuExpertsConfig {
  int num_threads = 0;            // 0: all hardware threads
  CpuIsa isa = detect_cpu_isa();  // must satisfy cpu_supports()
};

// Experts (standard format, TopKWeightApplied::kNone) for bf16 or fp32 weights, or quantized
// ones (weights.quant: every format of quant/format.h except a static activation scale, with
// scales in s13/s2 as quant/format.h lays them out). Prepacks the weights at construction (the
// caller's weight memory is not referenced afterwards): quantized codes are repacked per panel
// at their own size and dequantized in registers by the micro-kernels.
// Activation spec: bf16 a1 for bf16 weights, fp32 a1 for fp32 weights, ActivationSpec::of(the
// format) for quantized ones (bf16 for weight-only formats; e4m3 or int8 a1 with a per-tensor,
// per-token or per-block scale in DispatchedBatch::a1_scale). The intermediate is rounded to
// bf16 for bf16 activations, and requantized dynamically like a1 (per token, per 1 x 128
// block, per tensor) for fp8 and int8 ones. Results are bit-identical for any thread count and
// do not depend on the other tokens of the batch (except per-tensor activation scales, which
// are the batch's), and every ISA family gives the same bits up to the activation function.
// Throws moekit::Error on bad weights (e.g. e4m3 NaN weight codes; int8 with K > 65793, whose
// int32 dot products could overflow). apply() throws moekit::Error (before writing `out`) on
// bad shapes, dtypes, a missing or mis-shaped a1 scale, a too small workspace, or local ids
// outside [-1, E_local).
std::shared_ptr<Experts> make_cpu_experts(const ExpertWeights& weights, const Activation& act,
                                          const CpuExpertsConfig& config = {});

// Deterministic weight-and-reduce (fixed slot order), threads over tokens.
std::shared_ptr<WeightAndReduce> make_cpu_weight_and_reduce(int num_threads = 0);

// ---- the machine's ceilings, for rooflines (each call takes a fraction of a second) ----
// Peak GFLOP/s of `threads` threads multiply-adding at the vector width of `isa` for `weights`
// (bf16 or fp32) from register-only loops: FMA (bf16 products are exact in fp32, so widening
// bf16 and FMAing is one way to compute them), and for avx512bf16 with bf16 weights also
// vdpbf16ps, whichever is faster on this CPU (scalar: a scalar multiply-add loop). For int8
// (kI8): giga-operations per second (2 per multiply-add) of the int8 dot products the w8a8
// kernels use (vpdpbusd where the CPU has AVX512-VNNI / AVX-VNNI, else a scalar loop). Throws
// moekit::Error for other dtypes.
double measure_cpu_peak_gflops(CpuIsa isa, DType weights, int threads);
// DRAM read GB/s of `threads` threads streaming disjoint parts of a 1 GiB buffer (best pass).
double measure_dram_read_gbps(int threads);

}  // namespace moekit
