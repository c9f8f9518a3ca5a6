// cuda_experts_bench: times the CUDA MoE layer (prepare -> experts -> finalize, captured in a
// CUDA graph) over presets, formats and token counts, against the card's own ceilings, and
// checks every timed row against the oracle on a sample of tokens. Writes JSON in DESIGN.md
// section 7 format.
//
//   cuda_experts_bench [--out FILE] [--presets a,b] [--tokens 1,16] [--impl auto|small|grouped]
//                      [--format bf16,fp16,fp8-tensor,fp8-tensor:static,fp8-token]
//                      [--reps N] [--check-tokens N]
//
// The roofline of a row is max(active experts' weight bytes in the format (codes and scales,
// QuantScheme::bytes_per_weight) / copy bandwidth, FLOPs / the format's GEMM ceiling): cuBLAS
// bf16 8192^3 for bf16 and fp16, cuBLASLt e4m3 x e4m3 8192^3 (bf16 out) for fp8 formats.
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <fstream>
#include <functional>
#include <future>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "moekit/check.h"
#include "moekit/cuda.h"
#include "moekit/presets.h"
#include "moekit/quant/quantize.h"
#include "moekit/reference.h"

namespace {

using namespace moekit;

#define CHECK_CUDA(x)                                                     \
  do {                                                                    \
    cudaError_t e_ = (x);                                                 \
    if (e_ != cudaSuccess) MOEKIT_FAIL(#x, ": ", cudaGetErrorString(e_)); \
  } while (0)

struct Options {
  std::string out = "cuda_bench.json";
  std::vector<std::string> presets = {"qwen3-30b-a3b", "mixtral-8x7b", "gpt-oss-20b",
                                      "deepseek-v3"};
  std::vector<int64_t> tokens = {1, 16, 64, 256, 1024, 4096, 16384};
  std::string impl = "auto";  // auto: small-batch up to 16 tokens, grouped GEMM above
  std::vector<std::string> formats = {"bf16"};
  int reps = 30;
  int check_tokens = 2;
  std::string command;
};

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) out.push_back(item);
  return out;
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 0; i < argc; ++i) o.command += (i ? " " : "") + std::string(argv[i]);
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--out")
      o.out = v;
    else if (k == "--presets")
      o.presets = split(v);
    else if (k == "--tokens") {
      o.tokens.clear();
      for (auto& t : split(v)) o.tokens.push_back(std::stoll(t));
    } else if (k == "--impl")
      o.impl = v;
    else if (k == "--format") {
      o.formats = split(v);
      for (const auto& f : o.formats) {
        const QuantScheme q = QuantScheme::parse(f);
        MOEKIT_CHECK(q.format == Format::kBF16 || q.format == Format::kFP16 ||
                         q.format == Format::kFP8Tensor || q.format == Format::kFP8Token,
                     "--format: the CUDA experts take bf16, fp16, fp8-tensor, fp8-token, not ", f);
      }
    } else if (k == "--reps")
      o.reps = std::stoi(v);
    else if (k == "--check-tokens")
      o.check_tokens = std::stoi(v);
    else
      MOEKIT_FAIL("unknown option ", k);
  }
  return o;
}

// ---- device data ------------------------------------------------------------------------

uint64_t splitmix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Uniform values in [lo, hi) rounded to T (bf16, fp16, or e4m3 codes: saturating).
template <typename T>
__global__ void fill_uniform(T* p, int64_t n, uint64_t seed, float lo, float hi) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    uint64_t x = seed ^ (static_cast<uint64_t>(i) * 0x9e3779b97f4a7c15ull);
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    x ^= x >> 31;
    const float u = static_cast<float>(x >> 40) * (1.0f / 16777216.0f);
    p[i] = T(lo + (hi - lo) * u);
  }
}

// t (bf16, fp16 or e4m3) uniform in [-bound, bound).
void fill(const CudaTensor& t, uint64_t seed, double bound) {
  const float lo = static_cast<float>(-bound), hi = static_cast<float>(bound);
  const uint64_t sd = splitmix(seed);
  void* p = t.view().data;
  switch (t.dtype()) {
    case DType::kBF16:
      fill_uniform<<<4096, 256>>>(static_cast<__nv_bfloat16*>(p), t.numel(), sd, lo, hi);
      break;
    case DType::kF16:
      fill_uniform<<<4096, 256>>>(static_cast<__half*>(p), t.numel(), sd, lo, hi);
      break;
    case DType::kF8E4M3:
      fill_uniform<<<4096, 256>>>(static_cast<__nv_fp8_e4m3*>(p), t.numel(), sd, lo, hi);
      break;
    default:
      MOEKIT_FAIL("fill: ", name(t.dtype()));
  }
  CHECK_CUDA(cudaGetLastError());
}

// ---- ceilings -----------------------------------------------------------------------------

float time_ms(const std::function<void()>& f, int reps, const void* flush = nullptr,
              size_t flush_bytes = 0) {
  cudaEvent_t a, b;
  CHECK_CUDA(cudaEventCreate(&a));
  CHECK_CUDA(cudaEventCreate(&b));
  std::vector<float> ms;
  for (int r = 0; r < reps + 2; ++r) {
    if (flush) CHECK_CUDA(cudaMemsetAsync(const_cast<void*>(flush), r & 0xff, flush_bytes));
    CHECK_CUDA(cudaEventRecord(a));
    f();
    CHECK_CUDA(cudaEventRecord(b));
    CHECK_CUDA(cudaEventSynchronize(b));
    float t = 0;
    CHECK_CUDA(cudaEventElapsedTime(&t, a, b));
    if (r >= 2) ms.push_back(t);  // two warm-ups
  }
  CHECK_CUDA(cudaEventDestroy(a));
  CHECK_CUDA(cudaEventDestroy(b));
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

struct Machine {
  std::string device;
  int sm_count = 0;
  double l2_mb = 0, copy_gbps = 0, bf16_tflops = 0, fp8_tflops = 0;
};

// cuBLASLt e4m3 x e4m3 -> bf16 GEMM n^3 (fp32 compute; the TN layout fp8 needs), median ms.
float fp8_gemm_ms(int n) {
  CudaTensor A(DType::kF8E4M3, {n, n}), B(DType::kF8E4M3, {n, n}), D(DType::kBF16, {n, n});
  fill(A, 3, 448.0);
  fill(B, 4, 448.0);
  const size_t ws_bytes = size_t(64) << 20;
  CudaTensor ws(DType::kU8, {int64_t(ws_bytes)});
  auto ok = [](cublasStatus_t st, const char* what) {
    MOEKIT_CHECK(st == CUBLAS_STATUS_SUCCESS, "cuBLASLt ", what, " failed: ", int(st));
  };
  cublasLtHandle_t h;
  ok(cublasLtCreate(&h), "create");
  cublasLtMatmulDesc_t desc;
  ok(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "desc");
  const cublasOperation_t t = CUBLAS_OP_T, nt = CUBLAS_OP_N;
  ok(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof t), "transa");
  ok(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &nt, sizeof nt), "transb");
  cublasLtMatrixLayout_t la, lb, ld;
  ok(cublasLtMatrixLayoutCreate(&la, CUDA_R_8F_E4M3, n, n, n), "layout A");
  ok(cublasLtMatrixLayoutCreate(&lb, CUDA_R_8F_E4M3, n, n, n), "layout B");
  ok(cublasLtMatrixLayoutCreate(&ld, CUDA_R_16BF, n, n, n), "layout D");
  cublasLtMatmulPreference_t pref;
  ok(cublasLtMatmulPreferenceCreate(&pref), "preference");
  ok(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes,
                                          sizeof ws_bytes),
     "workspace preference");
  cublasLtMatmulHeuristicResult_t algo{};
  int found = 0;
  ok(cublasLtMatmulAlgoGetHeuristic(h, desc, la, lb, ld, ld, pref, 1, &algo, &found), "heuristic");
  MOEKIT_CHECK(found > 0, "cuBLASLt: no fp8 GEMM algorithm");
  const float one = 1, zero = 0;
  const float ms = time_ms(
      [&] {
        ok(cublasLtMatmul(h, desc, &one, A.view().data, la, B.view().data, lb, &zero, D.view().data,
                          ld, D.view().data, ld, &algo.algo, ws.view().data, ws_bytes, nullptr),
           "matmul");
      },
      20);
  cublasLtMatmulPreferenceDestroy(pref);
  cublasLtMatrixLayoutDestroy(la);
  cublasLtMatrixLayoutDestroy(lb);
  cublasLtMatrixLayoutDestroy(ld);
  cublasLtMatmulDescDestroy(desc);
  cublasLtDestroy(h);
  return ms;
}

Machine measure_machine() {
  Machine m;
  m.device = cuda_device_name();
  cudaDeviceProp p{};
  CHECK_CUDA(cudaGetDeviceProperties(&p, 0));
  m.sm_count = p.multiProcessorCount;
  m.l2_mb = p.l2CacheSize / 1048576.0;
  // Device-to-device copy of 2 GiB: bytes read + bytes written over the median time.
  const size_t bytes = size_t(2) << 30;
  CudaTensor src(DType::kU8, {int64_t(bytes)}), dst(DType::kU8, {int64_t(bytes)});
  CHECK_CUDA(cudaMemset(src.view().data, 1, bytes));
  const float copy_ms = time_ms(
      [&] {
        CHECK_CUDA(
            cudaMemcpyAsync(dst.view().data, src.view().data, bytes, cudaMemcpyDeviceToDevice));
      },
      10);
  m.copy_gbps = 2.0 * bytes / (copy_ms * 1e-3) / 1e9;
  // cuBLAS bf16 GEMM 8192^3 on random data, fp32 accumulation.
  const int n = 8192;
  CudaTensor A(DType::kBF16, {n, n}), B(DType::kBF16, {n, n}), C(DType::kBF16, {n, n});
  fill(A, 1, 1.0);
  fill(B, 2, 1.0);
  cublasHandle_t h;
  MOEKIT_CHECK(cublasCreate(&h) == CUBLAS_STATUS_SUCCESS, "cublasCreate failed");
  const float one = 1, zero = 0;
  const float gemm_ms = time_ms(
      [&] {
        MOEKIT_CHECK(
            cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, n, n, n, &one, A.view().data, CUDA_R_16BF, n,
                         B.view().data, CUDA_R_16BF, n, &zero, C.view().data, CUDA_R_16BF, n,
                         CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS,
            "cublasGemmEx failed");
      },
      20);
  cublasDestroy(h);
  m.bf16_tflops = 2.0 * n * double(n) * n / (gemm_ms * 1e-3) / 1e12;
  m.fp8_tflops = 2.0 * n * double(n) * n / (fp8_gemm_ms(n) * 1e-3) / 1e12;
  return m;
}

// ---- one preset ---------------------------------------------------------------------------

struct Row {
  std::string preset, impl, format;
  int E, k;
  int64_t H, I, tokens;
  int active_experts;
  double time_us, tflops, gbps, roofline_us, pct, max_rel_err, weight_bytes, flops;
  bool graph;
};

// One preset's experts on the device in a format: bf16/fp16 weights uniform in +-bound; fp8
// weights as e4m3 codes uniform over +-448 with fp32 scales of bound / 448 times a factor in
// [0.75, 1.25) per expert (fp8-tensor) or per output row (fp8-token), so that a scale read for
// the wrong expert or row shows in the error. Biases bf16. fp8-tensor:static gets the static
// activation scale of x in [-3, 3): 3 / 448.
struct DeviceExperts {
  CudaTensor w13, w2, b13, b2, s13, s2, static_scale;
  Tensor host_static_scale;
  ExpertWeights view;
  double expert_bytes = 0;  // weights (codes and scales) and biases of one expert
};

// Scales [E] (per tensor) or [E, R] (per channel): base times a factor in [0.75, 1.25).
CudaTensor random_scales(const QuantScheme& q, int E, int64_t R, double base, uint64_t seed) {
  const bool per_channel = q.traits().scale_layout == WeightScaleLayout::kChannel;
  Tensor host = per_channel ? Tensor(DType::kF32, {E, R}) : Tensor(DType::kF32, {E});
  check::fill_uniform(host, seed, 0.75 * base, 1.25 * base);
  return CudaTensor::copy_of(host.view());
}

DeviceExperts device_experts(const Preset& pr, const QuantScheme& q) {
  const int E = pr.num_experts;
  const int64_t H = pr.hidden, I = pr.intermediate, rows13 = pr.activation.w13_rows(I);
  const double bound13 = 2.5 / std::sqrt(double(H)), bound2 = 1.0 / std::sqrt(double(I));
  DeviceExperts d;
  const DType w = q.weight_dtype();
  d.w13 = CudaTensor(w, {E, rows13, H});
  d.w2 = CudaTensor(w, {E, H, I});
  if (q.is_float()) {
    fill(d.w13, 13, bound13);
    fill(d.w2, 2, bound2);
  } else {
    fill(d.w13, 13, 448.0);
    fill(d.w2, 2, 448.0);
    d.s13 = random_scales(q, E, rows13, bound13 / 448, 31);
    d.s2 = random_scales(q, E, H, bound2 / 448, 32);
  }
  if (pr.has_bias) {
    d.b13 = CudaTensor(DType::kBF16, {E, rows13});
    d.b2 = CudaTensor(DType::kBF16, {E, H});
    fill(d.b13, 113, 0.5);
    fill(d.b2, 12, 0.5);
  }
  d.view.w13 = d.w13;
  d.view.w2 = d.w2;
  d.view.b13 = d.b13.view();
  d.view.b2 = d.b2.view();
  if (!q.is_float()) {
    d.view.quant = q;
    d.view.s13.scale = d.s13;
    d.view.s2.scale = d.s2;
  }
  if (q.static_act) {
    d.host_static_scale = Tensor(DType::kF32, {1});
    d.host_static_scale.data<float>()[0] = 3.0f / 448.0f;
    d.static_scale = CudaTensor::copy_of(d.host_static_scale.view());
  }
  d.expert_bytes = q.bytes_per_weight(rows13, H) * double(rows13 * H) +
                   q.bytes_per_weight(H, I) * double(H * I) +
                   (pr.has_bias ? 2.0 * (rows13 + H) : 0.0);
  return d;
}

// Host copies of the experts `needed` use (codes, scales, biases), as global ExpertWeights
// through a source table.
struct HostExperts {
  std::vector<Tensor> tensors;  // only the needed experts
  ExpertWeights view;
};

HostExperts host_experts(const ExpertWeights& dev, const std::set<int32_t>& needed, int E) {
  HostExperts h;
  const int64_t n = static_cast<int64_t>(needed.size());
  std::vector<int32_t> source(E, 0);
  int64_t slot = 0;
  for (int32_t e : needed) source[e] = static_cast<int32_t>(slot++);
  auto copy_rows = [&](const TensorView& d) -> TensorView {
    if (!d.present()) return {};
    const int64_t per = d.numel() / d.size(0), bytes = storage_bytes(d.dtype, per);
    Tensor t(d.dtype, {n * per});
    int64_t s = 0;
    for (int32_t e : needed) {
      CHECK_CUDA(cudaMemcpy(static_cast<char*>(t.view().data) + s * bytes,
                            static_cast<const char*>(d.data) + e * bytes, bytes,
                            cudaMemcpyDeviceToHost));
      ++s;
    }
    h.tensors.push_back(std::move(t));
    TensorView v = h.tensors.back().view();
    v.ndim = d.ndim;
    v.shape = d.shape;
    v.shape[0] = n;
    v.stride = d.stride;
    return v;
  };
  h.tensors.reserve(6);
  h.view.w13 = copy_rows(dev.w13);
  h.view.w2 = copy_rows(dev.w2);
  h.view.b13 = copy_rows(dev.b13);
  h.view.b2 = copy_rows(dev.b2);
  h.view.quant = dev.quant;
  h.view.s13.scale = copy_rows(dev.s13.scale);
  h.view.s2.scale = copy_rows(dev.s2.scale);
  h.view.source = source;
  return h;
}

std::vector<Row> run_preset(const Preset& pr, const QuantScheme& q, const Options& o,
                            const Machine& m, const CudaTensor& flush) {
  const int E = pr.num_experts, k = pr.top_k;
  const int64_t H = pr.hidden, I = pr.intermediate, rows13 = pr.activation.w13_rows(I);
  const DeviceExperts dev = device_experts(pr, q);
  const ExpertWeights& weights = dev.view;
  const DType act_dtype = q.format == Format::kFP16 ? DType::kF16 : DType::kBF16;
  const bool fp8 = !q.is_float();
  const double peak_tflops = fp8 ? m.fp8_tflops : m.bf16_tflops;
  const ExpertMap map = ExpertMap::linear(E, 1);
  // auto: small-batch experts (weights applied by finalize, fewest launches) up to 16 tokens,
  // grouped GEMM above -- the choice make_cuda_experts makes.
  const std::shared_ptr<Experts> small = make_cuda_small_batch_experts(
      weights, pr.activation, TopKWeightApplied::kNone, dev.static_scale.view());
  const std::shared_ptr<Experts> grouped =
      make_cuda_grouped_gemm_experts(weights, pr.activation, dev.static_scale.view());
  auto pf = make_cuda_prepare_finalize(map, 0);
  auto wr = make_cuda_weight_and_reduce();
  RouterConfig rc{.method = RoutingMethod::kSoftmaxTopK, .num_experts = E, .top_k = k};

  std::vector<Row> rows;
  for (int64_t M : o.tokens) {
    const std::shared_ptr<Experts>& experts =
        o.impl == "small" || (o.impl == "auto" && M <= 16) ? small : grouped;
    // Random softmax top-k routing and x in [-3, 3).
    check::Routing routing = check::make_random_routing(rc, M, 1000 + M);
    Tensor x(act_dtype, {M, H});
    check::fill_uniform(x, 7 + M, -3.0, 3.0);
    CudaTensor dx = CudaTensor::copy_of(x), ids = CudaTensor::copy_of(routing.topk_ids),
               tw = CudaTensor::copy_of(routing.topk_weights), y(act_dtype, {M, H});
    const MoEProblem p{.num_experts = E,
                       .num_local_experts = E,
                       .hidden = H,
                       .intermediate = I,
                       .top_k = k,
                       .tokens = M,
                       .act_dtype = act_dtype,
                       .weight_dtype = q.weight_dtype(),
                       .quant = q,
                       .activation = pr.activation,
                       .has_bias13 = pr.has_bias,
                       .has_bias2 = pr.has_bias};
    if (auto r = experts->can_implement(p)) MOEKIT_FAIL(pr.name, " M=", M, ": ", *r);
    const TopKWeightApplied applied = experts->weight_application();
    const bool reduced = applied == TopKWeightApplied::kWeightedAndReduced;
    const size_t bytes = Workspace::aligned(pf->workspace_size(p)) +
                         Workspace::aligned(experts->workspace_size(p)) +
                         Workspace::aligned(M * (reduced ? 1 : k) * H * 4);
    CudaTensor ws_mem(DType::kU8, {int64_t(bytes)});
    cudaStream_t stream;
    CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    auto layer = [&] {
      Workspace ws(ws_mem.view().data, bytes);
      const ExecContext ctx{stream};
      DispatchedBatch b = pf->prepare({dx, ids, tw, 0, false, experts->activation_spec()}, ws, ctx);
      TensorView out = reduced ? ws.take(DType::kF32, {M, H}) : ws.take(DType::kF32, {M, k, H});
      out.device = dx.view().device;
      experts->apply(b, out, ws, ctx);
      pf->finalize({y, out, ids, tw, applied, wr.get()}, ws, ctx);
    };
    // One graph of the whole layer; replays time it without launch gaps from the host.
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    bool use_graph = true;
    try {
      CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
      layer();
      CHECK_CUDA(cudaStreamEndCapture(stream, &graph));
      CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
    } catch (const Error& e) {
      std::fprintf(stderr, "graph capture failed (%s); timing stream launches\n", e.what());
      cudaStreamEndCapture(stream, &graph);
      (void)cudaGetLastError();
      use_graph = false;
    }
    const int reps = M >= 4096 ? std::max(5, o.reps / 4) : o.reps;
    cudaEvent_t a, b;
    CHECK_CUDA(cudaEventCreate(&a));
    CHECK_CUDA(cudaEventCreate(&b));
    std::vector<float> ms;
    for (int r = 0; r < reps + 3; ++r) {
      // Evict L2: write a buffer larger than it.
      CHECK_CUDA(cudaMemsetAsync(flush.view().data, r & 0xff, flush.view().nbytes(), stream));
      CHECK_CUDA(cudaEventRecord(a, stream));
      if (use_graph)
        CHECK_CUDA(cudaGraphLaunch(exec, stream));
      else
        layer();
      CHECK_CUDA(cudaEventRecord(b, stream));
      CHECK_CUDA(cudaEventSynchronize(b));
      float t = 0;
      CHECK_CUDA(cudaEventElapsedTime(&t, a, b));
      if (r >= 3) ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
    const double us = ms[ms.size() / 2] * 1e3;

    // Check a sample of tokens (evenly spread, last included) against the oracle.
    const Tensor yh = y.to_host();
    std::vector<int64_t> sample;
    for (int i = 0; i < o.check_tokens; ++i)
      sample.push_back(o.check_tokens == 1 ? 0 : (M - 1) * i / (o.check_tokens - 1));
    sample.erase(std::unique(sample.begin(), sample.end()), sample.end());
    std::set<int32_t> needed, active;
    for (int64_t t = 0; t < M; ++t)
      for (int s = 0; s < k; ++s) active.insert(routing.topk_ids.data<int32_t>()[t * k + s]);
    for (int64_t t : sample)
      for (int s = 0; s < k; ++s) needed.insert(routing.topk_ids.data<int32_t>()[t * k + s]);
    const HostExperts he = host_experts(weights, needed, E);
    // The oracle sees one sampled token at a time. A dynamic per-tensor a1 scale is the kernel's
    // over all M rows: the oracle gets it as a static scale (the same numbers). A per-tensor a2
    // scale (fp8-tensor) cannot be given: the oracle's covers the sample's pairs only, so those
    // rows' max_rel_err also holds the difference of the two scales' roundings.
    ExpertWeights oracle_weights = he.view;
    Tensor oracle_scale(DType::kF32, {1});
    const bool static_scale = ActivationSpec::of(q).scale == ScaleKind::kTensor;
    if (q.static_act) {
      oracle_scale.data<float>()[0] = dev.host_static_scale.data<float>()[0];
    } else if (static_scale) {
      oracle_weights.quant->static_act = true;
      oracle_scale.data<float>()[0] = tensor_scale_of_amax(activation_amax(x), DType::kF8E4M3);
    }
    std::vector<std::future<double>> errs;
    for (int64_t t : sample)
      errs.push_back(std::async(std::launch::async, [&, t] {
        ReferenceArgs ra;
        ra.x = x.view().slice0(t, t + 1);
        ra.topk_ids = routing.topk_ids.view().slice0(t, t + 1);
        ra.topk_weights = routing.topk_weights.view().slice0(t, t + 1);
        ra.weights = oracle_weights;
        ra.activation = pr.activation;
        ra.round_intermediate_to_bf16 = q.format == Format::kBF16;
        if (static_scale) ra.static_act_scale = oracle_scale.view();
        Tensor want(DType::kF32, {1, H});
        reference_moe(ra, want);
        TensorView got = yh.view().reshaped({M, H}).slice0(t, t + 1);
        return check::compare_rows(got, want, 1.0).max_err;
      }));
    double max_err = 0;
    for (auto& f : errs) max_err = std::max(max_err, f.get());

    Row row;
    row.preset = std::string(pr.name);
    row.impl = std::string(experts->name());
    row.format = q.str();
    row.E = E;
    row.k = k;
    row.H = H;
    row.I = I;
    row.tokens = M;
    row.active_experts = static_cast<int>(active.size());
    row.weight_bytes = dev.expert_bytes * active.size();
    row.flops = 2.0 * M * k * (rows13 * H + H * I);
    row.time_us = us;
    row.tflops = row.flops / (us * 1e-6) / 1e12;
    row.gbps = row.weight_bytes / (us * 1e-6) / 1e9;
    row.roofline_us =
        std::max(row.weight_bytes / (m.copy_gbps * 1e9), row.flops / (peak_tflops * 1e12)) * 1e6;
    row.pct = 100.0 * row.roofline_us / us;
    row.max_rel_err = max_err;
    row.graph = use_graph;
    rows.push_back(row);
    std::printf(
        "%-14s %-17s M=%-6lld %-18s %10.1f us  roofline %10.1f us  %5.1f%%  %7.1f TFLOP/s"
        "  %7.0f GB/s  err %.2e\n",
        row.preset.c_str(), row.format.c_str(), (long long)M, row.impl.c_str(), us, row.roofline_us,
        row.pct, row.tflops, row.gbps, max_err);
    std::fflush(stdout);
    if (exec) cudaGraphExecDestroy(exec);
    if (graph) cudaGraphDestroy(graph);
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    cudaStreamDestroy(stream);
  }
  return rows;
}

void write_json(const Options& o, const Machine& m, const std::vector<Row>& rows) {
  std::ofstream f(o.out);
  char date[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof date, "%Y-%m-%d", std::gmtime(&now));
  f << "{\n  \"command\": \"" << o.command << "\",\n  \"date\": \"" << date << "\",\n"
    << "  \"machine\": {\"device\": \"" << m.device
    << "\", \"threads\": 1, \"read_gbps\": " << m.copy_gbps
    << ", \"copy_gbps_read_plus_write\": " << m.copy_gbps
    << ", \"peak_tflops\": {\"bf16\": " << m.bf16_tflops << ", \"fp8\": " << m.fp8_tflops
    << "}, \"peak_source\": "
    << "\"cuBLAS bf16 GEMM 8192^3 and cuBLASLt e4m3 GEMM 8192^3 (bf16 out), median\", "
    << "\"sm_count\": " << m.sm_count << ", \"l2_mb\": " << m.l2_mb << "},\n  \"rows\": [\n";
  for (size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    f << "    {\"preset\": \"" << r.preset << "\", \"E\": " << r.E << ", \"H\": " << r.H
      << ", \"I\": " << r.I << ", \"k\": " << r.k << ", \"tokens\": " << r.tokens
      << ", \"format\": \"" << r.format
      << "\", \"device\": \"cuda\", \"ep\": 1, \"experts_impl\": \"" << r.impl
      << "\", \"time_us\": " << r.time_us << ", \"tflops\": " << r.tflops
      << ", \"gbps\": " << r.gbps << ", \"roofline_us\": " << r.roofline_us
      << ", \"pct_roofline\": " << r.pct << ", \"max_rel_err\": " << r.max_rel_err
      << ", \"active_experts\": " << r.active_experts << ", \"weight_bytes\": " << r.weight_bytes
      << ", \"flops\": " << r.flops << ", \"cuda_graph\": " << (r.graph ? "true" : "false")
      << ", \"routing\": \"random softmax_topk\"}" << (i + 1 < rows.size() ? "," : "") << "\n";
  }
  f << "  ]\n}\n";
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Options o = parse(argc, argv);
    MOEKIT_CHECK(cuda_device_count() > 0, "no CUDA device");
    const Machine m = measure_machine();
    std::printf(
        "%s: copy %.0f GB/s (read+write), cuBLAS bf16 %.0f TFLOP/s, cuBLASLt fp8 %.0f "
        "TFLOP/s\n",
        m.device.c_str(), m.copy_gbps, m.bf16_tflops, m.fp8_tflops);
    // Written between timed runs: twice the L2.
    const CudaTensor flush(DType::kU8, {int64_t(m.l2_mb * 2 * 1048576)});
    std::vector<Row> rows;
    for (const std::string& format : o.formats)
      for (const std::string& name : o.presets) {
        const std::vector<Row> r =
            run_preset(find_preset(name), QuantScheme::parse(format), o, m, flush);
        rows.insert(rows.end(), r.begin(), r.end());
        write_json(o, m, rows);  // partial results survive a later failure
      }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cuda_experts_bench: %s\n", e.what());
    return 1;
  }
}
