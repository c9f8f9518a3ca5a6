// Cache flushing between timed runs, so that every rep reads its weights from DRAM as a serving
// engine does after the other layers of the model ran, not from a warm last-level cache.
#pragma once

#include <cstdint>

#include "moekit/core/tensor.h"

namespace moekit::cli {

// Size of the largest cache level of CPU 0 from sysfs (0 when unknown).
int64_t last_level_cache_bytes();

class CacheFlusher {
 public:
  // A buffer of max(2 x last-level cache, 512 MiB), touched by `threads` threads.
  explicit CacheFlusher(int threads);
  int64_t bytes() const { return bytes_; }
  // Reads and writes one word of every cache line of the buffer.
  void flush();

 private:
  int threads_;
  int64_t bytes_;
  Tensor buffer_;
};

}  // namespace moekit::cli
