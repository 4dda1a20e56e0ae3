// llamaworks::prefill_attention: a prefill chunk's attention (inference/paged.py's
// prefill_attention), queries at positions start..start+S-1 over the prefix's keys 0..start-1
// (every query sees all of them) and the chunk's own keys (causal), in one pass with an online
// softmax in fp32 (Milakov & Gimelshein 2018), GQA, q / keys / values all fp32 or all bf16, or an
// fp32 q over bf16 keys and values (a bf16 cache under an fp32 model: serve --kv-dtype).
//
// Why not SDPA's CPU flash kernel: in bf16 it is no faster than in fp32 (a 2049-token prompt of
// the `small` preset at 1 thread: 425-584 ms of attention in both), and after a prefix it needs
// two calls merged by their log-sum-exp plus a copy of every key head per query head for GQA.
// Why not the paged decode kernel (attn_body.h): it loops over one query row at a time, so every
// key is loaded (and widened from bf16) once per query; here a tile of KT keys is loaded once,
// transposed and widened into fp32 scratch, and serves every query row of a work item (QT
// positions x the H / Hkv query heads that read that key head), which is what makes prefill
// compute-bound rather than load-bound.
//
// Work item: (sequence b, key head hk, tile of QT query positions); items are taken from a shared
// counter, latest query tiles (the most keys) first, so two threads stay balanced under the
// causal mask. The same algorithm runs at 16 lanes (avx512 and up), 8 (avx2: AVX2-only CPUs, where
// the portable loop made a 128-token prompt's attention at the small preset 4x the avx512 level's)
// and on plain floats (W = 1).
//
// bf16 on CPUs with AVX512_BF16 (the avx512bf16 level: Zen 4, Cooper Lake, Sapphire Rapids):
// both products as bf16 dot products (vdpbf16ps: two bf16 products summed into each fp32 lane),
// prefill_item_dot below, instead of widening every key and value to fp32 for an FMA each (the
// widening path made bf16 prefill attention no faster than fp32). Scores q.k pair up head
// dimensions: a lane holds (q[2e], q[2e+1]) of its query row and the key's pair is broadcast, so
// the keys are read from the cache as they are, no widening. Outputs p.v pair up keys: the
// probabilities are rounded to bf16 (as flash attention's bf16 kernels do) and a tile's values
// interleaved pairwise ((v[2i][d], v[2i+1][d]) per 32 bits) once per tile for every row block.
// The products are exact and the sums fp32; what differs from fp32 math is the probabilities'
// rounding (2^-9 relative): the softmax's denominator sums the rounded values, so the weights
// still sum to 1 and the output is off by at most 2^-9 max|v - out| before its own bf16 rounding
// (tests/inference/test_prefill_kernel.py). The widening path stays for lower levels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "gemv.h"

extern "C" int lw_level();  // ops.cpp: the instruction set in use (native.py's ISAS index)

namespace lw {
namespace {

constexpr int LEVEL_AVX2 = 1, LEVEL_AVX512 = 2, LEVEL_AVX512BF16 = 4;  // ops.cpp's Level
constexpr int64_t QT = 64;       // query positions per work item
constexpr int KT = 32;           // keys per tile (one softmax update)
constexpr int RB = 32;           // query rows per row block: 2 vectors at 16 lanes
// e^x as x = n ln2 + r (|r| <= ln2 / 2, ln2 in two parts), e^r = 1 + r + r^2 P(r) by Cephes' expf
// polynomial (about 1 ulp), P's coefficients highest first: the vector exps below share them.
constexpr float LOG2E = 1.44269504088896341f, LN2_HI = 0.693359375f, LN2_LO = -2.12194440e-4f;
constexpr float EXP_P[] = {1.9875691500E-4f, 1.3981999507E-3f, 8.3334519073E-3f,
                           4.1665795894E-2f, 1.6666665459E-1f, 5.0000001201E-1f};

struct Prefill {
  const void* q;            // (B, H, S, D), strides qs (last dimension contiguous)
  const void* kc;           // the chunk's keys (B, Hkv, S, D), strides kcs
  const void* vc;           // the chunk's values, strides vcs
  const void* kp;           // the prefix's keys (B, Hkv, P, D), strides kps
  const void* vp;           // strides vps
  void* out;                // (B, H, S, D), contiguous
  bool bf16;                // q and out bf16 (else fp32)
  bool kv_bf16;             // keys and values bf16 (else fp32): a bf16 cache under an fp32 model too
  int64_t B, H, Hkv, S, P, D;
  int64_t qs[3], kcs[3], vcs[3], kps[3], vps[3];
  float scale;
};

inline float widen(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t to_bf16(float f) {  // round to nearest even (finite values)
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  bits += 0x7FFF + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}

// Per-thread scratch of one work item (see prefill_body.h).
struct Scratch {
  std::vector<float> qt, ot;  // (blocks, D, RB): queries (scaled) and running outputs, transposed
  std::vector<float> m, l;    // (blocks, RB): running maximum and sum per row
  std::vector<float> kt, vt;  // (KT, D): a bf16 tile's keys and values widened
  std::vector<float> s;       // (KT, RB): a tile's scores
  // The bf16 dot-product path (prefill_item_dot), 32-bit pairs of bf16 values:
  std::vector<uint32_t> qb;   // (blocks, D/2, RB): queries, head dimensions 2e, 2e+1 per lane
  std::vector<uint32_t> pb;   // (KT/2, RB): probabilities, keys 2i, 2i+1 per lane
  std::vector<uint32_t> vb;   // (KT/2, D): values, keys 2i, 2i+1 per head dimension
};

inline uint32_t load_pair(const uint16_t* p) {  // two bf16 values, any alignment
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Scalar "vector" for the portable level: one lane.
struct Scalar {
  using V = float;
  static constexpr int W = 1, KJ = 8, DJ = 8;
  static V zero() { return 0.0f; }
  static V set1(float x) { return x; }
  static V load(const float* p) { return *p; }
  static void store(float* p, V v) { *p = v; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static V mul(V a, V b) { return a * b; }
  static V max(V a, V b) { return a > b ? a : b; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V iota(float x) { return x; }  // lanes x, x + 1, ...
  static V mask_below(V v, V pos, float lim) { return pos < lim ? -INFINITY : v; }
  static V exp(V x) { return std::exp(x); }
};

namespace portable {
using I = Scalar;
#include "prefill_body.h"
}  // namespace portable

}  // namespace
}  // namespace lw

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace lw {
namespace {

struct Avx2 {
  using V = __m256;
  // 16 registers: 2 keys (or head dimensions) x 4 vectors of a row block accumulate, with the
  // block's 4 query vectors and a broadcast beside them (8 keys at a time spilled to the stack).
  static constexpr int W = 8, KJ = 2, DJ = 2;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V iota(float x) { return _mm256_add_ps(_mm256_set1_ps(x), _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7)); }
  static V mask_below(V v, V pos, float lim) {
    return _mm256_blendv_ps(v, _mm256_set1_ps(-INFINITY), _mm256_cmp_ps(pos, _mm256_set1_ps(lim), _CMP_LT_OQ));
  }
  // e^x as Avx512::exp below (the same reduction and EXP_P, 0 below -87: never subnormal), with 2^n
  // built in the exponent bits instead of vscalefps. The softmax only takes e^x of x <= 0, so the
  // top clamp (88, where Avx512's is 88.38) keeps n <= 127, a finite 2^n.
  static V exp(V x) {
    const V normal = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GE_OQ);
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    x = _mm256_min_ps(x, _mm256_set1_ps(88.0f));
    const V n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    V p = _mm256_set1_ps(EXP_P[0]);
    for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P[i]));
    const V r2 = _mm256_mul_ps(r, r);
    p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    // 2^n for n in [-126, 127]: the biased exponent n + 127 in bits 23..30.
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), normal);
  }
};

namespace mid {
using I = Avx2;
#include "prefill_body.h"
}  // namespace mid

}  // namespace
}  // namespace lw

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
#endif

namespace lw {
namespace {

struct Avx512 {
  using V = __m512;
  static constexpr int W = 16, KJ = 8, DJ = 8;  // 16 of the 32 registers accumulate
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V iota(float x) {
    return _mm512_add_ps(_mm512_set1_ps(x), _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  }
  // v where pos >= lim, -inf where pos < lim (a key past the row's position).
  static V mask_below(V v, V pos, float lim) {
    return _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(pos, _mm512_set1_ps(lim), _CMP_LT_OQ),
                              _mm512_set1_ps(-INFINITY));
  }
  // e^x (EXP_P above), scaled by 2^n with vscalefps. Below -87 (masked scores: -inf on every
  // diagonal tile) the result is exactly 0, never subnormal (e^-87 = 1.6e-38 is just above
  // FLT_MIN; 0 next to the row's maximum's 1): every FMA that reads a subnormal operand is a
  // microcode assist on Intel cores, and with e^-100 (3.7e-44) here a 128-token prompt's
  // attention ran 15x slower on Sapphire Rapids (1 thread: 3.07 -> 0.21 ms; a 2048-token one
  // 2.8x, 80 -> 29 ms). AMD's Zen 4 takes subnormals at full speed, which hid it.
  static V exp(V x) {
    const __mmask16 normal = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    x = _mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f));
    const V n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    V p = _mm512_set1_ps(EXP_P[0]);
    for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P[i]));
    const V r2 = _mm512_mul_ps(r, r);
    p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_scalef_ps(normal, p, n);
  }
};

// The kernel body at 16 lanes, compiled for the same target as its vector type.
namespace wide {
using I = Avx512;
#include "prefill_body.h"
}  // namespace wide

}  // namespace
}  // namespace lw

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512bf16,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512bf16,avx2,fma")
#endif

namespace lw {
namespace {

// 16 fp32 values rounded to bf16 (nearest even), zero-extended into the low half of 32-bit lanes.
inline __m512i bf16_lanes(__m512 x) { return _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x)); }

// prefill_body.h's work item for bf16 inputs with vdpbf16ps (see the top of this file): the same
// tiles, masks and online softmax (Avx512's exp), the two products as bf16 dot products.
void prefill_item_dot(const Prefill& a, int64_t b, int64_t hk, int64_t s0, Scratch& sc) {
  using I = Avx512;
  using V = __m512;
  constexpr int W = 16, NR = RB / W, KJ = 8, DJ = 8;
  const int64_t D = a.D, DP = D / 2, group = a.H / a.Hkv, nq = std::min(QT, a.S - s0);
  const int64_t per_head = (nq + RB - 1) / RB, blocks = group * per_head;
  const uint16_t* q16 = static_cast<const uint16_t*>(a.q);
  // Queries as they are (bf16), pairs of head dimensions per lane; the scale goes on the scores.
  for (int64_t x = 0; x < blocks; ++x) {
    const int64_t h = hk * group + x / per_head, p0 = s0 + (x % per_head) * RB;
    uint32_t* qb = sc.qb.data() + x * DP * RB;
    for (int r = 0; r < RB; ++r) {
      if (p0 + r < s0 + nq) {
        const uint16_t* qp = q16 + b * a.qs[0] + h * a.qs[1] + (p0 + r) * a.qs[2];
        for (int64_t e = 0; e < DP; ++e) qb[e * RB + r] = load_pair(qp + 2 * e);
      } else {
        for (int64_t e = 0; e < DP; ++e) qb[e * RB + r] = 0u;
      }
    }
    std::fill(sc.ot.begin() + x * D * RB, sc.ot.begin() + (x + 1) * D * RB, 0.0f);
    std::fill(sc.m.begin() + x * RB, sc.m.begin() + (x + 1) * RB, -INFINITY);
    std::fill(sc.l.begin() + x * RB, sc.l.begin() + (x + 1) * RB, 0.0f);
  }
  const V scale = I::set1(a.scale);
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const int64_t prefix_tiles = (a.P + KT - 1) / KT, chunk_end = s0 + nq;
  const int64_t tiles = prefix_tiles + (chunk_end + KT - 1) / KT;
  float* s = sc.s.data();
  uint32_t* pb = sc.pb.data();
  uint32_t* vb = sc.vb.data();
  for (int64_t t = 0; t < tiles; ++t) {
    const bool prefix = t < prefix_tiles;
    const int64_t c0 = prefix ? t * KT : (t - prefix_tiles) * KT;
    const int64_t n = std::min<int64_t>(KT, (prefix ? a.P : chunk_end) - c0), pairs = (n + 1) / 2;
    const int64_t* ks = prefix ? a.kps : a.kcs;
    const int64_t* vs = prefix ? a.vps : a.vcs;
    const uint16_t* kr = static_cast<const uint16_t*>(prefix ? a.kp : a.kc) + b * ks[0] + hk * ks[1] + c0 * ks[2];
    const uint16_t* vr = static_cast<const uint16_t*>(prefix ? a.vp : a.vc) + b * vs[0] + hk * vs[1] + c0 * vs[2];
    // The tile's values interleaved by pairs of keys; a missing odd key's half is 0.
    for (int64_t i = 0; i < pairs; ++i) {
      const uint16_t* v0 = vr + 2 * i * vs[2];
      const uint16_t* v1 = 2 * i + 1 < n ? v0 + vs[2] : nullptr;
      for (int64_t d = 0; d < D; d += 16) {
        const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v0 + d)));
        const __m512i hi = v1 ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v1 + d)))
                              : _mm512_setzero_si512();
        _mm512_storeu_si512(vb + i * D + d, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
    }
    for (int64_t x = 0; x < blocks; ++x) {
      const int64_t p0 = s0 + (x % per_head) * RB;
      if (!prefix && p0 + RB - 1 < c0) continue;  // no row of the block sees a key of this tile
      const uint32_t* qb = sc.qb.data() + x * DP * RB;
      float* ot = sc.ot.data() + x * D * RB;
      float* m = sc.m.data() + x * RB;
      float* l = sc.l.data() + x * RB;
      // Scores, KJ keys at a time (past the tile's end: the last key again, not used).
      for (int64_t j0 = 0; j0 < n; j0 += KJ) {
        const uint16_t* kj[KJ];
        for (int u = 0; u < KJ; ++u) kj[u] = kr + std::min<int64_t>(j0 + u, n - 1) * ks[2];
        V acc[KJ][NR];
        for (int u = 0; u < KJ; ++u)
          for (int w = 0; w < NR; ++w) acc[u][w] = I::zero();
        for (int64_t e = 0; e < DP; ++e) {
          __m512i qv[NR];
          for (int w = 0; w < NR; ++w) qv[w] = _mm512_loadu_si512(qb + e * RB + w * W);
          for (int u = 0; u < KJ; ++u) {
            const __m512i kb = _mm512_set1_epi32(static_cast<int>(load_pair(kj[u] + 2 * e)));
            for (int w = 0; w < NR; ++w) acc[u][w] = _mm512_dpbf16_ps(acc[u][w], (__m512bh)qv[w], (__m512bh)kb);
          }
        }
        for (int u = 0; u < KJ && j0 + u < KT; ++u)
          for (int w = 0; w < NR; ++w) I::store(s + (j0 + u) * RB + w * W, I::mul(acc[u][w], scale));
      }
      const bool diagonal = !prefix && c0 + n - 1 > p0;
      V pos[NR];
      for (int w = 0; w < NR; ++w) pos[w] = I::iota(static_cast<float>(p0 + w * W));
      V mx[NR];
      for (int w = 0; w < NR; ++w) mx[w] = I::load(m + w * W);
      for (int64_t j = 0; j < n; ++j)
        for (int w = 0; w < NR; ++w) {
          V v = I::load(s + j * RB + w * W);
          if (diagonal) {
            v = I::mask_below(v, pos[w], static_cast<float>(c0 + j));
            I::store(s + j * RB + w * W, v);
          }
          mx[w] = I::max(mx[w], v);
        }
      V corr[NR], sum[NR];
      for (int w = 0; w < NR; ++w) {
        corr[w] = I::exp(I::sub(I::load(m + w * W), mx[w]));
        I::store(m + w * W, mx[w]);
        sum[w] = I::zero();
      }
      // Probabilities rounded to bf16 in pairs of keys; the sum is of the rounded values.
      for (int64_t i = 0; i < pairs; ++i)
        for (int w = 0; w < NR; ++w) {
          const V e0 = I::exp(I::sub(I::load(s + 2 * i * RB + w * W), mx[w]));
          const V e1 = 2 * i + 1 < n ? I::exp(I::sub(I::load(s + (2 * i + 1) * RB + w * W), mx[w])) : I::zero();
          const __m512i pair = _mm512_or_si512(bf16_lanes(e0), _mm512_slli_epi32(bf16_lanes(e1), 16));
          _mm512_storeu_si512(pb + i * RB + w * W, pair);
          sum[w] = I::add(sum[w], I::add(_mm512_castsi512_ps(_mm512_slli_epi32(pair, 16)),
                                         _mm512_castsi512_ps(_mm512_and_si512(pair, high))));
        }
      for (int w = 0; w < NR; ++w) I::store(l + w * W, I::fma(I::load(l + w * W), corr[w], sum[w]));
      // ot = ot * corr + sum_i (p[2i] v[2i] + p[2i+1] v[2i+1]), DJ head dimensions at a time.
      for (int64_t d0 = 0; d0 < D; d0 += DJ) {
        V o[DJ][NR];
        for (int u = 0; u < DJ; ++u)
          for (int w = 0; w < NR; ++w) o[u][w] = I::mul(I::load(ot + (d0 + u) * RB + w * W), corr[w]);
        for (int64_t i = 0; i < pairs; ++i) {
          __m512i p[NR];
          for (int w = 0; w < NR; ++w) p[w] = _mm512_loadu_si512(pb + i * RB + w * W);
          const uint32_t* vi = vb + i * D + d0;
          for (int u = 0; u < DJ; ++u) {
            const __m512i vv = _mm512_set1_epi32(static_cast<int>(vi[u]));
            for (int w = 0; w < NR; ++w) o[u][w] = _mm512_dpbf16_ps(o[u][w], (__m512bh)p[w], (__m512bh)vv);
          }
        }
        for (int u = 0; u < DJ; ++u)
          for (int w = 0; w < NR; ++w) I::store(ot + (d0 + u) * RB + w * W, o[u][w]);
      }
    }
  }
  for (int64_t x = 0; x < blocks; ++x) {
    const int64_t h = hk * group + x / per_head, p0 = s0 + (x % per_head) * RB;
    const float* ot = sc.ot.data() + x * D * RB;
    for (int r = 0; r < RB && p0 + r < s0 + nq; ++r) {
      const float lr = sc.l[x * RB + r], inv = lr > 0.0f ? 1.0f / lr : 0.0f;
      uint16_t* out = static_cast<uint16_t*>(a.out) + ((b * a.H + h) * a.S + p0 + r) * D;
      for (int64_t d = 0; d < D; ++d) out[d] = to_bf16(ot[d * RB + r] * inv);
    }
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

// LLAMAWORKS_PREFILL_DOT=0 keeps bf16 on the widening path at the avx512bf16 level (A/B runs):
// read per call, as paged.py reads LLAMAWORKS_PREFILL_KERNEL, so one process can time both.
bool dot_allowed() {
  const char* e = std::getenv("LLAMAWORKS_PREFILL_DOT");
  return e == nullptr || std::strcmp(e, "0") != 0;
}

void check_part(const at::Tensor& t, at::ScalarType kt, int64_t B, int64_t Hkv, int64_t D, const char* what) {
  TORCH_CHECK(t.dim() == 4 && t.device().is_cpu() && t.scalar_type() == kt,
              "llamaworks prefill_attention: ", what, " must be a 4-d CPU tensor of k's dtype");
  TORCH_CHECK(t.size(0) == B && t.size(1) == Hkv && t.size(3) == D && t.stride(3) == 1,
              "llamaworks prefill_attention: ", what, " has shape ", t.sizes(), ", want (", B, ", ", Hkv,
              ", *, ", D, ") with a contiguous last dimension");
}

// prefill_attention(q, k, v, k_prefix, v_prefix): q (B, H, S, D) at positions P..P+S-1; k, v
// (B, Hkv, S, D) the chunk's own keys and values; k_prefix, v_prefix (B, Hkv, P, D) those of
// positions 0..P-1 (P may be 0; any strides, a batch stride of 0 included). Query s sees every
// prefix key and chunk keys 0..s. Returns (B, H, S, D) contiguous in q's dtype (fp32 or bf16).
at::Tensor prefill_attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                             const at::Tensor& kp_in, const at::Tensor& vp_in) {
  auto last = [](const at::Tensor& t) { return t.dim() == 4 && t.stride(3) != 1 ? t.contiguous() : t; };
  const at::Tensor q = last(q_in), k = last(k_in), v = last(v_in), kp = last(kp_in), vp = last(vp_in);
  TORCH_CHECK(q.dim() == 4 && q.device().is_cpu(), "llamaworks prefill_attention: q must be a 4-d CPU tensor");
  const at::ScalarType dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "llamaworks prefill_attention: float32 or bfloat16 only");
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3), Hkv = k.dim() == 4 ? k.size(1) : 0;
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "llamaworks prefill_attention: ", H, " query heads for ", Hkv, " key heads");
  const at::ScalarType kt = k.scalar_type();
  TORCH_CHECK(kt == dt || (dt == at::kFloat && kt == at::kBFloat16),
              "llamaworks prefill_attention: keys and values must be of q's dtype, or bfloat16 under a float32 q");
  check_part(k, kt, B, Hkv, D, "k");
  check_part(v, kt, B, Hkv, D, "v");
  check_part(kp, kt, B, Hkv, D, "k_prefix");
  check_part(vp, kt, B, Hkv, D, "v_prefix");
  TORCH_CHECK(k.size(2) == S && v.size(2) == S && vp.size(2) == kp.size(2),
              "llamaworks prefill_attention: the chunk's keys and values must have q's length, the prefix's one length");
  TORCH_CHECK(D % 16 == 0 && D <= lw::MAX_HEAD_DIM, "llamaworks prefill_attention: head_dim ", D,
              " must be a multiple of 16 up to ", lw::MAX_HEAD_DIM);
  at::Tensor out = at::empty({B, H, S, D}, q.options());
  if (out.numel() == 0) return out;
  const int64_t P = kp.size(2);
  lw::Prefill a{q.data_ptr(), k.data_ptr(), v.data_ptr(), kp.data_ptr(), vp.data_ptr(), out.data_ptr(),
                dt == at::kBFloat16, kt == at::kBFloat16, B, H, Hkv, S, P, D,
                {q.stride(0), q.stride(1), q.stride(2)}, {k.stride(0), k.stride(1), k.stride(2)},
                {v.stride(0), v.stride(1), v.stride(2)}, {kp.stride(0), kp.stride(1), kp.stride(2)},
                {vp.stride(0), vp.stride(1), vp.stride(2)}, 1.0f / std::sqrt(static_cast<float>(D))};
  const int level = lw_level();
  const bool wide = level >= lw::LEVEL_AVX512, mid = level >= lw::LEVEL_AVX2;
  const bool dot = a.bf16 && level >= lw::LEVEL_AVX512BF16 && dot_allowed();
  const int64_t tiles = (S + lw::QT - 1) / lw::QT, items = B * Hkv * tiles;
  const int64_t blocks = (H / Hkv) * ((lw::QT + lw::RB - 1) / lw::RB);
  // Item i: the latest query tiles first (they see the most keys), so that threads taking items
  // from the counter in turn end together.
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), items);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    lw::Scratch sc;
    sc.qt.resize(blocks * D * lw::RB);
    sc.ot.resize(blocks * D * lw::RB);
    sc.m.resize(blocks * lw::RB);
    sc.l.resize(blocks * lw::RB);
    sc.kt.resize(lw::KT * D);
    sc.vt.resize(lw::KT * D);
    sc.s.resize(lw::KT * lw::RB);
    if (dot) {
      sc.qb.resize(blocks * D / 2 * lw::RB);
      sc.pb.resize(lw::KT / 2 * lw::RB);
      sc.vb.resize(lw::KT / 2 * D);
    }
    for (int64_t i = next++; i < items; i = next++) {
      const int64_t t = tiles - 1 - i / (B * Hkv), bh = i % (B * Hkv);
      if (dot)
        lw::prefill_item_dot(a, bh / Hkv, bh % Hkv, t * lw::QT, sc);
      else if (wide)
        lw::wide::prefill_item(a, bh / Hkv, bh % Hkv, t * lw::QT, sc);
      else if (mid)
        lw::mid::prefill_item(a, bh / Hkv, bh % Hkv, t * lw::QT, sc);
      else
        lw::portable::prefill_item(a, bh / Hkv, bh % Hkv, t * lw::QT, sc);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llamaworks, m) {
  m.def("prefill_attention(Tensor q, Tensor k, Tensor v, Tensor k_prefix, Tensor v_prefix) -> Tensor");
}

TORCH_LIBRARY_IMPL(llamaworks, CPU, m) { m.impl("prefill_attention", &prefill_attention); }
