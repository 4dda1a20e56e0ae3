// llamaworks::prefill_attention: a prefill chunk's attention (inference/paged.py's
// prefill_attention), queries at positions start..start+S-1 over the prefix's keys 0..start-1
// (every query sees all of them) and the chunk's own keys (causal), in one pass with an online
// softmax in fp32 (Milakov & Gimelshein 2018), GQA, q / keys / values all fp32 or all bf16.
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
// causal mask. Below avx512 the same algorithm runs on plain floats (W = 1).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "gemv.h"

extern "C" int lw_level();  // ops.cpp: the instruction set in use (native.py's ISAS index)

namespace lw {
namespace {

constexpr int LEVEL_AVX512 = 2;  // ops.cpp's Level
constexpr int64_t QT = 64;       // query positions per work item
constexpr int KT = 32;           // keys per tile (one softmax update)
constexpr int RB = 32;           // query rows per row block: 2 vectors at 16 lanes

struct Prefill {
  const void* q;            // (B, H, S, D), strides qs (last dimension contiguous)
  const void* kc;           // the chunk's keys (B, Hkv, S, D), strides kcs
  const void* vc;           // the chunk's values, strides vcs
  const void* kp;           // the prefix's keys (B, Hkv, P, D), strides kps
  const void* vp;           // strides vps
  void* out;                // (B, H, S, D), contiguous
  bool bf16;
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
};

// Scalar "vector" for the portable level: one lane.
struct Scalar {
  using V = float;
  static constexpr int W = 1;
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
#pragma clang attribute push(__attribute__((target("avx512f,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
#endif

namespace lw {
namespace {

struct Avx512 {
  using V = __m512;
  static constexpr int W = 16;
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
  // e^x: x = n ln2 + r (|r| <= ln2 / 2, ln2 in two parts), e^r by Cephes' expf polynomial
  // (about 1 ulp), scaled by 2^n with vscalefps (which gives 0 for very negative x). Inputs
  // below -100 (masked scores, -inf) are clamped there: e^-100 is 0 next to the row's maximum's 1.
  static V exp(V x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-100.0f));
    x = _mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f));
    const V n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    V p = _mm512_set1_ps(1.9875691500E-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
    const V r2 = _mm512_mul_ps(r, r);
    p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
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

namespace {

void check_part(const at::Tensor& t, const at::Tensor& q, int64_t B, int64_t Hkv, int64_t D, const char* what) {
  TORCH_CHECK(t.dim() == 4 && t.device().is_cpu() && t.scalar_type() == q.scalar_type(),
              "llamaworks prefill_attention: ", what, " must be a 4-d CPU tensor of q's dtype");
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
  check_part(k, q, B, Hkv, D, "k");
  check_part(v, q, B, Hkv, D, "v");
  check_part(kp, q, B, Hkv, D, "k_prefix");
  check_part(vp, q, B, Hkv, D, "v_prefix");
  TORCH_CHECK(k.size(2) == S && v.size(2) == S && vp.size(2) == kp.size(2),
              "llamaworks prefill_attention: the chunk's keys and values must have q's length, the prefix's one length");
  TORCH_CHECK(D % 16 == 0 && D <= lw::MAX_HEAD_DIM, "llamaworks prefill_attention: head_dim ", D,
              " must be a multiple of 16 up to ", lw::MAX_HEAD_DIM);
  at::Tensor out = at::empty({B, H, S, D}, q.options());
  if (out.numel() == 0) return out;
  const int64_t P = kp.size(2);
  lw::Prefill a{q.data_ptr(), k.data_ptr(), v.data_ptr(), kp.data_ptr(), vp.data_ptr(), out.data_ptr(),
                dt == at::kBFloat16, B, H, Hkv, S, P, D,
                {q.stride(0), q.stride(1), q.stride(2)}, {k.stride(0), k.stride(1), k.stride(2)},
                {v.stride(0), v.stride(1), v.stride(2)}, {kp.stride(0), kp.stride(1), kp.stride(2)},
                {vp.stride(0), vp.stride(1), vp.stride(2)}, 1.0f / std::sqrt(static_cast<float>(D))};
  const bool wide = lw_level() >= lw::LEVEL_AVX512;
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
    for (int64_t i = next++; i < items; i = next++) {
      const int64_t t = tiles - 1 - i / (B * Hkv), bh = i % (B * Hkv);
      if (wide)
        lw::wide::prefill_item(a, bh / Hkv, bh % Hkv, t * lw::QT, sc);
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
