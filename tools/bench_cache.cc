#include "bench_cache.h"

#include <algorithm>
#include <fstream>
#include <string>

#include "bench_parallel.h"

namespace moekit::cli {

int64_t last_level_cache_bytes() {
  int64_t best_level = 0, best_bytes = 0;
  for (int index = 0;; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index);
    std::ifstream level_file(dir + "/level"), size_file(dir + "/size");
    int64_t level = 0, size = 0;
    std::string unit;  // "K" or "M" follows the number, e.g. "266240K"
    if (!(level_file >> level) || !(size_file >> size)) break;
    size_file >> unit;
    size *= unit == "M" ? 1 << 20 : unit == "K" ? 1 << 10 : 1;
    if (level >= best_level) best_level = level, best_bytes = size;
  }
  return best_bytes;
}

CacheFlusher::CacheFlusher(int threads)
    : threads_(threads),
      bytes_(std::max<int64_t>(2 * last_level_cache_bytes(), int64_t(512) << 20)),
      buffer_(Tensor::zeros(DType::kU8, {bytes_})) {}

void CacheFlusher::flush() {
  constexpr int64_t kLineWords = 64 / sizeof(uint64_t);
  uint64_t* words = buffer_.data<uint64_t>();
  parallel_for(bytes_ / 64, threads_, [&](int64_t begin, int64_t end) {
    for (int64_t line = begin; line < end; ++line) words[line * kLineWords] += 1;
  });
}

}  // namespace moekit::cli
