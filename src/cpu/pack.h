// Prepacked expert weights (layout in kernels.h): both GEMMs of every local expert, copied out
// of the caller's tensors at construction into one huge-page-backed buffer per GEMM.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/thread_pool.h"
#include "moekit/modular.h"

namespace moekit::cpu {

// Page-aligned host bytes, asking the kernel for transparent huge pages (weights are streamed
// once per call: 4 KiB pages would cost a TLB miss every 64 cache lines).
class HugeBuffer {
 public:
  HugeBuffer() = default;
  explicit HugeBuffer(size_t bytes);
  std::byte* data() const { return data_.get(); }
  size_t size() const { return bytes_; }

 private:
  struct Free {
    void operator()(std::byte* p) const;
  };
  std::unique_ptr<std::byte, Free> data_;
  size_t bytes_ = 0;
};

// One GEMM of all local experts: out[r, n] = sum_k A[r, k] W[n, k] + b[n], n < n_out, in panels
// of kPanel packed columns producing cols_per_panel output columns each.
struct PackedGemm {
  int64_t k = 0;               // reduction length
  int64_t n_out = 0;           // output columns (I for GEMM1, H for GEMM2)
  int64_t cols_per_panel = 0;  // kGatedHalf (gated GEMM1) or kPanel
  int64_t panels = 0;          // per expert
  int64_t panel_bytes = 0;     // packed bytes of one panel (K padded to even for bf16)
  Epilogue epilogue = Epilogue::kStore;
  HugeBuffer weights;       // [E_local][panels][panel_bytes]
  std::vector<float> bias;  // [E_local][panels][kPanel], zeros when absent
  // Quantized weights (kernels.h QuantPanel), absent for bf16/fp32 ones.
  std::optional<QuantPanel> quant;
  std::vector<float> post;  // [E_local] the expert's global scale (1 where the format has none)
  // A rows of a quantized GEMM: K rounded up to the family's unit (the kernels read whole units).
  int64_t k_padded() const {
    const int64_t u = quant ? unit_steps(quant->family) : 1;
    return (k + u - 1) / u * u;
  }
  int64_t groups() const { return quant ? (k + quant->group - 1) / quant->group : 0; }

  const void* panel(int64_t e, int64_t p) const {
    return weights.data() + (e * panels + p) * panel_bytes;
  }
  const float* panel_bias(int64_t e, int64_t p) const {
    return bias.data() + (e * panels + p) * kPanel;
  }
};

// GEMM1 from W13 [n, w13_rows(I), H] (gate/up rows per act's layout) and b13; GEMM2 from
// W2 [n, H, I] and b2. Weights bf16 or fp32 (kept as is) or quantized (w.quant: codes repacked
// into quantized panels, kernels.h); biases any float dtype. Throws moekit::Error on weights
// the kernels cannot take.
PackedGemm pack_w13(const ExpertWeights& w, const Activation& act, ThreadPool& pool);
PackedGemm pack_w2(const ExpertWeights& w, ThreadPool& pool);

// ---- shared by the float and the quantized packing (pack.cc, pack_quant.cc) ----
// Source of one packed GEMM: matrix [rows, k] of expert e is w[index(e)] (scales: its quantized
// scales), and packed column c of panel p reads row row_of(p, c) (-1: zero column).
struct PackSource {
  const TensorView* w;
  const TensorView* bias;  // may be absent
  const WeightScales* scales;
  const ExpertWeights* ew;
  const char* what;  // "w13" / "w2", for messages
  std::function<int64_t(int64_t p, int c)> row_of;
};
// The geometry of g (k, n_out, cols_per_panel, panels, epilogue), its bias panels, and the
// weights of every (expert, panel) written by fill(e, p, dst) on the pool's threads.
void pack_panels(const PackSource& s, PackedGemm& g, ThreadPool& pool,
                 const std::function<void(int64_t e, int64_t p, std::byte* dst)>& fill);
// Quantized panels of W in scheme q, for activations of dtype act (int8 activations make int8
// weights kInt8Dot panels); g's geometry set, panel_bytes computed here.
void pack_quant(const PackSource& s, const QuantScheme& q, DType act, PackedGemm& g,
                ThreadPool& pool);

}  // namespace moekit::cpu
