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

// ---- quantized panels (formats of quant/format.h) ----------------------------------------
// One micro-kernel per weight element family; the format's traits row (scale layout, group,
// zero point, global scale) arrives as data in the PanelJob, never as a switch on the format.
//   kNibble  4-bit codes (int4, uint4 with a zero point, e2m1) read through a table of their 16
//            values; unit of 8 K-steps: [kPanel][8 nibbles] (one 32-bit lane per column, K-step
//            k0 + i in bits 4i..4i+3), 256 bytes.
//   kByte    int8, or uint8 with a zero point; unit of 1 K-step: [kPanel] bytes.
//   kFp8     e4m3 (never the NaN code: refused at packing); unit of 1 K-step: [kPanel] bytes.
//            A code's value is its e4m3 value * 2^-8 (what widening through fp16 gives, exact
//            and never an fp32 denormal); the packed column scales carry the 2^8.
//   kInt8Dot int8 weights x int8 activations (w8a8) as integer dot products: the weight w is
//            stored as the byte w + 128 (unsigned) so that u8 x s8 instructions (vpdpbusd) take
//            it; unit of 4 K-steps: [kPanel][4] bytes, 256 bytes.
// A quantized panel is its scale groups one after the other; group g (G K-steps, the last one
// possibly shorter, its units zero-padded) is
//   codes  ceil(len / unit) units;
//   scales kPanel column scales as ScaleStore (kF32 4 bytes, kBF16 2, kE8: ue8m0 code 1..254);
//   zeros  kPanel bytes, zero point formats only.
// Weight scales of every layout become column scales per group here (kTensor: one group of the
// expert's scale; kChannel: one group; kBlock: groups of the block edge).
enum class QFamily : uint8_t { kNibble, kByte, kFp8, kInt8Dot };
enum class ScaleStore : uint8_t { kF32, kBF16, kE8 };

// A rows of quantized GEMMs (QFamily kernels) are records: A[Kp] (fp32 values of the
// activation codes, unscaled, zero past K; kInt8Dot: int8 codes, Kp bytes), then at float
// offset a_meta:
//   meta[0]           the row's scale (activation per-token / per-tensor scale; 1 when none)
//   meta[1 + g]       kNibble/kByte with a zero point: the sum of A over group g (fp32, in order)
//   meta[1 + ng + g]  kFp8 with per-block activation scales: the scale of A's group g
//   kInt8Dot: meta[1] (int32) = 128 * sum of A's codes, which the +128 of the weights added.
// Per output element (r, n) the kernels compute, in this order (fp32):
//   for each group g:  p  = sum over k of A[r, k] * code_value[n, k]   (fma chain from 0, k up)
//                      p  = p - zero[n, g] * meta[1 + g]                (zero point; one fma)
//                      s  = scale[n, g] (* meta[1 + ng + g], block activation scales)
//                      acc = fma(p, s, acc)                             (acc from 0)
//   x = acc * (meta[0] * post) + bias, then the epilogue.
// kInt8Dot (one group): x = (float(sum of u8 * s8 - meta[1]) * scale[n]) * (meta[0] * post).
// Every family, scalar included, follows this order, so they agree bit for bit (products of the
// codes with bf16, e4m3 or int8 values are exact in fp32).
struct QuantPanel {
  QFamily family = QFamily::kNibble;
  ScaleStore scale = ScaleStore::kF32;
  bool zero_point = false;
  bool block_act_scale = false;  // kFp8: A rows carry a scale per group
  bool is_signed = true;         // kByte: int8 (else uint8)
  int64_t group = 0;             // K-steps per scale group, a multiple of the unit
  const float* table = nullptr;  // kNibble: the values of codes 0..15
};

// K-steps per unit and bytes per unit of a family (see above).
constexpr int64_t unit_steps(QFamily f) {
  return f == QFamily::kNibble ? 8 : f == QFamily::kInt8Dot ? 4 : 1;
}
constexpr int64_t unit_bytes(QFamily f) {
  return f == QFamily::kNibble || f == QFamily::kInt8Dot ? 256 : kPanel;
}
constexpr int64_t scale_bytes(ScaleStore s) {
  return s == ScaleStore::kF32 ? 4 : s == ScaleStore::kBF16 ? 2 : 1;
}

// panel: a_rows are row records (above), b the quantized panel, prefetch the bytes ahead of each
// unit prefetched into L1 (kNibble, kByte, kFp8; kInt8Dot prefetches by chunks of its own,
// gemm_x86_int8.h).
struct QuantJob {
  PanelJob panel;
  QuantPanel q;
  int64_t a_meta = 0;       // floats from an A record's start to its meta
  float post = 1;           // the expert's global scale (nvfp4, w4a8), else 1
  int64_t prefetch_l2 = 0;  // bytes ahead prefetched into L2 (kNibble, kByte, kFp8)
};

// Dynamic int8 quantization of intermediate rows (w8a8's a2), per row of n fp32 values x:
// amax over the finite values, s = amax / 127 (1 when 0), q = x / s rounded to nearest even,
// clamped to [-127, 127] (NaN: 0); writes q to codes[0, n) and zeros to codes[n, n_pad),
// meta[0] = s and meta[1] (int32) = 128 * sum of q.
struct RequantInt8Job {
  const float* x;
  int8_t* codes;
  float* meta;
  int64_t n = 0, n_pad = 0;
};

struct KernelTable {
  void (*gemm_bf16)(const PanelJob& job);
  void (*gemm_f32)(const PanelJob& job);
  // Quantized panels, one per element family (QFamily order).
  void (*gemm_quant[4])(const QuantJob& job);
  void (*requant_int8)(const RequantInt8Job& job);
  // Register-only multiply-add loop of `iters` steps; returns the flops it did.
  double (*peak_loop)(DType weights, int64_t iters);
  // The same with the int8 dot products gemm_quant[kInt8Dot] uses; returns the operations it
  // did (2 per multiply-add).
  double (*peak_loop_int8)(int64_t iters);
  // Reads [p, p + bytes) once (bytes a multiple of 64, p 64-byte aligned); returns a checksum.
  uint64_t (*stream_read)(const void* p, size_t bytes);
};

const KernelTable& kernels_scalar();
// The scalar family's epilogue of one row x[kPanel] (bias, activation, store; PanelJob).
void scalar_epilogue(const PanelJob& j, const float* x, float* c_row);
// The quantized entries of a family's table (src/cpu/isa/quant_*_<isa>.cc): the FMA-decoded
// families (kNibble, kByte, kFp8) and the int8 ones (kInt8Dot, requant_int8, peak_loop_int8).
void add_quant_kernels_scalar(KernelTable& t);
#ifdef MOEKIT_X86_KERNELS
void add_quant_fma_avx2(KernelTable& t);
void add_quant_fma_avx512(KernelTable& t);
// Where the CPU lacks AVX-VNNI / AVX512-VNNI these take the scalar family's kInt8Dot (the same
// bits, integer sums being exact).
void add_quant_int8_avx2(KernelTable& t);
void add_quant_int8_avx512(KernelTable& t);
const KernelTable& kernels_avx2();
const KernelTable& kernels_avx512();
const KernelTable& kernels_avx512bf16();
// vdpbf16ps register loop (avx512bf16 CPUs only); returns the flops it did.
double dpbf16_peak_loop(int64_t iters);
#endif
// The table of `isa` (throws moekit::Error when this build or CPU lacks it).
const KernelTable& kernels_for(CpuIsa isa);

}  // namespace moekit::cpu
