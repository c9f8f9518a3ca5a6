#include "cpu/pack.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <functional>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "moekit/core/error.h"

namespace moekit::cpu {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;

template <typename T>
void pack_float_panel(const PackSource& s, const PackedGemm& g, int64_t e, int64_t p, T* dst) {
  // bf16 panels interleave K-pairs ([K/2][kPanel][2]); fp32 panels are [K][kPanel].
  constexpr int kPairs = sizeof(T) == 2 ? 2 : 1;
  const TensorView& w = *s.w;
  std::memset(static_cast<void*>(dst), 0, size_t(g.panel_bytes));
  const T* base = static_cast<const T*>(w.data) + s.ew->index(e) * w.stride[0];
  for (int c = 0; c < kPanel; ++c) {
    const int64_t row = s.row_of(p, c);
    if (row < 0) continue;
    const T* src = base + row * w.stride[1];
    for (int64_t kk = 0; kk < g.k; ++kk)
      dst[(kk / kPairs * kPanel + c) * kPairs + kk % kPairs] = src[kk * w.stride[2]];
  }
}

PackedGemm pack(const PackSource& s, int64_t k, int64_t n_out, int64_t cols_per_panel, Epilogue ep,
                ThreadPool& pool) {
  PackedGemm g;
  g.k = k;
  g.n_out = n_out;
  g.cols_per_panel = cols_per_panel;
  g.epilogue = ep;
  if (s.ew->quant) {
    pack_quant(s, *s.ew->quant, ActivationSpec::of(*s.ew->quant).dtype, g, pool);
    return g;
  }
  const TensorView& w = *s.w;
  MOEKIT_CHECK(w.dtype == DType::kBF16 || w.dtype == DType::kF32,
               "cpu experts: weights must be bf16 or fp32, got ", w.str());
  g.panel_bytes = (w.dtype == DType::kBF16 ? (k + 1) / 2 * 2 : k) * kPanel * element_bytes(w.dtype);
  pack_panels(s, g, pool, [&](int64_t e, int64_t p, std::byte* dst) {
    if (w.dtype == DType::kBF16)
      pack_float_panel(s, g, e, p, reinterpret_cast<uint16_t*>(dst));
    else
      pack_float_panel(s, g, e, p, reinterpret_cast<float*>(dst));
  });
  return g;
}

}  // namespace

HugeBuffer::HugeBuffer(size_t bytes) : bytes_(bytes) {
  const size_t rounded = (std::max<size_t>(bytes, 1) + kHugePage - 1) / kHugePage * kHugePage;
  void* p = std::aligned_alloc(kHugePage, rounded);
  MOEKIT_CHECK(p != nullptr, "cpu experts: cannot allocate ", rounded, " bytes of packed weights");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  madvise(p, rounded, MADV_HUGEPAGE);  // a hint: failure only costs TLB misses
#endif
  data_.reset(static_cast<std::byte*>(p));
}

void HugeBuffer::Free::operator()(std::byte* p) const {
  std::free(p);
}

void pack_panels(const PackSource& s, PackedGemm& g, ThreadPool& pool,
                 const std::function<void(int64_t e, int64_t p, std::byte* dst)>& fill) {
  g.panels = (g.n_out + g.cols_per_panel - 1) / g.cols_per_panel;
  const int64_t experts = s.ew->num_local();
  // 64 bytes past the end: the nibble kernels load a unit's last lanes up to 3 bytes further.
  g.weights = HugeBuffer(size_t(experts * g.panels * g.panel_bytes + 64));
  g.bias.assign(size_t(experts * g.panels * kPanel), 0.f);
  const int64_t tasks = experts * g.panels;
  pool.run([&](int t) {
    const int n = pool.size();
    for (int64_t i = tasks * t / n; i < tasks * (t + 1) / n; ++i) {
      const int64_t e = i / g.panels, p = i % g.panels;
      fill(e, p, g.weights.data() + i * g.panel_bytes);
      if (!s.bias->present()) continue;
      float* b = g.bias.data() + i * kPanel;
      const TensorView& bv = *s.bias;
      const int64_t off = s.ew->index(e) * bv.stride[0];
      for (int c = 0; c < kPanel; ++c) {
        const int64_t row = s.row_of(p, c);
        b[c] = row < 0 ? 0.f : load_as_float(bv.data, bv.dtype, off + row * bv.stride[1]);
      }
    }
  });
}

PackedGemm pack_w13(const ExpertWeights& w, const Activation& act, ThreadPool& pool) {
  const int64_t I = w.intermediate();
  PackSource s{&w.w13, &w.b13, &w.s13, &w, "w13", nullptr};
  if (act.gated) {
    s.row_of = [&act, I](int64_t p, int c) -> int64_t {
      const int64_t j = p * kGatedHalf + c % kGatedHalf;
      if (j >= I) return -1;
      return c < kGatedHalf ? act.gate_row(j, I) : act.up_row(j, I);
    };
    return pack(s, w.hidden(), I, kGatedHalf, Epilogue::kGated, pool);
  }
  s.row_of = [I](int64_t p, int c) -> int64_t {
    const int64_t j = p * kPanel + c;
    return j < I ? j : -1;
  };
  return pack(s, w.hidden(), I, kPanel, Epilogue::kAct, pool);
}

PackedGemm pack_w2(const ExpertWeights& w, ThreadPool& pool) {
  const int64_t H = w.hidden();
  PackSource s{&w.w2, &w.b2, &w.s2, &w, "w2", [H](int64_t p, int c) -> int64_t {
                 const int64_t n = p * kPanel + c;
                 return n < H ? n : -1;
               }};
  return pack(s, w.intermediate(), H, kPanel, Epilogue::kStore, pool);
}

}  // namespace moekit::cpu
