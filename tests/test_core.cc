// Core: dtype conversions (bit-exact), tensor views, DLPack interop, errors with file:line.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "moekit/activation.h"
#include "moekit/core/dlpack.h"
#include "moekit/core/tensor.h"
#include "moekit/modular.h"

namespace moekit {
namespace {

float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

TEST(DType, TraitsTableIsIndexedByEnum) {
  for (int i = 0; i < static_cast<int>(DType::kCount); ++i)
    EXPECT_EQ(static_cast<int>(kDTypeTraits[i].dtype), i);
  EXPECT_EQ(element_bytes(DType::kBF16), 2);
  EXPECT_EQ(parse_dtype("bf16"), DType::kBF16);
  EXPECT_THROW(parse_dtype("bf17"), Error);
}

TEST(DType, Bf16RoundsToNearestEven) {
  EXPECT_EQ(float_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(float_to_bf16(from_bits(0x3f808000)), 0x3f80);  // tie, even stays
  EXPECT_EQ(float_to_bf16(from_bits(0x3f818000)), 0x3f82);  // tie, odd rounds up
  EXPECT_EQ(float_to_bf16(from_bits(0x3f808001)), 0x3f81);  // above tie
  EXPECT_EQ(float_to_bf16(-0.0f), 0x8000);
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::infinity()), 0x7f80);
  EXPECT_EQ(float_to_bf16(from_bits(0x7f7fffff)), 0x7f80);  // max float rounds to inf
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(std::nanf("")))));
  EXPECT_EQ(bf16_to_float(0x0001), from_bits(0x00010000));  // subnormal kept
}

TEST(DType, F16RoundTripAndRounding) {
  EXPECT_EQ(float_to_f16(1.0f), 0x3c00);
  EXPECT_EQ(float_to_f16(65504.0f), 0x7bff);
  EXPECT_EQ(float_to_f16(65520.0f), 0x7c00);              // rounds to inf
  EXPECT_EQ(float_to_f16(std::ldexp(1.0f, -24)), 0x0001);  // smallest subnormal
  EXPECT_EQ(float_to_f16(std::ldexp(1.0f, -25)), 0x0000);  // tie to even (zero)
  EXPECT_EQ(float_to_f16(std::ldexp(1.5f, -25)), 0x0001);
  EXPECT_EQ(float_to_f16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);  // tie, even
  EXPECT_EQ(float_to_f16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);
  EXPECT_EQ(float_to_f16(-2.0f), 0xc000);
  EXPECT_TRUE(std::isnan(f16_to_float(float_to_f16(std::nanf("")))));
  for (uint32_t h = 0; h < 0x7c00; ++h) {  // every finite positive f16 survives the round trip
    ASSERT_EQ(float_to_f16(f16_to_float(static_cast<uint16_t>(h))), h) << h;
  }
}

// load_as_float of every quantized dtype: codes as their unscaled values (packed types: element
// 2i in the low nibble), ue8m0 as its power of two.
TEST(DType, LoadAsFloatReadsQuantizedTypes) {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  const struct {
    DType dtype;
    std::vector<uint8_t> bytes;
    std::vector<float> values;
  } cases[] = {
      {DType::kF8E4M3, {0x38, 0xFE, 0x01, 0x7F}, {1.0f, -448.0f, std::ldexp(1.0f, -9), nan}},
      {DType::kF8E5M2, {0x3C, 0x7B, 0x7C, 0xFC}, {1.0f, 57344.0f, inf, -inf}},
      {DType::kUE8M0, {127, 130, 0, 0xFF}, {1.0f, 8.0f, std::ldexp(1.0f, -127), nan}},
      {DType::kI8, {0x80, 0x7F, 0xFB}, {-128.0f, 127.0f, -5.0f}},
      {DType::kU8, {0, 200, 255}, {0.0f, 200.0f, 255.0f}},
      {DType::kI4, {0x9A, 0x70, 0x0F}, {-6.0f, -7.0f, 0.0f, 7.0f, -1.0f, 0.0f}},
      {DType::kU4, {0x9A, 0x70, 0x0F}, {10.0f, 9.0f, 0.0f, 7.0f, 15.0f, 0.0f}},
      {DType::kF4E2M1, {0x9A, 0x70, 0x0F}, {-1.0f, -0.5f, 0.0f, 6.0f, -6.0f, 0.0f}},
  };
  for (const auto& c : cases)
    for (size_t i = 0; i < c.values.size(); ++i) {
      const float got = load_as_float(c.bytes.data(), c.dtype, int64_t(i));
      if (std::isnan(c.values[i]))
        EXPECT_TRUE(std::isnan(got)) << name(c.dtype) << " element " << i;
      else
        EXPECT_EQ(got, c.values[i]) << name(c.dtype) << " element " << i;
    }
  uint8_t code = 0;
  EXPECT_THROW(store_from_float(&code, DType::kF8E4M3, 0, 1.0f), Error);  // floats only
  EXPECT_EQ(code, 0);
}

// Packed 4-bit types: bits-based sizes, no element size, and byte offsets only on even elements.
TEST(DType, PackedTypesHaveStorageBytesNotElementBytes) {
  for (const DTypeTraits& t : kDTypeTraits) EXPECT_EQ(is_packed(t.dtype), t.bits == 4) << t.name;
  for (DType t : {DType::kI4, DType::kU4, DType::kF4E2M1}) {
    EXPECT_TRUE(is_packed(t));
    EXPECT_EQ(storage_bytes(t, 0), 0);
    EXPECT_EQ(storage_bytes(t, 1), 1);
    EXPECT_EQ(storage_bytes(t, 2), 1);
    EXPECT_EQ(storage_bytes(t, 7), 4);
    try {
      element_bytes(t);
      ADD_FAILURE() << name(t) << ": no throw";
    } catch (const Error& e) {
      EXPECT_NE(e.message().find("storage_bytes"), std::string::npos) << e.message();
    }
  }
  for (DType t : {DType::kF8E4M3, DType::kF8E5M2, DType::kUE8M0, DType::kI8, DType::kU8}) {
    EXPECT_FALSE(is_packed(t));
    EXPECT_EQ(element_bytes(t), 1);
    EXPECT_EQ(storage_bytes(t, 7), 7);
  }
  EXPECT_EQ(storage_bytes(DType::kF32, 3), 12);
}

TEST(TensorView, PackedViewsAddressWholeBytes) {
  Tensor t(DType::kI4, {3, 6});
  const TensorView& v = t.view();
  EXPECT_EQ(v.nbytes(), 9);
  EXPECT_EQ(v.byte_offset(6), 3);
  EXPECT_EQ(v.byte_offset(0), 0);
  try {
    v.byte_offset(5);
    ADD_FAILURE() << "odd offset: no throw";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("inside a byte"), std::string::npos) << e.message();
  }
  const TensorView rows = v.slice0(1, 3);
  EXPECT_EQ(static_cast<char*>(rows.data), t.data<char>() + 3);
  EXPECT_EQ(rows.nbytes(), 6);
  EXPECT_FALSE(v.slice0(0, 1).overlaps(v.slice0(1, 2)));
  EXPECT_TRUE(v.slice0(0, 2).overlaps(v.slice0(1, 2)));
  // Rows of 5 nibbles: row 1 starts inside byte 2, so it cannot be sliced out.
  Tensor odd(DType::kF4E2M1, {3, 5});
  EXPECT_EQ(odd.view().nbytes(), 8);
  EXPECT_THROW(odd.view().slice0(1, 2), Error);
  EXPECT_EQ(odd.view().slice0(2, 3).data, odd.data<char>() + 5);
  Tensor f8(DType::kF8E4M3, {2, 3});
  EXPECT_EQ(f8.view().nbytes(), 6);
  EXPECT_EQ(f8.view().byte_offset(5), 5);
}

TEST(TensorView, ShapesSlicesAndOverlap) {
  Tensor t(DType::kF32, {4, 6});
  const TensorView& v = t.view();
  EXPECT_EQ(v.numel(), 24);
  EXPECT_TRUE(v.is_contiguous());
  TensorView s = v.slice0(1, 3);
  EXPECT_EQ(s.size(0), 2);
  EXPECT_EQ(s.ptr<float>(), t.data<float>() + 6);
  EXPECT_TRUE(s.overlaps(v));
  EXPECT_FALSE(v.slice0(0, 1).overlaps(v.slice0(1, 2)));
  EXPECT_THROW(v.slice0(2, 5), Error);
  EXPECT_EQ(v.reshaped({24}).numel(), 24);
  EXPECT_THROW(v.reshaped({5, 5}), Error);
  EXPECT_EQ(v.str(), "fp32[4, 6] cpu");
  TensorView strided = v;
  strided.shape[1] = 3;  // rows of 3 with row stride 6
  EXPECT_FALSE(strided.is_contiguous());
  EXPECT_NO_THROW(check_row_major(strided, "x"));
  strided.stride[1] = 2;
  EXPECT_THROW(check_row_major(strided, "x"), Error);
}

TEST(TensorView, ChecksNameTheArgument) {
  Tensor t(DType::kBF16, {2, 3});
  try {
    check_shape(t, {2, 4}, "topk_ids");
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("topk_ids: expected shape [2, 4], got bf16[2, 3]"),
              std::string::npos)
        << e.what();
    EXPECT_NE(std::string(e.what()).find("src/core/tensor.cc:"), std::string::npos) << e.what();
    EXPECT_GT(e.line(), 0);
  }
  EXPECT_THROW(check_dtype(t, DType::kF32, "x"), Error);
  TensorView null_view(nullptr, DType::kF32, {2, 2});
  EXPECT_THROW(check_data(null_view, "y"), Error);
}

TEST(DLPack, RoundTripKeepsLayout) {
  Tensor t(DType::kBF16, {3, 5});
  TensorView v = t.view().slice0(1, 3);
  DLTensor d = to_dlpack(v);
  EXPECT_EQ(d.dtype.code, 4);  // kDLBfloat
  EXPECT_EQ(d.dtype.bits, 16);
  TensorView back = from_dlpack(d);
  EXPECT_EQ(back.data, v.data);
  EXPECT_EQ(back.dtype, DType::kBF16);
  EXPECT_EQ(back.shape, v.shape);
  EXPECT_EQ(back.stride, v.stride);
  d.strides = nullptr;  // compact row-major
  d.byte_offset = 4;
  back = from_dlpack(d);
  EXPECT_EQ(back.stride[0], 5);
  EXPECT_EQ(static_cast<char*>(back.data), static_cast<char*>(v.data) + 4);
  d.dtype = {2, 8, 1};  // an 8-bit kDLFloat: DLPack's fp8 types have codes of their own
  EXPECT_THROW(from_dlpack(d), Error);
  d.dtype = {2, 32, 4};  // vector lanes
  EXPECT_THROW(from_dlpack(d), Error);
}

// Quantized dtypes keep their DLPack 1.1 codes and bits both ways (fp8 e4m3 as
// kDLFloat8_e4m3fn, packed 4-bit types with bits 4), with shapes and strides in elements.
TEST(DLPack, QuantizedDtypesRoundTrip) {
  const struct {
    DType dtype;
    uint8_t code, bits;
  } cases[] = {{DType::kF8E4M3, 10, 8}, {DType::kF8E5M2, 12, 8}, {DType::kUE8M0, 14, 8},
               {DType::kI8, 0, 8},      {DType::kU8, 1, 8},      {DType::kI4, 0, 4},
               {DType::kU4, 1, 4},      {DType::kF4E2M1, 17, 4}};
  for (const auto& c : cases) {
    Tensor t(c.dtype, {3, 6});
    TensorView v = t.view().slice0(1, 3);
    DLTensor d = to_dlpack(v);
    EXPECT_EQ(d.dtype.code, c.code) << name(c.dtype);
    EXPECT_EQ(d.dtype.bits, c.bits) << name(c.dtype);
    const TensorView back = from_dlpack(d);
    EXPECT_EQ(back.dtype, c.dtype);
    EXPECT_EQ(back.data, v.data);
    EXPECT_EQ(back.shape, v.shape);
    EXPECT_EQ(back.stride, v.stride);
  }
  // The bytes of an fp8 tensor read back through the view from_dlpack gives.
  Tensor t(DType::kF8E4M3, {1, 2});
  t.data<uint8_t>()[0] = 0x38, t.data<uint8_t>()[1] = 0xC0;  // 1, -2
  TensorView v = t.view();
  const TensorView back = from_dlpack(to_dlpack(v));
  EXPECT_EQ(load_as_float(back.data, back.dtype, 0), 1.0f);
  EXPECT_EQ(load_as_float(back.data, back.dtype, 1), -2.0f);
}

TEST(Activation, NamesRoundTrip) {
  for (const char* s : {"silu", "gelu", "gelu_tanh", "relu2", "swiglu_oai", "silu_nogate",
                        "relu2_nogate", "swiglu_oai_interleaved", "gelu_interleaved"})
    EXPECT_EQ(parse_activation(s).str(), s);
  EXPECT_THROW(parse_activation("swiglu_oai_nogate"), Error);
  EXPECT_THROW(parse_activation("tanh"), Error);
}

TEST(Activation, SwigluOaiMatchesDefinition) {
  Activation a = parse_activation("swiglu_oai");
  // gate clamped at 7 above, up clamped to [-7, 7]; (up + 1) * g * sigmoid(1.702 g).
  const double g = 7.0, u = 7.0, alpha = 1.702f;  // alpha is stored as float
  EXPECT_NEAR(apply_activation<double>(a, 9.0, 8.0), (u + 1) * g / (1 + std::exp(-alpha * g)),
              1e-12);
  EXPECT_NEAR(apply_activation<double>(a, -1.0, -9.0),
              (-7.0 + 1) * -1.0 / (1 + std::exp(alpha)), 1e-12);
}

TEST(Workspace, TakesAlignedAndRefusesOverflow) {
  alignas(64) static std::byte buf[256];
  Workspace ws(buf, sizeof buf);
  TensorView a = ws.take(DType::kF32, {3});
  TensorView b = ws.take(DType::kBF16, {5});
  EXPECT_EQ(reinterpret_cast<uintptr_t>(b.data) % 64, 0u);
  EXPECT_FALSE(a.overlaps(b));
  EXPECT_EQ(ws.used(), 128u);
  EXPECT_THROW(ws.take_bytes(200), Error);
}

}  // namespace
}  // namespace moekit
