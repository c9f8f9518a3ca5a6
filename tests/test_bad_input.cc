// Contract 8: bad input gets a clear error and changes nothing. Each case builds one bad call
// to ModularKernel, MoELayer, make_cpu_experts, ExpertMap or route; the test checks that it
// throws moekit::Error, that the message names the problem, and that no byte of any output (or
// input) was written.
#include <cstring>
#include <functional>

#include "moekit/cpu.h"
#include "moekit/layer.h"
#include "moekit/router.h"
#include "support/test_support.h"

namespace moekit::test {
namespace {

constexpr int kE = 8, kK = 2;
constexpr int64_t kH = 16, kI = 8, kM = 10, kChunk = 4;

// Valid inputs for every API under test; a case spoils one of them. Every tensor here is
// snapshotted before the call and must be unchanged after it.
struct World {
  World()
      : layer({.num_experts = kE, .hidden = kH, .intermediate = kI, .top_k = kK, .tokens = kM}) {
    kernel = layer.kernel(experts_entry("cpu-" + std::string(name(detect_cpu_isa()))), kChunk);
    MoELayerConfig c;
    c.router = layer.routing.config;
    c.activation = layer.spec.activation;
    c.hidden = kH;
    c.intermediate = kI;
    c.chunk_tokens = kChunk;
    layer_config = c;
    moe = make_cpu_layer(c, layer.weights.view(), nullptr, {});
    watch(layer.x);
    watch(layer.routing.logits);
    watch(layer.routing.topk_ids);
    watch(layer.routing.topk_weights);
    watch(y);
  }
  ForwardArgs args() const {
    return {layer.x.view(),
            layer.routing.topk_ids.view(),
            layer.routing.topk_weights.view(),
            y.view(),
            false,
            0};
  }
  // A new tensor that must stay untouched as well.
  TensorView own(Tensor t) {
    owned.push_back(std::move(t));
    watch(owned.back());
    return owned.back().view();
  }
  void watch(const TensorView& t) { watched.push_back(t); }

  TestLayer layer;
  Tensor y = sentinel_tensor(DType::kBF16, {kM, kH});
  std::unique_ptr<ModularKernel> kernel;
  MoELayerConfig layer_config;
  std::unique_ptr<MoELayer> moe;
  std::vector<Tensor> owned;
  std::vector<TensorView> watched;
};

struct BadInput {
  const char* name;
  const char* needle;  // what the message must mention
  // Prepares the bad call (creating any tensors it needs through World::own) and returns it.
  std::function<std::function<void()>(World&)> make;
};

// A forward of the world's kernel with one argument spoiled.
BadInput bad_forward(const char* name, const char* needle,
                     std::function<void(World&, ForwardArgs&)> spoil) {
  return {name, needle, [spoil](World& w) -> std::function<void()> {
            ForwardArgs a = w.args();
            spoil(w, a);
            return [&w, a] { w.kernel->forward(a); };
          }};
}

// make_cpu_experts over the world's weights with one tensor spoiled.
BadInput bad_weights(const char* name, const char* needle,
                     std::function<void(World&, ExpertWeights&)> spoil) {
  return {name, needle, [spoil](World& w) -> std::function<void()> {
            ExpertWeights ew = w.layer.weights.view();
            spoil(w, ew);
            return [&w, ew] { make_cpu_experts(ew, w.layer.spec.activation); };
          }};
}

// route() into the world's ids and weights with one argument spoiled.
BadInput bad_route(const char* name, const char* needle,
                   std::function<void(World&, RouterConfig&, TensorView& logits)> spoil) {
  return {name, needle, [spoil](World& w) -> std::function<void()> {
            RouterConfig c = w.layer.routing.config;
            TensorView logits = w.layer.routing.logits.view();
            spoil(w, c, logits);
            return [&w, c, logits] {
              route(c, logits, {}, w.layer.routing.topk_ids, w.layer.routing.topk_weights);
            };
          }};
}

BadInput bad_call(const char* name, const char* needle, std::function<void(World&)> call) {
  return {name, needle,
          [call](World& w) -> std::function<void()> { return [&w, call] { call(w); }; }};
}

TensorView with(TensorView v, int dim, int64_t extent) {
  v.shape[dim] = extent;
  return v;
}

const std::vector<BadInput>& bad_inputs() {
  static const std::vector<BadInput> cases = {
      // ---- ModularKernel::forward ----
      bad_forward("x_wrong_width", "x: expected shape",
                  [](World& w, ForwardArgs& a) { a.x = w.own(Tensor::zeros(DType::kBF16, {kM, kH + 1})); }),
      bad_forward("x_wrong_dtype", "x: expected dtype",
                  [](World& w, ForwardArgs& a) { a.x = w.own(Tensor::zeros(DType::kF32, {kM, kH})); }),
      bad_forward("x_3d", "x: expected",
                  [](World& w, ForwardArgs& a) { a.x = w.own(Tensor::zeros(DType::kBF16, {kM, 1, kH})); }),
      bad_forward("x_null_data", "x: null", [](World&, ForwardArgs& a) { a.x.data = nullptr; }),
      bad_forward("x_last_dim_not_contiguous", "contiguous", [](World& w, ForwardArgs& a) {
        a.x = w.own(Tensor::zeros(DType::kBF16, {kM, 2 * kH})).reshaped({kM, 2 * kH});
        a.x.shape[1] = kH;
        a.x.stride[1] = 2;
      }),
      bad_forward("x_on_cuda", "cpu", [](World&, ForwardArgs& a) { a.x.device = {DeviceType::kCUDA, 0}; }),
      bad_forward("ids_wrong_dtype", "topk_ids: expected dtype", [](World& w, ForwardArgs& a) {
        a.topk_ids = w.own(Tensor::zeros(DType::kI64, {kM, kK}));
      }),
      bad_forward("ids_wrong_k", "topk_ids: expected shape", [](World& w, ForwardArgs& a) {
        a.topk_ids = w.own(Tensor::zeros(DType::kI32, {kM, kK + 1}));
      }),
      bad_forward("weights_wrong_dtype", "topk_weights: expected dtype", [](World& w, ForwardArgs& a) {
        a.topk_weights = w.own(Tensor::zeros(DType::kBF16, {kM, kK}));
      }),
      bad_forward("weights_wrong_rows", "topk_weights: expected shape",
                  [](World&, ForwardArgs& a) { a.topk_weights = with(a.topk_weights, 0, kM - 1); }),
      // The bad id sits in the last chunk: nothing may be written for the earlier chunks.
      bad_forward("id_equal_to_E", "topk_ids[9, 1] = 8", [](World& w, ForwardArgs& a) {
        Tensor ids = Tensor::zeros(DType::kI32, {kM, kK});
        ids.data<int32_t>()[kM * kK - 1] = kE;
        a.topk_ids = w.own(std::move(ids));
      }),
      bad_forward("id_below_minus_one", "= -2", [](World& w, ForwardArgs& a) {
        Tensor ids = Tensor::zeros(DType::kI32, {kM, kK});
        ids.data<int32_t>()[kM * kK - 2] = -2;
        a.topk_ids = w.own(std::move(ids));
      }),
      bad_forward("y_wrong_rows", "y: expected shape", [](World&, ForwardArgs& a) { a.y = with(a.y, 0, kM - 1); }),
      bad_forward("y_wrong_dtype", "y: expected dtype",
                  [](World& w, ForwardArgs& a) { a.y = w.own(sentinel_tensor(DType::kF32, {kM, kH})); }),
      bad_forward("y_overlaps_x", "overlaps x", [](World& w, ForwardArgs& a) {
        const TensorView buf = w.own(random_tensor(DType::kBF16, {kM + 3, kH}, 1));
        a.x = buf.slice0(0, kM);
        a.y = buf.slice0(3, kM + 3);
      }),
      bad_forward("y_overlaps_topk_weights", "overlaps topk_weights", [](World& w, ForwardArgs& a) {
        // One buffer: fp32 weights [M, k] at the start, bf16 y [M, H] from byte 16 on.
        const TensorView buf = w.own(Tensor::zeros(DType::kF32, {kM * kH}));
        a.topk_weights = TensorView(buf.data, DType::kF32, {kM, kK});
        a.y = TensorView(static_cast<char*>(buf.data) + 16, DType::kBF16, {kM, kH});
      }),
      bad_forward("weight_on_input_with_k2", "weight_on_input",
                  [](World&, ForwardArgs& a) { a.weight_on_input = true; }),
      // ---- ModularKernel construction ----
      bad_call("kernel_chunk_tokens_0", "chunk_tokens", [](World& w) {
        make_kernel(make_reference_experts(w.layer.weights.view(), w.layer.spec.activation),
                    ExpertMap::linear(kE, 1), 0, kK, DType::kBF16, 0);
      }),
      bad_call("kernel_top_k_above_E", "top_k", [](World& w) {
        make_kernel(make_reference_experts(w.layer.weights.view(), w.layer.spec.activation),
                    ExpertMap::linear(kE, 1), 0, kE + 1, DType::kBF16);
      }),
      bad_call("kernel_int_activation_dtype", "float", [](World& w) {
        make_kernel(make_reference_experts(w.layer.weights.view(), w.layer.spec.activation),
                    ExpertMap::linear(kE, 1), 0, kK, DType::kI32);
      }),
      bad_call("kernel_without_experts", "required", [](World&) {
        ModularKernel(make_local_prepare_finalize(ExpertMap::linear(kE, 1), 0), nullptr,
                      make_cpu_weight_and_reduce(1), {kK, DType::kBF16, 64});
      }),
      // ---- make_cpu_experts ----
      bad_weights("w2_disagrees_with_w13", "w2", [](World& w, ExpertWeights& ew) {
        ew.w2 = w.own(Tensor::zeros(DType::kBF16, {kE, kH + 1, kI}));
      }),
      bad_weights("w13_rows_not_2I", "w13", [](World& w, ExpertWeights& ew) {
        ew.w13 = w.own(Tensor::zeros(DType::kBF16, {kE, kI, kH}));
      }),
      bad_weights("b13_misshaped", "b13", [](World& w, ExpertWeights& ew) {
        ew.b13 = w.own(Tensor::zeros(DType::kBF16, {kE, kI}));
      }),
      bad_weights("b2_misshaped", "b2", [](World& w, ExpertWeights& ew) {
        ew.b2 = w.own(Tensor::zeros(DType::kBF16, {kE, kI}));
      }),
      bad_weights("w2_dtype_differs", "w2", [](World& w, ExpertWeights& ew) {
        ew.w2 = w.own(Tensor::zeros(DType::kF32, {kE, kH, kI}));
      }),
      bad_weights("integer_weights", "float", [](World& w, ExpertWeights& ew) {
        ew.w13 = w.own(Tensor::zeros(DType::kI32, {kE, 2 * kI, kH}));
        ew.w2 = w.own(Tensor::zeros(DType::kI32, {kE, kH, kI}));
      }),
      bad_weights("zero_experts", "expert", [](World& w, ExpertWeights& ew) {
        ew.w13 = w.own(Tensor::zeros(DType::kBF16, {0, 2 * kI, kH}));
        ew.w2 = w.own(Tensor::zeros(DType::kBF16, {0, kH, kI}));
      }),
      bad_weights("w13_null_data", "null", [](World&, ExpertWeights& ew) { ew.w13.data = nullptr; }),
      bad_weights("source_outside_weights", "source",
                  [](World&, ExpertWeights& ew) { ew.source = std::vector<int32_t>{0, kE}; }),
      // ---- ExpertMap ----
      bad_call("map_not_divisible", "divisible", [](World&) { ExpertMap::linear(kE, 3); }),
      bad_call("map_zero_experts", "num_experts", [](World&) { ExpertMap::round_robin(0, 1); }),
      bad_call("map_expert_held_twice", "held by ranks",
               [](World&) { ExpertMap::table(4, {{0, 1}, {1, 2, 3}}); }),
      bad_call("map_expert_missing", "held by no rank", [](World&) { ExpertMap::table(4, {{0, 1}, {2}}); }),
      bad_call("map_expert_out_of_range", "outside", [](World&) { ExpertMap::replicated(4, {{0, 1}, {2, 3, 4}}); }),
      // ---- route ----
      bad_route("route_k_above_E", "top_k", [](World&, RouterConfig& c, TensorView&) { c.top_k = kE + 1; }),
      bad_route("route_logits_wrong_width", "logits",
                [](World& w, RouterConfig&, TensorView& l) { l = w.own(Tensor::zeros(DType::kF32, {kM, kE + 1})); }),
      bad_route("route_logits_int", "logits",
                [](World& w, RouterConfig&, TensorView& l) { l = w.own(Tensor::zeros(DType::kI32, {kM, kE})); }),
      bad_route("route_grouped_without_bias", "correction_bias", [](World&, RouterConfig& c, TensorView&) {
        c = check::router_config(RoutingMethod::kSigmoidGroupedTopK, kE, kK);
      }),
      bad_route("route_llama4_k2", "top_k", [](World&, RouterConfig& c, TensorView&) {
        c.method = RoutingMethod::kLlama4Top1Sigmoid;
      }),
      // ---- MoELayer ----
      {"layer_logits_wrong_width", "router_logits",
       [](World& w) -> std::function<void()> {
         const TensorView logits = w.own(Tensor::zeros(DType::kF32, {kM, kE + 1}));
         return [&w, logits] { w.moe->forward(w.layer.x, logits, w.y); };
       }},
      {"layer_x_wrong_dtype", "x: expected dtype",
       [](World& w) -> std::function<void()> {
         const TensorView x = w.own(Tensor::zeros(DType::kF32, {kM, kH}));
         return [&w, x] { w.moe->forward(x, w.layer.routing.logits, w.y); };
       }},
      bad_call("layer_y_wrong_rows", "y: expected shape", [](World& w) {
        w.moe->forward(w.layer.x, w.layer.routing.logits, with(w.y.view(), 0, kM - 1));
      }),
      // y is x shifted by one chunk: no chunk of y overlaps the same chunk of x, yet writing
      // y's first chunk destroys x's second.
      {"layer_y_overlaps_x_across_chunks", "overlaps",
       [](World& w) -> std::function<void()> {
         const TensorView buf = w.own(random_tensor(DType::kBF16, {kM + kChunk, kH}, 2));
         return [&w, buf] {
           w.moe->forward(buf.slice0(0, kM), w.layer.routing.logits,
                          buf.slice0(kChunk, kM + kChunk));
         };
       }},
      {"layer_routed_ids_out_of_range", "topk_ids",
       [](World& w) -> std::function<void()> {
         Tensor ids = Tensor::zeros(DType::kI32, {kM, kK});
         ids.data<int32_t>()[3] = kE;
         const TensorView v = w.own(std::move(ids));
         return [&w, v] { w.moe->forward_routed(w.layer.x, v, w.layer.routing.topk_weights, w.y); };
       }},
      bad_call("cpu_layer_map_of_other_E", "router's E", [](World& w) {
        CpuLayerOptions o;
        o.map = ExpertMap::linear(2 * kE, 2);
        make_cpu_layer(w.layer_config, w.layer.weights.view(), nullptr, {}, o);
      }),
      bad_call("cpu_layer_chunk_tokens_0", "chunk_tokens", [](World& w) {
        MoELayerConfig c = w.layer_config;
        c.chunk_tokens = 0;
        make_cpu_layer(c, w.layer.weights.view(), nullptr, {});
      }),
      bad_call("cpu_layer_weights_of_other_H", "H=", [](World& w) {
        MoELayerConfig c = w.layer_config;
        c.hidden = kH + 1;
        make_cpu_layer(c, w.layer.weights.view(), nullptr, {});
      }),
  };
  return cases;
}

class BadInputs : public ::testing::TestWithParam<size_t> {};

TEST_P(BadInputs, ThrowAClearErrorAndChangeNothing) {
  const BadInput& bad = bad_inputs()[GetParam()];
  World world;
  const std::function<void()> call = bad.make(world);
  std::vector<Snapshot> before;
  for (const TensorView& t : world.watched) before.emplace_back(t);
  EXPECT_TRUE(error_mentions(call, bad.needle));
  for (size_t i = 0; i < before.size(); ++i)
    EXPECT_TRUE(before[i].unchanged()) << "watched tensor " << i << ": " << world.watched[i].str();
}

INSTANTIATE_TEST_SUITE_P(Contract8, BadInputs, ::testing::Range<size_t>(0, bad_inputs().size()),
                         [](const auto& info) {
                           return std::string(bad_inputs()[info.param].name);
                         });

}  // namespace
}  // namespace moekit::test
