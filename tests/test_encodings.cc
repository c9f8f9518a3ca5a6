// Quantized element encodings, bit for bit against hand-computed codes: zeros, the smallest
// subnormal, the largest finite, ties, saturation, NaN and infinities, and int4 packing order.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "moekit/quant/encodings.h"

namespace moekit {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

struct Case {
  float value;
  uint8_t code;
};

void expect_codes(MiniFloat f, std::initializer_list<Case> cases) {
  for (const Case& c : cases)
    EXPECT_EQ(encode(f, c.value), c.code) << traits(f).name << " of " << c.value;
}

TEST(Encodings, E4M3) {
  expect_codes(MiniFloat::kE4M3, {
                                     {0.0f, 0x00},
                                     {-0.0f, 0x80},
                                     {1.0f, 0x38},                      // 0.0111.000
                                     {-2.0f, 0xC0},                     // 1.1000.000
                                     {std::ldexp(1.0f, -9), 0x01},      // smallest subnormal
                                     {std::ldexp(1.0f, -10), 0x00},     // its half: tie to even 0
                                     {std::ldexp(3.0f, -10), 0x02},     // 1.5 ulp: tie to even 2
                                     {std::ldexp(1.0f, -6), 0x08},      // smallest normal
                                     {448.0f, 0x7E},                    // largest finite
                                     {464.0f, 0x7E},                    // would round to 480
                                     {1e6f, 0x7E},                      // saturates
                                     {-kInf, 0xFE},                     // inf saturates
                                     {1.0625f, 0x38},                   // 1 + 1/16: tie, even
                                     {1.1875f, 0x3A},                   // 1 + 3/16: tie, up
                                     {1.07f, 0x39},                     // above the tie
                                 });
  EXPECT_EQ(encode(MiniFloat::kE4M3, NAN), 0x7F);
  EXPECT_EQ(encode(MiniFloat::kE4M3, -NAN), 0xFF);
  EXPECT_EQ(decode(MiniFloat::kE4M3, 0x7E), 448.0f);
  EXPECT_EQ(decode(MiniFloat::kE4M3, 0x01), std::ldexp(1.0f, -9));
  EXPECT_TRUE(std::isnan(decode(MiniFloat::kE4M3, 0x7F)));
  EXPECT_TRUE(std::isnan(decode(MiniFloat::kE4M3, 0xFF)));
}

TEST(Encodings, E5M2) {
  expect_codes(MiniFloat::kE5M2, {
                                     {0.0f, 0x00},
                                     {-0.0f, 0x80},
                                     {1.0f, 0x3C},                   // 0.01111.00
                                     {std::ldexp(1.0f, -16), 0x01},  // smallest subnormal
                                     {std::ldexp(1.0f, -17), 0x00},  // tie to even 0
                                     {std::ldexp(1.0f, -14), 0x04},  // smallest normal
                                     {57344.0f, 0x7B},               // largest finite
                                     {61440.0f, 0x7B},               // tie with 65536: saturates
                                     {kInf, 0x7B},
                                     {-kInf, 0xFB},
                                     {1.125f, 0x3C},  // 1 + 1/8: tie, even
                                     {1.375f, 0x3E},  // 1 + 3/8: tie, up to 1.5
                                 });
  EXPECT_EQ(encode(MiniFloat::kE5M2, NAN), 0x7F);
  EXPECT_EQ(decode(MiniFloat::kE5M2, 0x7C), kInf);
  EXPECT_EQ(decode(MiniFloat::kE5M2, 0xFC), -kInf);
  EXPECT_TRUE(std::isnan(decode(MiniFloat::kE5M2, 0x7D)));
  EXPECT_EQ(decode(MiniFloat::kE5M2, 0x7B), 57344.0f);
}

TEST(Encodings, E2M1) {
  // The eight magnitudes: 0, 0.5, 1, 1.5, 2, 3, 4, 6.
  const float values[] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  for (int c = 0; c < 8; ++c) {
    EXPECT_EQ(decode(MiniFloat::kE2M1, uint8_t(c)), values[c]) << c;
    EXPECT_EQ(decode(MiniFloat::kE2M1, uint8_t(c | 8)), -values[c]) << c;
    EXPECT_EQ(encode(MiniFloat::kE2M1, values[c]), c);
  }
  expect_codes(MiniFloat::kE2M1, {
                                     {0.25f, 0x0},   // tie between 0 and 0.5: even
                                     {0.75f, 0x2},   // tie between 0.5 and 1: even (1)
                                     {1.25f, 0x2},   // tie between 1 and 1.5: even (1)
                                     {2.5f, 0x4},    // tie between 2 and 3: even (2)
                                     {3.5f, 0x6},    // tie between 3 and 4: even (4)
                                     {5.0f, 0x6},    // tie between 4 and 6: even (4)
                                     {5.1f, 0x7},
                                     {100.0f, 0x7},  // saturates
                                     {-kInf, 0xF},
                                     {-0.0f, 0x8},
                                 });
  EXPECT_EQ(encode(MiniFloat::kE2M1, NAN), 0x0);
}

TEST(Encodings, EveryCodeRoundTrips) {
  for (MiniFloat f : {MiniFloat::kE4M3, MiniFloat::kE5M2, MiniFloat::kE2M1}) {
    const int codes = f == MiniFloat::kE2M1 ? 16 : 256;
    for (int c = 0; c < codes; ++c) {
      const float v = decode(f, uint8_t(c));
      if (std::isnan(v) || std::isinf(v)) continue;
      EXPECT_EQ(encode(f, v), c) << traits(f).name << " code " << c;
    }
  }
}

TEST(Encodings, Ue8m0) {
  EXPECT_EQ(encode_ue8m0(1.0f, ScaleRounding::kUp), 127);
  EXPECT_EQ(encode_ue8m0(1.0f, ScaleRounding::kDown), 127);
  EXPECT_EQ(encode_ue8m0(1.5f, ScaleRounding::kUp), 128);
  EXPECT_EQ(encode_ue8m0(1.5f, ScaleRounding::kDown), 127);
  EXPECT_EQ(encode_ue8m0(0.75f, ScaleRounding::kUp), 127);
  EXPECT_EQ(encode_ue8m0(std::ldexp(1.0f, -127), ScaleRounding::kUp), 0);
  EXPECT_EQ(encode_ue8m0(std::ldexp(1.0f, -140), ScaleRounding::kUp), 0);
  EXPECT_EQ(encode_ue8m0(std::ldexp(1.0f, 127), ScaleRounding::kUp), 254);
  EXPECT_EQ(encode_ue8m0(std::numeric_limits<float>::max(), ScaleRounding::kUp), 254);
  EXPECT_EQ(encode_ue8m0(0.0f, ScaleRounding::kUp), 0);
  EXPECT_EQ(encode_ue8m0(-3.0f, ScaleRounding::kUp), 0);
  EXPECT_EQ(encode_ue8m0(NAN, ScaleRounding::kUp), 0xFF);
  EXPECT_EQ(decode_ue8m0(127), 1.0f);
  EXPECT_EQ(decode_ue8m0(0), std::ldexp(1.0f, -127));
  EXPECT_EQ(decode_ue8m0(254), std::ldexp(1.0f, 127));
  EXPECT_TRUE(std::isnan(decode_ue8m0(0xFF)));
}

TEST(Encodings, Int4PackingOrder) {
  const uint8_t b = pack_int4(-8, 7);  // element 0 low nibble, element 1 high
  EXPECT_EQ(b, 0x78);
  EXPECT_EQ(unpack_int4(b, 0), -8);
  EXPECT_EQ(unpack_int4(b, 1), 7);
  EXPECT_EQ(pack_int4(-1, 0), 0x0F);
  EXPECT_EQ(unpack_int4(0x0F, 0), -1);
  EXPECT_EQ(unpack_uint4(0xA5, 0), 5);  // unsigned, with a zero point applied by the caller
  EXPECT_EQ(unpack_uint4(0xA5, 1), 10);
  for (int lo = -8; lo < 8; ++lo)
    for (int hi = -8; hi < 8; ++hi) {
      const uint8_t p = pack_int4(lo, hi);
      ASSERT_EQ(unpack_int4(p, 0), lo);
      ASSERT_EQ(unpack_int4(p, 1), hi);
    }
}

}  // namespace
}  // namespace moekit
