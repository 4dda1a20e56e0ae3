// AVX2 + FMA kernels (Haswell and later, Zen 1 and later); chosen at run time only where the
// CPU reports both (ops.cpp). Compiled for that target; only the table has external linkage.
#include <immintrin.h>

#include "gemv.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace lw {
namespace {
struct Isa {
  using V = __m256;
  static constexpr int W = 8;
  // 16 vector registers: at most 8 accumulators.
  static constexpr int nb(int m) { return m == 1 ? 4 : m <= 3 ? 2 : 1; }
  static constexpr int nb4(int m) { return nb(m); }
  // Dense rows of 16 KiB or more are left to the hardware prefetchers (dense_block): on Zen 3, 4096 x
  // 4096 reads at 31-32 GB/s without the software prefetch against 23-28 with it, while rows of
  // 0.75-2 KiB fall to 10-15 GB/s without it (benchmarks/gemv.py, 2 threads). Rows of 4 and 8 KiB
  // (one or two pages: the hardware prefetchers stop at page boundaries) are prefetched since
  // session 22: with the kernels capped at avx2 on Zen 4, small's fp32 decode step (w2's rows are
  // 4 KiB) 1.44-1.59 -> 1.15-1.36 ms and A's 4.98-5.53 -> 4.64-5.30 ms, three interleaved rounds
  // (the threshold was 4 KiB; the 16 KiB rows Zen 3 measured keep their rule).
  static constexpr int64_t PREFETCH_ROWS_BELOW = 16384;
  static inline V zero() { return _mm256_setzero_ps(); }
  static inline V set1(float v) { return _mm256_set1_ps(v); }
  static inline V load(const float* p) { return _mm256_loadu_ps(p); }
  static inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static inline float hsum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static inline V bf16(const uint16_t* p) {
    const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
  }
  static inline V i8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static inline void u4(const uint8_t* p, V& lo, V& hi) {
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
    hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
  }
};
}  // namespace

#define LW_KERNELS avx2_kernels
#include "gemv_body.h"
#define LW_ATTENTION avx2_attention
#include "attn_body.h"

// int8 weights times activations quantised per block of 32 (gemv.h's int8_q8_avx2): one 32-byte
// vector is one block. maddubs multiplies unsigned by signed bytes and adds pairs into int16,
// so the weight's sign moves onto the activation (|w| times sign(w) * q, llama.cpp's trick):
// at most 2 * 127 * 127 per pair, inside int16, and the block sums are exact in int32.
namespace {
template <int M, int NB>
inline void int8_q8_block(const Gemv& g, int64_t n) {
  const int64_t K = g.K;
  const int8_t* w = static_cast<const int8_t*>(g.w) + n * K;
  const char* ahead = reinterpret_cast<const char*>(w + NB * K);  // as in gemv_body.h's dense_block
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[M][NB];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NB; ++j) acc[m][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {  // K % 32 == 0 (the caller's choice of kernel)
    __m256i wv[NB], aw[NB];
    for (int j = 0; j < NB; ++j) __builtin_prefetch(ahead + k * NB + j * 32, 0, 3);
    for (int j = 0; j < NB; ++j) {
      wv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * K + k));
      aw[j] = _mm256_abs_epi8(wv[j]);
    }
    for (int m = 0; m < M; ++m) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.xq + m * K + k));
      const __m256 d = _mm256_loadu_ps(g.xd + (m * K + k) / 4);  // the block's scale, 8 times
      for (int j = 0; j < NB; ++j) {
        const __m256i pairs = _mm256_maddubs_epi16(aw[j], _mm256_sign_epi8(xv, wv[j]));
        const __m256i dot = _mm256_madd_epi16(pairs, ones);  // 8 lanes of 4 columns
        acc[m][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), d, acc[m][j]);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NB; ++j) g.out[m * g.N + n + j] = Isa::hsum(acc[m][j]) * g.scales[n + j];
}

template <int M>
void int8_q8_columns(const Gemv& g, int64_t n0, int64_t n1) {
  // 16 registers: M x NB accumulators, 2 NB weight vectors, x, d, ones.
  constexpr int NB = M == 1 ? 4 : M <= 3 ? 2 : 1;
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) int8_q8_block<M, NB>(g, n);
  for (; n < n1; ++n) int8_q8_block<M, 1>(g, n);
}

void int8_q8_kernel(const Gemv& g, int64_t n0, int64_t n1) {
  switch (g.M) {
    case 1: return int8_q8_columns<1>(g, n0, n1);
    case 2: return int8_q8_columns<2>(g, n0, n1);
    case 3: return int8_q8_columns<3>(g, n0, n1);
    case 4: return int8_q8_columns<4>(g, n0, n1);
    case 5: return int8_q8_columns<5>(g, n0, n1);
    case 6: return int8_q8_columns<6>(g, n0, n1);
    case 7: return int8_q8_columns<7>(g, n0, n1);
    default: return int8_q8_columns<8>(g, n0, n1);
  }
}

// int4 weights (q in 0..15, gemv_body.h's layout) times the same quantised activations
// (gemv.h's int4_q8_avx2): 16 bytes of a row are one block of 32 columns in order once the
// high nibbles are put after the low ones; maddubs takes q as the unsigned operand directly
// (pairs at most 2 * 15 * 127). Per group: sum_b d_b * dot_b (q, xq), times the scale, and the
// offset times the group's sum of the dequantised activations (Gemv::xsum).
template <int M, int NB>
inline void int4_q8_block(const Gemv& g, int64_t n) {
  const int64_t K = g.K, half = K / 2, groups = K / g.group;
  const uint8_t* w = static_cast<const uint8_t*>(g.w) + n * half;
  const uint8_t* ahead = w + NB * half;  // the next block's rows, as in gemv_body.h's dense_block
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 total[M][NB];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NB; ++j) total[m][j] = _mm256_setzero_ps();
  for (int64_t gi = 0; gi < groups; ++gi) {
    __m256 acc[M][NB];
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < NB; ++j) acc[m][j] = _mm256_setzero_ps();
    for (int64_t k = gi * g.group; k < (gi + 1) * g.group; k += 32) {
      __m256i wv[NB];
      for (int j = 0; j < NB; ++j) __builtin_prefetch(ahead + k / 2 * NB + j * 16, 0, 3);
      for (int j = 0; j < NB; ++j) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j * half + k / 2));
        wv[j] = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), low);  // columns k .. k + 31
      }
      for (int m = 0; m < M; ++m) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.xq + m * K + k));
        const __m256 d = _mm256_loadu_ps(g.xd + (m * K + k) / 4);
        for (int j = 0; j < NB; ++j) {
          const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(wv[j], xv), ones);
          acc[m][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), d, acc[m][j]);
        }
      }
    }
    for (int j = 0; j < NB; ++j) {
      const __m256 sc = _mm256_set1_ps(g.scales[(n + j) * groups + gi]);
      for (int m = 0; m < M; ++m) total[m][j] = _mm256_fmadd_ps(acc[m][j], sc, total[m][j]);
    }
  }
  for (int j = 0; j < NB; ++j) {
    const float* o = g.offsets + (n + j) * groups;
    for (int m = 0; m < M; ++m) {
      float off = 0.0f;
      for (int64_t gi = 0; gi < groups; ++gi) off += o[gi] * g.xsum[m * groups + gi];
      g.out[m * g.N + n + j] = Isa::hsum(total[m][j]) + off;
    }
  }
}

template <int M>
void int4_q8_columns(const Gemv& g, int64_t n0, int64_t n1) {
  constexpr int NB = M == 1 ? 4 : M <= 3 ? 2 : 1;  // as int8_q8_columns
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) int4_q8_block<M, NB>(g, n);
  for (; n < n1; ++n) int4_q8_block<M, 1>(g, n);
}

void int4_q8_kernel(const Gemv& g, int64_t n0, int64_t n1) {
  switch (g.M) {
    case 1: return int4_q8_columns<1>(g, n0, n1);
    case 2: return int4_q8_columns<2>(g, n0, n1);
    case 3: return int4_q8_columns<3>(g, n0, n1);
    case 4: return int4_q8_columns<4>(g, n0, n1);
    case 5: return int4_q8_columns<5>(g, n0, n1);
    case 6: return int4_q8_columns<6>(g, n0, n1);
    case 7: return int4_q8_columns<7>(g, n0, n1);
    default: return int4_q8_columns<8>(g, n0, n1);
  }
}
}  // namespace

const GemvFn int8_q8_avx2 = int8_q8_kernel;
const GemvFn int4_q8_avx2 = int4_q8_kernel;

// Needs AVX2 (every level that runs the *_q8 kernels has it): vectorised, as a scalar loop
// (a libm call per value to round half to even) cost more than the product at 8 rows. The
// arithmetic is the reference's (native.quantize_activations_q8): fp32, round half even.
void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* xq, float* xd, int32_t* xc) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k0 = 0; k0 < K; k0 += 32) {
      const float* v = x + m * K + k0;
      __m256 a = _mm256_setzero_ps();
      for (int i = 0; i < 32; i += 8) a = _mm256_max_ps(a, _mm256_and_ps(_mm256_loadu_ps(v + i), abs_mask));
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      h = _mm_max_ss(h, _mm_movehdup_ps(h));
      const float amax = _mm_cvtss_f32(h);
      const float inv = amax > 0.0f ? 127.0f / amax : 0.0f, d = amax / 127.0f;
      const __m256 scale = _mm256_set1_ps(inv);
      __m256i q32[4];
      for (int i = 0; i < 4; ++i)  // round half to even, |q| <= 127
        q32[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(v + 8 * i), scale),
                                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      // int32 -> int8 in column order: the packs work per 128-bit half, the permute undoes it.
      const __m256i q16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(q32[0], q32[1]), 0xD8);
      const __m256i r16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(q32[2], q32[3]), 0xD8);
      const __m256i q8 = _mm256_permute4x64_epi64(_mm256_packs_epi16(q16, r16), 0xD8);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + m * K + k0), q8);
      // -128 * the sum of each 4 columns: 8 lanes of 4 bytes
      const __m256i sums = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), q8), _mm256_set1_epi16(1));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xc + (m * K + k0) / 4), _mm256_mullo_epi32(sums, _mm256_set1_epi32(-128)));
      _mm256_storeu_ps(xd + (m * K + k0) / 4, _mm256_set1_ps(d));
    }
}
}  // namespace lw

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
