// The smallest useful program over moekit's C++ API: a Mixtral-shaped (scaled down) MoE layer on
// the CPU, routed from logits, checked against the oracle.
#include <moekit/layer.h>
#include <moekit/reference.h>

#include <cmath>
#include <cstdio>
#include <random>

using namespace moekit;

int main() {
  const int E = 8, k = 2;
  const int64_t H = 256, I = 512, M = 5;
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto random = [&](DType dt, std::initializer_list<int64_t> shape, float scale) {
    Tensor t(dt, shape);
    for (int64_t i = 0; i < t.numel(); ++i) store_from_float(t.view().data, dt, i, scale * normal(rng));
    return t;
  };
  // Global weights: W13 [E, 2I, H] (gate rows then up rows), W2 [E, H, I].
  Tensor w13 = random(DType::kBF16, {E, 2 * I, H}, 1.0f / std::sqrt(float(H)));
  Tensor w2 = random(DType::kBF16, {E, H, I}, 1.0f / std::sqrt(float(I)));
  Tensor x = random(DType::kBF16, {M, H}, 1.0f);
  Tensor logits = random(DType::kF32, {M, E}, 1.0f);
  Tensor y(DType::kBF16, {M, H});

  MoELayerConfig config;
  config.router = {RoutingMethod::kSoftmaxTopK, E, k, /*renormalize=*/true};
  config.activation = Activation{};  // SiLU(gate) * up
  config.hidden = H;
  config.intermediate = I;
  ExpertWeights weights{w13, w2, {}, {}, std::nullopt};
  auto layer = make_cpu_layer(config, weights, /*shared_weights=*/nullptr, TensorView{});
  layer->forward(x, logits, y);

  // Check against the oracle with the same routing.
  Tensor ids(DType::kI32, {M, k}), w(DType::kF32, {M, k}), ref(DType::kF32, {M, H});
  route(config.router, logits, TensorView{}, ids, w);
  reference_moe({x, ids, w, weights, config.activation}, ref);
  double err = 0, norm = 0;
  for (int64_t i = 0; i < M * H; ++i) {
    const double d = load_as_float(y.view().data, DType::kBF16, i) - ref.data<float>()[i];
    err += d * d;
    norm += double(ref.data<float>()[i]) * ref.data<float>()[i];
  }
  std::printf("y[0][0..3] = %.4f %.4f %.4f %.4f, relative L2 error vs oracle %.2e\n",
              load_as_float(y.view().data, DType::kBF16, 0), load_as_float(y.view().data, DType::kBF16, 1),
              load_as_float(y.view().data, DType::kBF16, 2), load_as_float(y.view().data, DType::kBF16, 3),
              std::sqrt(err / norm));
  return std::sqrt(err / norm) < 1e-2 ? 0 : 1;
}
