// Tiles [0, n) of one phase of apply() shared by the threads of the pool: thread t owns a
// contiguous range (balanced by an estimate of cost, so that each thread streams a contiguous
// range of packed weights) and takes tiles from its front; a thread that runs out takes tiles
// from the back of the others' ranges, so a thread delayed by another process on its core (or a
// wrong estimate) does not hold up the phase. Which thread runs a tile never changes what the
// tile computes: results stay bit-identical.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace moekit::cpu {

class TileSchedule {
 public:
  // Bytes of storage for `threads` ranges (one cache line each, from the caller's workspace).
  static size_t bytes(int threads) { return size_t(threads) * sizeof(Range); }
  TileSchedule(void* storage, int threads)
      : ranges_(static_cast<Range*>(storage)), threads_(threads) {}

  // Thread t owns [bounds[t], bounds[t + 1]); bounds has threads + 1 entries. Call before the
  // phase starts (the pool's start publishes it).
  void assign(const int64_t* bounds) {
    for (int t = 0; t < threads_; ++t)
      new (&ranges_[t]) Range{pack(uint32_t(bounds[t]), uint32_t(bounds[t + 1]))};
  }

  // Runs fn(tile) for the tiles thread t gets: its own, then those it takes from others.
  template <typename Fn>
  void run(int t, Fn&& fn) {
    int64_t tile;
    while (take(ranges_[t], true, &tile)) fn(tile);
    for (int d = 1; d < threads_; ++d) {
      Range& other = ranges_[(t + d) % threads_];
      while (take(other, false, &tile)) fn(tile);
    }
  }

 private:
  // [front, back) in one word, so that the owner (front) and thieves (back) never both get a
  // tile.
  struct alignas(64) Range {
    std::atomic<uint64_t> word;
  };
  static uint64_t pack(uint32_t front, uint32_t back) { return uint64_t(front) << 32 | back; }

  static bool take(Range& r, bool front, int64_t* tile) {
    uint64_t w = r.word.load(std::memory_order_relaxed);
    for (;;) {
      const uint32_t f = uint32_t(w >> 32), b = uint32_t(w);
      if (f >= b) return false;
      const uint64_t next = front ? pack(f + 1, b) : pack(f, b - 1);
      if (r.word.compare_exchange_weak(w, next, std::memory_order_relaxed)) {
        *tile = front ? f : b - 1;
        return true;
      }
    }
  }

  Range* ranges_;
  int threads_;
};

}  // namespace moekit::cpu
