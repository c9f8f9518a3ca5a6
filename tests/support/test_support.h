// Shared helpers of the GoogleTest suite: deterministic tensors, routing through the real
// router, comparisons that name the first bad coordinate, sentinels that prove an output was
// left untouched, and error expectations. Data and comparisons come from moekit/check.h, which
// `moekit check` uses too.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "moekit/check.h"
#include "moekit/cpu.h"
#include "moekit/core/error.h"
#include "moekit/modular.h"
#include "moekit/reference.h"

namespace moekit::test {

// Experts that forward everything to `inner`: test wrappers override what they change.
class ForwardingExperts : public Experts {
 public:
  explicit ForwardingExperts(std::shared_ptr<Experts> inner) : inner_(std::move(inner)) {}
  std::string_view name() const override { return inner_->name(); }
  ActivationFormat activation_format() const override { return inner_->activation_format(); }
  ActivationSpec activation_spec() const override { return inner_->activation_spec(); }
  TopKWeightApplied weight_application() const override { return inner_->weight_application(); }
  const ExpertsInfo& info() const override { return inner_->info(); }
  std::optional<std::string> can_implement(const MoEProblem& p) const override {
    return inner_->can_implement(p);
  }
  size_t workspace_size(const MoEProblem& p) const override { return inner_->workspace_size(p); }
  void apply(const DispatchedBatch& b, const TensorView& out, Workspace& ws,
             const ExecContext& ctx) const override {
    inner_->apply(b, out, ws, ctx);
  }

 protected:
  std::shared_ptr<Experts> inner_;
};

// gamma_n of floating-point error analysis for fp32 (n u / (1 - n u), u = 2^-24): the bound of
// n roundings in a sum or product chain.
inline constexpr double kU = 0x1p-24;  // fp32 unit roundoff
inline double gamma(int64_t n) { return double(n) * kU / (1 - double(n) * kU); }

// Bound on |act(g', u') - act(g, u)| for |g' - g| <= eg, |u' - u| <= eu, plus the kernel's own
// fp32 evaluation of the activation (16 roundings of its magnitude): the derivative estimated
// by central differences, doubled for curvature.
double activation_error(const Activation& act, double g, double eg, double u, double eu);

// The CPU kernel families this CPU runs, slowest first.
std::vector<CpuIsa> supported_isas();

// A tensor of uniform values in [lo, hi), deterministic in seed.
Tensor random_tensor(DType dtype, std::initializer_list<int64_t> shape, uint64_t seed,
                     double lo = -1.0, double hi = 1.0);
// A copy of a 2-D tensor whose rows are `pad` elements longer than its last dimension
// (stride[0] = N + pad); `storage` owns the bytes, `view` is the strided view.
struct Strided {
  Tensor storage;
  TensorView view;
};
Strided strided_copy(const TensorView& src, int64_t pad);

// Every byte 0xff: NaN in fp32, fp16 and bf16, -1 in integers.
void fill_sentinel(const TensorView& t);
Tensor sentinel_tensor(DType dtype, std::initializer_list<int64_t> shape);

// The bytes a view covers, to prove later that nothing wrote them.
class Snapshot {
 public:
  explicit Snapshot(const TensorView& t);
  ::testing::AssertionResult unchanged() const;

 private:
  const char* begin_ = nullptr;
  std::vector<char> bytes_;
};

// Comparisons as gtest assertions; the failure message names the first bad coordinate.
::testing::AssertionResult rows_match(const TensorView& got, const TensorView& want, double bound,
                                      std::span<const double> row_scale = {});
::testing::AssertionResult bits_equal(const TensorView& got, const TensorView& want);

// reference_moe into a new fp32 [M, H] tensor.
Tensor reference_output(const ReferenceArgs& args);
// A new sentinel-filled y [M, H] of x's dtype, written by kernel.forward.
Tensor forward(ModularKernel& kernel, const TensorView& x, const TensorView& topk_ids,
               const TensorView& topk_weights, bool weight_on_input = false,
               int64_t token_key_offset = 0);

// A ModularKernel over local prepare/finalize of `rank` and CPU weight-and-reduce.
std::unique_ptr<ModularKernel> make_kernel(std::shared_ptr<Experts> experts, const ExpertMap& map,
                                           int rank, int top_k, DType act_dtype,
                                           int64_t chunk_tokens = 1024, int threads = 1);

// The experts of the check registry, for tests that loop over every implementation.
const std::vector<check::ExpertsEntry>& all_experts();
const check::ExpertsEntry& experts_entry(std::string_view name);
std::vector<std::string> experts_names();

// A random layer and batch: weights, x, and routing through the real router.
struct LayerSpec {
  int num_experts = 8;
  int64_t hidden = 67, intermediate = 45;
  int top_k = 2;  // Llama-4 routing forces 1
  int64_t tokens = 111;
  Activation activation;
  DType dtype = DType::kBF16;
  RoutingMethod routing = RoutingMethod::kSoftmaxTopK;
  bool bias = false;
  int64_t padding_period = 0;  // see check::make_random_routing
  uint64_t seed = 1;
};

struct TestLayer {
  explicit TestLayer(const LayerSpec& spec);
  ReferenceArgs reference_args() const;  // the whole layer on x
  Tensor reference() const;              // fp32 [M, H]
  // A kernel over `map` (default linear(E, 1)) for `rank`, with the experts `entry` builds
  // from the rank's local view of the weights.
  std::unique_ptr<ModularKernel> kernel(const check::ExpertsEntry& entry,
                                        int64_t chunk_tokens = 1024, const ExpertMap* map = nullptr,
                                        int rank = 0, int threads = 2) const;
  Tensor forward(ModularKernel& kernel) const;  // y for x and the routing
  double bound(int ranks = 1) const;            // check::error_bound for this layer

  LayerSpec spec;
  check::LayerWeights weights;
  check::Routing routing;
  Tensor x;  // [M, H] uniform in [-3, 3)
};

// Succeeds when f() throws moekit::Error whose message contains `needle` (case-insensitive).
::testing::AssertionResult error_mentions(const std::function<void()>& f, std::string_view needle);

// s with every character gtest rejects in a test name replaced by '_'.
std::string test_name(std::string_view s);

}  // namespace moekit::test
