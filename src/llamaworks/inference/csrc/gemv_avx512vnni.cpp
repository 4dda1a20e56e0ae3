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

}  // namespace

const GemvFn int8_vnni = int8_kernel;
}  // namespace lw

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
