// ISA names and detection, the kernel table of each family, and the ceiling measurements.
#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstring>
#include <string>

#include "cpu/kernels.h"
#include "cpu/pack.h"
#include "cpu/thread_pool.h"
#include "moekit/core/error.h"

namespace moekit {
namespace {

struct IsaRow {
  CpuIsa isa;
  std::string_view name;
};
constexpr std::array<IsaRow, 4> kIsas{{{CpuIsa::kScalar, "scalar"},
                                       {CpuIsa::kAvx2, "avx2"},
                                       {CpuIsa::kAvx512, "avx512"},
                                       {CpuIsa::kAvx512Bf16, "avx512bf16"}}};

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

std::string_view name(CpuIsa isa) {
  for (const auto& r : kIsas)
    if (r.isa == isa) return r.name;
  return "unknown";
}

CpuIsa parse_cpu_isa(std::string_view s) {
  std::string valid;
  for (const auto& r : kIsas) {
    if (r.name == s) return r.isa;
    valid += (valid.empty() ? "" : ", ") + std::string(r.name);
  }
  MOEKIT_FAIL("unknown cpu isa '", s, "' (valid: ", valid, ")");
}

bool cpu_supports(CpuIsa isa) {
#ifdef MOEKIT_X86_KERNELS
  // __builtin_cpu_supports also checks that the OS saves the wider registers (XCR0).
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq");
  switch (isa) {
    case CpuIsa::kScalar:
      return true;
    case CpuIsa::kAvx2:
      return avx2;
    case CpuIsa::kAvx512:
      return avx512;
    case CpuIsa::kAvx512Bf16:
      return avx512 && __builtin_cpu_supports("avx512bf16");
  }
  return false;
#else
  return isa == CpuIsa::kScalar;
#endif
}

CpuIsa detect_cpu_isa() {
  for (auto it = kIsas.rbegin(); it != kIsas.rend(); ++it)
    if (cpu_supports(it->isa)) return it->isa;
  return CpuIsa::kScalar;
}

namespace cpu {
const KernelTable& kernels_for(CpuIsa isa) {
  MOEKIT_CHECK(cpu_supports(isa), "cpu: this CPU (or build) cannot run the ", name(isa),
               " kernels");
  switch (isa) {
#ifdef MOEKIT_X86_KERNELS
    case CpuIsa::kAvx2:
      return kernels_avx2();
    case CpuIsa::kAvx512:
      return kernels_avx512();
    case CpuIsa::kAvx512Bf16:
      return kernels_avx512bf16();
#endif
    default:
      return kernels_scalar();
  }
}
}  // namespace cpu

namespace {
// Best GFLOP/s of `loop(iters)` run on every thread of `pool` at once (~0.1 s per round).
template <typename Loop>
double measure_loop_gflops(cpu::ThreadPool& pool, Loop&& loop) {
  int64_t iters = 1 << 16;
  for (;;) {  // calibrate to ~20 ms, then time rounds 5x longer
    auto t0 = std::chrono::steady_clock::now();
    loop(iters);
    if (seconds_since(t0) > 0.02) break;
    iters *= 4;
  }
  iters *= 5;
  double best = 0;
  for (int round = 0; round < 3; ++round) {
    std::atomic<double> flops{0};
    auto t0 = std::chrono::steady_clock::now();
    pool.run([&](int) {
      const double f = loop(iters);
      double cur = flops.load();
      while (!flops.compare_exchange_weak(cur, cur + f)) {
      }
    });
    best = std::max(best, flops.load() / seconds_since(t0) * 1e-9);
  }
  return best;
}
}  // namespace

double measure_cpu_peak_gflops(CpuIsa isa, DType weights, int threads) {
  MOEKIT_CHECK(weights == DType::kBF16 || weights == DType::kF32 || weights == DType::kI8,
               "measure_cpu_peak_gflops: no peak loop for ", name(weights),
               " (bf16, fp32 or int8)");
  const cpu::KernelTable& k = cpu::kernels_for(isa);
  cpu::ThreadPool pool(threads);
  if (weights == DType::kI8) return measure_loop_gflops(pool, k.peak_loop_int8);
  double best = measure_loop_gflops(pool, [&](int64_t n) { return k.peak_loop(weights, n); });
#ifdef MOEKIT_X86_KERNELS
  // bf16 products also run on vdpbf16ps: the ceiling is the better of the two instructions.
  if (isa == CpuIsa::kAvx512Bf16 && weights == DType::kBF16)
    best = std::max(best, measure_loop_gflops(pool, cpu::dpbf16_peak_loop));
#endif
  return best;
}

double measure_dram_read_gbps(int threads) {
  constexpr size_t kBytes = size_t(1) << 30;
  const cpu::KernelTable& k = cpu::kernels_for(detect_cpu_isa());
  cpu::ThreadPool pool(threads);
  cpu::HugeBuffer buf(kBytes);
  const int n = pool.size();
  auto share = [&](int t, size_t* off) {
    const size_t lines = kBytes / 64;
    *off = lines * size_t(t) / size_t(n) * 64;
    return (lines * size_t(t + 1) / size_t(n)) * 64 - *off;
  };
  pool.run([&](int t) {  // first touch by the reading thread
    size_t off;
    const size_t len = share(t, &off);
    std::memset(buf.data() + off, t + 1, len);
  });
  double best = 0;
  volatile uint64_t sink = 0;
  for (int round = 0; round < 5; ++round) {
    auto t0 = std::chrono::steady_clock::now();
    pool.run([&](int t) {
      size_t off;
      const size_t len = share(t, &off);
      sink = sink + k.stream_read(buf.data() + off, len);
    });
    best = std::max(best, double(kBytes) / seconds_since(t0) * 1e-9);
  }
  return best;
}

}  // namespace moekit
