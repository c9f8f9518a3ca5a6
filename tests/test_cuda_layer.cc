// A whole MoELayer on the GPU -- routing, experts, weight-and-reduce, shared expert -- against the
// same layer on the CPU, and captured in one CUDA graph that is replayed on new inputs (no host
// synchronization anywhere in forward). Skips loudly without a GPU.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <memory>

#include "moekit/check.h"
#include "moekit/cuda.h"
#include "moekit/layer.h"
#include "support/cuda_test_support.h"

namespace moekit {
namespace {

constexpr int kE = 32, kK = 4;
constexpr int64_t kH = 256, kI = 128, kM = 37;

MoELayerConfig deepseek_like() {
  MoELayerConfig c;
  c.router = check::router_config(RoutingMethod::kSigmoidGroupedTopK, kE, kK);
  c.hidden = kH;
  c.intermediate = kI;
  c.act_dtype = DType::kBF16;
  c.chunk_tokens = 16;  // several chunks per forward
  return c;
}

// max over rows of max |got - want| / max |want| (bf16 output of bf16 kernels on both sides).
double max_row_error(const Tensor& got, const Tensor& want) {
  double worst = 0;
  for (int64_t t = 0; t < kM; ++t) {
    double err = 0, scale = 0;
    for (int64_t h = 0; h < kH; ++h) {
      const double g = load_as_float(got.data<void>(), DType::kBF16, t * kH + h);
      const double w = load_as_float(want.data<void>(), DType::kBF16, t * kH + h);
      err = std::max(err, std::isnan(g) ? INFINITY : std::abs(g - w));
      scale = std::max(scale, std::abs(w));
    }
    worst = std::max(worst, err / scale);
  }
  return worst;
}

struct Inputs {
  Tensor x, logits;
  explicit Inputs(uint64_t seed) : x(DType::kBF16, {kM, kH}), logits(DType::kF32, {kM, kE}) {
    check::fill_uniform(x, seed, -3, 3);
    check::fill_uniform(logits, seed + 1, -4, 4);
  }
};

TEST(CudaLayer, WholeForwardMatchesTheCpuAndReplaysInAGraph) {
  SKIP_WITHOUT_CUDA();
  const MoELayerConfig config = deepseek_like();
  const check::LayerWeights host =
      check::make_random_weights(kE, kH, kI, {}, DType::kBF16, false, 5);
  const check::LayerWeights shared =
      check::make_random_weights(1, kH, kI, {}, DType::kBF16, false, 6);
  Tensor bias(DType::kF32, {kE});
  check::fill_uniform(bias, 9, -0.3, 0.3);
  CpuLayerOptions cpu;
  cpu.cpu.num_threads = 2;
  const ExpertWeights shared_view = shared.view();
  auto cpu_layer = make_cpu_layer(config, host.view(), &shared_view, bias, cpu);

  const DeviceExpertWeights routed(host.view()), shared_dev(shared_view);
  auto gpu_layer = make_cuda_layer(config, routed.view(), &shared_dev.view(), bias);

  const CudaTensor x(DType::kBF16, {kM, kH}), logits(DType::kF32, {kM, kE}),
      y(DType::kBF16, {kM, kH});
  std::unique_ptr<test::CapturedGraph> graph;
  for (uint64_t round = 0; round < 3; ++round) {
    const Inputs in(100 + round);
    copy_to_device(in.x, x);
    copy_to_device(in.logits, logits);
    if (round == 0) {
      // Direct call first, then capture the same forward into a graph for the later rounds.
      gpu_layer->forward(x, logits, y, {});
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      graph = std::make_unique<test::CapturedGraph>(
          [&](cudaStream_t stream) { gpu_layer->forward(x, logits, y, {stream}); });
      ASSERT_TRUE(graph->ok());
    } else {
      ASSERT_EQ(cudaMemset(y.data<void>(), 0xff, y.view().nbytes()), cudaSuccess);
      ASSERT_TRUE(graph->replay());
    }
    Tensor want(DType::kBF16, {kM, kH});
    cpu_layer->forward(in.x, in.logits, want);
    Tensor got(DType::kBF16, {kM, kH});
    copy_to_host(y, got);
    // Both sides round to bf16 at the intermediate and the output; routing is the same.
    EXPECT_LT(max_row_error(got, want), 2e-2) << "round " << round;
  }
}

// Pure host arithmetic: runs without a GPU too.
TEST(CudaLayer, SmallBatchCrossoverFollowsRowsPerExpert) {
  EXPECT_EQ(cuda_small_batch_rows(128, 8), 8);   // qwen3-30b-a3b: 16 tokens to the grouped GEMM
  EXPECT_EQ(cuda_small_batch_rows(32, 4), 4);    // gpt-oss-20b: 8 tokens to the grouped GEMM
  EXPECT_EQ(cuda_small_batch_rows(8, 2), 2);     // mixtral-8x7b
  EXPECT_EQ(cuda_small_batch_rows(256, 8), 16);  // deepseek-v3: 32 tokens to the grouped GEMM
  EXPECT_EQ(cuda_small_batch_rows(128, 8, DType::kF8E4M3), 4);  // fp8: half as many
  EXPECT_EQ(cuda_small_batch_rows(8, 2, DType::kF8E4M3), 1);
  EXPECT_EQ(cuda_small_batch_rows(1, 1), 1);  // a shared expert
  EXPECT_EQ(cuda_small_batch_rows(0, 8), 1);  // a rank without experts
}

}  // namespace
}  // namespace moekit
