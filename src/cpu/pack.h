// Prepacked expert weights (layout in kernels.h): both GEMMs of every local expert, copied out
// of the caller's tensors at construction into one huge-page-backed buffer per GEMM.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
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

  const void* panel(int64_t e, int64_t p) const {
    return weights.data() + (e * panels + p) * panel_bytes;
  }
  const float* panel_bias(int64_t e, int64_t p) const {
    return bias.data() + (e * panels + p) * kPanel;
  }
};

// GEMM1 from W13 [n, w13_rows(I), H] (gate/up rows per act's layout) and b13; GEMM2 from
// W2 [n, H, I] and b2. Weights bf16 or fp32 (kept as is), biases any float dtype.
PackedGemm pack_w13(const ExpertWeights& w, const Activation& act, ThreadPool& pool);
PackedGemm pack_w2(const ExpertWeights& w, ThreadPool& pool);

}  // namespace moekit::cpu
