// The interface between the host side of the CPU experts and the per-ISA micro-kernels
// (src/cpu/isa/kernels_<isa>.cc). Plain data only: the ISA translation units see nothing that
// needs their flags to be absent.
#pragma once

#include <cstddef>
#include <cstdint>

#include "moekit/activation.h"
#include "moekit/core/dtype.h"
#include "moekit/cpu.h"

namespace moekit::cpu {

// Packed weights: output columns in panels of kPanel. A gated W13 panel holds kPanel/2 gate
// columns then the kPanel/2 matching up columns, so GEMM1's epilogue sees both halves of each
// intermediate column. bf16 panels are [ceil(K/2)][kPanel][2] (the K-pair of one column is one
// 32-bit lane, as vdpbf16ps wants); fp32 panels are [K][kPanel]. Padding (K odd, last panel
// short) is zero.
inline constexpr int kPanel = 64;
inline constexpr int kGatedHalf = kPanel / 2;

enum class Epilogue : uint8_t {
  kGated,  // C[r, j] = act(gate_j, up_j), j < kGatedHalf (GEMM1 -> intermediate)
  kAct,    // C[r, j] = act(x_j), j < kPanel (GEMM1 of non-gated activations)
  kStore,  // C[r, j] = x_j, j < kPanel (GEMM2 -> out)
};

// One GEMM over one packed panel for a list of rows, bias and epilogue fused:
//   x[r, :] = A[r, :K] . B_panel + bias    // [rows, kPanel], fp32 accumulation
//   C[r, c_col + j] = epilogue(x[r, :])[j]  for j < c_valid (other columns are not written)
// A and C are fp32. With bf16 weights, A holds bf16 values (a1 widened, or the intermediate
// rounded by GEMM1's epilogue: round_bf16), so every product is exact and the kernels can
// broadcast A straight from memory into FMAs (see gemm_x86.h for why not vdpbf16ps).
struct PanelJob {
  const float* const* a_rows;  // [rows] A rows of K elements (bf16 weights: K rounded up to
                               // even, the extra element zero)
  float* const* c_rows;        // [rows] C rows
  int64_t rows = 0;
  int64_t k = 0;
  const void* b = nullptr;      // the packed panel
  const float* bias = nullptr;  // [kPanel] in panel column order (zeros when absent)
  int64_t c_col = 0, c_valid = 0;
  Epilogue epilogue = Epilogue::kStore;
  ActivationFn fn = ActivationFn::kSilu;
  float alpha = 0, limit = 0;  // SwiGLU-OAI
  bool round_bf16 = false;     // kGated/kAct: round C to bf16 values (bf16 weights)
  int64_t prefetch = 0;        // first row tile: prefetch B this many bytes ahead (0: none)
  int64_t prefetch_next = 0;   // second row tile: prefetch into L2 at this distance, the panel
                               // likely to come next (0: none)
};

struct KernelTable {
  void (*gemm_bf16)(const PanelJob& job);
  void (*gemm_f32)(const PanelJob& job);
  // Register-only multiply-add loop of `iters` steps; returns the flops it did.
  double (*peak_loop)(DType weights, int64_t iters);
  // Reads [p, p + bytes) once (bytes a multiple of 64, p 64-byte aligned); returns a checksum.
  uint64_t (*stream_read)(const void* p, size_t bytes);
};

const KernelTable& kernels_scalar();
#ifdef MOEKIT_X86_KERNELS
const KernelTable& kernels_avx2();
const KernelTable& kernels_avx512();
const KernelTable& kernels_avx512bf16();
// vdpbf16ps register loop (avx512bf16 CPUs only); returns the flops it did.
double dpbf16_peak_loop(int64_t iters);
#endif
// The table of `isa` (throws moekit::Error when this build or CPU lacks it).
const KernelTable& kernels_for(CpuIsa isa);

}  // namespace moekit::cpu
