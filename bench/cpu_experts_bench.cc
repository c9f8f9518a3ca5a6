// Standalone driver for iterating on the CPU experts (target cpu_experts_bench, next to the
// tools; uses the library's internal headers):
//   cpu_experts_bench [preset] [tokens,...] [threads] [isa] [reps] [--format f1,f2,...]
//   cpu_experts_bench kernel H,I,M [threads] [isa] [reps] [--format f] [--cold]
//   cpu_experts_bench ceilings [ignored] [ignored] [isa]
// Random bf16 weights of the preset (quantized with quantize_expert_weights for --format),
// random routing (top-k of random logits, what softmax routing picks), cold caches (a 768 MiB
// read between timed runs; L3 here is 260 MB), median of `reps` runs, against the roofline
// max(active weight bytes of the format / read GB/s, flops / peak) of this machine's measured
// ceilings (int8: the int8 dot-product peak). With several formats, each row also says how many
// times faster than bf16 (when bf16 is in the list) the same token count ran: the median over
// reps of bf16's time / the format's time, each rep running every format in turn.
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
#include "moekit/quant/quantize.h"

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

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  for (size_t pos = 0; pos < s.size();) {
    const size_t next = s.find(',', pos);
    out.push_back(s.substr(pos, next - pos));
    pos = next == std::string::npos ? s.size() : next + 1;
  }
  return out;
}

// Experts of `format` over random bf16 weights [E, 2I, H], [E, H, I] (quantized for quantized
// formats; the packed experts keep no reference to them).
std::shared_ptr<Experts> make_experts(const QuantScheme& q, int64_t E, int64_t H, int64_t I,
                                      const CpuExpertsConfig& cfg) {
  std::vector<uint16_t> w13(size_t(E * 2 * I * H)), w2(size_t(E * H * I));
  fill_bf16(w13.data(), int64_t(w13.size()), 1);
  fill_bf16(w2.data(), int64_t(w2.size()), 2);
  ExpertWeights w;
  w.w13 = TensorView(w13.data(), DType::kBF16, {E, 2 * I, H});
  w.w2 = TensorView(w2.data(), DType::kBF16, {E, H, I});
  if (q.is_float()) return make_cpu_experts(w, Activation{}, cfg);
  const QuantizedExpertWeights qw = quantize_expert_weights(w, q);
  return make_cpu_experts(qw.view(), Activation{}, cfg);
}

// a1 [M, H] as the experts want it: bf16 values, or x quantized with its typed scale.
struct A1 {
  Tensor a1, scale;
  ActivationScale typed;
  A1(const ActivationSpec& spec, int64_t M, int64_t H) {
    Tensor x(DType::kBF16, {M, H});
    fill_bf16(x.data<uint16_t>(), M * H, 3);
    if (spec.scale == ScaleKind::kNone) {
      a1 = std::move(x);
      return;
    }
    a1 = Tensor(spec.dtype, {M, H});
    const std::vector<int64_t> sh = activation_scale_shape(spec, M, H);
    scale = sh.size() == 1 ? Tensor(spec.scale_dtype, {sh[0]})
                           : Tensor(spec.scale_dtype, {sh[0], sh[1]});
    quantize_activations(x, spec, a1, scale.view());
    typed = {spec.scale, spec.scale == ScaleKind::kBlock ? spec.group : 0, scale.view()};
  }
};

MoEProblem problem_of(const Experts& x, int64_t tokens, int k) {
  return problem_for(x.info(), tokens, k);
}

double cpu_seconds(clockid_t clock, const timespec& c0) {
  timespec c1;
  clock_gettime(clock, &c1);
  return double(c1.tv_sec - c0.tv_sec) + 1e-9 * double(c1.tv_nsec - c0.tv_nsec);
}

// Hot caches, one expert, M rows: GFLOP (GOP for int8) per CPU-second against the peak loop
// timed the same way.
void kernel_mode(const QuantScheme& q, int64_t H, int64_t I, int64_t M, int threads, CpuIsa isa,
                 int reps, bool cold) {
  auto x = make_experts(q, 1, H, I, {.num_threads = threads, .isa = isa});
  const A1 in(x->activation_spec(), M, H);
  std::vector<char> ws_bytes(x->workspace_size(problem_of(*x, M, 1)));
  std::vector<int32_t> ids(size_t(M), 0);
  std::vector<float> out(size_t(M * H));
  DispatchedBatch b;
  b.a1 = in.a1;
  b.a1_scale = in.typed;
  b.topk_ids = TensorView(ids.data(), DType::kI32, {M, 1});
  TensorView ov(out.data(), DType::kF32, {M, 1, H});
  std::vector<double> per_cpu_s;
  std::vector<char> flush(cold ? size_t(768) << 20 : 0, 1);
  for (int r = 0; r < reps + 1; ++r) {
    if (cold) {  // weights from DRAM: stream a buffer larger than L3 first
      volatile uint64_t sink = cpu::kernels_for(isa).stream_read(flush.data(), flush.size());
      (void)sink;
    }
    Workspace ws(ws_bytes.data(), ws_bytes.size());
    timespec c0;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c0);
    x->apply(b, ov, ws, {});
    const double cpu = cpu_seconds(CLOCK_PROCESS_CPUTIME_ID, c0);
    if (r > 0) per_cpu_s.push_back(2.0 * double(M) * 3 * double(I * H) / cpu * 1e-9);
  }
  std::sort(per_cpu_s.begin(), per_cpu_s.end());
  const bool int8 = x->activation_spec().dtype == DType::kI8;
  double peak_cpu = 0;  // the peak loop, timed the same way
  for (int r = 0; r < 5; ++r) {
    timespec c0;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c0);
    const cpu::KernelTable& kt = cpu::kernels_for(isa);
    const double f = int8 ? kt.peak_loop_int8(5000000) : kt.peak_loop(DType::kF32, 20000000);
    peak_cpu = std::max(peak_cpu, f / cpu_seconds(CLOCK_THREAD_CPUTIME_ID, c0) * 1e-9);
  }
  std::printf(
      "kernel%s %s H=%lld I=%lld M=%lld: %.1f G%s per CPU-second (median; max %.1f); "
      "%s peak loop %.1f per CPU-second\n",
      cold ? " (cold)" : "", q.str().c_str(), (long long)H, (long long)I, (long long)M,
      per_cpu_s[per_cpu_s.size() / 2], int8 ? "OP" : "FLOP", per_cpu_s.back(),
      int8 ? "int8" : "FMA", peak_cpu);
}

// Top-k of random normal logits per token.
std::vector<int32_t> random_ids(int64_t M, int64_t E, int k) {
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
  return ids;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args, formats = {"bf16"};
  bool cold = false;
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--format" && i + 1 < argc)
      formats = split(argv[++i]);
    else if (std::string(argv[i]) == "--cold")
      cold = true;
    else
      args.push_back(argv[i]);
  }
  auto arg = [&](size_t i, const char* def) {
    return i < args.size() ? args[i] : std::string(def);
  };
  const std::string preset_name = arg(0, "qwen3-30b-a3b");
  std::vector<int64_t> token_list;
  for (const std::string& t : split(arg(1, "1,32,512"))) token_list.push_back(std::stoll(t));
  const int threads = std::stoi(arg(2, "2"));
  const CpuIsa isa = args.size() > 3 ? parse_cpu_isa(args[3]) : detect_cpu_isa();
  const int reps = std::stoi(arg(4, "7"));
  if (preset_name == "kernel") {  // hot caches, one expert, flops per CPU-second
    for (const std::string& f : formats)
      kernel_mode(QuantScheme::parse(f), token_list.at(0), token_list.at(1), token_list.at(2),
                  threads, isa, reps, cold);
    return 0;
  }
  if (preset_name == "ceilings") {
    for (int rep = 0; rep < 3; ++rep)
      for (int t : {1, 2})
        std::printf("threads=%d read=%.1f GB/s peak bf16=%.1f fp32=%.1f GFLOP/s int8=%.1f GOP/s\n",
                    t, measure_dram_read_gbps(t), measure_cpu_peak_gflops(isa, DType::kBF16, t),
                    measure_cpu_peak_gflops(isa, DType::kF32, t),
                    measure_cpu_peak_gflops(isa, DType::kI8, t));
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
  const double peak_i8 = measure_cpu_peak_gflops(isa, DType::kI8, threads);
  std::printf("# %s isa=%s threads=%d read=%.1f GB/s peak=%.1f GFLOP/s int8 %.1f GOP/s\n", pr->name,
              std::string(name(isa)).c_str(), threads, gbps, peak, peak_i8);
  // Every format's experts first, then each rep runs every format in turn: the formats share
  // the machine's noise (other processes on the 2 cores), so their ratios are fair.
  struct Run {
    QuantScheme q;
    std::shared_ptr<Experts> experts;
    double expert_bytes = 0;
  };
  std::vector<Run> runs;
  for (const std::string& fname : formats) {
    Run r;
    r.q = QuantScheme::parse(fname);
    const double t_pack = now_us();
    r.experts = make_experts(r.q, E, H, I, {.num_threads = threads, .isa = isa});
    std::printf("# %s packed in %.2f s\n", r.q.str().c_str(), (now_us() - t_pack) * 1e-6);
    r.expert_bytes = r.q.bytes_per_weight(2 * I, H) * double(2 * I * H) +
                     r.q.bytes_per_weight(H, I) * double(H * I);
    runs.push_back(std::move(r));
  }
  std::vector<char> flush(size_t(768) << 20, 1);  // > the 260 MB L3
  const cpu::KernelTable& kt = cpu::kernels_for(isa);
  auto on_threads = [&](auto&& fn) {
    std::vector<std::thread> th;
    for (int t = 1; t < threads; ++t) th.emplace_back(fn, t);
    fn(0);
    for (auto& x : th) x.join();
  };
  std::printf("%-16s %-16s %6s %10s %10s %7s %8s %9s %6s %7s\n", "preset", "format", "tokens",
              "time_us", "roof_us", "%roof", "GB/s", "GFLOP/s", "%peak", "active");
  for (const int64_t M : token_list) {
    const std::vector<int32_t> ids = random_ids(M, E, k);
    std::vector<bool> used(static_cast<size_t>(E));
    for (int32_t id : ids) used[size_t(id)] = true;
    const int64_t active = std::count(used.begin(), used.end(), true);
    const double flops = 2.0 * double(M * k) * double(3 * I * H);
    struct Timing {
      std::unique_ptr<A1> in;
      std::vector<char> ws;
      std::vector<double> times, adj;
    };
    std::vector<Timing> tm(runs.size());
    for (size_t f = 0; f < runs.size(); ++f) {
      tm[f].in = std::make_unique<A1>(runs[f].experts->activation_spec(), M, H);
      tm[f].ws.resize(runs[f].experts->workspace_size(problem_of(*runs[f].experts, M, k)) + 64);
    }
    std::vector<float> out(size_t(M * k * H));
    TensorView ov(out.data(), DType::kF32, {M, int64_t(k), H});
    for (int r = 0; r < reps + 1; ++r)
      for (size_t f = 0; f < runs.size(); ++f) {
        const bool int8 = runs[f].experts->activation_spec().dtype == DType::kI8;
        const double bytes = double(active) * runs[f].expert_bytes;
        // Flush by streaming the 768 MiB buffer on `threads` threads (timed: the DRAM read rate
        // of this moment), a short peak loop (the FMA / int8 rate of this moment), then the
        // timed apply. "adj" rates each run against the roofline of the ceilings measured next
        // to it, which the noise of a shared machine moves less than rates against ceilings
        // measured once at start.
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
          const double f8 = int8 ? kt.peak_loop_int8(100000) : kt.peak_loop(DType::kBF16, 400000);
          double cur = fl.load();
          while (!fl.compare_exchange_weak(cur, cur + f8)) {
          }
        });
        const double peak_now = fl.load() / (now_us() - t0) * 1e-3;
        DispatchedBatch b;
        b.a1 = tm[f].in->a1;
        b.a1_scale = tm[f].in->typed;
        b.topk_ids = TensorView(const_cast<int32_t*>(ids.data()), DType::kI32, {M, int64_t(k)});
        std::vector<char>& wsb = tm[f].ws;
        void* base = reinterpret_cast<void*>((uintptr_t(wsb.data()) + 63) & ~uintptr_t(63));
        Workspace ws(base, wsb.size() - 64);
        t0 = now_us();
        runs[f].experts->apply(b, ov, ws, {});
        const double t1 = now_us();
        if (r == 0) continue;  // the first run also faults in out and ws
        tm[f].times.push_back(t1 - t0);
        tm[f].adj.push_back(std::max(bytes / bw_now * 1e-3, flops / peak_now * 1e-3) / (t1 - t0));
      }
    auto median = [](std::vector<double> v) {
      std::sort(v.begin(), v.end());
      return v[v.size() / 2];
    };
    const auto bf16 =
        std::find_if(runs.begin(), runs.end(), [](const Run& r) { return r.q.str() == "bf16"; });
    for (size_t f = 0; f < runs.size(); ++f) {
      const bool int8 = runs[f].experts->activation_spec().dtype == DType::kI8;
      const double bytes = double(active) * runs[f].expert_bytes;
      const double roof_us = std::max(bytes / gbps * 1e-3, flops / (int8 ? peak_i8 : peak) * 1e-3);
      const std::vector<double>& t = tm[f].times;
      const double med = median(t);
      // %peak: GFLOP/s (int8: GOP/s) against the peak measured at start.
      std::printf(
          "%-16s %-16s %6lld %10.0f %10.0f %6.1f%% %8.1f %9.1f %5.1f%% %7lld   adj %5.1f%%  [min "
          "%.0f max %.0f]",
          pr->name, runs[f].q.str().c_str(), (long long)M, med, roof_us, 100 * roof_us / med,
          bytes / med * 1e-3, flops / med * 1e-3,
          100 * flops / med * 1e-3 / (int8 ? peak_i8 : peak), (long long)active,
          100 * median(tm[f].adj), *std::min_element(t.begin(), t.end()),
          *std::max_element(t.begin(), t.end()));
      if (bf16 != runs.end() && bf16 != runs.begin() + long(f)) {
        // Per rep, bf16's time / this format's (neighbouring runs), then the median.
        const std::vector<double>& tb = tm[size_t(bf16 - runs.begin())].times;
        std::vector<double> ratio;
        for (size_t i = 0; i < t.size(); ++i) ratio.push_back(tb[i] / t[i]);
        std::printf(
            "  %.2fx bf16 (min/min %.2fx)", median(ratio),
            *std::min_element(tb.begin(), tb.end()) / *std::min_element(t.begin(), t.end()));
      }
      std::printf("\n");
    }
    std::fflush(stdout);
  }
  return 0;
}
