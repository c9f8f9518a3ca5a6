// Quantized panel GEMMs of the x86 FMA families for the element families whose codes are
// decoded in registers and FMAed (kNibble, kByte, kFp8; layouts and the order of operations in
// kernels.h). Written once over a Family (vec_x86.h wrapper V plus tile sizes):
//   Family::kQRows x kQVecs            tile of many rows (a panel of kPanel columns is swept in
//                                      kPanel / (lanes * kQVecs) passes)
//   Family::kQSmallRows x kQSmallVecs  tile for panels of few rows (decode)
// A tile holds an fp32 accumulator and a partial sum per (row, vector): the partial sums take a
// scale group's products, then are scaled into the accumulators. Which tile computes an element
// never changes its bits, so results do not depend on how many rows an expert has (batch
// invariance) nor on the thread that runs the tile.
#pragma once

#include "cpu/isa/gemm_x86.h"

namespace moekit::cpu {
namespace {

// ---- decoders: one unit of codes (kernels.h) into fp32 values, kLanes columns at a time ----
// unit<R, NV>(part, a, k0, u, vo) adds A[r][k0 + i] * value(code of column vo[c], step i) into
// part[r][c] for the unit's steps i, in order.

template <class V>
struct NibbleDecoder {
  static constexpr QFamily kFamily = QFamily::kNibble;
  typename V::Lut lut;
  explicit NibbleDecoder(const QuantJob& qj) : lut(V::load_lut(qj.q.table)) {}
  template <int R, int NV>
  __attribute__((always_inline)) void unit(typename V::F (&part)[R][NV], const float* const (&a)[R],
                                           int64_t k0, const uint8_t* u,
                                           const int (&vo)[NV]) const {
    // Step 2j + h is nibble h of byte j of each lane: loading the lanes j bytes further puts
    // byte j lowest (the permute reads bits 0-3 only), so the load port does the byte moves
    // and only the high nibbles need a shift: 4 shifts per 8 steps instead of 7.
    static_for<4>([&](auto j) MOEKIT_INLINE {
      typename V::I raw[NV];
      static_for<NV>([&](auto c) MOEKIT_INLINE { raw[c] = V::load_i(u + vo[c] * V::kLanes * 4 + j); });
      static_for<2>([&](auto h) MOEKIT_INLINE {
        static_for<NV>([&](auto c) MOEKIT_INLINE {
          const auto w = V::lut16(lut, h == 0 ? raw[c] : V::srli(raw[c], 4));
          static_for<R>([&](auto r) MOEKIT_INLINE {
            part[r][c] = V::fma_bcast(part[r][c], w, &a[r][k0 + 2 * j + h]);
          });
        });
      });
    });
  }
};

// One byte per column and K-step; Bytes::template get<V>(p) turns kLanes bytes into values.
template <class V, class Bytes, QFamily F>
struct ByteDecoder {
  static constexpr QFamily kFamily = F;
  explicit ByteDecoder(const QuantJob&) {}
  template <int R, int NV>
  __attribute__((always_inline)) void unit(typename V::F (&part)[R][NV], const float* const (&a)[R],
                                           int64_t k0, const uint8_t* u,
                                           const int (&vo)[NV]) const {
    static_for<NV>([&](auto c) MOEKIT_INLINE {
      const auto w = Bytes::template get<V>(u + vo[c] * V::kLanes);
      static_for<R>([&](auto r)
                        MOEKIT_INLINE { part[r][c] = V::fma_bcast(part[r][c], w, &a[r][k0]); });
    });
  }
};
struct Int8Bytes {
  template <class V>
  static typename V::F get(const void* p) {
    return V::i8_to_f(p);
  }
};
struct Uint8Bytes {
  template <class V>
  static typename V::F get(const void* p) {
    return V::u8_to_f(p);
  }
};
struct E4m3Bytes {
  template <class V>
  static typename V::F get(const void* p) {
    return V::e4m3_to_f(p);
  }
};
template <class V>
using Int8Decoder = ByteDecoder<V, Int8Bytes, QFamily::kByte>;
template <class V>
using Uint8Decoder = ByteDecoder<V, Uint8Bytes, QFamily::kByte>;

// e4m3: as ByteDecoder, but a tile that holds the whole panel (vectors 0, 1, 2, 3 in order)
// widens two vectors' codes at once (V512): 4 instead of 5 uops per vector, the decode being
// most of the work of a decode-time (one row) tile.
template <class V>
struct Fp8Decoder : ByteDecoder<V, E4m3Bytes, QFamily::kFp8> {
  using ByteDecoder<V, E4m3Bytes, QFamily::kFp8>::ByteDecoder;
  template <int R, int NV>
  __attribute__((always_inline)) void unit(typename V::F (&part)[R][NV], const float* const (&a)[R],
                                           int64_t k0, const uint8_t* u,
                                           const int (&vo)[NV]) const {
    if constexpr (V::kLanes * NV == kPanel && V::kLanes == 16) {
      static_for<NV / 2>([&](auto h) MOEKIT_INLINE {
        typename V::F w0, w1;
        V::e4m3x2_to_f(u + 2 * h * V::kLanes, w0, w1);
        static_for<R>([&](auto r) MOEKIT_INLINE {
          part[r][2 * h] = V::fma_bcast(part[r][2 * h], w0, &a[r][k0]);
          part[r][2 * h + 1] = V::fma_bcast(part[r][2 * h + 1], w1, &a[r][k0]);
        });
      });
    } else {
      ByteDecoder<V, E4m3Bytes, QFamily::kFp8>::template unit<R, NV>(part, a, k0, u, vo);
    }
  }
};

template <class V, ScaleStore S>
typename V::F load_scales(const uint8_t* p) {
  if constexpr (S == ScaleStore::kF32)
    return V::load(reinterpret_cast<const float*>(p));
  else if constexpr (S == ScaleStore::kBF16)
    return V::bf16_to_f(p);
  else
    return V::e8_to_f(p);
}

// A kernel configuration: decoder, scale store, zero point, per-block activation scales.
template <template <class> class Dec, ScaleStore S, bool ZP, bool RB>
struct QConfig {
  template <class V>
  using Decoder = Dec<V>;
  static constexpr ScaleStore kScale = S;
  static constexpr bool kZeroPoint = ZP, kBlockAct = RB;
};

// One register tile: R rows from r0, pass P of the panel, all scale groups.
template <class Fam, class Q, int R, int NV, int P>
void quant_tile(const QuantJob& qj, int64_t r0) {
  using V = typename Fam::V;
  using F = typename V::F;
  using D = typename Q::template Decoder<V>;
  constexpr QFamily kFam = D::kFamily;
  constexpr int64_t kSteps = unit_steps(kFam), kUnitBytes = unit_bytes(kFam);
  constexpr int64_t kScaleBytes = kPanel * scale_bytes(Q::kScale);
  const PanelJob& j = qj.panel;
  const D dec(qj);
  int vo[NV];
  for (int c = 0; c < NV; ++c)
    vo[c] = panel_vec<V::kLanes, NV, P>(j.epilogue == Epilogue::kGated, c);
  const float* a[R];
  const float* meta[R];
  for (int r = 0; r < R; ++r) a[r] = j.a_rows[r0 + r], meta[r] = a[r] + qj.a_meta;
  F acc[R][NV];
  static_for<R>([&](auto r) MOEKIT_INLINE {
    static_for<NV>([&](auto c) MOEKIT_INLINE { acc[r][c] = V::zero(); });
  });
  const int64_t G = qj.q.group, groups = (j.k + G - 1) / G;
  const int64_t group_bytes = G / kSteps * kUnitBytes + kScaleBytes + (Q::kZeroPoint ? kPanel : 0);
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* u = static_cast<const uint8_t*>(j.b) + g * group_bytes;
    const int64_t k0 = g * G, units = ((j.k - k0 < G ? j.k - k0 : G) + kSteps - 1) / kSteps;
    F part[R][NV];
    static_for<R>([&](auto r) MOEKIT_INLINE {
      static_for<NV>([&](auto c) MOEKIT_INLINE { part[r][c] = V::zero(); });
    });
    for (int64_t i = 0; i < units; ++i, u += kUnitBytes) {
      // Into L1 and, further ahead, into L2 (kernels.h QuantJob), in every row tile: a run-time
      // branch here would cost the accumulators their registers, and later tiles find these
      // lines cached.
      for (int l = 0; l < kUnitBytes / 64; ++l) {
        _mm_prefetch(reinterpret_cast<const char*>(u) + j.prefetch + 64 * l, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(u) + qj.prefetch_l2 + 64 * l, _MM_HINT_T1);
      }
      dec.template unit<R, NV>(part, a, k0 + i * kSteps, u, vo);
    }
    F s[NV], z[NV];
    static_for<NV>([&](auto c) MOEKIT_INLINE {
      s[c] = load_scales<V, Q::kScale>(u + vo[c] * V::kLanes * scale_bytes(Q::kScale));
      if constexpr (Q::kZeroPoint) z[c] = V::u8_to_f(u + kScaleBytes + vo[c] * V::kLanes);
    });
    static_for<R>([&](auto r) MOEKIT_INLINE {
      static_for<NV>([&](auto c) MOEKIT_INLINE {
        F p = part[r][c], sc = s[c];
        if constexpr (Q::kZeroPoint) p = V::fnmadd(z[c], V::set1(meta[r][1 + g]), p);
        if constexpr (Q::kBlockAct) sc = V::mul(sc, V::set1(meta[r][1 + groups + g]));
        acc[r][c] = V::fma(p, sc, acc[r][c]);
      });
    });
  }
  static_for<R>([&](auto r) MOEKIT_INLINE {
    const F rs = V::set1(meta[r][0] * qj.post);
    auto x = [&](int c) { return c < NV ? V::mul(acc[r][c < NV ? c : 0], rs) : V::zero(); };
    epilogue<Fam, NV>(j, vo, j.c_rows[r0 + r], x(0), x(1), x(2), x(3));
  });
}

template <class Fam, class Q, int NV, int kRows>
constexpr auto make_quant_tiles() {
  constexpr int kPasses = kPanel / (Fam::V::kLanes * NV);
  QuantTileTable<kPasses, kRows> t{};
  static_for<kPasses>([&](auto p) MOEKIT_INLINE {
    static_for<kRows>([&](auto r)
                          MOEKIT_INLINE { t.fn[p][r] = &quant_tile<Fam, Q, r + 1, NV, p>; });
  });
  return t;
}

// The panel: one small tile for few rows, else row tiles of kQRows (the last one shorter),
// every pass of each tile while its A rows are hot.
template <class Fam, class Q>
void quant_gemm(const QuantJob& qj) {
  constexpr int kSmallNV = Fam::kQSmallVecs, kNV = Fam::kQVecs;
  static constexpr auto kSmall = make_quant_tiles<Fam, Q, kSmallNV, Fam::kQSmallRows>();
  static constexpr auto kTiles = make_quant_tiles<Fam, Q, kNV, Fam::kQRows>();
  const int64_t rows = qj.panel.rows;
  if (rows <= Fam::kQSmallRows) {
    for (int p = 0; p < kPanel / (Fam::V::kLanes * kSmallNV); ++p) kSmall.fn[p][rows - 1](qj, 0);
  } else {
    for (int64_t r0 = 0; r0 < rows; r0 += Fam::kQRows) {
      const int64_t n = rows - r0 < Fam::kQRows ? rows - r0 : Fam::kQRows;
      for (int p = 0; p < kPanel / (Fam::V::kLanes * kNV); ++p) kTiles.fn[p][n - 1](qj, r0);
    }
  }
  _mm256_zeroupper();  // see gemm()
}

// The kernels of each family, chosen by the panel's scale store and zero point.
template <class Fam>
void gemm_nibble(const QuantJob& qj) {
  using S = ScaleStore;
  const bool zp = qj.q.zero_point;
  switch (qj.q.scale) {
    case S::kF32:
      return zp ? quant_gemm<Fam, QConfig<NibbleDecoder, S::kF32, true, false>>(qj)
                : quant_gemm<Fam, QConfig<NibbleDecoder, S::kF32, false, false>>(qj);
    case S::kBF16:
      return zp ? quant_gemm<Fam, QConfig<NibbleDecoder, S::kBF16, true, false>>(qj)
                : quant_gemm<Fam, QConfig<NibbleDecoder, S::kBF16, false, false>>(qj);
    case S::kE8:  // ue8m0 scales (mxfp4) have no zero point
      return quant_gemm<Fam, QConfig<NibbleDecoder, S::kE8, false, false>>(qj);
  }
}

// int8 codes carry no zero point; uint8 codes always do.
template <class Fam>
void gemm_byte(const QuantJob& qj) {
  using S = ScaleStore;
  if (qj.q.scale == S::kBF16)
    return qj.q.is_signed ? quant_gemm<Fam, QConfig<Int8Decoder, S::kBF16, false, false>>(qj)
                          : quant_gemm<Fam, QConfig<Uint8Decoder, S::kBF16, true, false>>(qj);
  return qj.q.is_signed ? quant_gemm<Fam, QConfig<Int8Decoder, S::kF32, false, false>>(qj)
                        : quant_gemm<Fam, QConfig<Uint8Decoder, S::kF32, true, false>>(qj);
}

// e4m3 weights keep fp32 scales (tensor, channel or block; ue8m0 block scales widened).
template <class Fam>
void gemm_fp8(const QuantJob& qj) {
  return qj.q.block_act_scale
             ? quant_gemm<Fam, QConfig<Fp8Decoder, ScaleStore::kF32, false, true>>(qj)
             : quant_gemm<Fam, QConfig<Fp8Decoder, ScaleStore::kF32, false, false>>(qj);
}

}  // namespace
}  // namespace moekit::cpu
