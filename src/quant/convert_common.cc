#include "convert_common.h"

#include <cstring>
#include <sstream>

#include "moekit/core/error.h"

namespace moekit {

ExpertWeights ConvertedExperts::view() const {
  ExpertWeights w;
  w.w13 = w13.data.view();
  w.w2 = w2.data.view();
  w.b13 = b13.view();  // an empty Tensor's view has no dimensions: absent
  w.b2 = b2.view();
  w.quant = w13.scheme;
  w.s13 = {w13.scale.view(), w13.zero.view(), w13.global.view()};
  w.s2 = {w2.scale.view(), w2.zero.view(), w2.global.view()};
  return w;
}

namespace convert_detail {

std::string tensor_name(const char* convention, int64_t expert, const char* proj,
                        const char* tensor) {
  std::ostringstream os;
  os << convention << " expert " << expert << " " << proj << "." << tensor;
  return os.str();
}

void check_expert_count(size_t experts, const char* convention) {
  MOEKIT_CHECK(experts > 0, convention, ": no experts given");
}

std::array<int64_t, kMaxDims> extents(const TensorView& t, int ndim, const std::string& what) {
  MOEKIT_CHECK(t.present(), what, ": missing");
  MOEKIT_CHECK(t.ndim == ndim, what, ": expected ", ndim, " dimensions, got ", t.str());
  return t.shape;
}

void check_input(const TensorView& t, const std::string& what, std::initializer_list<int64_t> shape,
                 std::initializer_list<DType> dtypes) {
  MOEKIT_CHECK(t.present(), what, ": missing");
  MOEKIT_CHECK(t.device.type == DeviceType::kCPU, what, ": must be a host tensor, got ", t.str());
  bool dtype_ok = false;
  std::string names;
  for (DType d : dtypes) {
    dtype_ok = dtype_ok || t.dtype == d;
    (names += names.empty() ? "" : " or ") += name(d);
  }
  MOEKIT_CHECK(dtype_ok, what, ": expected dtype ", names, ", got ", t.str());
  check_shape(t, shape, what.c_str());
  MOEKIT_CHECK(t.is_contiguous(), what, ": must be contiguous, got ", t.str());
  check_data(t, what.c_str());
}

void check_same_dtype(const TensorView& got, DType want, const std::string& what) {
  MOEKIT_CHECK(got.dtype == want, what, ": dtype ", name(got.dtype), " differs from the ",
               name(want), " of expert 0 (one dtype per layer)");
}

Tensor stack_biases(const std::vector<std::vector<TensorView>>& parts,
                    const std::vector<std::vector<int64_t>>& orders,
                    std::span<const int64_t> lengths, const std::vector<std::string>& names) {
  const TensorView& first = parts[0][0];
  int64_t rows = 0;
  for (int64_t n : lengths) rows += n;
  for (size_t e = 0; e < parts.size(); ++e)
    for (size_t p = 0; p < lengths.size(); ++p) {
      const TensorView& b = parts[e][p];
      const std::string what = names[e * lengths.size() + p];
      MOEKIT_CHECK(b.present() == first.present(), what, ": ",
                   first.present() ? "missing, but other projections have a bias"
                                   : "given, but the first projection has none");
      if (!b.present()) continue;
      check_input(b, what, {lengths[p]}, kFloatTypes);
      check_same_dtype(b, first.dtype, what);
    }
  if (!first.present()) return {};
  const int64_t experts = int64_t(parts.size());
  const int64_t esz = element_bytes(first.dtype);
  Tensor out(first.dtype, {experts, rows});
  auto* dst = out.data<char>();
  for (int64_t e = 0; e < experts; ++e)
    for (size_t p = 0; p < lengths.size(); ++p) {
      const auto* src = static_cast<const char*>(parts[e][p].data);
      for (int64_t i = 0; i < lengths[p]; ++i, dst += esz) {
        const int64_t from = orders[e].empty() ? i : orders[e][i];
        std::memcpy(dst, src + from * esz, esz);
      }
    }
  return out;
}

Tensor copy_bias(const TensorView& bias, std::initializer_list<int64_t> shape,
                 const std::string& what) {
  if (!bias.present()) return {};
  check_input(bias, what, shape, kFloatTypes);
  Tensor out(bias.dtype, shape);
  std::memcpy(out.data<void>(), bias.data, bias.nbytes());
  return out;
}

}  // namespace convert_detail
}  // namespace moekit
