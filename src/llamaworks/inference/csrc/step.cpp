// Operators that stand for runs of small PyTorch operators in an eager decode step, where each
// call costs a few microseconds of dispatch over a few KiB of data (Zen 4, 2 threads: small's
// eager decode is 0.48x its compiled one). Eager only: compiled graphs keep the PyTorch code,
// which inductor fuses by itself (the cache write in place is then a graph mutation it handles).
//
// llamaworks::rope_cache: the step of attention between the fused q/k/v product and the
// attention itself (inference/fuse.py's FusedAttention).
// In PyTorch it is RoPE on q and on k (rope.py's apply_rotary_emb: about 17 operators each)
// and the cache write (kvcache.py's KVCache.update: two index_put and their index tensors),
// some 40 operator calls per layer and step, 80 us of CPU on Zen 4 where the data is a few KiB.
//
// rope_cache(qkv, freqs, input_pos, rows, k_cache, v_cache, n_heads, n_kv_heads) -> q
//   qkv (B, S, (H + 2 Hkv) * D): the fused product's output, q then k then v per token
//   freqs (B or 1, S, D/2, 2) fp32: cos and sin of each pair's angle (Transformer.freqs_cis rows)
//   input_pos (B, S) int64: each token's position; rows (B,) int64 cache rows, or empty: 0..B-1
//   k_cache, v_cache (rows, Hkv, L, D), contiguous, qkv's dtype (fp32 or bf16), or bf16 under an
//                    fp32 qkv (serve --kv-dtype): written in place, rounded to the cache's dtype
// Returns q rotated, (B, H, S, D) contiguous (the layout attention takes). The arithmetic is
// apply_rotary_emb's, operation for operation in fp32 (x0 c + x1 (-s), x1 c + x0 s, each
// product and the sum rounded: no fused multiply-add), rounded to the dtype at the end, so the
// results equal PyTorch's bit for bit.
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

namespace {

template <typename T>
inline float load(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}

// fp-contract=off: apply_rotary_emb rounds each product before the sum (separate kernels). The
// sum is rounded once to the output's type (a bf16 cache: as `.to(torch.bfloat16)` of fp32's).
template <typename T, typename O>
__attribute__((optimize("fp-contract=off"))) void rotate(const T* x, const float* f, int64_t D, O* out) {
  for (int64_t i = 0; i < D / 2; ++i) {
    const float c = f[2 * i], s = f[2 * i + 1];
    const float x0 = load(x, 2 * i), x1 = load(x, 2 * i + 1);
    const float a = x0 * c, b = x1 * -s;  // out[2i] = x0 c + x1 (-s)
    const float d = x1 * c, e = x0 * s;   // out[2i+1] = x1 c + x0 s
    out[2 * i] = static_cast<O>(a + b);
    out[2 * i + 1] = static_cast<O>(d + e);
  }
}

template <typename T, typename C>
void run(const at::Tensor& qkv, const at::Tensor& freqs, const at::Tensor& pos, const int64_t* rows,
         at::Tensor& kc, at::Tensor& vc, int64_t H, int64_t Hkv, at::Tensor& q) {
  const int64_t B = qkv.size(0), S = qkv.size(1), D = kc.size(3), L = kc.size(2);
  const T* src = qkv.data_ptr<T>();
  const float* fr = freqs.data_ptr<float>();
  const int64_t* ps = pos.data_ptr<int64_t>();
  T* qo = q.data_ptr<T>();
  C* kd = kc.data_ptr<C>();
  C* vd = vc.data_ptr<C>();
  const int64_t width = (H + 2 * Hkv) * D, fb = freqs.size(0) == 1 ? 0 : S * D;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t row = rows ? rows[b] : b;
    for (int64_t s = 0; s < S; ++s) {
      const T* x = src + (b * S + s) * width;
      const float* f = fr + b * fb + s * D;  // (D/2, 2) for this token
      const int64_t p = ps[b * S + s];
      TORCH_CHECK(p >= 0 && p < L, "llamaworks rope_cache: position ", p, " outside the cache (", L, ")");
      for (int64_t h = 0; h < H; ++h) rotate(x + h * D, f, D, qo + ((b * H + h) * S + s) * D);
      for (int64_t h = 0; h < Hkv; ++h) {
        const int64_t at = ((row * Hkv + h) * L + p) * D;
        rotate(x + (H + h) * D, f, D, kd + at);
        const T* v = x + (H + Hkv + h) * D;
        for (int64_t i = 0; i < D; ++i) vd[at + i] = static_cast<C>(static_cast<float>(v[i]));
      }
    }
  }
}

at::Tensor rope_cache(const at::Tensor& qkv_in, const at::Tensor& freqs_in, const at::Tensor& pos_in,
                      const at::Tensor& rows_in, at::Tensor k_cache, at::Tensor v_cache, int64_t H, int64_t Hkv) {
  const at::Tensor qkv = qkv_in.contiguous(), pos = pos_in.contiguous(), rows = rows_in.contiguous();
  const at::Tensor freqs = freqs_in.dim() == 3 ? freqs_in.unsqueeze(0).contiguous() : freqs_in.contiguous();
  TORCH_CHECK(qkv.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "llamaworks rope_cache: CPU tensors only");
  const at::ScalarType dt = qkv.scalar_type(), ct = k_cache.scalar_type();
  TORCH_CHECK((dt == at::kFloat || dt == at::kBFloat16) && (ct == dt || (dt == at::kFloat && ct == at::kBFloat16)) &&
                  v_cache.scalar_type() == ct,
              "llamaworks rope_cache: qkv and the caches must all be float32 or all bfloat16, or qkv float32 with "
              "bfloat16 caches");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes() && Hkv > 0 && H % Hkv == 0 && k_cache.size(1) == Hkv,
              "llamaworks rope_cache: caches (rows, ", Hkv, ", L, D), contiguous, got ", k_cache.sizes());
  const int64_t D = k_cache.size(3);
  TORCH_CHECK(qkv.dim() == 3 && qkv.size(2) == (H + 2 * Hkv) * D && D % 2 == 0,
              "llamaworks rope_cache: qkv must be (B, S, ", (H + 2 * Hkv) * D, "), got ", qkv.sizes());
  const int64_t B = qkv.size(0), S = qkv.size(1);
  TORCH_CHECK(freqs.scalar_type() == at::kFloat && freqs.dim() == 4 && (freqs.size(0) == B || freqs.size(0) == 1) &&
                  freqs.size(1) == S && freqs.size(2) == D / 2 && freqs.size(3) == 2,
              "llamaworks rope_cache: freqs must be float32 (", B, " or 1, ", S, ", ", D / 2, ", 2), got ",
              freqs.scalar_type(), " ", freqs.sizes());
  TORCH_CHECK(pos.scalar_type() == at::kLong && pos.dim() == 2 && pos.size(0) == B && pos.size(1) == S,
              "llamaworks rope_cache: input_pos must be int64 (", B, ", ", S, "), got ", pos.sizes());
  const bool has_rows = rows.numel() > 0;
  TORCH_CHECK(!has_rows || (rows.scalar_type() == at::kLong && rows.numel() == B),
              "llamaworks rope_cache: rows must be ", B, " int64 values or empty");
  TORCH_CHECK(has_rows || B <= k_cache.size(0), "llamaworks rope_cache: ", B, " sequences, cache of ",
              k_cache.size(0));
  if (has_rows) {
    const int64_t* r = rows.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(r[b] >= 0 && r[b] < k_cache.size(0), "llamaworks rope_cache: row ", r[b], " outside the cache");
  }
  at::Tensor q = at::empty({B, H, S, D}, qkv.options());
  const int64_t* r = has_rows ? rows.data_ptr<int64_t>() : nullptr;
  if (dt == at::kBFloat16)
    run<c10::BFloat16, c10::BFloat16>(qkv, freqs, pos, r, k_cache, v_cache, H, Hkv, q);
  else if (ct == at::kBFloat16)
    run<float, c10::BFloat16>(qkv, freqs, pos, r, k_cache, v_cache, H, Hkv, q);
  else
    run<float, float>(qkv, freqs, pos, r, k_cache, v_cache, H, Hkv, q);
  return q;
}

// rms_norm(x, weight, eps): model.py's RMSNorm, x / sqrt(mean(x^2) + eps) * weight, in one call
// instead of seven (inference/kernels.py's NativeRMSNorm): x (..., K) fp32 or bf16, weight (K)
// of x's dtype; computed in fp32 and rounded to x's dtype before the weight's product, as
// RMSNorm does (x.float() ... .type_as(x) * weight). The sum of squares is in double: within an
// ulp of torch's fp32 mean, not bit for bit.
template <typename T>
__attribute__((optimize("fp-contract=off"))) void rms_rows(const T* x, const T* w, int64_t M, int64_t K, double eps,
                                                            T* out) {
  for (int64_t m = 0; m < M; ++m) {
    const T* xr = x + m * K;
    double ss = 0.0;
    for (int64_t i = 0; i < K; ++i) {
      const float v = static_cast<float>(xr[i]);
      ss += static_cast<double>(v * v);  // pow(2) rounds each square in fp32
    }
    const float mean = static_cast<float>(ss / static_cast<double>(K));
    const float r = 1.0f / std::sqrt(mean + static_cast<float>(eps));
    for (int64_t i = 0; i < K; ++i) {
      const T n = static_cast<T>(static_cast<float>(xr[i]) * r);
      out[m * K + i] = static_cast<T>(static_cast<float>(n) * static_cast<float>(w[i]));
    }
  }
}

at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& w_in, double eps) {
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const at::ScalarType dt = x.scalar_type();
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "llamaworks rms_norm: CPU tensors only");
  TORCH_CHECK((dt == at::kFloat || dt == at::kBFloat16) && w.scalar_type() == dt && w.dim() == 1 &&
                  x.dim() >= 1 && x.size(-1) == w.size(0),
              "llamaworks rms_norm: x (..., K) and weight (K) both float32 or both bfloat16, got ", x.sizes(), " ",
              dt, " and ", w.sizes(), " ", w.scalar_type());
  at::Tensor out = at::empty_like(x);
  const int64_t K = x.size(-1), M = K ? x.numel() / K : 0;
  if (dt == at::kFloat)
    rms_rows<float>(x.data_ptr<float>(), w.data_ptr<float>(), M, K, eps, out.data_ptr<float>());
  else
    rms_rows<c10::BFloat16>(x.data_ptr<c10::BFloat16>(), w.data_ptr<c10::BFloat16>(), M, K, eps,
                            out.data_ptr<c10::BFloat16>());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llamaworks, m) {
  m.def("rope_cache(Tensor qkv, Tensor freqs, Tensor input_pos, Tensor rows, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, int n_heads, int n_kv_heads) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(llamaworks, CPU, m) {
  m.impl("rope_cache", &rope_cache);
  m.impl("rms_norm", &rms_norm);
}
