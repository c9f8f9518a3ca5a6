// w8a8 on the x86 families: kInt8Dot panels (kernels.h) through u8 x s8 dot products
// (vpdpbusd: AVX512-VNNI on zmm, AVX-VNNI on ymm), the dynamic int8 requantization of the
// intermediate, and the int8 peak loop. Written once over a Family:
//   Family::kI8Rows x kI8Vecs   register tile of int32 accumulators
// Integer sums are exact, so every tile (and the scalar family) gives the same bits.
#pragma once

#include <cstring>

#include "cpu/isa/gemm_x86.h"

namespace moekit::cpu {
namespace {

// The panel is swept in chunks of kChunkUnits units (8 KiB of weights) that every row tile of
// a group of up to kGroupTiles tiles takes in turn, the accumulators waiting in a stack buffer
// between chunks. Each tile prefetches a share of the lines kPrefetchChunks chunks ahead into
// L2, so the panel streams from DRAM while the whole group computes (without chunks only the
// first row tile of a panel overlaps the panel's streaming). One expert, 32 rows, cold weights,
// 1 thread (bench/notes_cpu.md): no prefetch 300 GOP per CPU-second, into L1 one chunk ahead
// 390, into L2 two chunks ahead 420 (hot: 580).
constexpr int64_t kChunkUnits = 32, kGroupTiles = 24, kPrefetchChunks = 2;

// One register tile over units [u0, u1): R rows from r0, pass P, accumulators from/to buf.
// Per unit (4 K-steps) the 4 code bytes of each row are broadcast into a register (a load
// only) and meet each weight vector (kLanes columns x 4 bytes): register operands measured
// ~10% faster than 28 broadcasts folded into the vpdpbusd (5.8 vs 5.3 G/s, 99% of the peak
// loop). kLines lines of each unit from line `pf` on are prefetched (above).
template <class Fam, int R, int NV, int P, int kLines>
void int8_chunk(const QuantJob& qj, int64_t r0, int64_t u0, int64_t u1, int pf,
                typename Fam::V::I* buf) {
  using V = typename Fam::V;
  using I = typename V::I;
  const PanelJob& j = qj.panel;
  int vo[NV];
  for (int c = 0; c < NV; ++c)
    vo[c] = panel_vec<V::kLanes, NV, P>(j.epilogue == Epilogue::kGated, c);
  const int8_t* a[R];
  for (int r = 0; r < R; ++r) a[r] = reinterpret_cast<const int8_t*>(j.a_rows[r0 + r]);
  I acc[R][NV];
  static_for<R>([&](auto r) MOEKIT_INLINE {
    static_for<NV>([&](auto c) MOEKIT_INLINE { acc[r][c] = buf[r * NV + c]; });
  });
  constexpr int64_t kUnit = unit_bytes(QFamily::kInt8Dot),
                    kAhead = kPrefetchChunks * kChunkUnits * kUnit;
  const uint8_t* b = static_cast<const uint8_t*>(j.b) + u0 * kUnit;
  const char* ahead = reinterpret_cast<const char*>(b) + kAhead + 64 * pf;
  for (int64_t i = u0; i < u1; ++i, b += kUnit, ahead += kUnit) {
    static_for<kLines>([&](auto l) MOEKIT_INLINE { _mm_prefetch(ahead + 64 * l, _MM_HINT_T1); });
    I av[R];
    static_for<R>([&](auto r) MOEKIT_INLINE { av[r] = V::bcast4(a[r] + 4 * i); });
    static_for<NV>([&](auto c) MOEKIT_INLINE {
      const I w = V::load_i(b + vo[c] * V::kLanes * 4);
      static_for<R>([&](auto r) MOEKIT_INLINE { acc[r][c] = V::dpbusd(acc[r][c], w, av[r]); });
    });
  }
  static_for<R>([&](auto r) MOEKIT_INLINE {
    static_for<NV>([&](auto c) MOEKIT_INLINE { buf[r * NV + c] = acc[r][c]; });
  });
}

// The tile's outputs from its finished accumulators: x = (float(acc - 128 sum a) * scale) * rs.
template <class Fam, int R, int NV, int P>
void int8_finish(const QuantJob& qj, int64_t r0, typename Fam::V::I* buf) {
  using V = typename Fam::V;
  using F = typename V::F;
  const PanelJob& j = qj.panel;
  int vo[NV];
  for (int c = 0; c < NV; ++c)
    vo[c] = panel_vec<V::kLanes, NV, P>(j.epilogue == Epilogue::kGated, c);
  // The column scales (one group, fp32) follow the codes.
  const float* scales = reinterpret_cast<const float*>(
      static_cast<const uint8_t*>(j.b) + (j.k + 3) / 4 * unit_bytes(QFamily::kInt8Dot));
  F s[NV];
  static_for<NV>([&](auto c) MOEKIT_INLINE { s[c] = V::load(scales + vo[c] * V::kLanes); });
  for (int r = 0; r < R; ++r) {
    const float* meta = j.a_rows[r0 + r] + qj.a_meta;
    int32_t corr;
    std::memcpy(&corr, meta + 1, 4);
    const auto cv = V::set1_i(corr);
    const F rs = V::set1(meta[0] * qj.post);
    auto x = [&](int c) {
      if (c >= NV) return V::zero();
      return V::mul(V::mul(V::cvt_i(V::sub_i(buf[r * NV + c], cv)), s[c]), rs);
    };
    epilogue<Fam, NV>(j, vo, j.c_rows[r0 + r], x(0), x(1), x(2), x(3));
  }
}

// The C lines rows [r0, r0 + n) will write, asked for in the modified state while the tile's
// last chunk computes: out rows are usually not cached (GEMM2 writes M' x k x H floats), and
// fetching them for ownership at the stores stalled the epilogues.
inline void prefetch_outputs(const PanelJob& j, int64_t r0, int64_t n) {
  for (int64_t r = r0; r < r0 + n; ++r)
    for (int64_t c = 0; c < j.c_valid; c += 16)
      __asm__ volatile("prefetchw %0" : : "m"(*(j.c_rows[r] + j.c_col + c)));
}

template <class Fam>
void gemm_int8(const QuantJob& qj) {
  using I = typename Fam::V::I;
  constexpr int kNV = Fam::kI8Vecs, kRows = Fam::kI8Rows;
  constexpr int kPasses = kPanel / (Fam::V::kLanes * kNV);
  using ChunkFn = void (*)(const QuantJob&, int64_t, int64_t, int64_t, int, I*);
  using FinishFn = void (*)(const QuantJob&, int64_t, I*);
  struct Tables {
    ChunkFn chunk[5][kPasses][kRows];  // [prefetched lines per unit: 0, 1, 2, 4]
    FinishFn finish[kPasses][kRows];
  };
  static constexpr Tables kTables = [] {
    Tables t{};
    static_for<kPasses>([&](auto p) MOEKIT_INLINE {
      static_for<kRows>([&](auto r) MOEKIT_INLINE {
        t.chunk[0][p][r] = &int8_chunk<Fam, r + 1, kNV, p, 0>;
        t.chunk[1][p][r] = &int8_chunk<Fam, r + 1, kNV, p, 1>;
        t.chunk[2][p][r] = &int8_chunk<Fam, r + 1, kNV, p, 2>;
        t.chunk[4][p][r] = &int8_chunk<Fam, r + 1, kNV, p, 4>;
        t.finish[p][r] = &int8_finish<Fam, r + 1, kNV, p>;
      });
    });
    return t;
  }();
  constexpr int64_t kTileVecs = kRows * kNV;
  alignas(64) I buf[kGroupTiles * kPasses * kTileVecs];
  const int64_t rows = qj.panel.rows, units = (qj.panel.k + 3) / 4;
  // Tiles of balanced heights (32 rows: 6, 6, 5, 5, 5, 5 rather than 6 x 5 + 2: a short tile
  // loads the weights for few dot products).
  const int64_t all_tiles = (rows + kRows - 1) / kRows;
  for (int64_t t0 = 0; t0 < all_tiles; t0 += kGroupTiles) {
    const int64_t tiles = all_tiles - t0 < kGroupTiles ? all_tiles - t0 : kGroupTiles;
    for (int64_t i = 0; i < tiles * kPasses * kTileVecs; ++i) buf[i] = Fam::V::set1_i(0);
    // Per tile of the group: first row, rows, and the lines [pf, pf + lines) of each unit its
    // pass 0 prefetches, [4t / tiles, 4(t + 1) / tiles): 1, 2 or 4 (computed once: the
    // divisions cost ~5% when redone per chunk).
    struct Tile {
      int64_t r0, n;
      int pf, lines;
    } tile[kGroupTiles];
    for (int64_t t = 0; t < tiles; ++t) {
      tile[t].r0 = rows * (t0 + t) / all_tiles;
      tile[t].n = rows * (t0 + t + 1) / all_tiles - tile[t].r0;
      tile[t].pf = int(4 * t / tiles);
      tile[t].lines = int(4 * (t + 1) / tiles) - tile[t].pf;
    }
    for (int64_t u0 = 0; u0 < units; u0 += kChunkUnits) {
      const int64_t u1 = units - u0 < kChunkUnits ? units : u0 + kChunkUnits;
      for (int64_t t = 0; t < tiles; ++t) {
        const Tile& tl = tile[t];
        if (u1 == units) prefetch_outputs(qj.panel, tl.r0, tl.n);
        for (int p = 0; p < kPasses; ++p)
          kTables.chunk[p == 0 ? tl.lines : 0][p][tl.n - 1](qj, tl.r0, u0, u1, tl.pf,
                                                            buf + (t * kPasses + p) * kTileVecs);
      }
    }
    for (int64_t t = 0; t < tiles; ++t)
      for (int p = 0; p < kPasses; ++p)
        kTables.finish[p][tile[t].n - 1](qj, tile[t].r0, buf + (t * kPasses + p) * kTileVecs);
  }
  _mm256_zeroupper();
}

// RequantInt8Job (kernels.h): the scalar family's arithmetic, kLanes at a time.
template <class V>
void requant_int8(const RequantInt8Job& jb) {
  using F = typename V::F;
  const int64_t n = jb.n;
  auto lanes = [&](int64_t i) { return int(n - i < V::kLanes ? n - i : V::kLanes); };
  F m = V::zero();
  for (int64_t i = 0; i < n; i += V::kLanes)
    m = V::max(m, V::abs_finite(V::load_n(jb.x + i, lanes(i))));
  float s = V::reduce_max(m) / 127.0f;
  if (s == 0.0f) s = 1.0f;
  const F sv = V::set1(s), lo = V::set1(-127.0f), hi = V::set1(127.0f);
  auto sum = V::set1_i(0);
  for (int64_t i = 0; i < n; i += V::kLanes) {
    const F v = V::min(hi, V::max(lo, V::nan_to_zero(V::div(V::load_n(jb.x + i, lanes(i)), sv))));
    const auto q = V::cvt_f(V::round(v));
    sum = V::add_i(sum, q);  // lanes past n hold 0
    V::store_i8_n(jb.codes + i, q, lanes(i));
  }
  std::memset(jb.codes + n, 0, size_t(jb.n_pad - n));
  jb.meta[0] = s;
  const int32_t corr = 128 * V::reduce_add_i(sum);
  std::memcpy(jb.meta + 1, &corr, 4);
  _mm256_zeroupper();
}

// vpdpbusd register loop: kChains independent accumulators (latency x throughput).
template <class V>
double int8_peak_loop(int64_t iters) {
  constexpr int kChains = 20;
  typename V::I acc[kChains];
  for (auto& v : acc) v = V::set1_i(0);
  typename V::I a = V::set1_i(0x01010101), b = V::set1_i(0x02020202);
  for (int64_t it = 0; it < iters; ++it) {
    static_for<kChains>([&](auto c) MOEKIT_INLINE { acc[c] = V::dpbusd(acc[c], b, a); });
    __asm__ volatile("" : "+x"(a), "+x"(b));
  }
  auto s = V::set1_i(0);
  for (auto& v : acc) s = V::add_i(s, v);
  volatile int32_t sink = V::reduce_add_i(s);
  (void)sink;
  _mm256_zeroupper();
  return double(iters) * kChains * V::kLanes * 4 * 2;
}

}  // namespace
}  // namespace moekit::cpu
