// The portable quantized kernels: every element family of kernels.h in plain C++, in the
// order of operations written there (std::fma where the SIMD families fuse), so that the x86
// families agree with these bit for bit. Also the reference for them in the tests.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>

#include "cpu/kernels.h"
#include "moekit/quant/encodings.h"

namespace moekit::cpu {
namespace {

constexpr int kRows = 4;  // rows per tile

// Value of the code of panel column c at step i of a unit.
float code_value(const QuantPanel& q, const uint8_t* u, int c, int i) {
  switch (q.family) {
    case QFamily::kNibble: {
      uint32_t lane;
      std::memcpy(&lane, u + 4 * c, 4);
      return q.table[(lane >> (4 * i)) & 0xF];
    }
    case QFamily::kByte:
      return q.is_signed ? float(int8_t(u[c])) : float(u[c]);
    case QFamily::kFp8: {
      static const std::array<float, 256> kE4m3 = [] {
        std::array<float, 256> t{};
        for (int v = 0; v < 256; ++v) t[size_t(v)] = decode(MiniFloat::kE4M3, uint8_t(v)) * 0x1p-8f;
        return t;
      }();
      return kE4m3[u[c]];
    }
    case QFamily::kInt8Dot:
      break;
  }
  return 0;
}

float scale_value(ScaleStore s, const uint8_t* p, int c) {
  switch (s) {
    case ScaleStore::kF32: {
      float v;
      std::memcpy(&v, p + 4 * c, 4);
      return v;
    }
    case ScaleStore::kBF16: {
      uint16_t v;
      std::memcpy(&v, p + 2 * c, 2);
      return bf16_to_float(v);
    }
    case ScaleStore::kE8: {
      const uint32_t bits = uint32_t(p[c]) << 23;
      float v;
      std::memcpy(&v, &bits, 4);
      return v;
    }
  }
  return 0;
}

// x[r][c] for n <= kRows rows of the FMA-decoded families (kNibble, kByte, kFp8).
void decoded_tile(const QuantJob& qj, int64_t r0, int64_t n, float (*x)[kPanel]) {
  const PanelJob& j = qj.panel;
  const QuantPanel& q = qj.q;
  const int64_t steps = unit_steps(q.family), ub = unit_bytes(q.family);
  const int64_t sb = kPanel * scale_bytes(q.scale), G = q.group, groups = (j.k + G - 1) / G;
  const int64_t group_bytes = G / steps * ub + sb + (q.zero_point ? kPanel : 0);
  float acc[kRows][kPanel] = {}, part[kRows][kPanel];
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* u = static_cast<const uint8_t*>(j.b) + g * group_bytes;
    const int64_t k0 = g * G, units = (std::min(G, j.k - k0) + steps - 1) / steps;
    std::fill(&part[0][0], &part[0][0] + kRows * kPanel, 0.f);
    for (int64_t i = 0; i < units; ++i, u += ub)
      for (int s = 0; s < steps; ++s)
        for (int c = 0; c < kPanel; ++c) {
          const float w = code_value(q, u, c, s);
          for (int64_t r = 0; r < n; ++r)
            part[r][c] = std::fma(w, j.a_rows[r0 + r][k0 + i * steps + s], part[r][c]);
        }
    for (int64_t r = 0; r < n; ++r) {
      const float* meta = j.a_rows[r0 + r] + qj.a_meta;
      for (int c = 0; c < kPanel; ++c) {
        float p = part[r][c], s = scale_value(q.scale, u, c);
        if (q.zero_point) p = std::fma(-float(u[sb + c]), meta[1 + g], p);
        if (q.block_act_scale) s = s * meta[1 + groups + g];
        acc[r][c] = std::fma(p, s, acc[r][c]);
      }
    }
  }
  for (int64_t r = 0; r < n; ++r) {
    const float rs = (j.a_rows[r0 + r] + qj.a_meta)[0] * qj.post;
    for (int c = 0; c < kPanel; ++c) x[r][c] = acc[r][c] * rs;
  }
}

// x[r][c] for n <= kRows rows of kInt8Dot: exact integer sums, then the fp32 scaling.
void int8_tile(const QuantJob& qj, int64_t r0, int64_t n, float (*x)[kPanel]) {
  const PanelJob& j = qj.panel;
  const int64_t units = (j.k + 3) / 4;
  const uint8_t* b = static_cast<const uint8_t*>(j.b);
  const uint8_t* scales = b + units * unit_bytes(QFamily::kInt8Dot);
  for (int64_t r = 0; r < n; ++r) {
    const int8_t* a = reinterpret_cast<const int8_t*>(j.a_rows[r0 + r]);
    const float* meta = j.a_rows[r0 + r] + qj.a_meta;
    int32_t corr;
    std::memcpy(&corr, meta + 1, 4);
    const float rs = meta[0] * qj.post;
    for (int c = 0; c < kPanel; ++c) {
      int32_t dot = 0;
      for (int64_t i = 0; i < units; ++i)
        for (int s = 0; s < 4; ++s) dot += int32_t(b[i * 256 + 4 * c + s]) * a[4 * i + s];
      x[r][c] = float(dot - corr) * scale_value(ScaleStore::kF32, scales, c) * rs;
    }
  }
}

template <void (*Tile)(const QuantJob&, int64_t, int64_t, float (*)[kPanel])>
void quant_gemm(const QuantJob& qj) {
  const PanelJob& j = qj.panel;
  alignas(64) float x[kRows][kPanel];
  for (int64_t r0 = 0; r0 < j.rows; r0 += kRows) {
    const int64_t n = std::min<int64_t>(kRows, j.rows - r0);
    Tile(qj, r0, n, x);
    for (int64_t r = 0; r < n; ++r) scalar_epilogue(j, x[r], j.c_rows[r0 + r]);
  }
}

void requant_int8(const RequantInt8Job& jb) {
  float amax = 0;
  for (int64_t i = 0; i < jb.n; ++i) {
    const float a = std::fabs(jb.x[i]);
    if (a < INFINITY) amax = std::max(amax, a);
  }
  float s = amax / 127.0f;
  if (s == 0.0f) s = 1.0f;
  int32_t sum = 0;
  for (int64_t i = 0; i < jb.n; ++i) {
    float v = jb.x[i] / s;
    v = v != v ? 0.0f : std::clamp(v, -127.0f, 127.0f);
    const int32_t q = int32_t(std::nearbyint(v));
    jb.codes[i] = int8_t(q);
    sum += q;
  }
  std::memset(jb.codes + jb.n, 0, size_t(jb.n_pad - jb.n));
  jb.meta[0] = s;
  const int32_t corr = 128 * sum;
  std::memcpy(jb.meta + 1, &corr, 4);
}

double int8_peak_loop(int64_t iters) {
  // 16 independent int32 multiply-add chains; the compiler keeps them in registers.
  int32_t acc[16] = {}, m[16];
  for (int i = 0; i < 16; ++i) m[i] = 3 + i;
  for (int64_t it = 0; it < iters; ++it)
    for (int i = 0; i < 16; ++i) acc[i] = acc[i] * m[i] + 7;
  volatile int32_t sink = 0;
  for (int32_t v : acc) sink = sink + v;
  return 2.0 * 16 * double(iters);
}

}  // namespace

void add_quant_kernels_scalar(KernelTable& t) {
  t.gemm_quant[int(QFamily::kNibble)] = &quant_gemm<decoded_tile>;
  t.gemm_quant[int(QFamily::kByte)] = &quant_gemm<decoded_tile>;
  t.gemm_quant[int(QFamily::kFp8)] = &quant_gemm<decoded_tile>;
  t.gemm_quant[int(QFamily::kInt8Dot)] = &quant_gemm<int8_tile>;
  t.requant_int8 = &requant_int8;
  t.peak_loop_int8 = &int8_peak_loop;
}

}  // namespace moekit::cpu
