// Shared pieces of the checkpoint importers (moekit/quant/convert.h): input validation with
// messages that name the expert, projection and tensor, and bias stacking.
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <span>
#include <string>
#include <vector>

#include "moekit/core/tensor.h"
#include "moekit/quant/convert.h"

namespace moekit::convert_detail {

inline constexpr std::initializer_list<DType> kFloatTypes = {DType::kF32, DType::kF16,
                                                             DType::kBF16};

// The checkpoints' names of an expert's projections: gate, up (w13), down (w2).
inline constexpr const char* kProj[3] = {"gate_proj", "up_proj", "down_proj"};

// "gptq expert 3 down_proj.qzeros": the name of one checkpoint tensor in messages.
std::string tensor_name(const char* convention, int64_t expert, const char* proj,
                        const char* tensor);

// Throws unless `experts` is not empty.
void check_expert_count(size_t experts, const char* convention);

// t's extents, after checking that it is present with `ndim` dimensions (to read sizes from a
// tensor before its full check).
std::array<int64_t, kMaxDims> extents(const TensorView& t, int ndim, const std::string& what);

// Throws unless t is a present, contiguous host tensor of one of `dtypes` with this shape.
void check_input(const TensorView& t, const std::string& what, std::initializer_list<int64_t> shape,
                 std::initializer_list<DType> dtypes);

// Throws unless `got` equals `want` (e.g. every expert's scales of one dtype), naming both.
void check_same_dtype(const TensorView& got, DType want, const std::string& what);

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Biases of E experts stacked into [E, R]: parts[e] are expert e's bias vectors in row order
// (w13: gate then up; w2: down), each absent or float [lengths[p]]; orders[e], when not empty,
// reorders within every part (row i of a part reads its element orders[e][i]). All absent: an
// empty tensor; some absent, or dtypes that differ: throws. Keeps the checkpoint's dtype.
Tensor stack_biases(const std::vector<std::vector<TensorView>>& parts,
                    const std::vector<std::vector<int64_t>>& orders,
                    std::span<const int64_t> lengths, const std::vector<std::string>& names);

// A float tensor [E, R] copied whole (a per-layer bias), or an empty tensor when absent.
Tensor copy_bias(const TensorView& bias, std::initializer_list<int64_t> shape,
                 const std::string& what);

}  // namespace moekit::convert_detail
