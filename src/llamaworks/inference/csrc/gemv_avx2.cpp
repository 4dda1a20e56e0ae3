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
}  // namespace lw

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
