// int8 weights times int8 activations on CPUs with AVX512_VNNI (Ice Lake, Cascade Lake,
// Sapphire Rapids and later, Zen 4 and later): vpdpbusd multiplies 64 byte pairs and adds them
// in fours into 16 int32 lanes per instruction, where the float path (gemv_body.h) widens every
// weight to fp32 and spends an FMA on it per activation row, compute-bound from a few rows.
//
// The activations are quantised per block of 32 columns (Gemv::xq, xd; ops.cpp's
// quantize_rows), so one 64-byte vector covers two blocks: lanes 0-7 the first, 8-15 the second,
// and Gemv::xd holds each block's scale once per lane. vpdpbusd takes unsigned x signed bytes:
// the weight's bytes are flipped to w + 128 (one xor) and the extra 128 * x is taken back
// exactly in the integer sum by starting each lane at Gemv::xc (-128 * its four x values), so
// every block's integer dot product is exact and only the scaling is in floating point.
#include <immintrin.h>

#include "gemv.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vnni,avx2,fma")
#endif

namespace lw {
namespace {

// Columns [k, k + 64) (or the 32 of a tail, under `mask`) of NB weight rows into M x NB sums.
template <int M, int NB, bool TAIL>
inline void step(const Gemv& g, const int8_t* w, int64_t k, __m512 (&acc)[M][NB]) {
  const int64_t K = g.K;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  constexpr __mmask64 bytes = TAIL ? 0xFFFFFFFFull : ~0ull;  // a tail is one block of 32
  constexpr __mmask16 lanes = TAIL ? 0x00FF : 0xFFFF;
  __m512i wv[NB];
  for (int j = 0; j < NB; ++j) wv[j] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(bytes, w + j * K + k), flip);
  for (int m = 0; m < M; ++m) {
    const __m512i xv = _mm512_maskz_loadu_epi8(bytes, g.xq + m * K + k);
    const __m512 d = _mm512_maskz_loadu_ps(lanes, g.xd + (m * K + k) / 4);
    for (int j = 0; j < NB; ++j) {
      // Masked-off lanes start at 0 and multiply x = 0: they add nothing.
      const __m512i start = _mm512_maskz_loadu_epi32(lanes, g.xc + (m * K + k) / 4);
      const __m512i dot = _mm512_dpbusd_epi32(start, wv[j], xv);  // exact sum of w * q per 4 columns
      acc[m][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), d, acc[m][j]);
    }
  }
}

template <int M, int NB>
inline void int8_block(const Gemv& g, int64_t n) {
  const int64_t K = g.K;
  const int8_t* w = static_cast<const int8_t*>(g.w) + n * K;
  const char* ahead = reinterpret_cast<const char*>(w + NB * K);  // as in gemv_body.h's dense_block
  __m512 acc[M][NB];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    for (int j = 0; j < NB; ++j) __builtin_prefetch(ahead + k * NB + j * 64, 0, 3);
    step<M, NB, false>(g, w, k, acc);
  }
  if (k < K) step<M, NB, true>(g, w, k, acc);  // K % 64 == 32
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NB; ++j) g.out[m * g.N + n + j] = _mm512_reduce_add_ps(acc[m][j]) * g.scales[n + j];
}

template <int M>
void columns(const Gemv& g, int64_t n0, int64_t n1) {
  // M x NB accumulators, NB weight vectors and the x, d and start vectors in 32 registers.
  constexpr int NB = M <= 4 ? 4 : 3;
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) int8_block<M, NB>(g, n);
  for (; n < n1; ++n) int8_block<M, 1>(g, n);
}

void int8_kernel(const Gemv& g, int64_t n0, int64_t n1) {
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

// int4 weights (q in 0..15, gemv_body.h's layout) times activations quantised per block of
// 128 columns (gemv.h's int4_vnni; quantize_rows_q8_128), for groups that are multiples of 128.
// q is unsigned already, so vpdpbusd takes it as it is (no flip, no correction). 64 bytes of a
// row are four 32-column blocks A-D; their low nibbles are columns [A 0-15, B 0-15, C 0-15,
// D 0-15] and their high nibbles the other halves, so one load, a shift and two ands give two
// vectors of 64 columns, and the activations are stored in that order. One activation scale
// per 128 columns (Q8_K takes one per 256) lets the integer dot run over all 128 before one
// conversion to fp32, where a scale per 32 (Q8_0) costs a conversion and an FMA per 32.
template <int M, int NB>
inline void int4_block(const Gemv& g, int64_t n) {
  const int64_t K = g.K, half = K / 2, groups = K / g.group, blocks = K / 128;
  const uint8_t* w = static_cast<const uint8_t*>(g.w) + n * half;
  const uint8_t* ahead = w + NB * half;  // the next block's rows, as in gemv_body.h's dense_block
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 total[M][NB];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NB; ++j) total[m][j] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t k = b * 128, gi = k / g.group;
    __m512i lo[NB], hi[NB];
    __m512 s[NB];
    for (int j = 0; j < NB; ++j) __builtin_prefetch(ahead + k / 2 * NB + j * 64, 0, 3);
    for (int j = 0; j < NB; ++j) {
      const __m512i v = _mm512_loadu_si512(w + j * half + k / 2);
      lo[j] = _mm512_and_si512(v, low);
      hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      s[j] = _mm512_set1_ps(g.scales[(n + j) * groups + gi]);
    }
    for (int m = 0; m < M; ++m) {
      const __m512i x0 = _mm512_loadu_si512(g.xq + m * K + k), x1 = _mm512_loadu_si512(g.xq + m * K + k + 64);
      const __m512 d = _mm512_set1_ps(g.xd[m * blocks + b]);
      for (int j = 0; j < NB; ++j) {
        // exact: at most 128 * 15 * 127 per lane
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[j], x0), hi[j], x1);
        total[m][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d, s[j]), total[m][j]);
      }
    }
  }
  for (int j = 0; j < NB; ++j) {
    const float* o = g.offsets + (n + j) * groups;
    for (int m = 0; m < M; ++m) {
      float off = 0.0f;
      for (int64_t gi = 0; gi < groups; ++gi) off += o[gi] * g.xsum[m * groups + gi];
      g.out[m * g.N + n + j] = _mm512_reduce_add_ps(total[m][j]) + off;
    }
  }
}

template <int M>
void int4_columns(const Gemv& g, int64_t n0, int64_t n1) {
  // M x NB accumulators, 3 NB weight vectors and scales, x (2), d and the dot in 32 registers.
  constexpr int NB = M <= 2 ? 4 : M <= 4 ? 3 : 2;
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) int4_block<M, NB>(g, n);
  for (; n < n1; ++n) int4_block<M, 1>(g, n);
}

void int4_kernel(const Gemv& g, int64_t n0, int64_t n1) {
  switch (g.M) {
    case 1: return int4_columns<1>(g, n0, n1);
    case 2: return int4_columns<2>(g, n0, n1);
    case 3: return int4_columns<3>(g, n0, n1);
    case 4: return int4_columns<4>(g, n0, n1);
    case 5: return int4_columns<5>(g, n0, n1);
    case 6: return int4_columns<6>(g, n0, n1);
    case 7: return int4_columns<7>(g, n0, n1);
    default: return int4_columns<8>(g, n0, n1);
  }
}

}  // namespace

const GemvFn int8_vnni = int8_kernel;
const GemvFn int4_vnni = int4_kernel;

void quantize_rows_q8_128(const float* x, int64_t M, int64_t K, int64_t group, int8_t* xq, float* xd, float* xsum) {
  const int64_t blocks = K / 128, per_group = group / 128;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < blocks; ++b) {
      const float* v = x + m * K + b * 128;
      __m512 a = _mm512_setzero_ps();
      for (int i = 0; i < 128; i += 16) a = _mm512_max_ps(a, _mm512_abs_ps(_mm512_loadu_ps(v + i)));
      const float amax = _mm512_reduce_max_ps(a);
      const float inv = amax > 0.0f ? 127.0f / amax : 0.0f, d = amax / 127.0f;
      const __m512 scale = _mm512_set1_ps(inv);
      __m512i sum = _mm512_setzero_si512();
      int8_t* out = xq + m * K + b * 128;
      for (int p = 0; p < 8; ++p) {  // columns 16p .. 16p + 15, stored at piece (p % 2) * 4 + p / 2
        const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(v + 16 * p), scale));  // half to even
        sum = _mm512_add_epi32(sum, q);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16 * ((p % 2) * 4 + p / 2)), _mm512_cvtsepi32_epi8(q));
      }
      xd[m * blocks + b] = d;
      float& gs = xsum[m * (K / group) + b / per_group];
      if (b % per_group == 0) gs = 0.0f;
      gs += d * static_cast<float>(_mm512_reduce_add_epi32(sum));
    }
}
}  // namespace lw

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
