#include "support/test_support.h"

#include <algorithm>
#include <cmath>
#include <cctype>
#include <cstring>

#include "moekit/cpu.h"

namespace moekit::test {

Tensor random_tensor(DType dtype, std::initializer_list<int64_t> shape, uint64_t seed, double lo,
                     double hi) {
  Tensor t(dtype, shape);
  check::fill_uniform(t, seed, lo, hi);
  return t;
}

Strided strided_copy(const TensorView& src, int64_t pad) {
  MOEKIT_CHECK(src.ndim == 2 && src.is_contiguous(), "strided_copy: needs a contiguous 2-D view");
  const int64_t M = src.size(0), N = src.size(1), eb = element_bytes(src.dtype);
  Strided s{Tensor(src.dtype, {M, N + pad}), {}};
  fill_sentinel(s.storage);
  s.view = s.storage.view().reshaped({M, N + pad});
  s.view.shape[1] = N;
  for (int64_t r = 0; r < M; ++r)
    std::memcpy(s.storage.data<char>() + r * (N + pad) * eb,
                static_cast<const char*>(src.data) + r * N * eb, N * eb);
  return s;
}

void fill_sentinel(const TensorView& t) {
  MOEKIT_CHECK(t.is_contiguous(), "fill_sentinel: needs a contiguous view, got ", t.str());
  std::memset(t.data, 0xff, t.nbytes());
}

Tensor sentinel_tensor(DType dtype, std::initializer_list<int64_t> shape) {
  Tensor t(dtype, shape);
  fill_sentinel(t);
  return t;
}

Snapshot::Snapshot(const TensorView& t) {
  // The byte span from the first to the last element (covers strided views too).
  int64_t last = 0;
  for (int d = 0; d < t.ndim; ++d) last += (t.shape[d] - 1) * t.stride[d];
  if (!t.data || t.numel() == 0) return;
  begin_ = static_cast<const char*>(t.data);
  bytes_.assign(begin_, begin_ + (last + 1) * element_bytes(t.dtype));
}

::testing::AssertionResult Snapshot::unchanged() const {
  for (size_t i = 0; i < bytes_.size(); ++i)
    if (begin_[i] != bytes_[i]) return ::testing::AssertionFailure() << "byte " << i << " changed";
  return ::testing::AssertionSuccess();
}

namespace {
::testing::AssertionResult as_assertion(const check::Comparison& c) {
  if (c.ok()) return ::testing::AssertionSuccess() << c.str();
  return ::testing::AssertionFailure() << c.str();
}
}  // namespace

::testing::AssertionResult rows_match(const TensorView& got, const TensorView& want, double bound,
                                      std::span<const double> row_scale) {
  return as_assertion(check::compare_rows(got, want, bound, row_scale));
}

::testing::AssertionResult bits_equal(const TensorView& got, const TensorView& want) {
  return as_assertion(check::compare_bits(got, want));
}

Tensor reference_output(const ReferenceArgs& args) {
  Tensor y(DType::kF32, {args.x.size(0), args.weights.hidden()});
  reference_moe(args, y);
  return y;
}

Tensor forward(ModularKernel& kernel, const TensorView& x, const TensorView& topk_ids,
               const TensorView& topk_weights, bool weight_on_input, int64_t token_key_offset) {
  Tensor y = sentinel_tensor(x.dtype, {x.size(0), x.size(1)});
  kernel.forward({x, topk_ids, topk_weights, y.view(), weight_on_input, token_key_offset});
  return y;
}

std::unique_ptr<ModularKernel> make_kernel(std::shared_ptr<Experts> experts, const ExpertMap& map,
                                           int rank, int top_k, DType act_dtype,
                                           int64_t chunk_tokens, int threads) {
  return std::make_unique<ModularKernel>(make_local_prepare_finalize(map, rank), std::move(experts),
                                         make_cpu_weight_and_reduce(threads),
                                         KernelConfig{top_k, act_dtype, chunk_tokens});
}

const std::vector<check::ExpertsEntry>& all_experts() {
  static const std::vector<check::ExpertsEntry> entries = check::experts_registry();
  return entries;
}

const check::ExpertsEntry& experts_entry(std::string_view name) {
  for (const auto& e : all_experts())
    if (e.name == name) return e;
  MOEKIT_FAIL("no experts '", name, "' in the registry");
}

TestLayer::TestLayer(const LayerSpec& s)
    : spec(s),
      weights(check::make_random_weights(s.num_experts, s.hidden, s.intermediate, s.activation,
                                         s.dtype, s.bias, check::mix_seed(s.seed, 1))),
      routing(check::make_random_routing(check::router_config(s.routing, s.num_experts, s.top_k),
                                         s.tokens, check::mix_seed(s.seed, 2), s.padding_period)),
      x(random_tensor(s.dtype, {s.tokens, s.hidden}, check::mix_seed(s.seed, 3), -3.0, 3.0)) {}

ReferenceArgs TestLayer::reference_args() const {
  return {x.view(),       routing.topk_ids.view(), routing.topk_weights.view(),
          weights.view(), spec.activation,         routing.weight_on_input};
}

Tensor TestLayer::reference() const {
  return reference_output(reference_args());
}

std::unique_ptr<ModularKernel> TestLayer::kernel(const check::ExpertsEntry& entry,
                                                 int64_t chunk_tokens, const ExpertMap* map,
                                                 int rank, int threads) const {
  const ExpertMap m = map ? *map : ExpertMap::linear(spec.num_experts, 1);
  return make_kernel(
      entry.make(ExpertWeights::local_view(weights.view(), m, rank), spec.activation, threads), m,
      rank, routing.config.top_k, spec.dtype, chunk_tokens, threads);
}

Tensor TestLayer::forward(ModularKernel& kernel) const {
  return test::forward(kernel, x, routing.topk_ids, routing.topk_weights, routing.weight_on_input);
}

double TestLayer::bound(int ranks) const {
  return check::error_bound(spec.dtype, ranks, routing.weight_on_input, spec.hidden,
                            spec.intermediate);
}

std::vector<std::string> experts_names() {
  std::vector<std::string> names;
  for (const auto& e : all_experts()) names.push_back(e.name);
  return names;
}

::testing::AssertionResult error_mentions(const std::function<void()>& f, std::string_view needle) {
  auto lower = [](std::string_view s) {
    std::string l(s);
    std::transform(l.begin(), l.end(), l.begin(), [](unsigned char c) { return std::tolower(c); });
    return l;
  };
  try {
    f();
  } catch (const Error& e) {
    if (lower(e.message()).find(lower(needle)) != std::string::npos)
      return ::testing::AssertionSuccess() << e.message();
    return ::testing::AssertionFailure()
           << "moekit::Error \"" << e.message() << "\" does not mention \"" << needle << "\"";
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "threw a non-moekit exception: " << e.what();
  }
  return ::testing::AssertionFailure()
         << "did not throw (expected an error about \"" << needle << "\")";
}

std::string test_name(std::string_view s) {
  std::string n;
  for (char c : s) n += std::isalnum(static_cast<unsigned char>(c)) ? c : '_';
  return n;
}

std::vector<CpuIsa> supported_isas() {
  std::vector<CpuIsa> out;
  for (CpuIsa isa : {CpuIsa::kScalar, CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAvx512Bf16})
    if (cpu_supports(isa)) out.push_back(isa);
  return out;
}

double activation_error(const Activation& act, double g, double eg, double u, double eu) {
  const double h = apply_activation<double>(act, g, u);
  const double dg =
      (apply_activation<double>(act, g + eg, u) - apply_activation<double>(act, g - eg, u)) / 2;
  const double du =
      (apply_activation<double>(act, g, u + eu) - apply_activation<double>(act, g, u - eu)) / 2;
  return 2 * (std::abs(dg) + std::abs(du)) +
         16 * kU * (std::abs(h) + std::abs(g) * (act.gated ? std::abs(u) : 1)) + 1e-37;
}

}  // namespace moekit::test
