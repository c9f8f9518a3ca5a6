#include "bench_random.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "bench_parallel.h"
#include "layer_spec.h"

namespace moekit::cli {
namespace {

// splitmix64's finalizer: a bijective mix with good avalanche, one multiply chain per value.
constexpr uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Standard normal quantiles at the midpoints of 2^16 equal-probability bins: a 16-bit uniform
// indexes it to give a normal value (tails reach 4.3 sigma), so one 64-bit hash yields four.
const std::array<float, 1 << 16>& normal_quantiles() {
  static const auto table = [] {
    std::array<float, 1 << 16> q{};
    constexpr int kHalf = 1 << 15;
    // Newton on Phi(x) = p from the centre outwards: Phi is convex below 0, so each root is
    // approached from the right, starting at the previous (larger) quantile.
    double x = 0;
    for (int u = kHalf - 1; u >= 0; --u) {
      const double p = (u + 0.5) / (1 << 16);
      for (int it = 0; it < 50; ++it) {
        const double f = 0.5 * std::erfc(-x / std::sqrt(2.0)) - p;
        const double step = f / (std::exp(-0.5 * x * x) / std::sqrt(2.0 * M_PI));
        x -= step;
        if (std::abs(step) < 1e-12) break;
      }
      q[u] = float(x);
      q[(1 << 16) - 1 - u] = float(-x);
    }
    return q;
  }();
  return table;
}

template <typename T, typename Convert>
void fill_blocks(T* out, uint64_t key, int64_t block, std::span<const int32_t> block_ids,
                 float stddev, int threads, Convert convert) {
  // The values in T, scaled: the conversion then costs nothing per element.
  std::vector<T> lut(1 << 16);
  const std::array<float, 1 << 16>& quantile = normal_quantiles();
  for (size_t u = 0; u < lut.size(); ++u) lut[u] = convert(stddev * quantile[u]);
  const int64_t n = int64_t(block_ids.size()) * block;
  // Value of counter c: quarter c % 4 of hash(c / 4), so that any slice regenerates exactly.
  auto hash = [key](uint64_t group) { return mix(key + group * 0x9e3779b97f4a7c15ull); };
  auto value = [&](uint64_t c) { return lut[(hash(c >> 2) >> (16 * (c & 3))) & 0xffff]; };
  // out[j, stop) from counters c, c + 1, ...: whole hashes for aligned groups of four.
  auto fill_run = [&](int64_t j, int64_t stop, uint64_t c) {
    for (; j < stop && (c & 3); ++j, ++c) out[j] = value(c);
    for (; j + 4 <= stop; j += 4, c += 4) {
      const uint64_t h = hash(c >> 2);
      out[j] = lut[h & 0xffff];
      out[j + 1] = lut[(h >> 16) & 0xffff];
      out[j + 2] = lut[(h >> 32) & 0xffff];
      out[j + 3] = lut[h >> 48];
    }
    for (; j < stop; ++j, ++c) out[j] = value(c);
  };
  parallel_for(n, threads, [&](int64_t begin, int64_t end) {
    // Block by block: a division per element would cost more than the value.
    int64_t b = begin / block, offset = begin % block;
    for (int64_t j = begin; j < end; ++b, offset = 0) {
      const int64_t stop = std::min(end, j + block - offset);
      fill_run(j, stop, uint64_t(block_ids[b]) * block + offset);
      j = stop;
    }
  });
}

// Fills t, seen as blocks of `block` elements, with block b taking the values of block
// block_ids[b] of the stream. The one place that switches on the output dtype.
void fill_normal_blocks(const TensorView& t, RandomStream stream, int64_t block,
                        std::span<const int32_t> block_ids, float stddev, int threads) {
  MOEKIT_CHECK(t.is_contiguous() && t.numel() == block * int64_t(block_ids.size()),
               "fill_normal: expected a contiguous tensor of ", block_ids.size(), " blocks of ",
               block, ", got ", t.str());
  const uint64_t key = mix(stream.seed ^ mix(stream.id + 1));
  switch (t.dtype) {
    case DType::kF32:
      return fill_blocks(t.ptr<float>(), key, block, block_ids, stddev, threads,
                         [](float v) { return v; });
    case DType::kBF16:
      return fill_blocks(t.ptr<uint16_t>(), key, block, block_ids, stddev, threads,
                         [](float v) { return float_to_bf16(v); });
    case DType::kF16:
      return fill_blocks(t.ptr<uint16_t>(), key, block, block_ids, stddev, threads,
                         [](float v) { return float_to_f16(v); });
    default:
      MOEKIT_FAIL("fill_normal: no random values for dtype ", name(t.dtype));
  }
}

}  // namespace

void fill_normal(const TensorView& t, RandomStream stream, float stddev, int threads) {
  const int32_t whole[] = {0};
  fill_normal_blocks(t, stream, t.numel(), whole, stddev, threads);
}

RandomExperts make_random_experts(const RandomExpertsSpec& spec, std::span<const int32_t> experts,
                                  int threads) {
  // Biases are small next to the O(1) products so the check still exercises the matrix paths.
  constexpr float kBiasStd = 0.1f;
  const int64_t n = int64_t(experts.size());
  const int64_t h = spec.hidden, i = spec.intermediate, rows = spec.activation.w13_rows(i);
  const DType dtype = io_dtype(spec.format);  // quantized formats: drawn in bf16, then quantized
  RandomExperts r;
  r.w13 = Tensor(dtype, {n, rows, h});
  r.w2 = Tensor(dtype, {n, h, i});
  auto stream = [&](uint64_t role) { return RandomStream{spec.seed, spec.stream_base + role}; };
  fill_normal_blocks(r.w13, stream(0), rows * h, experts, 1.0f / std::sqrt(float(h)), threads);
  fill_normal_blocks(r.w2, stream(1), h * i, experts, 1.0f / std::sqrt(float(i)), threads);
  if (spec.has_bias) {
    r.b13 = Tensor(dtype, {n, rows});
    r.b2 = Tensor(dtype, {n, h});
    fill_normal_blocks(r.b13, stream(2), rows, experts, kBiasStd, threads);
    fill_normal_blocks(r.b2, stream(3), h, experts, kBiasStd, threads);
  }
  if (!spec.format.is_float()) {
    r.quantized = quantize_expert_weights(r.view(), spec.format);
    r.w13 = Tensor();  // the bf16 copies are not needed any more (biases stay)
    r.w2 = Tensor();
  }
  return r;
}

}  // namespace moekit::cli
