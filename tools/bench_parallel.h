// A fork-join loop for the tool's own bulk work (random weights, cache flushing): the library's
// thread pool is private to the CPU backend, and these loops run outside any timed region.
#pragma once

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace moekit::cli {

// Calls fn(begin, end) on `threads` contiguous pieces of [0, n), one std::thread each.
template <typename Fn>
void parallel_for(int64_t n, int threads, Fn&& fn) {
  const int64_t pieces = std::clamp<int64_t>(threads, 1, std::max<int64_t>(n, 1));
  std::vector<std::jthread> workers;
  for (int64_t p = 1; p < pieces; ++p)
    workers.emplace_back([&, p] { fn(n * p / pieces, n * (p + 1) / pieces); });
  fn(0, n / pieces);
}

}  // namespace moekit::cli
