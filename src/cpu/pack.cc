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

// Source of one packed GEMM: matrix [rows, k] of expert e is w[index(e)], and packed column c
// of panel p reads row row_of(p, c) (-1: zero column).
struct PackSource {
  const TensorView* w;
  const TensorView* bias;  // may be absent
  const ExpertWeights* ew;
  std::function<int64_t(int64_t p, int c)> row_of;
};

template <typename T>
void pack_panel(const PackSource& s, const PackedGemm& g, int64_t e, int64_t p, T* dst) {
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
  if (s.bias->present()) {
    float* b = const_cast<float*>(g.panel_bias(e, p));
    const TensorView& bv = *s.bias;
    const int64_t off = s.ew->index(e) * bv.stride[0];
    for (int c = 0; c < kPanel; ++c) {
      const int64_t row = s.row_of(p, c);
      b[c] = row < 0 ? 0.f : load_as_float(bv.data, bv.dtype, off + row * bv.stride[1]);
    }
  }
}

PackedGemm pack(const PackSource& s, int64_t k, int64_t n_out, int64_t cols_per_panel, Epilogue ep,
                ThreadPool& pool) {
  const TensorView& w = *s.w;
  MOEKIT_CHECK(w.dtype == DType::kBF16 || w.dtype == DType::kF32,
               "cpu experts: weights must be bf16 or fp32, got ", w.str());
  PackedGemm g;
  g.k = k;
  g.n_out = n_out;
  g.cols_per_panel = cols_per_panel;
  g.panels = (n_out + cols_per_panel - 1) / cols_per_panel;
  g.epilogue = ep;
  const int64_t elem = element_bytes(w.dtype);
  g.panel_bytes = (w.dtype == DType::kBF16 ? (k + 1) / 2 * 2 : k) * kPanel * elem;
  const int64_t experts = s.ew->num_local();
  g.weights = HugeBuffer(size_t(experts * g.panels * g.panel_bytes));
  g.bias.assign(size_t(experts * g.panels * kPanel), 0.f);
  const int64_t tasks = experts * g.panels;
  pool.run([&](int t) {
    const int n = pool.size();
    for (int64_t i = tasks * t / n; i < tasks * (t + 1) / n; ++i) {
      const int64_t e = i / g.panels, p = i % g.panels;
      std::byte* dst = g.weights.data() + i * g.panel_bytes;
      if (w.dtype == DType::kBF16)
        pack_panel(s, g, e, p, reinterpret_cast<uint16_t*>(dst));
      else
        pack_panel(s, g, e, p, reinterpret_cast<float*>(dst));
    }
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

PackedGemm pack_w13(const ExpertWeights& w, const Activation& act, ThreadPool& pool) {
  const int64_t I = w.intermediate();
  PackSource s{&w.w13, &w.b13, &w, nullptr};
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
  PackSource s{&w.w2, &w.b2, &w, [H](int64_t p, int c) -> int64_t {
                 const int64_t n = p * kPanel + c;
                 return n < H ? n : -1;
               }};
  return pack(s, w.intermediate(), H, kPanel, Epilogue::kStore, pool);
}

}  // namespace moekit::cpu
