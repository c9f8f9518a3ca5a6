#include "bench_cuda.h"

#include <CLI/CLI.hpp>

#ifdef MOEKIT_HAS_CUDA
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <functional>
#include <optional>
#include <random>
#include <vector>

#include "bench_timer.h"
#include "l2_flush.h"
#include "moekit/cuda.h"
#include "moekit/layer.h"
#endif

namespace moekit::cli {

#ifdef MOEKIT_HAS_CUDA
namespace {

#define BENCH_CHECK_CUDA(call)                                                          \
  do {                                                                                   \
    const cudaError_t bench_status_ = (call);                                            \
    MOEKIT_CHECK(bench_status_ == cudaSuccess, "CUDA: ", #call, " failed: ",             \
                 cudaGetErrorString(bench_status_));                                     \
  } while (0)
#define BENCH_CHECK_CUBLAS(call) \
  MOEKIT_CHECK((call) == CUBLAS_STATUS_SUCCESS, "cuBLAS: ", #call, " failed")

constexpr int kDefaultReps = 30;
constexpr int kGemmSize = 8192;

class Stream {
 public:
  Stream() { BENCH_CHECK_CUDA(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
  ~Stream() { cudaStreamDestroy(s_); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  operator cudaStream_t() const { return s_; }

 private:
  cudaStream_t s_;
};

// Median over `reps` of the device time of f() (enqueued on `stream`), with `before()` run
// outside the timed window ahead of each rep (the L2 flush).
double median_ms(cudaStream_t stream, int reps, const std::function<void()>& f,
                 const std::function<void()>& before = [] {}) {
  cudaEvent_t start, stop;
  BENCH_CHECK_CUDA(cudaEventCreate(&start));
  BENCH_CHECK_CUDA(cudaEventCreate(&stop));
  std::vector<double> samples;
  for (int r = 0; r < reps; ++r) {
    before();
    BENCH_CHECK_CUDA(cudaEventRecord(start, stream));
    f();
    BENCH_CHECK_CUDA(cudaEventRecord(stop, stream));
    BENCH_CHECK_CUDA(cudaEventSynchronize(stop));
    float ms = 0;
    BENCH_CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
    samples.push_back(ms);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return median(samples);
}

// A device buffer of n random bytes in [lo, hi] (drawn on the host, then copied).
CudaTensor random_bytes(int64_t n, uint8_t lo, uint8_t hi) {
  std::mt19937 rng(1234);
  std::uniform_int_distribution<int> d(lo, hi);
  Tensor host(DType::kU8, {n});
  for (int64_t i = 0; i < n; ++i) host.data<uint8_t>()[i] = uint8_t(d(rng));
  return CudaTensor::copy_of(host);
}

double copy_gbps(cudaStream_t s) {
  const int64_t bytes = int64_t(2) << 30;
  const CudaTensor src(DType::kU8, {bytes}), dst(DType::kU8, {bytes});
  BENCH_CHECK_CUDA(cudaMemsetAsync(src.data<void>(), 1, size_t(bytes), s));
  auto copy = [&] {
    BENCH_CHECK_CUDA(cudaMemcpyAsync(dst.data<void>(), src.data<void>(), size_t(bytes),
                                     cudaMemcpyDeviceToDevice, s));
  };
  copy();
  return 2.0 * double(bytes) / (median_ms(s, 10, copy) * 1e-3) / 1e9;
}

double gemm_flops_per_ms() { return 2.0 * kGemmSize * double(kGemmSize) * kGemmSize; }

double bf16_gemm_gflops(cudaStream_t s) {
  const int n = kGemmSize;
  // Random bytes 0x30..0x3f make bf16 values in (0, 1): no NaN or infinity.
  const CudaTensor a = random_bytes(int64_t(n) * n * 2, 0x30, 0x3f);
  const CudaTensor b = random_bytes(int64_t(n) * n * 2, 0x30, 0x3f);
  const CudaTensor c(DType::kBF16, {n, n});
  cublasHandle_t h;
  BENCH_CHECK_CUBLAS(cublasCreate(&h));
  BENCH_CHECK_CUBLAS(cublasSetStream(h, s));
  const float one = 1, zero = 0;
  auto gemm = [&] {
    BENCH_CHECK_CUBLAS(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, n, n, n, &one, a.data<void>(),
                                    CUDA_R_16BF, n, b.data<void>(), CUDA_R_16BF, n, &zero,
                                    c.data<void>(), CUDA_R_16BF, n, CUBLAS_COMPUTE_32F,
                                    CUBLAS_GEMM_DEFAULT));
  };
  gemm();
  const double ms = median_ms(s, 20, gemm);
  cublasDestroy(h);
  return gemm_flops_per_ms() / ms * 1e-6;
}

double fp8_gemm_gflops(cudaStream_t s) {
  const int n = kGemmSize;
  // e4m3 codes 0x30..0x47: values in [0.125, 3.75], no NaN; fp8 GEMMs take A transposed (TN).
  const CudaTensor a = random_bytes(int64_t(n) * n, 0x30, 0x47);
  const CudaTensor b = random_bytes(int64_t(n) * n, 0x30, 0x47);
  const CudaTensor c(DType::kBF16, {n, n});
  const size_t ws_bytes = size_t(64) << 20;
  const CudaTensor ws(DType::kU8, {int64_t(ws_bytes)});
  cublasLtHandle_t lt;
  BENCH_CHECK_CUBLAS(cublasLtCreate(&lt));
  cublasLtMatmulDesc_t op;
  BENCH_CHECK_CUBLAS(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  BENCH_CHECK_CUBLAS(
      cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  BENCH_CHECK_CUBLAS(
      cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  cublasLtMatrixLayout_t la, lb, lc;
  BENCH_CHECK_CUBLAS(cublasLtMatrixLayoutCreate(&la, CUDA_R_8F_E4M3, n, n, n));
  BENCH_CHECK_CUBLAS(cublasLtMatrixLayoutCreate(&lb, CUDA_R_8F_E4M3, n, n, n));
  BENCH_CHECK_CUBLAS(cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, n, n, n));
  cublasLtMatmulPreference_t pref;
  BENCH_CHECK_CUBLAS(cublasLtMatmulPreferenceCreate(&pref));
  BENCH_CHECK_CUBLAS(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes, sizeof(ws_bytes)));
  cublasLtMatmulHeuristicResult_t heur{};
  int found = 0;
  BENCH_CHECK_CUBLAS(
      cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, lc, lc, pref, 1, &heur, &found));
  MOEKIT_CHECK(found > 0, "cuBLASLt: no fp8 e4m3 GEMM algorithm for ", n, "^3 on this device");
  const float one = 1, zero = 0;
  auto gemm = [&] {
    BENCH_CHECK_CUBLAS(cublasLtMatmul(lt, op, &one, a.data<void>(), la, b.data<void>(), lb, &zero,
                                      c.data<void>(), lc, c.data<void>(), lc, &heur.algo,
                                      ws.data<void>(), ws_bytes, s));
  };
  gemm();
  const double ms = median_ms(s, 20, gemm);
  cublasLtMatmulPreferenceDestroy(pref);
  cublasLtMatrixLayoutDestroy(la);
  cublasLtMatrixLayoutDestroy(lb);
  cublasLtMatrixLayoutDestroy(lc);
  cublasLtMatmulDescDestroy(op);
  cublasLtDestroy(lt);
  return gemm_flops_per_ms() / ms * 1e-6;
}

// Before each rep, a read of a clean buffer of 4x the L2 with plain loads (l2_flush.h) evicts
// whatever the last rep left there, so the weights come from HBM. Not a memset: overwriting the
// buffer would leave L2 full of dirty lines, whose write-back to HBM the timed forward would then
// pay (seen on an H100: a 75 MB read of weights took 36.8 us after a memset of 2x L2, 31.5 us
// after this read). The buffer is filled once, before any timing; 4x the L2 so that hardly a
// line of the last rep survives the read.
class L2Flusher {
 public:
  // Fills the buffer on `stream`, ahead of the first flush.
  explicit L2Flusher(cudaStream_t stream) : buffer_(DType::kU8, {buffer_bytes()}) {
    int device = 0, sms = 0, threads_per_sm = 0;
    BENCH_CHECK_CUDA(cudaGetDevice(&device));
    BENCH_CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    BENCH_CHECK_CUDA(
        cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device));
    // Every SM full of threads, one 16-byte load in flight each.
    blocks_ = sms * std::max(threads_per_sm / kL2ReadThreads, 1);
    BENCH_CHECK_CUDA(cudaMemsetAsync(buffer_.data<void>(), 0x5a, size_t(buffer_.numel()), stream));
  }
  // The buffer's size on the current device: 4x its L2, a multiple of 16.
  static int64_t buffer_bytes() {
    int device = 0, l2 = 0;
    BENCH_CHECK_CUDA(cudaGetDevice(&device));
    BENCH_CHECK_CUDA(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device));
    return (4 * int64_t(l2) + 15) / 16 * 16;
  }
  void flush(cudaStream_t stream) {
    BENCH_CHECK_CUDA(launch_l2_read(buffer_.data<void>(), buffer_.numel(), sink_.data<uint32_t>(),
                                    blocks_, stream));
  }

 private:
  CudaTensor buffer_, sink_{DType::kI32, {1}};
  int blocks_ = 0;
};

// The layer's weights on the device (make_cuda_bench_layer's copies).
struct DeviceLayerWeights {
  DeviceExpertWeights routed;
  std::optional<DeviceExpertWeights> shared;
};

}  // namespace

BenchMachine measure_cuda_machine() {
  MOEKIT_CHECK(cuda_device_count() > 0, "--device cuda: no CUDA device is visible");
  const Stopwatch watch;
  const Stream s;
  BenchMachine m;
  m.device = cuda_device_name();
  m.kind = "cuda";
  m.threads = 1;
  MachineCeilings& c = m.ceilings;
  c.read_gbps = copy_gbps(s);
  c.peak_gflops_bf16 = bf16_gemm_gflops(s);
  c.peak_gflops_fp8 = fp8_gemm_gflops(s);
  c.measure_seconds = watch.elapsed_us() * 1e-6;
  m.flush_bytes = L2Flusher::buffer_bytes();
  m.flush_method = "a read of a clean buffer of 4x the L2 with plain loads";
  return m;
}

std::unique_ptr<MoELayer> make_cuda_bench_layer(const MoELayerConfig& config,
                                                const ExpertWeights& routed,
                                                const ExpertWeights* shared,
                                                const TensorView& correction_bias,
                                                std::shared_ptr<void>& device_copies) {
  auto copies = std::make_shared<DeviceLayerWeights>();
  copies->routed = DeviceExpertWeights(routed);
  if (shared) copies->shared.emplace(*shared);
  device_copies = copies;
  return make_cuda_layer(config, copies->routed.view(),
                         copies->shared ? &copies->shared->view() : nullptr, correction_bias);
}

RowRun run_cuda_row(const RowSettings& s, const LayerSpec& spec, BenchLayer& b, int64_t tokens) {
  const DType io = b.layer->config().act_dtype;
  const BenchInputs in = make_bench_inputs(spec, io, tokens, s.seed, s.threads, 0);
  const int64_t k = spec.top_k;
  const CudaTensor x = CudaTensor::copy_of(in.x), logits = CudaTensor::copy_of(in.logits);
  const CudaTensor ids(DType::kI32, {tokens, k}), weights(DType::kF32, {tokens, k});
  const CudaTensor y(io, {tokens, spec.hidden});
  const CudaTensor bias = b.correction_bias.numel() ? CudaTensor::copy_of(b.correction_bias)
                                                    : CudaTensor();
  const Stream stream;
  const ExecContext ctx{static_cast<cudaStream_t>(stream)};
  RowRun run;
  auto routing = [&] { route(spec.router, logits, bias.view(), ids, weights, ctx); };
  routing();
  run.routing_us = median_ms(stream, 5, routing) * 1e3;

  // The forward is enqueued once into a graph (no host synchronization inside it), replayed;
  // or, without the graph, launched afresh for each rep.
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  auto forward = [&] { b.layer->forward_routed(x, ids, weights, y, ctx); };
  if (s.cuda_graph) {
    BENCH_CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    forward();
    BENCH_CHECK_CUDA(cudaStreamEndCapture(stream, &graph));
    BENCH_CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
  }
  auto replay = [&] {
    if (exec)
      BENCH_CHECK_CUDA(cudaGraphLaunch(exec, stream));
    else
      forward();
  };
  replay();  // warm-up
  L2Flusher flusher(stream);
  const int reps = s.reps ? s.reps : kDefaultReps;
  const double ms = median_ms(stream, reps, replay, [&] { flusher.flush(stream); });
  run.timing = {ms * 1e3, ms * 1e3, ms * 1e3, reps};
  BENCH_CHECK_CUDA(cudaStreamSynchronize(stream));
  if (exec) {
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
  }

  run.ids = Tensor(DType::kI32, {tokens, k});
  copy_to_host(ids, run.ids);
  run.weights = Tensor(DType::kF32, {tokens, k});
  copy_to_host(weights, run.weights);
  const Tensor y_host(io, {tokens, spec.hidden});
  copy_to_host(y, y_host);
  run.check = check_sampled_rows(b, in.x, run.ids, run.weights, y_host, s.err_tokens, s.threads);
  return run;
}

#else  // no CUDA in this build

namespace {
[[noreturn]] void no_cuda() {
  throw CLI::ValidationError("--device", "cuda: this moekit was built without CUDA");
}
}  // namespace

BenchMachine measure_cuda_machine() { no_cuda(); }
std::unique_ptr<MoELayer> make_cuda_bench_layer(const MoELayerConfig&, const ExpertWeights&,
                                                const ExpertWeights*, const TensorView&,
                                                std::shared_ptr<void>&) {
  no_cuda();
}
RowRun run_cuda_row(const RowSettings&, const LayerSpec&, BenchLayer&, int64_t) { no_cuda(); }

#endif

}  // namespace moekit::cli
