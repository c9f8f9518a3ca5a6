// Shared machinery of the quantizers (quantize_weights.cc, quantize_activations.cc): the codes
// a value can be quantized to, the statistics a scale is computed from, spans of values
// encoded under one scale and decoded back. One table of codes (kCodes in quantize_codes.cc);
// the per-element loops are templates chosen once per span, never a switch per element.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "moekit/core/tensor.h"

namespace moekit::quant {

// A quantized element type and the range of its codes: floats [-max, max]; signed integers
// symmetric [-max, max] (int8 [-127, 127], int4 [-7, 7], so that -amax and amax are equally
// exact); unsigned integers (with a zero point) [0, max].
struct Code {
  DType dtype;
  float max;  // largest code value: the dynamic scale is amax / max
  bool is_int;
  bool is_unsigned;  // a zero point shifts it
  // The code has no NaN of its own (e2m1): a NaN among the values a scale covers makes that
  // scale NaN, which every scale element can hold. Integer codes take NaN as 0 instead.
  bool nan_in_scale;
};
// The code of a quantized dtype; throws naming `what` for a float or unknown one.
const Code& code_of(DType t, const char* what);
bool is_code(DType t);

// What a scale is computed from: the finite values it covers (NaN and +-inf excluded; +-inf
// saturate to the largest code), and whether a NaN was among them.
struct Stats {
  float amax = 0, min = 0, max = 0;  // min/max start at 0: the range always holds zero
  bool nan = false;
  void add(const float* x, int64_t n);
  void merge(const Stats& o);
};

// The value a scale s >= 0 (or NaN) becomes when stored as element i of p in dtype t: fp32 as is,
// bf16/fp16 to nearest even (round_up: the nearest value >= s), e4m3 to nearest and saturating,
// ue8m0 up to a power of two. A scale that stores as zero (all-zero values, or too small for the
// element) is stored as 1 instead, so dequantizing never loses a value to a zero scale and
// quantizing never divides by zero. Returns the stored value.
float store_scale(void* p, DType t, int64_t i, float s, bool round_up = false);

// The scale of values with statistics `st` under code c with no zero point: amax / max, NaN
// where c wants NaN kept in the scale (before storing).
float symmetric_scale(const Stats& st, const Code& c);

// n values x, divided by `scale` (fp32 division) and shifted by `zero` (unsigned integer codes),
// encoded into elements [first, first + n) of the row `out` (packed types: `first` even).
// Rounding to nearest even; saturation; NaN as Code says.
void encode_span(const Code& c, const float* x, int64_t n, float scale, int zero, void* out,
                 int64_t first);
// Elements [first, first + n) of a row of codes of dtype t, as their unscaled values.
void decode_span(DType t, const void* row, int64_t first, int64_t n, float* out);

// A row of a float (fp32/fp16/bf16) tensor as fp32: fp32 rows are used in place, the others
// converted into `buffer` (resized to n).
const float* load_float_row(const void* row, DType t, int64_t n, std::vector<float>& buffer);
// n fp32 values into a row of float dtype t.
void store_float_row(const float* x, int64_t n, DType t, void* row);

// Throws "what: expected shape [...], got ..." unless t has exactly `shape`.
void check_shape(const TensorView& t, const std::vector<int64_t>& shape, const char* what);
// A float matrix/tensor argument of a quantizer: ndim dims, on the host, last dim contiguous.
void check_host_rows(const TensorView& t, int ndim, const char* what);

// Byte address of element `elements` of view v (packed types: an even element).
inline char* element_ptr(const TensorView& v, int64_t elements) {
  return static_cast<char*>(v.data) + v.byte_offset(elements);
}

}  // namespace moekit::quant
