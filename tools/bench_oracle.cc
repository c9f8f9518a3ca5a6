#include "bench_oracle.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>

#include "moekit/reference.h"

namespace moekit::cli {
namespace {

std::vector<int64_t> spread_rows(int64_t m, int max_rows) {
  const int64_t n = std::min<int64_t>(m, max_rows);
  std::vector<int64_t> rows;
  for (int64_t j = 0; j < n; ++j) rows.push_back(n == 1 ? 0 : j * (m - 1) / (n - 1));
  return rows;
}

// Copies the chosen rows of a row-major [M, C] view into a new contiguous [rows, C] tensor.
Tensor gather_rows(const TensorView& t, const std::vector<int64_t>& rows) {
  const int64_t cols = t.size(1), row_bytes = cols * element_bytes(t.dtype);
  Tensor out(t.dtype, {int64_t(rows.size()), cols});
  for (size_t r = 0; r < rows.size(); ++r)
    std::memcpy(
        out.data<std::byte>() + r * row_bytes,
        static_cast<const std::byte*>(t.data) + rows[r] * t.stride[0] * element_bytes(t.dtype),
        row_bytes);
  return out;
}

// Adds the oracle's output [n, H] for experts regenerated from `spec` to y_ref.
// The oracle takes ids into the weights it is given, so the used experts are packed into
// slots 0..u-1 and `ids` rewritten to those slots in place.
void add_oracle(const RandomExpertsSpec& spec, const TensorView& x, Tensor& ids,
                const TensorView& weights, bool weight_on_input, int threads,
                std::vector<double>& y_ref) {
  std::map<int32_t, int32_t> slot_of;  // global expert -> slot, in id order
  int32_t* id = ids.data<int32_t>();
  for (int64_t i = 0; i < ids.numel(); ++i)
    if (id[i] >= 0) slot_of.emplace(id[i], 0);
  std::vector<int32_t> used;
  for (auto& [expert, slot] : slot_of) {
    slot = int32_t(used.size());
    used.push_back(expert);
  }
  for (int64_t i = 0; i < ids.numel(); ++i)
    if (id[i] >= 0) id[i] = slot_of[id[i]];
  const RandomExperts experts = make_random_experts(spec, used, threads);

  // fp32 out of fp64 sums: rounding 2^-24, far below the errors measured against it.
  Tensor part(DType::kF32, {x.size(0), x.size(1)});
  ReferenceArgs args;
  args.x = x;
  args.topk_ids = ids;
  args.topk_weights = weights;
  args.weights = experts.view();
  args.activation = spec.activation;
  args.weight_on_input = weight_on_input;
  reference_moe(args, part);
  for (int64_t i = 0; i < part.numel(); ++i) y_ref[i] += part.data<float>()[i];
}

}  // namespace

OracleCheck check_sampled_rows(const BenchLayer& b, const TensorView& x, const TensorView& topk_ids,
                               const TensorView& topk_weights, const TensorView& y, int max_rows,
                               int threads) {
  OracleCheck check;
  check.rows = spread_rows(x.size(0), max_rows);
  if (check.rows.empty()) return check;
  const int64_t n = int64_t(check.rows.size()), h = x.size(1);
  const Tensor xs = gather_rows(x, check.rows);
  Tensor ids = gather_rows(topk_ids, check.rows);
  const Tensor weights = gather_rows(topk_weights, check.rows);
  std::vector<double> y_ref(n * h);
  add_oracle(b.routed, xs, ids, weights, b.layer->config().weight_on_input(), threads, y_ref);
  if (b.shared.intermediate) {
    // The shared expert sees every token unweighted: one expert, k = 1, weight 1.
    Tensor shared_ids = Tensor::zeros(DType::kI32, {n, 1});
    Tensor ones(DType::kF32, {n, 1});
    std::fill_n(ones.data<float>(), n, 1.0f);
    add_oracle(b.shared, xs, shared_ids, ones, false, threads, y_ref);
  }

  const Tensor ys = gather_rows(y, check.rows);
  for (int64_t r = 0; r < n; ++r) {
    double max_err = 0, max_ref = 0;
    for (int64_t i = r * h; i < (r + 1) * h; ++i) {
      const double err = std::abs(double(load_as_float(ys.data<void>(), ys.dtype(), i)) - y_ref[i]);
      // A NaN in y would vanish in std::max; it is an infinite error.
      max_err = std::max(max_err, std::isnan(err) ? INFINITY : err);
      max_ref = std::max(max_ref, std::abs(y_ref[i]));
    }
    check.max_rel_err = std::max(check.max_rel_err, max_ref > 0 ? max_err / max_ref : max_err);
  }
  return check;
}

}  // namespace moekit::cli
