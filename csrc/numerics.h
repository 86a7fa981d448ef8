// numerics.h -- scalar building blocks for the fastpo CPU kernels.
//
// * bit_cast helpers (memcpy based, so they vectorise and stay free of aliasing UB);
// * the 16-bit storage formats: bfloat16 and IEEE binary16 ("float16") as raw uint16 patterns,
//   with exact widening to float and round-to-nearest-even narrowing (NaN, inf, subnormals);
// * exp and tanh for the kernels' inner loops: branch-free polynomial expf / tanhf that gcc
//   vectorises at -O3 (libm's would keep the loops scalar), and std::exp / std::tanh for double.
//
// Everything here is branch-free (choices are bit-mask blends, see mask()) so that the calling
// loops vectorise on SSE2, AVX2 and AVX-512 alike; nothing depends on the floating-point
// environment beyond the default round-to-nearest-even mode.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

// gcc's code sinking moves the loads and arithmetic that only feed `counted ? v : 0` into a branch, which
// if-conversion cannot undo (a conditional load): a token loop then stays scalar (policy_loss.h's
// reinforce, dro, sapo and geo_mean did, and rollout_stats.h's sums). Off for such a loop's function, it
// vectorises.
#if defined(__GNUC__) && !defined(__clang__)
#define FASTPO_NO_SINK __attribute__((optimize("no-tree-sink")))
#else
#define FASTPO_NO_SINK
#endif

namespace fastpo {

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// All ones when c holds, else zero. Choices between computed values are made as
// (a & mask(c)) | (b & ~mask(c)) rather than c ? a : b: given a select, gcc sinks the computation
// of an arm into a branch, cannot if-convert it back (under -ftrapping-math it does not speculate
// floating-point arithmetic) unless the target has masked vector instructions, and the loop then
// stays scalar on SSE/AVX2. The bitwise form uses both values unconditionally.
inline uint32_t mask(bool c) { return 0u - static_cast<uint32_t>(c); }

// ---------------------------------------------------------------------------------------------
// 16-bit storage types. They are distinct tag types (not plain uint16_t) so that the kernel
// templates can be specialised on them; both have the size and layout of a uint16_t, so an
// int16/uint16 numpy buffer holding the raw bit patterns can be read through them directly.
// ---------------------------------------------------------------------------------------------
struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};
static_assert(sizeof(bf16) == 2 && sizeof(f16) == 2, "16-bit storage types must be 2 bytes");

// bfloat16 is the top half of a float32: widening is a shift.
inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// float -> bfloat16, round to nearest, ties to even. NaN stays NaN (quietened, sign kept): adding
// the rounding bias to a NaN pattern could carry it into an infinity, so NaN is selected apart.
inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (u >> 16) | 0x0040u;
  const uint32_t is_nan = mask((u & 0x7fffffffu) > 0x7f800000u);
  return static_cast<uint16_t>((quiet_nan & is_nan) | (rounded & ~is_nan));
}

// binary16 -> float, exact for every one of the 65536 patterns.
//   exponent field 1..30  : normal, rebias the exponent by 127 - 15 = 112;
//   exponent field 31     : inf / NaN, exponent all ones, mantissa moved up (payload kept);
//   exponent field 0      : zero / subnormal, value = m * 2^-24 for the 10-bit mantissa m. It is
//                           formed as 2^-14 (1 + m / 1024) - 2^-14, both terms exact floats and the
//                           difference exact (Sterbenz). (An int -> float conversion would do too,
//                           but gcc will not if-convert it under -ftrapping-math, and the loop would
//                           stay scalar.)
inline float f16_to_float_portable(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t mag = h & 0x7fffu;  // exponent and mantissa
  const uint32_t normal = (mag << 13) + (112u << 23);
  const uint32_t special = (mag << 13) | 0x7f800000u;
  const uint32_t sub = float_to_bits(bits_to_float((mag << 13) + (113u << 23)) - 6.103515625e-05f);  // 2^-14
  const uint32_t is_sub = mask(mag < 0x0400u), is_special = mask(mag >= 0x7c00u);
  const uint32_t body = (sub & is_sub) | (special & is_special) | (normal & ~(is_sub | is_special));
  return bits_to_float(sign | body);
}

// float -> binary16, round to nearest, ties to even.
//   |f| is NaN                 -> quiet NaN (top payload bits kept);
//   |f| >= 65520               -> inf (65520 is the midpoint between 65504, the largest half,
//                                 and 2^16; the tie goes to the even neighbour, which is 2^16 = inf);
//   2^-14 <= |f| < 65520       -> normal: rebias the exponent and round the 13 dropped mantissa
//                                 bits (a carry out of the mantissa correctly bumps the exponent);
//   |f| < 2^-14                -> subnormal half = round(|f| * 2^24) as an integer in [0, 1024]
//                                 (1024 is the bit pattern of the smallest normal, as it should be).
//                                 The scaling is exact; adding 2^23 rounds it to an integer in the
//                                 FPU's own round-to-nearest-even, and the integer is then read off
//                                 the low mantissa bits.
inline uint16_t float_to_f16_portable(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  const uint32_t nan = 0x7e00u | ((a >> 13) & 0x03ffu);
  const uint32_t inf = 0x7c00u;
  const uint32_t normal = (a + 0x0fffu + ((a >> 13) & 1u) - (112u << 23)) >> 13;
  const float scaled = bits_to_float(a) * 16777216.0f + 8388608.0f;  // |f| * 2^24 + 2^23
  const uint32_t subnormal = float_to_bits(scaled) - 0x4b000000u;      // bits(2^23) = 0x4b000000
  const uint32_t is_nan = mask(a > 0x7f800000u);
  const uint32_t is_inf = mask(a >= 0x477ff000u) & ~is_nan;  // 0x477ff000 = 65520
  const uint32_t is_sub = mask(a < 0x38800000u);             // 0x38800000 = 2^-14
  const uint32_t is_normal = ~(is_nan | is_inf | is_sub);
  const uint32_t body = (nan & is_nan) | (inf & is_inf) | (subnormal & is_sub) | (normal & is_normal);
  return static_cast<uint16_t>(sign | body);
}

inline float f16_to_float(uint16_t h) { return f16_to_float_portable(h); }
inline uint16_t float_to_f16(float f) { return float_to_f16_portable(f); }

// ---------------------------------------------------------------------------------------------
// exp
// ---------------------------------------------------------------------------------------------
// clamp(v, ±bound). Kernels pass the bound as a runtime value: with a literal one gcc may thread the
// clamp's branches into an exp that follows (a constant on each side) and leave the loop scalar.
template <class T>
inline T clamp_abs(T v, T bound) { return std::min(std::max(v, -bound), bound); }

// Vectorisable expf. e^x = 2^k * e^r with k = round(x / ln 2) and r = x - k ln 2, |r| <= ln2 / 2.
//   * k is rounded with the 1.5 * 2^23 trick: t = x log2(e) + 1.5 * 2^23 rounds x log2(e) to an
//     integer in the FPU's round-to-nearest-even, kf = t - 1.5 * 2^23 is that integer as a float,
//     and the low bits of t's bit pattern hold k itself, so bits(t) << 23 is k << 23 (mod 2^32);
//   * r is computed Cody-Waite style: ln 2 = kLn2Hi + kLn2Lo with kLn2Hi holding few enough
//     mantissa bits (15) that kf * kLn2Hi is exact for every |k| < 512;
//   * e^r = 1 + r + r^2 q(r), q of degree 4, fitted for minimal relative error on |r| <= 0.348
//     (fit error 3e-9; measured error of the float evaluation <= 1e-7 relative, under 1 ulp);
//   * 2^k is applied by adding k to the exponent field of e^r (an integer add, exact).
// That is valid while the result is a normal float, which holds for kMin <= x <= kMax. Outside:
//   x < kMin = -87 (including -inf): 0 -- the exact value is below 1.7e-38 (e^x for x in the
//     subnormal range is flushed to zero: an absolute error under 1.7e-38);
//   x > kMax = ln(FLT_MAX) (including +inf): +inf;  NaN: NaN.
// No input needs a clamp first: for out-of-range or non-finite x the integer bit arithmetic
// produces some pattern that the final masks discard (the only conversions are bit casts).
inline float exp_fast(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693145751953125f;      // 15 significant bits: kf * kLn2Hi is exact
  const float kLn2Lo = 1.428606765330187e-06f;  // ln 2 - kLn2Hi
  const float kRound = 12582912.0f;             // 1.5 * 2^23
  const float kMin = -87.0f;                    // k >= -126 and e^x normal for x >= kMin
  const float kMax = 88.72283172607421875f;     // largest float with e^x <= FLT_MAX
  const float t = x * kLog2e + kRound;
  const float kf = t - kRound;
  const float r = (x - kf * kLn2Hi) - kf * kLn2Lo;
  float q = 1.381908893e-03f;
  q = q * r + 8.368910290e-03f;
  q = q * r + 4.166831821e-02f;
  q = q * r + 1.666651964e-01f;
  q = q * r + 4.999999404e-01f;
  const float er = 1.0f + (r + (r * r) * q);  // in [0.70, 1.42]
  const uint32_t y = float_to_bits(er) + (float_to_bits(t) << 23);
  const uint32_t in_range = mask(x >= kMin) & mask(x <= kMax);  // false for NaN
  const uint32_t overflow = mask(x > kMax);
  const uint32_t is_nan = mask(x != x);
  return bits_to_float((y & in_range) | (0x7f800000u & overflow) | (float_to_bits(x) & is_nan));
}

// Double precision: correctness over speed (float64 is the reference / gradcheck path).
inline double exp_fast(double x) { return std::exp(x); }

// ---------------------------------------------------------------------------------------------
// log
// ---------------------------------------------------------------------------------------------
// Vectorisable logf (libm's keeps the loops scalar), branch-free, Cephes' logf: x = 2^e·m with
// m in [√½, √2) read off the bits (subnormals are first scaled by 2^23), then
// log x = e·ln 2 + log1p(f), f = m − 1, log1p(f) = f − f²/2 + f³·P(f) (P of degree 8, Cephes' fit),
// with ln 2 split as 0.693359375 − 2.12194440e-4 (e·0.693359375 is exact). Measured error against
// log in double: <= 1 ulp. x = 0: −inf; x < 0 and NaN: NaN; +inf: +inf.
inline float log_fast(float x) {
  const bool sub = x < 1.17549435e-38f;  // below the smallest normal (0, negatives, -inf too: masked below)
  const float xs = sub ? x * 8388608.0f : x;  // 2^23 (a select of two products: gcc if-converts it)
  const uint32_t u = float_to_bits(xs);
  const int32_t e_raw = static_cast<int32_t>((u >> 23) & 0xffu) - 126 - (sub ? 23 : 0);
  float m = bits_to_float((u & 0x007fffffu) | 0x3f000000u);  // [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  const float e = static_cast<float>(e_raw - (small ? 1 : 0));
  const float f = (small ? m + m : m) - 1.0f;
  const float z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const float y = f * z * p - 2.12194440e-4f * e - 0.5f * z;
  const float r = (f + y) + 0.693359375f * e;
  const uint32_t is_zero = mask(x == 0.0f), is_nan = mask(!(x >= 0.0f));
  const uint32_t is_inf = mask(x == std::numeric_limits<float>::infinity());
  const uint32_t special = is_zero | is_nan | is_inf;
  return bits_to_float((float_to_bits(r) & ~special) | (0xff800000u & is_zero) | (0x7fc00000u & is_nan) |
                       (0x7f800000u & is_inf));
}

inline double log_fast(double x) { return std::log(x); }

// ---------------------------------------------------------------------------------------------
// tanh
// ---------------------------------------------------------------------------------------------
// Vectorisable tanhf (std::tanh keeps the loops scalar), branch-free, Cephes' tanhf split:
//   |x| < 0.625: tanh x = x + x^3 P(x^2), P of degree 4 (Cephes' minimax fit): no cancellation
//                near 0, where 1 - 2 / (e^{2x} + 1) would lose the relative accuracy of small x;
//   otherwise:   tanh |x| = 1 - 2 / (e^{2|x|} + 1) through exp_fast (e^{2|x|} = inf gives 1),
//                with the sign of x put back. Both arms are computed and blended with a mask.
// Measured error against tanh in double: <= 1.3 ulp (every 97th float of either sign); NaN stays
// NaN, +-inf give +-1, -0 gives -0.
inline float tanh_fast(float x) {
  const uint32_t sign = float_to_bits(x) & 0x80000000u;
  const float a = bits_to_float(float_to_bits(x) & 0x7fffffffu);
  const float z = a * a;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = a + a * z * p;
  const float large = 1.0f - 2.0f / (exp_fast(2.0f * a) + 1.0f);
  const uint32_t is_small = mask(a < 0.625f);  // false for NaN: the large arm is NaN too
  return bits_to_float(((float_to_bits(small) & is_small) | (float_to_bits(large) & ~is_small)) | sign);
}

inline double tanh_fast(double x) { return std::tanh(x); }

}  // namespace fastpo
