// AVX-512F kernels (Skylake-X and later, Zen 4 and later); chosen at run time only where the
// CPU reports avx512f (ops.cpp). The whole file is compiled for that target and nothing in it
// but the table has external linkage; the base build flags stay the compiler's default.
#include <immintrin.h>

#include "gemv.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
#endif

namespace lw {
namespace {
struct Isa {
  using V = __m512;
  static constexpr int W = 16;
  // 32 vector registers: up to 24 accumulators plus the weight and activation vectors (3 rows
  // of weights for 5-8 activation rows: 20% more per core at 8 rows than 2); int4 also keeps
  // a scale and an offset per weight row.
  static constexpr int nb(int m) { return m <= 4 ? 4 : 3; }
  static constexpr int nb4(int m) { return m <= 4 ? 4 : 2; }
  static constexpr int64_t PREFETCH_ROWS_BELOW = INT64_MAX;  // every row (measured on Zen 4 and Intel)
  static inline V zero() { return _mm512_setzero_ps(); }
  static inline V set1(float v) { return _mm512_set1_ps(v); }
  static inline V load(const float* p) { return _mm512_loadu_ps(p); }
  static inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static inline float hsum(V v) { return _mm512_reduce_add_ps(v); }
  static inline V bf16(const uint16_t* p) {
    // bf16 is the top half of an fp32: widen to 32 bits and shift into place.
    const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
  }
  static inline V i8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static inline void u4(const uint8_t* p, V& lo, V& hi) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
    hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
  }
};
}  // namespace

#define LW_KERNELS avx512_kernels
#include "gemv_body.h"
#define LW_ATTENTION avx512_attention
#include "attn_body.h"
}  // namespace lw

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
