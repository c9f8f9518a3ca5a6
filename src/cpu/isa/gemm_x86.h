// Panel GEMM micro-kernels for the x86 families, written once over a Family:
//   Family::V               vector wrapper (vec_x86.h)
//   Family::kRowsBf16/F32   rows of the register tile
//   Family::kVecsBf16/F32   vectors of accumulator columns per row; a panel of kPanel columns is
//                           swept in kPanel / (lanes * vecs) passes
// A rows are fp32 (for bf16 weights they hold bf16 values, so every product is exact).
// bf16 weights: each K-pair vector of the panel (lanes columns x 2) is widened once into its
// even and odd halves (one shift, one and) and used by the R rows through FMAs whose A operand
// is a broadcast from memory. On this machine (Emerald Rapids) vdpbf16ps retires half the flops
// of two FMA ports, so widening + FMA is the faster path: 8 + 8R port-0/5 uops per K-pair for
// 4R vectors of 2 products each (R = 7: 7/8 of the FMA peak). The odd product is added before
// the even one, as vdpbf16ps and the scalar family do, so all families agree bit for bit.
#pragma once

#include <utility>

#include "cpu/isa/math_x86.h"
#include "cpu/kernels.h"

namespace moekit::cpu {
namespace {

// Lambdas of the register tiles must inline (GCC's size heuristics otherwise outline the larger
// decoder loops, and the tiles then live on the stack): [&](auto c) MOEKIT_INLINE { ... }.
#define MOEKIT_INLINE __attribute__((always_inline))

// f(integral_constant<0>) ... f(integral_constant<N-1>): loop indices that are constants from
// the start, so the register tiles (arrays of vectors) become registers (#pragma unroll comes
// too late for that, and leaves the accumulators stored to the stack every iteration).
template <int N, typename Fn>
__attribute__((always_inline)) constexpr void static_for(Fn&& f) {
  [&]<int... I>(std::integer_sequence<int, I...>) __attribute__((always_inline)) {
    (f(std::integral_constant<int, I>{}), ...);
  }
  (std::make_integer_sequence<int, N>{});
}

// Vector index within the panel of accumulator column c in pass P. Gated panels pair gate
// vector i with up vector kPanel/2/lanes + i, so both halves meet in one pass.
template <int kLanes, int kVecs, int P>
constexpr int panel_vec(bool gated, int c) {
  constexpr int kHalf = kVecs / 2;
  if (kVecs * kLanes == kPanel || !gated) return P * kVecs + c;  // one pass: same order
  return c < kHalf ? P * kHalf + c : kPanel / 2 / kLanes + P * kHalf + (c - kHalf);
}

// One K step of a panel is 256 bytes in both layouts ([2][kPanel] bf16, [kPanel] fp32).
// kHint: kNoPrefetch, or _MM_HINT_T0 / _MM_HINT_T1 (into L1 / into L2).
constexpr int kNoPrefetch = -1;
template <int kHint>
inline void prefetch_row(const void* bk, int64_t ahead) {
  if constexpr (kHint != kNoPrefetch) {
    const char* p = static_cast<const char*>(bk) + ahead;
    for (int l = 0; l < 4; ++l) _mm_prefetch(p + l * 64, _mm_hint(kHint));
  }
}

// The K loop over one panel, by weight type: bf16 panels advance in pairs, fp32 one by one.
template <class Fam, typename W>
struct KStep;

template <class Fam>
struct KStep<Fam, uint16_t> {
  using V = typename Fam::V;
  static constexpr int kRows = Fam::kRowsBf16, kVecs = Fam::kVecsBf16;
  // A rows hold a zero at [k] when k is odd (the packed panel holds zeros there too), so the
  // loop runs over whole K-pairs; no tail (a tail, like a run-time prefetch branch, makes the
  // compiler store the accumulators to the stack in every iteration).
  template <int R, int NV, int kHint>
  static void run(typename V::F (&acc)[R][NV], const float* const* a, const uint16_t* b, int64_t k,
                  const int (&vo)[NV], int64_t prefetch) {
    const auto hi = V::set1_i(int32_t(0xffff0000u));
    const int64_t kp = (k + 1) / 2;
    for (int64_t kk = 0; kk < kp; ++kk) {
      const uint16_t* bk = b + kk * 2 * kPanel;
      prefetch_row<kHint>(bk, prefetch);
      static_for<NV>([&](auto c) {
        const auto raw = V::load_i(bk + vo[c] * 2 * V::kLanes);
        const auto even = V::as_f(V::slli(raw, 16)), odd = V::as_f(V::and_(raw, hi));
        static_for<R>([&](auto r) {
          acc[r][c] =
              V::fma_bcast(V::fma_bcast(acc[r][c], odd, &a[r][2 * kk + 1]), even, &a[r][2 * kk]);
        });
      });
    }
  }
};

template <class Fam>
struct KStep<Fam, float> {
  using V = typename Fam::V;
  static constexpr int kRows = Fam::kRowsF32, kVecs = Fam::kVecsF32;
  template <int R, int NV, int kHint>
  static void run(typename V::F (&acc)[R][NV], const float* const* a, const float* b, int64_t k,
                  const int (&vo)[NV], int64_t prefetch) {
    for (int64_t kk = 0; kk < k; ++kk) {
      const float* bk = b + kk * kPanel;
      prefetch_row<kHint>(bk, prefetch);
      typename V::F bv[NV];
      static_for<NV>([&](auto c) { bv[c] = V::load(bk + vo[c] * V::kLanes); });
      static_for<R>([&](auto r) {
        const auto av = V::set1(a[r][kk]);
        static_for<NV>([&](auto c) { acc[r][c] = V::fma(av, bv[c], acc[r][c]); });
      });
    }
  }
};

// Bias, activation and store of one row of accumulators (NV <= 4 vectors x0.., columns vo).
// The vectors come by value (in registers): an array argument would give the accumulators an
// address, and the compiler then stores them to the stack in every K iteration.
template <class Fam, int NV>
__attribute__((noinline)) void epilogue(const PanelJob& j, const int (&vo)[NV], float* c_row,
                                        typename Fam::V::F x0, typename Fam::V::F x1,
                                        typename Fam::V::F x2, typename Fam::V::F x3) {
  using V = typename Fam::V;
  static_assert(NV <= 4);
  const typename V::F x[4] = {x0, x1, x2, x3};
  constexpr int kL = V::kLanes;
  auto valid = [&](int v) {
    const int64_t n = j.c_valid - v * kL;
    return n < 0 ? 0 : n > kL ? kL : int(n);
  };
  auto biased = [&](int c) { return V::add(x[c], V::load(j.bias + vo[c] * kL)); };
  auto store_mid = [&](int c, typename V::F h) {
    V::store_n(c_row + j.c_col + vo[c] * kL, j.round_bf16 ? V::round_bf16(h) : h, valid(vo[c]));
  };
  switch (j.epilogue) {
    case Epilogue::kGated:
      for (int c = 0; c < NV / 2; ++c)
        store_mid(c, vactivation<V>(j.fn, true, j.alpha, j.limit, biased(c), biased(NV / 2 + c)));
      break;
    case Epilogue::kAct:
      for (int c = 0; c < NV; ++c)
        store_mid(c, vactivation<V>(j.fn, false, j.alpha, j.limit, biased(c), V::zero()));
      break;
    case Epilogue::kStore:
      for (int c = 0; c < NV; ++c)
        V::store_n(c_row + j.c_col + vo[c] * kL, biased(c), valid(vo[c]));
      break;
  }
}

// One register tile: R rows from r0, pass P of the panel. The first tile of a panel streams B
// from memory (prefetching if asked); later tiles find it in L2, and the second one prefetches
// the next panel into L2 so that the next first tile does not wait on DRAM.
template <class Fam, typename W, int R, int P>
void tile(const PanelJob& j, int64_t r0) {
  using V = typename Fam::V;
  using K = KStep<Fam, W>;
  constexpr int NV = K::kVecs;
  const bool gated = j.epilogue == Epilogue::kGated;
  int vo[NV];
  for (int c = 0; c < NV; ++c) vo[c] = panel_vec<V::kLanes, NV, P>(gated, c);
  const float* a[R];
  for (int r = 0; r < R; ++r) a[r] = j.a_rows[r0 + r];
  typename V::F acc[R][NV];
  static_for<R>([&](auto r) { static_for<NV>([&](auto c) { acc[r][c] = V::zero(); }); });
  const W* b = static_cast<const W*>(j.b);
  if (r0 == 0 && j.prefetch > 0)  // streams this panel from DRAM
    K::template run<R, NV, _MM_HINT_T0>(acc, a, b, j.k, vo, j.prefetch);
  else if (r0 == K::kRows && j.prefetch_next > 0)  // brings the next panel to L2 meanwhile
    K::template run<R, NV, _MM_HINT_T1>(acc, a, b, j.k, vo, j.prefetch_next);
  else
    K::template run<R, NV, kNoPrefetch>(acc, a, b, j.k, vo, 0);
  static_for<R>([&](auto r) {
    auto x = [&](int c) { return c < NV ? acc[r][c < NV ? c : 0] : V::zero(); };
    epilogue<Fam, NV>(j, vo, j.c_rows[r0 + r], x(0), x(1), x(2), x(3));
  });
}

// The tiles of every pass and row count: fn[pass][rows - 1]. (Plain arrays in this unit's
// anonymous namespace: no library template is instantiated with this unit's ISA flags.)
using TileFn = void (*)(const PanelJob&, int64_t);
template <int kPasses, int kRows>
struct TileTable {
  TileFn fn[kPasses][kRows];
};

// The same for the quantized kernels (gemm_x86_quant.h, gemm_x86_int8.h).
using QuantTileFn = void (*)(const QuantJob&, int64_t);
template <int kPasses, int kRows>
struct QuantTileTable {
  QuantTileFn fn[kPasses][kRows];
};

template <class Fam, typename W, int kPasses, int kRows>
constexpr TileTable<kPasses, kRows> make_tile_table() {
  TileTable<kPasses, kRows> t{};
  static_for<kPasses>(
      [&](auto p) { static_for<kRows>([&](auto r) { t.fn[p][r] = &tile<Fam, W, r + 1, p>; }); });
  return t;
}

// The panel: row tiles of kRows (the last one shorter), every pass of each tile while its A
// rows are hot.
template <class Fam, typename W>
void gemm(const PanelJob& j) {
  using K = KStep<Fam, W>;
  constexpr int kPasses = kPanel / (Fam::V::kLanes * K::kVecs);
  static constexpr auto kTiles = make_tile_table<Fam, W, kPasses, K::kRows>();
  for (int64_t r0 = 0; r0 < j.rows; r0 += K::kRows) {
    const int64_t n = j.rows - r0 < K::kRows ? j.rows - r0 : K::kRows;
    for (int p = 0; p < kPasses; ++p) kTiles.fn[p][n - 1](j, r0);
  }
  // GCC does not count the inline-asm FMAs as dirtying the upper vector state, so the tiles
  // return without vzeroupper; without one here the caller's SSE code (routing, reductions) ran
  // 15-40x slower after a forward.
  _mm256_zeroupper();
}

}  // namespace
}  // namespace moekit::cpu
