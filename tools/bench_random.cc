#include "bench_random.h"

#include <algorithm>
#include <cmath>

#include "bench_parallel.h"

namespace moekit::cli {
namespace {

// splitmix64's finalizer: a bijective mix with good avalanche, one multiply chain per value.
constexpr uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// A standard normal approximated by the Irwin-Hall sum of the four 16-bit quarters of one hash.
inline float normal_at(uint64_t key, uint64_t counter) {
  const uint64_t h = mix(key + counter * 0x9e3779b97f4a7c15ull);
  const float sum = float(h & 0xffff) + float((h >> 16) & 0xffff) + float((h >> 32) & 0xffff) +
                    float(h >> 48);
  // Each quarter is uniform on {0..65535}: mean 32767.5, variance ~65536^2/12.
  constexpr float kMean = 4 * 32767.5f;
  constexpr float kInvStd = 1.7320508f / 65536.0f;  // 1 / (65536 * sqrt(4/12))
  return (sum - kMean) * kInvStd;
}

template <typename T, typename Convert>
void fill_blocks(T* out, uint64_t key, int64_t block, std::span<const int32_t> block_ids,
                 float stddev, int threads, Convert convert) {
  const int64_t n = int64_t(block_ids.size()) * block;
  parallel_for(n, threads, [&](int64_t begin, int64_t end) {
    // Walk block by block: a division per element would cost more than the hash.
    int64_t b = begin / block, offset = begin % block;
    for (int64_t j = begin; j < end; ++b, offset = 0) {
      const int64_t stop = std::min(end, j + block - offset);
      const uint64_t base = uint64_t(block_ids[b]) * block + offset - j;  // counter = base + j
      for (; j < stop; ++j) out[j] = convert(stddev * normal_at(key, base + j));
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
  RandomExperts r;
  r.w13 = Tensor(spec.dtype, {n, rows, h});
  r.w2 = Tensor(spec.dtype, {n, h, i});
  auto stream = [&](uint64_t role) { return RandomStream{spec.seed, spec.stream_base + role}; };
  fill_normal_blocks(r.w13, stream(0), rows * h, experts, 1.0f / std::sqrt(float(h)), threads);
  fill_normal_blocks(r.w2, stream(1), h * i, experts, 1.0f / std::sqrt(float(i)), threads);
  if (spec.has_bias) {
    r.b13 = Tensor(spec.dtype, {n, rows});
    r.b2 = Tensor(spec.dtype, {n, h});
    fill_normal_blocks(r.b13, stream(2), rows, experts, kBiasStd, threads);
    fill_normal_blocks(r.b2, stream(3), h, experts, kBiasStd, threads);
  }
  return r;
}

}  // namespace moekit::cli
