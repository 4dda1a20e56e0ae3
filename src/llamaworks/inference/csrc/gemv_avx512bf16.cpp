// int4 kernels for CPUs with AVX512_BF16 (Cooper Lake, Sapphire Rapids and later, Zen 4 and
// later): the products run as bf16 dot products (vdpbf16ps: 32 multiply-adds into 16 fp32 lanes
// per instruction, exact products, fp32 sums) instead of a float conversion and an FMA per
// weight, which leaves one-row int4 products bound by compute rather than memory (measured on
// Zen 4: 8 GB/s per core through gemv_body.h's dequantise-and-FMA, about 2x less work here).
//
// A nibble q becomes the bf16 number 128 + q exactly with one bitwise op (0x4300 | q: exponent
// of 128, q in the top mantissa bits), so no table or conversion is needed; the 128 is taken
// back per group with the activations' group sums:
//   out = sum_g scale_g * dot_g(128 + q, x) + (offset_g - 128 * scale_g) * sum_g(x).
// The activations are rounded to bf16 (as the torch int4 kernel takes them), and their group
// sums are of the rounded values, both prepared once per call by ops.cpp (Gemv::xb, Gemv::xsum);
// for group sizes of 64 and more, xb is permuted per 64 columns to match nibbles_bf16_x2.
#include <immintrin.h>

#include "gemv.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512bf16,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512bf16,avx2,fma")
#endif

namespace lw {
namespace {

// 32 columns (16 bytes of the layout: column j low nibble, column 16 + j high) as 32 bf16
// values 128 + q, in column order.
inline __m512i nibbles_bf16(const uint8_t* p) {
  const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));  // 16 words
  const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(b), _mm256_srli_epi16(b, 4), 1);
  // (both & 0x000F) | 0x4300 in one ternary-logic op: A=both, B=0x000F, C=0x4300 -> (A & B) | C.
  return _mm512_ternarylogic_epi32(both, _mm512_set1_epi16(0x000F), _mm512_set1_epi16(0x4300), 0xEA);
}

// 64 columns (two blocks of 32: 32 bytes) as two vectors of 32 bf16 values 128 + q, in the order
// of ops.cpp's permuted activations: columns 0-15 and 32-47 (low nibbles), 16-31 and 48-63 (high).
inline void nibbles_bf16_x2(const uint8_t* p, __m512i& lo, __m512i& hi) {
  const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));  // 32 words
  lo = _mm512_ternarylogic_epi32(b, _mm512_set1_epi16(0x000F), _mm512_set1_epi16(0x4300), 0xEA);
  hi = _mm512_or_si512(_mm512_srli_epi16(b, 4), _mm512_set1_epi16(0x4300));  // bytes: >> 4 leaves < 16
}

// sum_g (offset_g - 128 * scale_g) * xsum_g over the groups of one output row and one x row.
inline float offset_terms(const float* s, const float* o, const float* xs, int64_t groups) {
  __m512 acc = _mm512_setzero_ps();
  const __m512 c = _mm512_set1_ps(-128.0f);
  for (int64_t gi = 0; gi < groups; gi += 16) {
    const __mmask16 mask = groups - gi >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (groups - gi)) - 1);
    const __m512 off = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, s + gi), c, _mm512_maskz_loadu_ps(mask, o + gi));
    acc = _mm512_fmadd_ps(off, _mm512_maskz_loadu_ps(mask, xs + gi), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

template <int M, int NB, bool WIDE>
inline void int4_block(const Gemv& g, int64_t n) {
  const int64_t K = g.K, half = K / 2, groups = K / g.group;
  const uint8_t* w = static_cast<const uint8_t*>(g.w) + n * half;
  const uint8_t* ahead = w + NB * half;  // the next block's rows, as in gemv_body.h's dense_block
  __m512 total[M][NB];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NB; ++j) total[m][j] = _mm512_setzero_ps();
  for (int64_t gi = 0; gi < groups; ++gi) {
    __m512 acc[M][NB];
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_setzero_ps();
    if (WIDE) {  // group sizes of 64 and more: 64 columns per step
      for (int64_t k = gi * g.group; k < (gi + 1) * g.group; k += 64) {
        __m512i lo[NB], hi[NB];
        for (int j = 0; j < NB; ++j) __builtin_prefetch(ahead + k / 2 * NB + j * 32, 0, 3);
        for (int j = 0; j < NB; ++j) nibbles_bf16_x2(w + j * half + k / 2, lo[j], hi[j]);
        for (int m = 0; m < M; ++m) {
          const __m512i xl = _mm512_loadu_si512(g.xb + m * K + k);
          const __m512i xh = _mm512_loadu_si512(g.xb + m * K + k + 32);
          for (int j = 0; j < NB; ++j) {
            acc[m][j] = _mm512_dpbf16_ps(acc[m][j], (__m512bh)lo[j], (__m512bh)xl);
            acc[m][j] = _mm512_dpbf16_ps(acc[m][j], (__m512bh)hi[j], (__m512bh)xh);
          }
        }
      }
    } else {
      for (int64_t k = gi * g.group; k < (gi + 1) * g.group; k += 32) {
        __m512i wv[NB];
        for (int j = 0; j < NB; ++j) __builtin_prefetch(ahead + k / 2 * NB + j * 16, 0, 3);
        for (int j = 0; j < NB; ++j) wv[j] = nibbles_bf16(w + j * half + k / 2);
        for (int m = 0; m < M; ++m) {
          const __m512i xv = _mm512_loadu_si512(g.xb + m * K + k);
          for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], (__m512bh)wv[j], (__m512bh)xv);
        }
      }
    }
    for (int j = 0; j < NB; ++j) {
      const __m512 s = _mm512_set1_ps(g.scales[(n + j) * groups + gi]);
      for (int m = 0; m < M; ++m) total[m][j] = _mm512_fmadd_ps(acc[m][j], s, total[m][j]);
    }
  }
  for (int j = 0; j < NB; ++j) {
    const float* s = g.scales + (n + j) * groups;
    const float* o = g.offsets + (n + j) * groups;
    for (int m = 0; m < M; ++m)
      g.out[m * g.N + n + j] = _mm512_reduce_add_ps(total[m][j]) + offset_terms(s, o, g.xsum + m * groups, groups);
  }
}

template <int M, bool WIDE>
void columns_of(const Gemv& g, int64_t n0, int64_t n1) {
  // 2 * M * NB accumulators of 32 registers.
  constexpr int NB = M == 1 ? 4 : M <= 4 ? 2 : 1;
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) int4_block<M, NB, WIDE>(g, n);
  for (; n < n1; ++n) int4_block<M, 1, WIDE>(g, n);
}

template <int M>
void columns(const Gemv& g, int64_t n0, int64_t n1) {
  if (g.group % 64 == 0)
    columns_of<M, true>(g, n0, n1);
  else
    columns_of<M, false>(g, n0, n1);
}

void int4_kernel(const Gemv& g, int64_t n0, int64_t n1) {
  switch (g.M) {
    case 1: return columns<1>(g, n0, n1);
    case 2: return columns<2>(g, n0, n1);
    case 3: return columns<3>(g, n0, n1);
    case 4: return columns<4>(g, n0, n1);
    case 5: return columns<5>(g, n0, n1);
    case 6: return columns<6>(g, n0, n1);
    case 7: return columns<7>(g, n0, n1);
    default: return columns<8>(g, n0, n1);
  }
}

// bf16 weights times bf16 activations (a bf16 model's): products exact in fp32, so the same
// result as widening both to fp32, with one instruction per 32 weights and row instead of
// two conversions and two FMAs (what makes 8 rows compute-bound in gemv_body.h).
template <int M, int NB>
inline void bf16_block(const Gemv& g, int64_t n) {
  const int64_t K = g.K;
  const uint16_t* w = static_cast<const uint16_t*>(g.w) + n * K;
  __m512 acc[M][NB];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_setzero_ps();
  const char* ahead = reinterpret_cast<const char*>(w + NB * K);  // as in gemv_body.h's dense_block
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512i wv[NB];
    for (int j = 0; j < NB; ++j) __builtin_prefetch(ahead + (k * NB + j * 32) * 2, 0, 3);
    for (int j = 0; j < NB; ++j) wv[j] = _mm512_loadu_si512(w + j * K + k);
    for (int m = 0; m < M; ++m) {
      const __m512i xv = _mm512_loadu_si512(g.xb + m * K + k);
      for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], (__m512bh)wv[j], (__m512bh)xv);
    }
  }
  if (k < K) {  // masked loads read nothing past the end
    const __mmask32 mask = static_cast<__mmask32>((1ull << (K - k)) - 1);
    __m512i wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = _mm512_maskz_loadu_epi16(mask, w + j * K + k);
    for (int m = 0; m < M; ++m) {
      const __m512i xv = _mm512_maskz_loadu_epi16(mask, g.xb + m * K + k);
      for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], (__m512bh)wv[j], (__m512bh)xv);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NB; ++j) g.out[m * g.N + n + j] = _mm512_reduce_add_ps(acc[m][j]);
}

template <int M>
void bf16_columns(const Gemv& g, int64_t n0, int64_t n1) {
  constexpr int NB = M <= 4 ? 4 : 2;
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) bf16_block<M, NB>(g, n);
  for (; n < n1; ++n) bf16_block<M, 1>(g, n);
}

void bf16_kernel(const Gemv& g, int64_t n0, int64_t n1) {
  switch (g.M) {
    case 1: return bf16_columns<1>(g, n0, n1);
    case 2: return bf16_columns<2>(g, n0, n1);
    case 3: return bf16_columns<3>(g, n0, n1);
    case 4: return bf16_columns<4>(g, n0, n1);
    case 5: return bf16_columns<5>(g, n0, n1);
    case 6: return bf16_columns<6>(g, n0, n1);
    case 7: return bf16_columns<7>(g, n0, n1);
    default: return bf16_columns<8>(g, n0, n1);
  }
}

}  // namespace

const GemvFn avx512bf16_int4 = int4_kernel;
const GemvFn avx512bf16_bf16 = bf16_kernel;

void avx512bf16_int4_prepare(const float* x, int64_t M, int64_t K, int64_t group, uint16_t* xb, float* xsum) {
  const int64_t groups = K / group;
  const bool wide = group % 64 == 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t gi = 0; gi < groups; ++gi) {
      __m512 sum = _mm512_setzero_ps();
      for (int64_t k = gi * group; k < (gi + 1) * group; k += 16) {
        const __m256i h = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + m * K + k));  // round to nearest even
        sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
        // wide: per 64 columns the order 0-15, 32-47, 16-31, 48-63 (nibbles_bf16_x2's)
        const int64_t c = k % 64, at = wide ? k - c + ((c & 16) << 1) + ((c & 32) >> 1) : k;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(xb + m * K + at), h);
      }
      xsum[m * groups + gi] = _mm512_reduce_add_ps(sum);
    }
}
}  // namespace lw

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
