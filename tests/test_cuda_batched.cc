// Batched-format CUDA experts (make_cuda_batched_experts) against the oracle, driven through
// Experts::apply on device tensors (there is no CUDA batched prepare/finalize): a1 [E_local, N, H]
// with uneven counts per expert (0 and N among them) on the device, in every format the CUDA
// experts take, with and without biases, under a linear and a round-robin placement, on the
// small-batch path, the grouped-GEMM path and the chooser. The oracle is the reference experts
// behind the CPU batched adapter (make_batched_experts) on host copies of the same batch. Rows
// past a count hold NaN (and NaN scales): they must not leak, and their output must be +0.
// Skips, loudly, without a CUDA device.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "moekit/cuda.h"
#include "moekit/dist/ep.h"
#include "moekit/layer.h"
#include "moekit/quant/quantize.h"
#include "support/cuda_test_support.h"
#include "support/test_support.h"

namespace moekit {
namespace {

constexpr int kLocal = 8;  // E_local of every test
// max_small_rows that force one path.
constexpr int64_t kAlwaysSmall = std::numeric_limits<int64_t>::max();
constexpr int64_t kAlwaysGrouped = 0;
// The static activation scale of fp8-tensor:static: x reaches about 6 here (6 / 448 = 0.0134).
constexpr float kStaticScale = 0.0234375f;

// Uneven counts of the 8 local experts for N rows each: N and 0 among them, and 0 first, so that
// row 0 of the batch is padding.
std::vector<int32_t> uneven_counts(int64_t N) {
  const int64_t pattern[kLocal] = {0, N, 1, (N + 1) / 2, N - 1, 3, N, 2};
  std::vector<int32_t> c(kLocal);
  for (int e = 0; e < kLocal; ++e)
    c[e] = static_cast<int32_t>(std::clamp<int64_t>(pattern[e], 0, N));
  return c;
}

// A layer of `format` on the host and on the device: global weights [E, ...] (quantized formats:
// codes and scales) and, for the static format, its activation scale.
struct Layer {
  Layer(const std::string& format_name, int num_experts, int64_t hidden, int64_t intermediate,
        const Activation& activation, bool bias, uint64_t seed)
      : format(QuantScheme::parse(format_name)),
        act(activation),
        H(hidden),
        I(intermediate),
        host(check::make_random_weights(num_experts, H, I, act, format, bias,
                                        check::mix_seed(seed, 1))),
        device_weights(host.view()) {
    if (format.static_act) {
      host_static = Tensor(DType::kF32, {1});
      host_static.data<float>()[0] = kStaticScale;
      static_scale = CudaTensor::copy_of(host_static);
    }
  }
  bool quantized() const { return !format.is_float(); }
  // x and y: the float format's dtype, bf16 for quantized formats.
  DType x_dtype() const { return quantized() ? DType::kBF16 : format.traits().weight; }
  ActivationSpec spec() const {
    ActivationSpec s = ActivationSpec::of(format);
    s.static_scale = host_static.view();
    if (s.scale == ScaleKind::kNone) s.dtype = x_dtype();
    return s;
  }
  std::shared_ptr<Experts> experts(const ExpertMap& map, int rank, int64_t max_small_rows) const {
    return make_cuda_batched_experts(ExpertWeights::local_view(device_weights.view(), map, rank),
                                     act, max_small_rows, static_scale.view());
  }

  QuantScheme format;
  Activation act;
  int64_t H, I;
  check::LayerWeights host;
  DeviceExpertWeights device_weights;  // host's weights, global [E, ...]
  CudaTensor static_scale;
  Tensor host_static;
};

// A batch of the batched layout, host (what the oracle reads) and device (what the kernels read):
// a1 [E_local * N, H] in the experts' activation dtype (quantized: the check library's
// row-scaled x, quantized on the host), its scale ([E_local * N] per token or [1]), and the counts
// [E_local] as given (the host batch uses them clamped into [0, N], as the kernels do). Rows past
// a count, and their per-token scales, are NaN.
struct Batch {
  Batch(const Layer& l, int64_t n, std::vector<int32_t> given_counts, uint64_t seed)
      : N(n), H(l.H), counts(std::move(given_counts)) {
    const int64_t R = kLocal * N;
    const ActivationSpec spec = l.spec();
    Tensor x = check::make_activations(l.format, l.x_dtype(), R, H, seed);
    if (spec.scale == ScaleKind::kNone) {
      a1 = std::move(x);
    } else {
      a1 = Tensor(spec.dtype, {R, H});
      scale = Tensor(DType::kF32, {spec.scale == ScaleKind::kToken ? R : 1});
      quantize_activations(x, spec, a1, scale);
    }
    const int64_t row_bytes = a1.view().nbytes() / std::max<int64_t>(R, 1);
    for (int e = 0; e < kLocal; ++e) {
      clamped.push_back(std::clamp<int32_t>(counts[e], 0, static_cast<int32_t>(N)));
      for (int64_t j = clamped[e]; j < N; ++j) {
        std::memset(a1.data<char>() + (e * N + j) * row_bytes, 0xff, row_bytes);
        if (spec.scale == ScaleKind::kToken) scale.data<float>()[e * N + j] = std::nanf("");
      }
    }
    d_a1 = CudaTensor::copy_of(a1);
    d_counts = CudaTensor::copy_of(counts_view(counts));
    if (spec.scale != ScaleKind::kNone) d_scale = CudaTensor::copy_of(scale);
    kind = spec.scale;
  }
  // Writes `other`'s data into this batch's device buffers (same shapes), keeping their addresses.
  void load(const Batch& other) {
    copy_to_device(other.a1, d_a1);
    copy_to_device(counts_view(other.counts), d_counts);
    if (kind != ScaleKind::kNone) copy_to_device(other.scale, d_scale);
  }
  DispatchedBatch device() const { return make(d_a1, d_scale, d_counts); }
  DispatchedBatch host() const { return make(a1, scale, counts_view(clamped)); }
  bool valid(int64_t r) const { return r % N < clamped[r / N]; }

  int64_t N, H;
  std::vector<int32_t> counts, clamped;
  Tensor a1, scale;
  CudaTensor d_a1, d_scale, d_counts;
  ScaleKind kind = ScaleKind::kNone;

 private:
  static TensorView counts_view(const std::vector<int32_t>& c) {
    return TensorView(const_cast<int32_t*>(c.data()), DType::kI32, {kLocal});
  }
  DispatchedBatch make(const TensorView& x, const TensorView& s, const TensorView& c) const {
    DispatchedBatch b;
    b.format = ActivationFormat::kBatched;
    b.a1 = x.reshaped({kLocal, N, H});
    b.a1_scale = {kind, 0, kind == ScaleKind::kNone ? TensorView{} : s};
    b.expert_num_tokens = c;
    return b;
  }
};

// The oracle: reference experts of the rank's host weights behind the CPU batched adapter, on
// the host batch; [E_local * N, H] fp32 with exact zeros past the counts.
Tensor oracle(const Layer& l, const ExpertMap& map, int rank, const Batch& b) {
  const auto ref = make_batched_experts(make_reference_experts(
      ExpertWeights::local_view(l.host.view(), map, rank), l.act, l.host_static.view()));
  const int64_t R = kLocal * b.N;
  Tensor ws_mem(DType::kU8,
                {static_cast<int64_t>(ref->workspace_size(problem_for(ref->info(), R, 1))) + 64});
  Workspace ws(ws_mem.data<void>(), ws_mem.view().nbytes());
  Tensor out(DType::kF32, {R, l.H});
  ref->apply(b.host(), out.view().reshaped({kLocal, b.N, l.H}), ws, {});
  return out;
}

// A device workspace for `experts` over the batch's rows; the problem's top_k (4) plays no part
// in the batched format. Poisoned: every byte read must have been written first.
struct DeviceWorkspace {
  DeviceWorkspace(const Experts& experts, int64_t rows) {
    const MoEProblem p = problem_for(experts.info(), rows, 4);
    EXPECT_FALSE(experts.can_implement(p).has_value()) << *experts.can_implement(p);
    bytes = experts.workspace_size(p);
    mem = CudaTensor(DType::kU8, {static_cast<int64_t>(std::max<size_t>(bytes, 1))});
    EXPECT_EQ(cudaMemset(mem.view().data, 0xff, bytes), cudaSuccess);
  }
  Workspace get() const { return Workspace(mem.view().data, bytes); }
  size_t bytes;
  CudaTensor mem;
};

// out [E_local, N, H] on the device, NaN-filled.
CudaTensor poisoned_out(const Batch& b) {
  CudaTensor out(DType::kF32, {kLocal, b.N, b.H});
  EXPECT_EQ(cudaMemset(out.view().data, 0xff, out.view().nbytes()), cudaSuccess);
  return out;
}

// apply() on the device, on `stream`; the output [E_local * N, H] on the host.
Tensor run(const Experts& experts, const Batch& b, cudaStream_t stream = nullptr) {
  DeviceWorkspace ws(experts, kLocal * b.N);
  Workspace w = ws.get();
  const CudaTensor out = poisoned_out(b);
  experts.apply(b.device(), out, w, ExecContext{stream});
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  return out.to_host();
}

// Every valid row within check::error_bound of the format (and, for quantized activations, no
// systematic error beyond check::systematic_error_bound), every row past a count +0 bit for bit.
::testing::AssertionResult matches(const Tensor& got, const Tensor& want, const Layer& l,
                                   const Batch& b) {
  const int64_t R = kLocal * b.N, H = l.H;
  for (int64_t r = 0; r < R; ++r)
    if (!b.valid(r))
      for (int64_t c = 0; c < H; ++c) {
        uint32_t bits;
        std::memcpy(&bits, got.data<float>() + r * H + c, 4);
        if (bits != 0)
          return ::testing::AssertionFailure()
                 << "padding row " << r << " (expert " << r / b.N << ", row " << r % b.N
                 << ") column " << c << " is " << got.data<float>()[r * H + c] << ", not +0";
      }
  const TensorView g = got.view().reshaped({R, H}), w = want.view().reshaped({R, H});
  const double bound = check::error_bound(l.format, l.x_dtype(), 1, false, H, l.I);
  if (auto r = test::rows_match(g, w, bound); !r) return r;
  const auto systematic = check::systematic_error_bound(l.format, l.x_dtype(), 1);
  if (!systematic) return ::testing::AssertionSuccess();
  const check::Comparison c = check::compare_systematic(g, w, *systematic);
  if (c.ok()) return ::testing::AssertionSuccess() << c.str();
  return ::testing::AssertionFailure() << c.str();
}

const Activation kSilu{};
const Activation kOai{
    .fn = ActivationFn::kSwigluOai, .gated = true, .layout = GateUpLayout::kInterleaved};

// The layer of a case: SiLU, H 128, I 96 without biases; SwiGLU-OAI (interleaved), H 144, I 48
// with them (16-byte rows in every format). Round-robin: rank 1 of 2 holds 8 of 16 experts.
Layer case_layer(const std::string& format, bool bias, bool round_robin, uint64_t seed) {
  return Layer(format, round_robin ? 2 * kLocal : kLocal, bias ? 144 : 128, bias ? 48 : 96,
               bias ? kOai : kSilu, bias, seed);
}

struct Placement {
  ExpertMap map;
  int rank;
};
Placement placement(bool round_robin) {
  if (round_robin) return {ExpertMap::round_robin(2 * kLocal, 2), 1};
  return {ExpertMap::linear(kLocal, 1), 0};
}

struct Case {
  std::string format;
  int64_t N;
  bool bias;
  std::string path;  // small, grouped, auto
  bool round_robin;
};

int64_t max_small_rows(const std::string& path) {
  if (path == "small") return kAlwaysSmall;
  if (path == "grouped") return kAlwaysGrouped;
  return -1;
}

class CudaBatchedVsOracle : public ::testing::TestWithParam<Case> {};

TEST_P(CudaBatchedVsOracle, MatchesReference) {
  SKIP_WITHOUT_CUDA();
  const Case& c = GetParam();
  const uint64_t seed = check::mix_seed(c.N * 17 + c.bias, c.format);
  const Layer l = case_layer(c.format, c.bias, c.round_robin, seed);
  const Placement where = placement(c.round_robin);
  const auto experts = l.experts(where.map, where.rank, max_small_rows(c.path));
  EXPECT_EQ(experts->activation_format(), ActivationFormat::kBatched);
  EXPECT_EQ(experts->weight_application(), TopKWeightApplied::kNone);
  const Batch b(l, c.N, uneven_counts(c.N), check::mix_seed(seed, 2));
  const Tensor got = run(*experts, b);
  EXPECT_TRUE(matches(got, oracle(l, where.map, where.rank, b), l, b));
  // Deterministic: a second run gives the same bits.
  const Tensor again = run(*experts, b);
  EXPECT_TRUE(test::bits_equal(again.view().reshaped({kLocal * c.N, l.H}),
                               got.view().reshaped({kLocal * c.N, l.H})));
}

const char* const kFormats[] = {"bf16", "fp16", "fp8-token", "fp8-tensor", "fp8-tensor:static"};

std::vector<Case> cases() {
  std::vector<Case> out;
  for (const char* format : kFormats)
    for (int64_t N : {1, 5, 64})
      for (bool bias : {false, true})
        for (const char* path : {"small", "grouped", "auto"})
          for (bool round_robin : {false, true})
            out.push_back({format, N, bias, path, round_robin});
  return out;
}

INSTANTIATE_TEST_SUITE_P(Sweep, CudaBatchedVsOracle, ::testing::ValuesIn(cases()),
                         [](const ::testing::TestParamInfo<Case>& i) {
                           const Case& c = i.param;
                           return test::test_name(c.format + "_N" + std::to_string(c.N) +
                                                  (c.bias ? "_bias_" : "_") + c.path +
                                                  (c.round_robin ? "_round_robin" : "_linear"));
                         });

// Counts outside [0, N] are clamped on the device (no host synchronisation to report them): a
// negative count computes no row, one above N all N rows, on both paths.
TEST(CudaBatched, ClampsCountsOutsideTheRows) {
  SKIP_WITHOUT_CUDA();
  const Layer l = case_layer("bf16", true, false, 11);
  const Placement where = placement(false);
  const Batch b(l, 5, {-3, 9, 5, 0, 2, -1, 6, 1}, 12);
  for (int64_t max_small : {kAlwaysSmall, kAlwaysGrouped}) {
    SCOPED_TRACE("max_small_rows " + std::to_string(max_small));
    const auto experts = l.experts(where.map, where.rank, max_small);
    EXPECT_TRUE(matches(run(*experts, b), oracle(l, where.map, where.rank, b), l, b));
  }
}

// The chooser: by default small-batch up to one row per local expert, the grouped GEMM above;
// MOEKIT_LOG_CHOICES logs each call's choice.
TEST(CudaBatched, ChoosesThePathByTheRowsOffered) {
  SKIP_WITHOUT_CUDA();
  const Layer l = case_layer("bf16", false, false, 21);
  const Placement where = placement(false);
  ASSERT_EQ(setenv("MOEKIT_LOG_CHOICES", "1", 1), 0);
  const auto experts = l.experts(where.map, where.rank, -1);
  ASSERT_EQ(unsetenv("MOEKIT_LOG_CHOICES"), 0);
  const int64_t threshold = kLocal;
  EXPECT_NE(std::string(experts->name()).find("<= " + std::to_string(threshold) + " rows"),
            std::string::npos)
      << experts->name();
  for (int64_t N : {int64_t{1}, int64_t{5}}) {
    const Batch b(l, N, uneven_counts(N), 22 + N);
    ::testing::internal::CaptureStderr();
    const Tensor got = run(*experts, b);
    const std::string log = ::testing::internal::GetCapturedStderr();
    const char* want = kLocal * N <= threshold ? "-> cuda-small-batch" : "-> cuda-grouped-gemm";
    EXPECT_NE(log.find(want), std::string::npos) << "N " << N << ": " << log;
    EXPECT_TRUE(matches(got, oracle(l, where.map, where.rank, b), l, b));
  }
}

// Contract 7: apply enqueues everything on ctx.stream without a host synchronisation (captured
// in global mode, where a synchronising call fails the capture), and the graph replayed on new
// a1, scales and counts written into the same buffers computes the new batch -- on both paths,
// in every format.
TEST(CudaBatched, GraphReplaysOnNewInputsAndCounts) {
  SKIP_WITHOUT_CUDA();
  for (const char* format : kFormats)
    for (int64_t max_small : {kAlwaysSmall, kAlwaysGrouped}) {
      SCOPED_TRACE(std::string(format) + " max_small_rows " + std::to_string(max_small));
      const Layer l = case_layer(format, true, true, 31);
      const Placement where = placement(true);
      const auto experts = l.experts(where.map, where.rank, max_small);
      const int64_t N = 6;
      Batch captured(l, N, uneven_counts(N), 32);
      const Batch second(l, N, {6, 0, 2, 5, 0, 1, 3, 6}, 33);
      DeviceWorkspace ws(*experts, kLocal * N);
      const CudaTensor out = poisoned_out(captured);
      test::CapturedGraph graph([&](cudaStream_t stream) {
        Workspace w = ws.get();
        experts->apply(captured.device(), out, w, ExecContext{stream});
      });
      ASSERT_TRUE(graph.ok());
      for (const Batch* b : std::initializer_list<const Batch*>{&captured, &second}) {
        captured.load(*b);
        EXPECT_EQ(cudaMemset(out.view().data, 0xff, out.view().nbytes()), cudaSuccess);
        ASSERT_TRUE(graph.replay());
        EXPECT_TRUE(matches(out.to_host(), oracle(l, where.map, where.rank, *b), l, *b));
      }
    }
}

// Contract 8: a batch the experts cannot take is refused with the reason before anything is
// enqueued: out keeps its bytes.
TEST(CudaBatched, RefusesBadBatchesAndChangesNothing) {
  SKIP_WITHOUT_CUDA();
  for (const char* format : {"bf16", "fp8-token"}) {
    SCOPED_TRACE(format);
    const Layer l = case_layer(format, false, false, 41);
    const Placement where = placement(false);
    const int64_t N = 5, R = kLocal * N, H = l.H;
    const Batch b(l, N, uneven_counts(N), 42);
    const CudaTensor out = poisoned_out(b);
    const CudaTensor wide(l.spec().dtype, {kLocal, N, H + 16});
    const CudaTensor f32_counts(DType::kF32, {kLocal}), long_counts(DType::kI32, {kLocal + 1});
    const CudaTensor bf16_out(DType::kBF16, {kLocal, N, H}),
        tall_out(DType::kF32, {kLocal, N + 1, H});
    const CudaTensor more_experts(l.spec().dtype, {kLocal + 1, N, H});
    const Tensor host_out(DType::kF32, {kLocal, N, H});
    TensorView strided = wide.view();  // [E_local, N, H] rows H + 16 apart
    strided.shape[2] = H;

    struct Bad {
      const char* why;
      std::function<void(DispatchedBatch&, TensorView&)> change;
    };
    std::vector<Bad> bad = {
        {"expects batched activations",
         [](DispatchedBatch& x, TensorView&) { x.format = ActivationFormat::kStandard; }},
        {"a1 must be [E_local=8", [&](DispatchedBatch& x, TensorView&) { x.a1 = more_experts; }},
        {"a1 must be [E_local=8",
         [&](DispatchedBatch& x, TensorView&) {
           x.a1 = x.a1.reshaped({R, H});
         }},
        {"a1 must be a contiguous CUDA tensor",
         [&](DispatchedBatch& x, TensorView&) { x.a1 = strided; }},
        {"a1 must be a contiguous CUDA tensor",
         [&](DispatchedBatch& x, TensorView&) { x.a1 = b.host().a1; }},
        {"expert_num_tokens: expected shape",
         [&](DispatchedBatch& x, TensorView&) { x.expert_num_tokens = long_counts; }},
        {"expert_num_tokens: expected dtype",
         [&](DispatchedBatch& x, TensorView&) { x.expert_num_tokens = f32_counts; }},
        {"expert_num_tokens must be a contiguous CUDA tensor",
         [&](DispatchedBatch& x, TensorView&) {
           x.expert_num_tokens = b.host().expert_num_tokens;
         }},
        {"out: expected shape", [&](DispatchedBatch&, TensorView& o) { o = tall_out; }},
        {"out: expected dtype", [&](DispatchedBatch&, TensorView& o) { o = bf16_out; }},
        {"out must be a contiguous CUDA tensor",
         [&](DispatchedBatch&, TensorView& o) { o = host_out; }},
        {"a1 carries", [&](DispatchedBatch& x, TensorView&) {
           x.a1_scale.kind =
               x.a1_scale.kind == ScaleKind::kNone ? ScaleKind::kToken : ScaleKind::kNone;
         }}};
    if (l.quantized())
      bad.push_back({"a1 scale: expected shape", [&](DispatchedBatch& x, TensorView&) {
                       x.a1_scale.scale = x.a1_scale.scale.slice0(0, R - 1);
                     }});
    const auto experts = l.experts(where.map, where.rank, -1);
    DeviceWorkspace ws(*experts, R);
    const Tensor before = out.to_host();
    for (const Bad& x : bad) {
      DispatchedBatch batch = b.device();
      TensorView o = out.view();
      x.change(batch, o);
      Workspace w = ws.get();
      EXPECT_TRUE(test::error_mentions([&] { experts->apply(batch, o, w, {}); }, x.why)) << x.why;
    }
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_TRUE(
        test::bits_equal(out.to_host().view().reshaped({R, H}), before.view().reshaped({R, H})));
  }
}

// Contract 5: formats, shapes and scales the CUDA experts do not take are refused at
// construction with the reason, and a standard prepare/finalize does not compose with them.
TEST(CudaBatched, RefusesWhatItCannotCompute) {
  SKIP_WITHOUT_CUDA();
  const ExpertMap map = ExpertMap::linear(kLocal, 1);
  for (const char* format : {"fp8-block", "int8", "w4a16"}) {
    const Layer l(format, kLocal, 128, 128, kSilu, false, 51);
    EXPECT_TRUE(test::error_mentions([&] { l.experts(map, 0, -1); }, "format")) << format;
  }
  const Layer odd("bf16", kLocal, 67, 45, kSilu, false, 52);
  EXPECT_TRUE(test::error_mentions([&] { odd.experts(map, 0, -1); }, "multiples of 8"));
  const Layer fp8_static = case_layer("fp8-tensor:static", false, false, 53);
  EXPECT_TRUE(test::error_mentions(
      [&] { make_cuda_batched_experts(fp8_static.device_weights.view(), kSilu, -1, {}); },
      "static activation scale"));
  EXPECT_TRUE(test::error_mentions(
      [&] { make_cuda_batched_experts(fp8_static.host.view(), kSilu); }, "CUDA"));
  const Layer l = case_layer("bf16", false, false, 54);
  EXPECT_TRUE(test::error_mentions([&] { l.experts(map, 0, -2); }, "max_small_rows"));
  const auto experts = l.experts(map, 0, -1);
  MoEProblem p = problem_for(experts->info(), 16, 2);
  p.hidden += 8;
  ASSERT_TRUE(experts->can_implement(p).has_value());
  int dev = 0;
  ASSERT_EQ(cudaGetDevice(&dev), cudaSuccess);
  const auto why = ModularKernel::check_compatible(
      *make_cuda_prepare_finalize(map, 0), *experts,
      KernelConfig{2, DType::kBF16, 16, Device{DeviceType::kCUDA, dev},
                   cuda_workspace_allocator(dev)});
  ASSERT_TRUE(why.has_value());
  EXPECT_NE(why->find("batched"), std::string::npos) << *why;
}

}  // namespace
}  // namespace moekit
