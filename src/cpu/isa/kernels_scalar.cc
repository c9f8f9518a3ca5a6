// The portable micro-kernel family: plain C++ (the compiler may vectorize the column loops).
// It follows the SIMD families' arithmetic order (per lane: odd product, then even product,
// each exact in fp32) and evaluates the activation with the scalar formula of activation.h.
#include <algorithm>

#include "cpu/kernels.h"

namespace moekit::cpu {
namespace {

constexpr int kRows = 4;  // rows per tile

// x[r][c] += A[r, :k] . B[:k, c] for n <= kRows rows, by weight type: bf16 panels step over
// K-pairs ([K/2][kPanel][2]), fp32 panels one by one ([K][kPanel]).
void madd(float (*x)[kPanel], const float* const* a, int64_t n, const uint16_t* b, int64_t k) {
  auto bf = [](uint16_t v) { return bf16_to_float(v); };
  for (int64_t kk = 0; kk < (k + 1) / 2; ++kk) {
    const uint16_t* bk = b + kk * 2 * kPanel;
    const bool odd = 2 * kk + 1 < k;
    for (int64_t r = 0; r < n; ++r) {
      const float ae = a[r][2 * kk], ao = odd ? a[r][2 * kk + 1] : 0.f;
      for (int c = 0; c < kPanel; ++c)
        x[r][c] = (x[r][c] + ao * bf(bk[2 * c + 1])) + ae * bf(bk[2 * c]);
    }
  }
}

void madd(float (*x)[kPanel], const float* const* a, int64_t n, const float* b, int64_t k) {
  for (int64_t kk = 0; kk < k; ++kk) {
    const float* bk = b + kk * kPanel;
    for (int64_t r = 0; r < n; ++r) {
      const float av = a[r][kk];
      for (int c = 0; c < kPanel; ++c) x[r][c] = x[r][c] + av * bk[c];
    }
  }
}

}  // namespace

void scalar_epilogue(const PanelJob& j, const float* x, float* c_row) {
  Activation act;
  act.fn = j.fn;
  act.gated = j.epilogue == Epilogue::kGated;
  act.alpha = j.alpha;
  act.limit = j.limit;
  const float* bias = j.bias;
  auto mid = [&](float h) { return j.round_bf16 ? bf16_to_float(float_to_bf16(h)) : h; };
  float* c = c_row + j.c_col;
  switch (j.epilogue) {
    case Epilogue::kGated:
      for (int64_t i = 0; i < j.c_valid; ++i)
        c[i] = mid(
            apply_activation<float>(act, x[i] + bias[i], x[kGatedHalf + i] + bias[kGatedHalf + i]));
      break;
    case Epilogue::kAct:
      for (int64_t i = 0; i < j.c_valid; ++i)
        c[i] = mid(apply_activation<float>(act, x[i] + bias[i], 0.f));
      break;
    case Epilogue::kStore:
      for (int64_t i = 0; i < j.c_valid; ++i) c[i] = x[i] + bias[i];
      break;
  }
}

namespace {

template <typename W>
void gemm(const PanelJob& j) {
  alignas(64) float x[kRows][kPanel];
  for (int64_t r0 = 0; r0 < j.rows; r0 += kRows) {
    const int64_t n = std::min<int64_t>(kRows, j.rows - r0);
    std::fill(&x[0][0], &x[0][0] + kRows * kPanel, 0.f);
    madd(x, j.a_rows + r0, n, static_cast<const W*>(j.b), j.k);
    for (int64_t r = 0; r < n; ++r) scalar_epilogue(j, x[r], j.c_rows[r0 + r]);
  }
}

double peak_loop(DType, int64_t iters) {
  // 16 independent multiply-add chains; the compiler keeps them in registers.
  float acc[16] = {}, m[16];
  for (int i = 0; i < 16; ++i) m[i] = 1.0f + 1e-7f * float(i);
  for (int64_t it = 0; it < iters; ++it)
    for (int i = 0; i < 16; ++i) acc[i] = acc[i] * m[i] + 1e-9f;
  volatile float sink = 0;
  for (float v : acc) sink = sink + v;
  return 2.0 * 16 * double(iters);
}

uint64_t stream_read(const void* p, size_t bytes) {
  const uint64_t* q = static_cast<const uint64_t*>(p);
  uint64_t s[8] = {};
  for (size_t i = 0; i < bytes / 8; i += 8)
    for (int l = 0; l < 8; ++l) s[l] += q[i + l];
  uint64_t t = 0;
  for (uint64_t v : s) t ^= v;
  return t;
}

}  // namespace

const KernelTable& kernels_scalar() {
  static const KernelTable table = [] {
    KernelTable t{};
    t.gemm_bf16 = &gemm<uint16_t>;
    t.gemm_f32 = &gemm<float>;
    t.peak_loop = &peak_loop;
    t.stream_read = &stream_read;
    add_quant_kernels_scalar(t);
    return t;
  }();
  return table;
}

}  // namespace moekit::cpu
