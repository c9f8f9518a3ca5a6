// Standalone driver for iterating on the CPU experts (not part of the build):
//   g++ -O2 -std=c++20 -Iinclude -Isrc bench/cpu_experts_bench.cc build-cpu/libmoekit.a -lpthread \
//       -o build-cpu/cpu_experts_bench
//   build-cpu/cpu_experts_bench [preset] [tokens,...] [threads] [isa] [reps]
// Random bf16 weights of the preset, random routing (top-k of random logits, what softmax
// routing picks), cold caches (a 768 MiB read between timed runs; L3 here is 260 MB), median
// of `reps` runs, against the roofline max(active weight bytes / read GB/s, flops / peak) of
// this machine's measured ceilings.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cpu/kernels.h"  // the peak loop, for the kernel mode
#include "moekit/cpu.h"

using namespace moekit;

namespace {

struct Preset {
  const char* name;
  int64_t E, H, I;
  int k;
};
constexpr Preset kPresets[] = {{"qwen3-30b-a3b", 128, 2048, 768, 8},
                               {"mixtral-8x7b", 8, 4096, 14336, 2},
                               {"qwen3-235b-a22b", 128, 4096, 1536, 8}};

// Random bf16 bits in +-[2^-7, 2^-5): no denormals, no NaN; values do not matter for speed.
void fill_bf16(uint16_t* p, int64_t n, uint64_t seed) {
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (int64_t i = 0; i < n; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    p[i] = uint16_t(0x3c00 | (x & 0x00ff) | ((x >> 8) & 0x8000));
  }
}

double now_us() {
  return std::chrono::duration<double, std::micro>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

int main(int argc, char** argv) {
  const std::string preset_name = argc > 1 ? argv[1] : "qwen3-30b-a3b";
  std::vector<int64_t> token_list;
  {
    std::string s = argc > 2 ? argv[2] : "1,32,512";
    for (size_t pos = 0; pos < s.size();) {
      size_t next = s.find(',', pos);
      token_list.push_back(std::stoll(s.substr(pos, next - pos)));
      pos = next == std::string::npos ? s.size() : next + 1;
    }
  }
  const int threads = argc > 3 ? std::atoi(argv[3]) : 2;
  const CpuIsa isa = argc > 4 ? parse_cpu_isa(argv[4]) : detect_cpu_isa();
  const int reps = argc > 5 ? std::atoi(argv[5]) : 7;
  if (preset_name == "kernel") {  // hot caches, one expert, flops per CPU-second
    const int64_t H = token_list.at(0), I = token_list.at(1), M = token_list.at(2);
    std::vector<uint16_t> w13(size_t(2 * I * H)), w2(size_t(H * I)), a1(size_t(M * H));
    fill_bf16(w13.data(), int64_t(w13.size()), 1);
    fill_bf16(w2.data(), int64_t(w2.size()), 2);
    fill_bf16(a1.data(), int64_t(a1.size()), 3);
    ExpertWeights w;
    w.w13 = TensorView(w13.data(), DType::kBF16, {1, 2 * I, H});
    w.w2 = TensorView(w2.data(), DType::kBF16, {1, H, I});
    auto x = make_cpu_experts(w, Activation{}, {.num_threads = threads, .isa = isa});
    MoEProblem p;
    p.num_experts = p.num_local_experts = 1;
    p.hidden = H;
    p.intermediate = I;
    p.top_k = 1;
    p.tokens = M;
    std::vector<char> ws_bytes(x->workspace_size(p));
    std::vector<int32_t> ids(size_t(M), 0);
    std::vector<float> out(size_t(M * H));
    DispatchedBatch b;
    b.a1 = TensorView(a1.data(), DType::kBF16, {M, H});
    b.topk_ids = TensorView(ids.data(), DType::kI32, {M, 1});
    TensorView ov(out.data(), DType::kF32, {M, 1, H});
    std::vector<double> per_cpu_s;
    for (int r = 0; r < reps + 1; ++r) {
      Workspace ws(ws_bytes.data(), ws_bytes.size());
      timespec c0, c1;
      clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c0);
      x->apply(b, ov, ws, {});
      clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c1);
      const double cpu = double(c1.tv_sec - c0.tv_sec) + 1e-9 * double(c1.tv_nsec - c0.tv_nsec);
      if (r > 0) per_cpu_s.push_back(2.0 * double(M) * 3 * double(I * H) / cpu * 1e-9);
    }
    std::sort(per_cpu_s.begin(), per_cpu_s.end());
    double peak_cpu = 0;  // the FMA peak loop, timed the same way
    for (int r = 0; r < 5; ++r) {
      timespec c0, c1;
      clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c0);
      const double f = cpu::kernels_for(isa).peak_loop(DType::kF32, 20000000);
      clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c1);
      const double cpu = double(c1.tv_sec - c0.tv_sec) + 1e-9 * double(c1.tv_nsec - c0.tv_nsec);
      peak_cpu = std::max(peak_cpu, f / cpu * 1e-9);
    }
    std::printf(
        "kernel H=%lld I=%lld M=%lld: %.1f GFLOP per CPU-second (median; max %.1f); "
        "FMA peak loop %.1f per CPU-second\n",
        (long long)H, (long long)I, (long long)M, per_cpu_s[per_cpu_s.size() / 2], per_cpu_s.back(),
        peak_cpu);
    return 0;
  }
  if (preset_name == "ceilings") {
    for (int rep = 0; rep < 3; ++rep)
      for (int t : {1, 2})
        std::printf("threads=%d read=%.1f GB/s peak bf16=%.1f fp32=%.1f GFLOP/s\n", t,
                    measure_dram_read_gbps(t), measure_cpu_peak_gflops(isa, DType::kBF16, t),
                    measure_cpu_peak_gflops(isa, DType::kF32, t));
    return 0;
  }
  const Preset* pr = nullptr;
  for (const auto& p : kPresets)
    if (preset_name == p.name) pr = &p;
  if (!pr) {
    std::fprintf(stderr, "unknown preset %s\n", preset_name.c_str());
    return 1;
  }
  const int64_t E = pr->E, H = pr->H, I = pr->I;
  const int k = pr->k;

  const double gbps = measure_dram_read_gbps(threads);
  const double peak = measure_cpu_peak_gflops(isa, DType::kBF16, threads);
  std::printf("# %s isa=%s threads=%d read=%.1f GB/s peak=%.1f GFLOP/s\n", pr->name,
              std::string(name(isa)).c_str(), threads, gbps, peak);

  std::shared_ptr<Experts> experts;
  {
    std::vector<uint16_t> w13(size_t(E * 2 * I * H)), w2(size_t(E * H * I));
    fill_bf16(w13.data(), int64_t(w13.size()), 1);
    fill_bf16(w2.data(), int64_t(w2.size()), 2);
    ExpertWeights w;
    w.w13 = TensorView(w13.data(), DType::kBF16, {E, 2 * I, H});
    w.w2 = TensorView(w2.data(), DType::kBF16, {E, H, I});
    const double t0 = now_us();
    experts = make_cpu_experts(w, Activation{}, {.num_threads = threads, .isa = isa});
    std::printf("# packed in %.2f s\n", (now_us() - t0) * 1e-6);
  }
  const int64_t expert_bytes = 3 * I * H * 2;
  std::vector<char> flush(size_t(768) << 20, 1);  // > the 260 MB L3

  std::printf("%-16s %6s %10s %10s %7s %8s %9s %7s\n", "preset", "tokens", "time_us", "roof_us",
              "%roof", "GB/s", "GFLOP/s", "active");
  for (int64_t M : token_list) {
    std::vector<uint16_t> a1(size_t(M * H));
    fill_bf16(a1.data(), int64_t(a1.size()), 3);
    std::vector<int32_t> ids(size_t(M * k));
    std::mt19937 rng(42);
    std::normal_distribution<float> nd;
    std::vector<float> logits(static_cast<size_t>(E));
    std::vector<int> idx(static_cast<size_t>(E));
    for (int64_t t = 0; t < M; ++t) {
      for (auto& l : logits) l = nd(rng);
      std::iota(idx.begin(), idx.end(), 0);
      std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                        [&](int a, int b) { return logits[size_t(a)] > logits[size_t(b)]; });
      for (int s = 0; s < k; ++s) ids[size_t(t * k + s)] = idx[size_t(s)];
    }
    std::vector<bool> used(static_cast<size_t>(E));
    for (int32_t id : ids) used[size_t(id)] = true;
    const int64_t active = std::count(used.begin(), used.end(), true);
    const double bytes = double(active * expert_bytes);
    const double flops = 2.0 * double(M * k) * double(3 * I * H);
    const double roof_us = std::max(bytes / gbps * 1e-3, flops / peak * 1e-3);

    MoEProblem p;
    p.num_experts = p.num_local_experts = E;
    p.hidden = H;
    p.intermediate = I;
    p.top_k = k;
    p.tokens = M;
    std::vector<char> ws_bytes(experts->workspace_size(p) + 64);
    std::vector<float> out(size_t(M * k * H));
    DispatchedBatch b;
    b.a1 = TensorView(a1.data(), DType::kBF16, {M, H});
    b.topk_ids = TensorView(ids.data(), DType::kI32, {M, int64_t(k)});
    TensorView ov(out.data(), DType::kF32, {M, int64_t(k), H});
    // Each rep: flush by streaming the 768 MiB buffer on `threads` threads (timed: the DRAM read
    // rate of this moment), a short peak loop (the FMA rate of this moment), then the timed
    // apply. "adj" rates each run against the roofline of the ceilings measured next to it,
    // which the noise of a shared machine (other builds on the 2 cores) moves less than rates
    // against ceilings measured once at start.
    const cpu::KernelTable& kt = cpu::kernels_for(isa);
    auto on_threads = [&](auto&& fn) {
      std::vector<std::thread> th;
      for (int t = 1; t < threads; ++t) th.emplace_back(fn, t);
      fn(0);
      for (auto& x : th) x.join();
    };
    std::vector<double> times, adj;
    for (int r = 0; r < reps + 1; ++r) {
      std::atomic<uint64_t> sink{0};
      double t0 = now_us();
      on_threads([&](int t) {
        const size_t part = flush.size() / size_t(threads) / 64 * 64;
        sink += kt.stream_read(flush.data() + part * size_t(t), part);
      });
      const double bw_now = double(flush.size()) / (now_us() - t0) * 1e-3;
      std::atomic<double> fl{0};
      t0 = now_us();
      on_threads([&](int) {
        const double f = kt.peak_loop(DType::kBF16, 400000);
        double cur = fl.load();
        while (!fl.compare_exchange_weak(cur, cur + f)) {
        }
      });
      const double peak_now = fl.load() / (now_us() - t0) * 1e-3;
      void* base = reinterpret_cast<void*>((uintptr_t(ws_bytes.data()) + 63) & ~uintptr_t(63));
      Workspace ws(base, ws_bytes.size() - 64);
      t0 = now_us();
      experts->apply(b, ov, ws, {});
      const double t1 = now_us();
      if (r == 0) continue;  // the first run also faults in out and ws
      times.push_back(t1 - t0);
      adj.push_back(std::max(bytes / bw_now * 1e-3, flops / peak_now * 1e-3) / (t1 - t0));
    }
    std::sort(times.begin(), times.end());
    std::sort(adj.begin(), adj.end());
    const double med = times[times.size() / 2];
    std::printf(
        "%-16s %6lld %10.0f %10.0f %6.1f%% %8.1f %9.1f %7lld   adj %5.1f%%  [min %.0f max %.0f]\n",
        pr->name, (long long)M, med, roof_us, 100 * roof_us / med, bytes / med * 1e-3,
        flops / med * 1e-3, (long long)active, 100 * adj[adj.size() / 2], times.front(),
        times.back());
    std::fflush(stdout);
  }
  return 0;
}
