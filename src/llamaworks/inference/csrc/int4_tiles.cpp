// llamaworks::gemv_int4_tiles: int4 weights (groups of 128, 256, ...) in 16-row tiles, Int4Linear's
// decode layout on AVX512_VNNI CPUs (quant.py's int4_tiles), for out = x @ dequantised(w).T.
//
// Why a second layout: gemv_int4 (gemv_avx512vnni.cpp) reads each weight row as its own stream
// and ends every row with a horizontal sum, an fp32 scale and an offset loop; at dim 512 a row is
// four blocks of 128, so that epilogue costs as much as the integer dot products, and the int4
// product ran slower than int8's on half the bytes. Here one 64-byte vector holds 16 output rows
// x 8 columns: lane r (4 bytes) is row r, byte i holds column i in its low nibble and column
// 4 + i in its high one. One AND and one shift+AND give two vectors of 16 rows x 4 columns, each
// multiplied by 4 activation bytes broadcast to every lane (vpdpbusd, nibbles as the unsigned
// operand): the int32 lanes are the 16 rows' sums, so there is no horizontal sum at all, and a
// tile's scales and offsets for a group are one vector each ((N/16, groups, 16)).
//
// The activations are quantised per block of 128 columns as for gemv_int4 on VNNI
// (native.py's quantize_activations_q8(x, 128): d = max|x| / 127, q = round-half-even(x / d)),
// here in natural column order; each block's integer sums (exact: at most 128 * 15 * 127) are
// scaled once by the row's group scale times d, and the offsets (zero - 8 * scale) multiply the
// group sums of the dequantised activations.
//
// Below avx512vnni (avx2: AVX2-only CPUs; avx512 without VNNI) the same tiles run at 8 rows per
// 256-bit vector (tiles_avx2) with the activations as gemv_int4 takes them there (native.py's
// int4_activations): quantised per block of 32 (Q8_0's rule), AVX2 maddubs instead of vpdpbusd. On
// scalar a portable loop takes them as they are.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "gemv.h"
#include "parallel.h"

extern "C" int lw_level();  // ops.cpp: the instruction set in use (native.py's ISAS index)

namespace lw {
namespace {

constexpr int TILE = 16;        // output rows per tile (the int32 lanes of a 512-bit vector)
constexpr int LEVEL_AVX2 = 1;   // ops.cpp's Level
constexpr int LEVEL_VNNI = 3;

struct Tiles {
  const uint8_t* w;        // (N/16, K/8, 16, 4): tile, 8-column chunk, row, byte
  const float* scales;     // (N/16, K/group, 16)
  const float* offsets;    // the same, zero - 8 * scale
  int64_t M, K, N, group;
  float* out;              // (M, N)
  const int8_t* xq;        // x quantised per block of 128 (VNNI) or 32 (AVX2) (M, K), natural order
  const float* xd;         // each block's scale: VNNI (M, K/128); AVX2 repeated per 4 columns (M, K/4)
  const float* xsum;       // per group, the sum of the dequantised activations (M, K/group)
  const float* xt;         // portable: the activations as taken (M, K), fp32
};

// Tiles [t0, t1), any instruction set: fp32 sums of xt * (q * scale + offset).
void tiles_portable(const Tiles& g, int64_t t0, int64_t t1) {
  const int64_t K = g.K, chunks = K / 8, groups = K / g.group;
  for (int64_t t = t0; t < t1; ++t)
    for (int r = 0; r < TILE; ++r)
      for (int64_t m = 0; m < g.M; ++m) {
        const float* x = g.xt + m * K;
        float sum = 0.0f;
        for (int64_t c = 0; c < chunks; ++c) {
          const uint8_t* b = g.w + ((t * chunks + c) * TILE + r) * 4;
          const int64_t gi = c * 8 / g.group;
          const float s = g.scales[(t * groups + gi) * TILE + r], o = g.offsets[(t * groups + gi) * TILE + r];
          for (int i = 0; i < 4; ++i) {
            sum += x[c * 8 + i] * (static_cast<float>(b[i] & 15) * s + o);
            sum += x[c * 8 + 4 + i] * (static_cast<float>(b[i] >> 4) * s + o);
          }
        }
        g.out[m * g.N + t * TILE + r] = sum;
      }
}

}  // namespace
}  // namespace lw

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vnni,avx2,fma")
#endif

namespace lw {
namespace {

// Per row and block of 128: d = max|x| / 127, q = round-half-even(x * (127 / max|x|)); xsum per
// group: the sum of d * q.
void quantize_q8_128(const float* x, int64_t M, int64_t K, int64_t group, int8_t* xq, float* xd, float* xsum) {
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
      for (int i = 0; i < 128; i += 16) {
        const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(v + i), scale));  // half to even
        sum = _mm512_add_epi32(sum, q);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + m * K + b * 128 + i), _mm512_cvtsepi32_epi8(q));
      }
      xd[m * blocks + b] = d;
      float& gs = xsum[m * (K / group) + b / per_group];
      if (b % per_group == 0) gs = 0.0f;
      gs += d * static_cast<float>(_mm512_reduce_add_epi32(sum));
    }
}

inline __m512i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// T tiles from t for M activation rows. SPLIT: low and high nibbles into separate int32
// accumulators, so that at few rows there are enough independent vpdpbusd chains to hide
// its latency (4-5 cycles on Zen 4 and Ice Lake).
template <int M, int T, bool SPLIT>
inline void tiles_block(const Tiles& g, int64_t t) {
  const int64_t K = g.K, chunks = K / 8, groups = K / g.group, blocks = K / 128, stride = chunks * 64;
  const uint8_t* w = g.w + t * stride;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[M][T];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < T; ++j) acc[m][j] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i ia[M][T], ib[M][T];
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < T; ++j) ia[m][j] = ib[m][j] = _mm512_setzero_si512();
    for (int64_t c = b * 16; c < b * 16 + 16; ++c) {
      __m512i lo[T], hi[T];
      for (int j = 0; j < T; ++j) {
        const uint8_t* p = w + j * stride + c * 64;
        // The next T tiles, the same line of each, at the pace these are read (as gemv_body.h's
        // dense_block): T streams of one 4 KiB page each at dim 512 are too short for the
        // hardware prefetchers, and a few lines ahead within the tile ran 0.75-0.95x gemv_int4
        // at one row from memory.
        _mm_prefetch(reinterpret_cast<const char*>(p + T * stride), _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(p);
        lo[j] = _mm512_and_si512(v, low);
        hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      }
      for (int m = 0; m < M; ++m) {
        const __m512i xa = broadcast4(g.xq + m * K + c * 8), xb = broadcast4(g.xq + m * K + c * 8 + 4);
        for (int j = 0; j < T; ++j) {
          if (SPLIT) {
            ia[m][j] = _mm512_dpbusd_epi32(ia[m][j], lo[j], xa);
            ib[m][j] = _mm512_dpbusd_epi32(ib[m][j], hi[j], xb);
          } else {
            ia[m][j] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(ia[m][j], lo[j], xa), hi[j], xb);
          }
        }
      }
    }
    const int64_t gi = b * 128 / g.group;
    const bool group_end = (b + 1) * 128 % g.group == 0;
    for (int j = 0; j < T; ++j) {
      const __m512 s = _mm512_loadu_ps(g.scales + ((t + j) * groups + gi) * TILE);
      const __m512 o = group_end ? _mm512_loadu_ps(g.offsets + ((t + j) * groups + gi) * TILE) : _mm512_setzero_ps();
      for (int m = 0; m < M; ++m) {
        const __m512i dot = SPLIT ? _mm512_add_epi32(ia[m][j], ib[m][j]) : ia[m][j];
        const __m512 sd = _mm512_mul_ps(s, _mm512_set1_ps(g.xd[m * blocks + b]));
        acc[m][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sd, acc[m][j]);
        if (group_end) acc[m][j] = _mm512_fmadd_ps(o, _mm512_set1_ps(g.xsum[m * groups + gi]), acc[m][j]);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < T; ++j) _mm512_storeu_ps(g.out + m * g.N + (t + j) * TILE, acc[m][j]);
}

template <int M>
void tiles_rows(const Tiles& g, int64_t t0, int64_t t1) {
  constexpr int T = M == 1 ? 4 : M == 2 ? 2 : 1;
  constexpr bool SPLIT = M * T <= 4;
  int64_t t = t0;
  for (; t + T <= t1; t += T) tiles_block<M, T, SPLIT>(g, t);
  for (; t < t1; ++t) tiles_block<M, 1, true>(g, t);
}

void tiles_vnni(const Tiles& g, int64_t t0, int64_t t1) {
  switch (g.M) {  // 1 <= M <= MAX_ROWS
    case 1: return tiles_rows<1>(g, t0, t1);
    case 2: return tiles_rows<2>(g, t0, t1);
    case 3: return tiles_rows<3>(g, t0, t1);
    case 4: return tiles_rows<4>(g, t0, t1);
    case 5: return tiles_rows<5>(g, t0, t1);
    case 6: return tiles_rows<6>(g, t0, t1);
    case 7: return tiles_rows<7>(g, t0, t1);
    default: return tiles_rows<8>(g, t0, t1);
  }
}

}  // namespace
}  // namespace lw

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace lw {
namespace {

inline __m256i broadcast4_avx2(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// One tile (16 rows as two halves of 8) for M <= 2 activation rows. Per chunk of 8 columns, the
// low nibbles times the activation bytes of columns 0-3 and the high ones times those of 4-7
// (maddubs, nibbles as the unsigned operand: int16 pairs of at most 2 * 15 * 127), summed in int16
// over a block's 4 chunks (at most 8 * 2 * 15 * 127 = 30480 < 2^15, so neither saturates nor wraps),
// then into each row's int32 sum (madd by ones) and to fp32 once per block of 32, times its d.
template <int M>
inline void tile_avx2(const Tiles& g, int64_t t) {
  const int64_t K = g.K, stride = K * 8, groups = K / g.group, per_group = g.group / 32;
  const uint8_t* w = g.w + t * stride;
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 total[M][2];
  for (int m = 0; m < M; ++m) total[m][0] = total[m][1] = _mm256_setzero_ps();
  for (int64_t gi = 0; gi < groups; ++gi) {
    __m256 acc[M][2];
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t b = gi * per_group; b < (gi + 1) * per_group; ++b) {
      __m256i s16[M][2];
      for (int m = 0; m < M; ++m) s16[m][0] = s16[m][1] = _mm256_setzero_si256();
      for (int64_t c = b * 4; c < b * 4 + 4; ++c) {
        const uint8_t* p = w + c * 64;
        // The next tile's same line (as tiles_block): one 4 KiB page per tile at dim 512 is too
        // short a stream for the hardware prefetchers.
        _mm_prefetch(reinterpret_cast<const char*>(p + stride), _MM_HINT_T0);
        const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));       // rows 0-7
        const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));  // rows 8-15
        const __m256i lo0 = _mm256_and_si256(v0, low), hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), low);
        const __m256i lo1 = _mm256_and_si256(v1, low), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), low);
        for (int m = 0; m < M; ++m) {
          const __m256i xa = broadcast4_avx2(g.xq + m * K + c * 8), xb = broadcast4_avx2(g.xq + m * K + c * 8 + 4);
          s16[m][0] = _mm256_add_epi16(s16[m][0], _mm256_add_epi16(_mm256_maddubs_epi16(lo0, xa),
                                                                   _mm256_maddubs_epi16(hi0, xb)));
          s16[m][1] = _mm256_add_epi16(s16[m][1], _mm256_add_epi16(_mm256_maddubs_epi16(lo1, xa),
                                                                   _mm256_maddubs_epi16(hi1, xb)));
        }
      }
      for (int m = 0; m < M; ++m) {
        const __m256 d = _mm256_set1_ps(g.xd[(m * K + b * 32) / 4]);
        for (int h = 0; h < 2; ++h)
          acc[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s16[m][h], ones)), d, acc[m][h]);
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 sc = _mm256_loadu_ps(g.scales + (t * groups + gi) * TILE + h * 8);
      const __m256 of = _mm256_loadu_ps(g.offsets + (t * groups + gi) * TILE + h * 8);
      for (int m = 0; m < M; ++m) {
        total[m][h] = _mm256_fmadd_ps(acc[m][h], sc, total[m][h]);
        total[m][h] = _mm256_fmadd_ps(of, _mm256_set1_ps(g.xsum[m * groups + gi]), total[m][h]);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(g.out + m * g.N + t * TILE + h * 8, total[m][h]);
}

// Tiles [t0, t1): each tile for every pair of rows in turn while it is in the L1 cache.
void tiles_avx2(const Tiles& g, int64_t t0, int64_t t1) {
  auto from_row = [&g](int64_t m) {  // g's rows m, m + 1, ...
    Tiles r = g;
    r.xq += m * g.K, r.xd += m * (g.K / 4), r.xsum += m * (g.K / g.group), r.out += m * g.N;
    return r;
  };
  for (int64_t t = t0; t < t1; ++t) {
    int64_t m = 0;
    for (; m + 2 <= g.M; m += 2) tile_avx2<2>(from_row(m), t);
    if (m < g.M) tile_avx2<1>(from_row(m), t);
  }
}

}  // namespace
}  // namespace lw

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace {

// Work below this many weight bytes per thread stays on one thread (as ops.cpp's GRAIN_BYTES).
constexpr int64_t GRAIN_BYTES = 1 << 16;
// More than MAX_ROWS rows: the weight in slices of about this many bytes, each multiplied into
// every chunk of 8 rows while it is in the L2 cache (as ops.cpp's SLICE_BYTES).
constexpr int64_t SLICE_BYTES = 1 << 16;

// gemv_int4_tiles(x, weight, scales, offsets, group_size): x (..., K) fp32 or bf16, at most
// a few rows in all (decode: more run in chunks of MAX_ROWS); weight (N/16, 8K) uint8 in tiles
// (see the top of this file); scales, offsets (N/16, K/group, 16) fp32. Returns (..., N) in x's dtype.
at::Tensor gemv_int4_tiles(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& scales,
                           const at::Tensor& offsets, int64_t group) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous() && w.size(1) % 1024 == 0,
              "llamaworks gemv_int4_tiles: the weight must be contiguous uint8 (out/16, 8 * in) with in a multiple "
              "of 128, got ", w.scalar_type(), " ", w.sizes());
  const int64_t K = w.size(1) / 8, N = w.size(0) * lw::TILE;
  TORCH_CHECK(group > 0 && group % 128 == 0 && K % group == 0, "llamaworks gemv_int4_tiles: group size ", group,
              " must be a multiple of 128 dividing ", K);
  for (const at::Tensor* t : {&scales, &offsets})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 3 && t->size(0) == w.size(0) &&
                    t->size(1) == K / group && t->size(2) == lw::TILE,
                "llamaworks gemv_int4_tiles: scales and offsets must be contiguous float32 (", w.size(0), ", ",
                K / group, ", 16), got ", t->scalar_type(), " ", t->sizes());
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) == K, "llamaworks gemv_int4_tiles: x must be (..., ", K, "), got ",
              x_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16,
              "llamaworks gemv_int4_tiles: x must be float32 or bfloat16, got ", x_in.scalar_type());
  TORCH_CHECK(x_in.device().is_cpu() && w.device().is_cpu() && scales.device().is_cpu() && offsets.device().is_cpu(),
              "llamaworks gemv_int4_tiles: CPU tensors only");
  // Any leading dimensions, flattened here rather than by the caller: Int4Linear.forward passes
  // x as it comes (a reshape and a view fewer per call in eager decode).
  const at::Tensor x = x_in.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t M = x.size(0), groups = K / group;
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());
  shape.back() = N;
  at::Tensor out = at::empty(shape, x.options());
  if (M == 0 || N == 0) return out.to(x_in.scalar_type());
  const float* xp = x.data_ptr<float>();
  lw::Tiles g{w.data_ptr<uint8_t>(), scales.data_ptr<float>(), offsets.data_ptr<float>(), M, K, N, group,
              out.data_ptr<float>(), nullptr, nullptr, nullptr, nullptr};
  const int level = lw_level();
  const bool vnni = level >= lw::LEVEL_VNNI, avx2 = !vnni && level >= lw::LEVEL_AVX2;
  std::vector<int8_t> xq;
  std::vector<float> xd, xsum;
  if (vnni) {
    xq.resize(M * K);
    xd.resize(M * K / 128);
    xsum.resize(M * groups);
    lw::quantize_q8_128(xp, M, K, group, xq.data(), xd.data(), xsum.data());
    g.xq = xq.data();
    g.xd = xd.data();
    g.xsum = xsum.data();
  } else if (avx2) {
    // gemv_int4's activations at these levels: Q8_0's blocks of 32 and their group sums, as ops.cpp makes them.
    std::vector<int32_t> xc(M * K / 4);
    xq.resize(M * K);
    xd.resize(M * K / 4);
    xsum.resize(M * groups);
    lw::quantize_rows(xp, M, K, xq.data(), xd.data(), xc.data());
    lw::group_sums_q8(xd.data(), xc.data(), M, K, group, xsum.data());
    g.xq = xq.data();
    g.xd = xd.data();
    g.xsum = xsum.data();
  } else {
    g.xt = xp;
  }
  const int64_t tiles = w.size(0), tile_bytes = K * 8;
  const int64_t grain = std::max<int64_t>(1, GRAIN_BYTES / tile_bytes);
  const int64_t slice = M <= lw::MAX_ROWS ? tiles : std::max<int64_t>(1, SLICE_BYTES / tile_bytes);
  lw::parallel_for(0, tiles, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t t0 = b0; t0 < b1; t0 += slice) {
      const int64_t t1 = std::min(b1, t0 + slice);
      for (int64_t m0 = 0; m0 < M; m0 += lw::MAX_ROWS) {
        lw::Tiles part = g;
        part.M = std::min(lw::MAX_ROWS, M - m0);
        part.out = g.out + m0 * N;
        if (vnni) {
          part.xq = g.xq + m0 * K;
          part.xd = g.xd + m0 * (K / 128);
          part.xsum = g.xsum + m0 * groups;
          lw::tiles_vnni(part, t0, t1);
        } else if (avx2) {
          part.xq = g.xq + m0 * K;
          part.xd = g.xd + m0 * (K / 4);
          part.xsum = g.xsum + m0 * groups;
          lw::tiles_avx2(part, t0, t1);
        } else {
          part.xt = g.xt + m0 * K;
          lw::tiles_portable(part, t0, t1);
        }
      }
    }
  });
  return out.to(x_in.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llamaworks, m) {
  m.def("gemv_int4_tiles(Tensor x, Tensor weight, Tensor scales, Tensor offsets, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(llamaworks, CPU, m) { m.impl("gemv_int4_tiles", &gemv_int4_tiles); }
