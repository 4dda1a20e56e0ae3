// llamaworks::decode_block: one transformer block of an eager decode step as one operator call
// (inference/block.py's NativeBlock), instead of the ~25 Python-dispatched calls the block's
// modules make (two rms_norm, four products, rope_cache, decode_attention, silu, mul, two adds,
// views). At small sizes a decode step is bound by that per-call cost, not by bytes: small's
// int4 weights are 8 MB, read in ~0.2 ms, while its step took ~1 ms (Zen 3, ~30 native calls at
// 4-7 us of dispatch each, the kernel threads idle 65% of the time).
//
// It composes the same operators through the dispatcher, in TransformerBlock.forward's order
// over FusedAttention (NativeAttention) and FusedFeedForward with NativeRMSNorm, so its result
// equals the module path's bit for bit:
//   h   = x + wo(decode_attention(rope_cache(wqkv(rms_norm(x, attention_norm)), ...)))
//   out = h + w2(silu(a) * b),  (a, b) = w13(rms_norm(h, ffn_norm)) split in two halves
//
// decode_block(x, attention_norm, ffn_norm, eps, kinds, weights, group_sizes, freqs, input_pos,
//              rows, k_cache, v_cache, mask, n_heads, n_kv_heads) -> out
//   x (B, S, dim), fp32 or bf16, B * S <= 8; the norms' weights in x's dtype
//   kinds (4,): how wqkv, wo, w13, w2 multiply (Kind below); weights: their tensors in that order,
//     1 (F32, BF16), 2 (INT8: weight, fp32 scales) or 3 (INT4, INT4_TILES: weight, scales,
//     offsets) each; group_sizes (4,): the int4 groups (0 otherwise)
//   freqs, input_pos, rows, k_cache, v_cache: as rope_cache takes them (the caches in x's dtype,
//     written in place); mask (B or 1, 1, S, L) bool, True: attend
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace {

enum Kind { F32 = 0, BF16 = 1, INT8 = 2, INT4 = 3, INT4_TILES = 4 };
constexpr int64_t TENSORS[] = {1, 1, 2, 3, 3};  // weights each kind takes

using T = at::Tensor;
using CT = const at::Tensor&;

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

struct Ops {
  c10::TypedOperatorHandle<T(CT, CT)> f32 = op<T(CT, CT)>("llamaworks::gemv_f32");
  c10::TypedOperatorHandle<T(CT, CT)> bf16 = op<T(CT, CT)>("llamaworks::gemv_bf16");
  c10::TypedOperatorHandle<T(CT, CT, CT)> int8 = op<T(CT, CT, CT)>("llamaworks::gemv_int8");
  c10::TypedOperatorHandle<T(CT, CT, CT, CT, int64_t)> int4 =
      op<T(CT, CT, CT, CT, int64_t)>("llamaworks::gemv_int4");
  c10::TypedOperatorHandle<T(CT, CT, CT, CT, int64_t)> int4_tiles =
      op<T(CT, CT, CT, CT, int64_t)>("llamaworks::gemv_int4_tiles");
  c10::TypedOperatorHandle<T(CT, CT, double)> rms_norm = op<T(CT, CT, double)>("llamaworks::rms_norm");
  c10::TypedOperatorHandle<T(CT, CT, CT, CT, T, T, int64_t, int64_t)> rope_cache =
      op<T(CT, CT, CT, CT, T, T, int64_t, int64_t)>("llamaworks::rope_cache");
  c10::TypedOperatorHandle<T(CT, CT, CT, CT)> attention = op<T(CT, CT, CT, CT)>("llamaworks::decode_attention");
};

const Ops& ops() {
  static const Ops o;  // looked up once, on the first call (every operator is registered by then)
  return o;
}

// One projection: x (B, S, in) -> (B, S, out), as the layer's module computes it.
T linear(int64_t kind, const at::Tensor* w, int64_t group, const T& x) {
  const Ops& o = ops();
  const int64_t B = x.size(0), S = x.size(1);
  T out;
  switch (kind) {
    case F32: out = o.f32.call(x.reshape({-1, x.size(2)}), w[0]); break;
    case BF16: out = o.bf16.call(x.reshape({-1, x.size(2)}), w[0]); break;
    case INT8: out = o.int8.call(x.reshape({-1, x.size(2)}), w[0], w[1]); break;
    case INT4: out = o.int4.call(x.reshape({-1, x.size(2)}), w[0], w[1], w[2], group); break;
    case INT4_TILES: return o.int4_tiles.call(x, w[0], w[1], w[2], group);  // takes x (..., in) as it is
    default: TORCH_CHECK(false, "llamaworks decode_block: unknown projection kind ", kind);
  }
  return out.view({B, S, out.size(1)});
}

T decode_block(CT x, CT attention_norm, CT ffn_norm, double eps, at::IntArrayRef kinds, at::TensorList weights,
               at::IntArrayRef groups, CT freqs, CT input_pos, CT rows, T k_cache, T v_cache, CT mask, int64_t H,
               int64_t Hkv) {
  TORCH_CHECK(x.dim() == 3 && x.size(0) * x.size(1) <= 8, "llamaworks decode_block: x must be (B, S, dim) with ",
              "B * S <= 8, got ", x.sizes());
  TORCH_CHECK(kinds.size() == 4 && groups.size() == 4, "llamaworks decode_block: 4 projections (wqkv, wo, w13, ",
              "w2), got ", kinds.size(), " kinds and ", groups.size(), " group sizes");
  const at::Tensor* w[4];
  int64_t used = 0;
  for (size_t i = 0; i < 4; ++i) {
    TORCH_CHECK(kinds[i] >= F32 && kinds[i] <= INT4_TILES, "llamaworks decode_block: unknown projection kind ",
                kinds[i]);
    w[i] = weights.data() + used;
    used += TENSORS[kinds[i]];
  }
  TORCH_CHECK(used == static_cast<int64_t>(weights.size()), "llamaworks decode_block: kinds ", kinds, " take ",
              used, " tensors, got ", weights.size());
  // The inner calls skip the autograd keys (nothing here records gradients: NativeBlock calls this without
  // them), a few us of dispatch spared on each of the block's ~20 calls.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Ops& o = ops();
  const int64_t B = x.size(0), S = x.size(1);
  // Attention (FusedAttention.forward with NativeAttention.attend)
  const T qkv = linear(kinds[0], w[0], groups[0], o.rms_norm.call(x, attention_norm, eps));
  const T q = o.rope_cache.call(qkv, freqs, input_pos, rows, k_cache, v_cache, H, Hkv);  // (B, H, S, D)
  const bool all_rows = rows.numel() == 0;
  const T k = all_rows ? k_cache.narrow(0, 0, B) : k_cache.index_select(0, rows);  // (B, Hkv, L, D)
  const T v = all_rows ? v_cache.narrow(0, 0, B) : v_cache.index_select(0, rows);
  const T att = o.attention.call(q, k, v, mask).transpose(1, 2).reshape({B, S, -1});  // (B, S, H * D)
  const T h = x + linear(kinds[1], w[1], groups[1], att);
  // SwiGLU (FusedFeedForward.forward): w2(silu(a) * b)
  const T ab = linear(kinds[2], w[2], groups[2], o.rms_norm.call(h, ffn_norm, eps));  // (B, S, 2 * hidden)
  TORCH_CHECK(ab.size(2) % 2 == 0, "llamaworks decode_block: w13's output ", ab.size(2), " is not two halves");
  const int64_t hidden = ab.size(2) / 2;
  const T g = at::silu(ab.narrow(2, 0, hidden)) * ab.narrow(2, hidden, hidden);
  return h + linear(kinds[3], w[3], groups[3], g);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llamaworks, m) {
  m.def("decode_block(Tensor x, Tensor attention_norm, Tensor ffn_norm, float eps, int[] kinds, Tensor[] weights, "
        "int[] group_sizes, Tensor freqs, Tensor input_pos, Tensor rows, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor mask, int n_heads, int n_kv_heads) -> Tensor");
}

TORCH_LIBRARY_IMPL(llamaworks, CPU, m) { m.impl("decode_block", &decode_block); }
