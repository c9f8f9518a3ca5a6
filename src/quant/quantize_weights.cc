// Weight quantizers (quant/quantize.h): float [n, R, K] -> data, scale, zero, global as
// quant/format.h lays them out, and a row back. Offline work, one expert at a time: one pass
// over its rows gathers the statistics of every scale, a second encodes the rows.
#include <algorithm>
#include <cmath>
#include <exception>
#include <memory>
#include <vector>

#include "cpu/thread_pool.h"
#include "moekit/core/error.h"
#include "moekit/quant/quantize.h"
#include "quant/quantize_codes.h"

namespace moekit {

namespace {

using quant::Code;
using quant::Stats;

// Every scale layout of quant/format.h is a grid of cells over one expert's [R, K]: a cell is
// `rows` rows by `cols` columns (the last ones ragged), and an expert's scales are its
// [nr, nc] cells in row-major order -- kTensor [1, 1], kChannel [R, 1], kBlock
// [ceil(R/B), ceil(K/B)], kGroup [R, ceil(K/g)].
struct Cells {
  int64_t rows, cols, nr, nc;
  int64_t count() const { return nr * nc; }
  // The cell of element (r, column group j).
  int64_t of(int64_t r, int64_t j) const { return (r / rows) * nc + j; }
};

Cells cells_of(const QuantScheme& q, int64_t R, int64_t K) {
  const int64_t cols = q.group_size(K);
  const int64_t rows = q.traits().scale_layout == WeightScaleLayout::kTensor  ? R
                       : q.traits().scale_layout == WeightScaleLayout::kBlock ? q.traits().block
                                                                              : 1;
  return {rows, cols, (R + rows - 1) / rows, (K + cols - 1) / cols};
}

// The shape of the scale tensor of n experts: [n], [n, R], [n, nr, nc] by layout.
std::vector<int64_t> scale_shape(const QuantScheme& q, int64_t n, const Cells& c) {
  switch (q.traits().scale_layout) {
    case WeightScaleLayout::kTensor:
      return {n};
    case WeightScaleLayout::kChannel:
      return {n, c.nr};
    default:
      return {n, c.nr, c.nc};
  }
}

Tensor make_tensor(DType t, const std::vector<int64_t>& shape) {
  switch (shape.size()) {
    case 1:
      return Tensor(t, {shape[0]});
    case 2:
      return Tensor(t, {shape[0], shape[1]});
    default:
      return Tensor(t, {shape[0], shape[1], shape[2]});
  }
}

// The largest |q * scale| a global scale aims at, so that w = q * scale * global: the largest
// weight code times the largest scale code where the scale element is a code of its own (nvfp4:
// 6 * 448, the e4m3 group scales use their whole range); with a float scale element, the
// largest activation code (w4a8: 448, so int4 * bf16 group scale fits e4m3 unsaturated).
float global_target(const QuantScheme& q) {
  const FormatTraits& t = q.traits();
  if (quant::is_code(t.scale))
    return quant::code_of(t.scale, "global scale").max *
           quant::code_of(q.weight_dtype(), "global scale").max;
  return quant::code_of(t.act, "global scale").max;
}

// Element (e, r / rows, j) of a scale or zero tensor of 1, 2 or 3 dims (strided).
int64_t cell_index(const TensorView& s, const Cells& c, int64_t e, int64_t r, int64_t j) {
  int64_t i = e * s.stride[0];
  if (s.ndim >= 2) i += (r / c.rows) * s.stride[1];
  if (s.ndim >= 3) i += j * s.stride[2];
  return i;
}

void check_scheme(const QuantScheme& q, const char* what) {
  if (auto why = q.validate()) MOEKIT_FAIL(what, ": format ", q.str(), ": ", *why);
  MOEKIT_CHECK(!q.is_float(), what, ": format ", q.str(),
               " is a float format (nothing to quantize)");
}

// The scales of weights [n, R, K] in scheme q, as dequantize_weight_row reads them.
void check_scales(const WeightScales& s, const QuantScheme& q, int64_t n, int64_t R, int64_t K) {
  const Cells c = cells_of(q, R, K);
  const std::vector<int64_t> shape = scale_shape(q, n, c);
  MOEKIT_CHECK(s.scale.present(), "dequantize_weight_row: scale missing (format ", q.str(), ")");
  quant::check_shape(s.scale, shape, "dequantize_weight_row: scale");
  const DType sd = q.scale_dtype();
  MOEKIT_CHECK(s.scale.dtype == sd || (traits(sd).is_float && traits(s.scale.dtype).is_float),
               "dequantize_weight_row: scale: expected dtype ", name(sd), ", got ", s.scale.str());
  MOEKIT_CHECK(s.zero.present() == q.zero_point, "dequantize_weight_row: zero ",
               q.zero_point ? "missing" : "given", " (format ", q.str(), ")");
  if (q.zero_point) {
    quant::check_shape(s.zero, {n, R, c.nc}, "dequantize_weight_row: zero");
    check_dtype(s.zero, DType::kU8, "dequantize_weight_row: zero");
  }
  MOEKIT_CHECK(s.global.present() == q.traits().global_scale, "dequantize_weight_row: global ",
               q.traits().global_scale ? "missing" : "given", " (format ", q.str(), ")");
  if (q.traits().global_scale) {
    quant::check_shape(s.global, {n}, "dequantize_weight_row: global");
    check_dtype(s.global, DType::kF32, "dequantize_weight_row: global");
  }
  for (const TensorView* t : {&s.scale, &s.zero, &s.global})
    if (t->present()) {
      MOEKIT_CHECK(t->device.type == DeviceType::kCPU,
                   "dequantize_weight_row: scales must be host tensors, got ", t->str());
      check_data(*t, "dequantize_weight_row: scales");
    }
}

// Row r of expert e of w [n, R, K] as fp32.
const float* weight_row(const TensorView& w, int64_t e, int64_t r, std::vector<float>& buffer) {
  return quant::load_float_row(quant::element_ptr(w, e * w.stride[0] + r * w.stride[1]), w.dtype,
                               w.size(2), buffer);
}

// Quantizes expert e of w into out (scales as `cells` says).
void quantize_expert(const TensorView& w, const QuantScheme& q, const Cells& cells, int64_t e,
                     QuantizedWeight& out) {
  const int64_t R = w.size(1), K = w.size(2);
  const Code& code = quant::code_of(q.weight_dtype(), "quantize_weight");
  std::vector<float> buffer;

  std::vector<Stats> stats(size_t(cells.count()));
  for (int64_t r = 0; r < R; ++r) {
    const float* row = weight_row(w, e, r, buffer);
    for (int64_t j = 0; j < cells.nc; ++j)
      stats[cells.of(r, j)].add(row + j * cells.cols, std::min(cells.cols, K - j * cells.cols));
  }

  float global = 1.0f;
  if (q.traits().global_scale) {
    Stats all;
    for (const Stats& s : stats) all.merge(s);
    global =
        quant::store_scale(out.global.data<float>(), DType::kF32, e, all.amax / global_target(q));
  }

  // Scales as stored (their rounding is what the codes are divided by), zero points.
  std::vector<float> scale(stats.size());
  std::vector<int> zero(stats.size(), 0);
  const int64_t base = e * cells.count();
  for (size_t i = 0; i < stats.size(); ++i) {
    const Stats& st = stats[i];
    if (q.zero_point) {
      // [min, max] (both include 0) onto [0, max code]; the scale rounds up to its element so
      // that max code * scale still spans the range and only rounding moves a value.
      scale[i] = quant::store_scale(out.scale.data<void>(), out.scale.dtype(), base + int64_t(i),
                                    (st.max - st.min) / code.max, /*round_up=*/true);
      zero[i] = int(std::clamp(std::nearbyint(-st.min / scale[i]), 0.0f, code.max));
      out.zero.data<uint8_t>()[base + int64_t(i)] = uint8_t(zero[i]);
    } else {
      scale[i] = quant::store_scale(out.scale.data<void>(), out.scale.dtype(), base + int64_t(i),
                                    quant::symmetric_scale(st, code) / global);
    }
  }

  const TensorView& data = out.data.view();
  for (int64_t r = 0; r < R; ++r) {
    const float* row = weight_row(w, e, r, buffer);
    char* dst = quant::element_ptr(data, e * data.stride[0] + r * data.stride[1]);
    for (int64_t j = 0; j < cells.nc; ++j) {
      const int64_t c = cells.of(r, j), k0 = j * cells.cols;
      quant::encode_span(code, row + k0, std::min(cells.cols, K - k0), scale[c] * global, zero[c],
                         dst, k0);
    }
  }
}

}  // namespace

WeightScales QuantizedWeight::scales() const {
  return {scale.view(), zero.view(), global.view()};
}

QuantizedWeight quantize_weight(const TensorView& w, const QuantScheme& scheme) {
  check_scheme(scheme, "quantize_weight");
  quant::check_host_rows(w, 3, "quantize_weight: w");
  MOEKIT_CHECK(traits(w.dtype).is_float, "quantize_weight: w must be fp32/fp16/bf16, got ",
               w.str());
  const int64_t n = w.size(0), R = w.size(1), K = w.size(2);
  MOEKIT_CHECK(n >= 1 && R >= 1 && K >= 1, "quantize_weight: empty weight ", w.str());
  const DType wt = scheme.weight_dtype();
  MOEKIT_CHECK(!is_packed(wt) || K % 2 == 0, "quantize_weight: ", name(wt),
               " packs two elements per byte, so each row of K = ", K,
               " must be even to start on a whole byte");

  const Cells cells = cells_of(scheme, R, K);
  QuantizedWeight out;
  out.scheme = scheme;
  out.data = Tensor(wt, {n, R, K});
  out.scale = make_tensor(scheme.scale_dtype(), scale_shape(scheme, n, cells));
  if (scheme.zero_point) out.zero = Tensor(DType::kU8, {n, R, cells.nc});
  if (scheme.traits().global_scale) out.global = Tensor(DType::kF32, {n});
  // Experts are independent (each writes its own rows, scales, zeros and global, all starting on
  // whole bytes), so they run on the shared CPU pool; the result does not depend on the threads.
  const std::shared_ptr<cpu::ThreadPool> pool = cpu::shared_thread_pool(0);
  const int threads = pool->size();
  std::vector<std::exception_ptr> failed(static_cast<size_t>(threads));
  pool->run([&](int t) {
    try {
      for (int64_t e = t; e < n; e += threads) quantize_expert(w, scheme, cells, e, out);
    } catch (...) {
      failed[size_t(t)] = std::current_exception();
    }
  });
  for (const std::exception_ptr& f : failed)
    if (f) std::rethrow_exception(f);
  return out;
}

void dequantize_weight_row(const TensorView& data, const WeightScales& scales,
                           const QuantScheme& scheme, int64_t e, int64_t r, float* out) {
  check_scheme(scheme, "dequantize_weight_row");
  MOEKIT_CHECK(data.ndim == 3, "dequantize_weight_row: data: expected [n, R, K], got ", data.str());
  check_dtype(data, scheme.weight_dtype(), "dequantize_weight_row: data");
  MOEKIT_CHECK(data.device.type == DeviceType::kCPU && data.stride[2] == 1,
               "dequantize_weight_row: data must be a host tensor with contiguous rows, got ",
               data.str());
  const int64_t n = data.size(0), R = data.size(1), K = data.size(2);
  MOEKIT_CHECK(e >= 0 && e < n && r >= 0 && r < R, "dequantize_weight_row: row (", e, ", ", r,
               ") is not in ", data.str());
  check_scales(scales, scheme, n, R, K);

  const Cells cells = cells_of(scheme, R, K);
  quant::decode_span(data.dtype, quant::element_ptr(data, e * data.stride[0] + r * data.stride[1]),
                     0, K, out);
  const TensorView &s = scales.scale, &z = scales.zero;
  const float global = scales.global.present() ? load_as_float(scales.global.data, DType::kF32,
                                                               e * scales.global.stride[0])
                                               : 1.0f;
  for (int64_t j = 0; j < cells.nc; ++j) {
    const float sc = load_as_float(s.data, s.dtype, cell_index(s, cells, e, r, j));
    const float zp =
        z.present() ? load_as_float(z.data, DType::kU8, cell_index(z, cells, e, r, j)) : 0.0f;
    for (int64_t k = j * cells.cols; k < std::min(K, (j + 1) * cells.cols); ++k)
      out[k] = (out[k] - zp) * sc * global;
  }
}

ExpertWeights QuantizedExpertWeights::view() const {
  ExpertWeights v;
  v.w13 = w13.data.view();
  v.w2 = w2.data.view();
  v.b13 = b13;
  v.b2 = b2;
  v.quant = w13.scheme;
  v.s13 = w13.scales();
  v.s2 = w2.scales();
  return v;
}

QuantizedExpertWeights quantize_expert_weights(const ExpertWeights& w, const QuantScheme& scheme) {
  MOEKIT_CHECK(!w.quant, "quantize_expert_weights: the weights are already in format ",
               w.quant ? w.quant->str() : "");
  MOEKIT_CHECK(!w.source,
               "quantize_expert_weights: weights with a source table (a local view); "
               "quantize the global weights, then take ExpertWeights::local_view of the result");
  MOEKIT_CHECK(w.w13.ndim == 3 && w.w2.ndim == 3 && w.w13.size(0) == w.w2.size(0) &&
                   w.w13.size(2) == w.w2.size(1),
               "quantize_expert_weights: w13 ", w.w13.str(), " and w2 ", w.w2.str(),
               " are not [n, rows, H] and [n, H, I]");
  QuantizedExpertWeights q;
  q.w13 = quantize_weight(w.w13, scheme);
  q.w2 = quantize_weight(w.w2, scheme);
  q.b13 = w.b13;
  q.b2 = w.b2;
  return q;
}

}  // namespace moekit
