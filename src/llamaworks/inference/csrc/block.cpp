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

#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "parallel.h"

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
  c10::TypedOperatorHandle<T(CT, CT, CT, CT, CT)> paged_attention =
      op<T(CT, CT, CT, CT, CT)>("llamaworks::paged_attention");
};

const Ops& ops() {
  static const Ops o;  // looked up once, on the first call (every operator is registered by then)
  return o;
}

// A block or a whole step in one parallel region (parallel.h): its products and attention sections go to a
// team of threads that spins on them, instead of a region, a barrier and two futex wakes each.
template <typename F>
T in_team(F step) {
  T out;
  lw::with_team([&] { out = step(); });
  return out;
}

// One projection's kind, tensors and int4 group.
struct Proj {
  int64_t kind = F32;
  const at::Tensor* w = nullptr;
  int64_t group = 0;
};

// The block's parts: the norms' weights, the four projections (wqkv, wo, w13, w2), the caches.
struct Block {
  at::Tensor attention_norm, ffn_norm, k_cache, v_cache;
  Proj p[4];
};

// One projection: x (B, S, in) -> (B, S, out), as the layer's module computes it.
T linear(const Proj& p, const T& x) {
  const Ops& o = ops();
  if (p.kind == INT4_TILES) return o.int4_tiles.call(x, p.w[0], p.w[1], p.w[2], p.group);  // takes x as it is
  const T flat = x.reshape({-1, x.size(2)});  // (B * S, in)
  T out;
  switch (p.kind) {
    case F32: out = o.f32.call(flat, p.w[0]); break;
    case BF16: out = o.bf16.call(flat, p.w[0]); break;
    case INT8: out = o.int8.call(flat, p.w[0], p.w[1]); break;
    case INT4: out = o.int4.call(flat, p.w[0], p.w[1], p.w[2], p.group); break;
    default: TORCH_CHECK(false, "llamaworks decode_block: unknown projection kind ", p.kind);
  }
  return out.view({x.size(0), x.size(1), out.size(1)});
}

// Reads `kinds` (4 per block) and `groups`, taking each projection's tensors from `weights` at `used`.
void read_projections(at::IntArrayRef kinds, at::IntArrayRef groups, at::TensorList weights, int64_t& used,
                      Proj* out, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(kinds[i] >= F32 && kinds[i] <= INT4_TILES, "llamaworks decode_block: unknown projection kind ",
                kinds[i]);
    TORCH_CHECK(used + TENSORS[kinds[i]] <= static_cast<int64_t>(weights.size()), "llamaworks decode_block: kinds ",
                kinds, " take more tensors than the ", weights.size(), " given");
    out[i] = Proj{kinds[i], weights.data() + used, groups[i]};
    used += TENSORS[kinds[i]];
  }
}

// Where a step's keys and values live, and what its attention reads. A static cache (B, Hkv, L, D) per
// layer: positions input_pos (B, S), cache rows `rows` (empty: 0..B-1), the mask (B or 1, 1, S, L). Or a
// paged pool (Hkv, num_blocks, block_size, D) per layer (inference/paged.py), a ragged decode pass of n
// tokens in one row (B = 1, S = n, one token a sequence): each token's pool slot `slots` (n, 1), its
// sequence's table row `blocks` (n, width), its position `pos` (n, 1), and `row0` (n,) zeros.
struct StepAttention {
  bool paged = false;
  T input_pos, rows, mask;
  T slots, blocks, pos, row0;
};

// RoPE, the cache write and attention: qkv (B, S, (H + 2 Hkv) * D) -> (B, S, H * D).
T attend(const Block& b, CT qkv, CT freqs, const StepAttention& a, int64_t H, int64_t Hkv) {
  const Ops& o = ops();
  const int64_t B = qkv.size(0), S = qkv.size(1);
  if (a.paged) {
    // PagedKVCache.rope_update and paged.ragged_attention's one-group decode pass: the pool seen as one
    // cache row of num_blocks * block_size positions, each token a sequence of its own at its slot.
    const int64_t D = b.k_cache.size(3), n = B * S;
    const T k = b.k_cache.view({1, Hkv, -1, D}), v = b.v_cache.view({1, Hkv, -1, D});
    const T q = o.rope_cache.call(qkv.view({n, 1, -1}), freqs.view({n, 1, D / 2, 2}), a.slots, a.row0, k, v, H,
                                  Hkv);  // (n, H, 1, D)
    // (n, H, 1, D), token-major: read as (B, S, H * D) without a copy
    return o.paged_attention.call(q, b.k_cache, b.v_cache, a.blocks, a.pos).view({B, S, -1});
  }
  const T q = o.rope_cache.call(qkv, freqs, a.input_pos, a.rows, b.k_cache, b.v_cache, H, Hkv);  // (B, H, S, D)
  const bool all_rows = a.rows.numel() == 0;
  const T k = all_rows ? b.k_cache.narrow(0, 0, B) : b.k_cache.index_select(0, a.rows);  // (B, Hkv, L, D)
  const T v = all_rows ? b.v_cache.narrow(0, 0, B) : b.v_cache.index_select(0, a.rows);
  return o.attention.call(q, k, v, a.mask).transpose(1, 2).reshape({B, S, -1});  // (B, S, H * D)
}

// The next product's weight, for the team's other threads to read while this one works alone (parallel.h).
void hint(const Proj& p) { lw::prefetch_next(p.w[0].data_ptr(), p.w[0].nbytes()); }

// TransformerBlock.forward for decode rows (the header's formula). Runs below the autograd keys.
T block(const Block& b, CT x, double eps, CT freqs, const StepAttention& a, int64_t H, int64_t Hkv) {
  const Ops& o = ops();
  // Attention (FusedAttention.forward with NativeAttention.attend, or PagedAttention's ragged read)
  hint(b.p[0]);
  const T qkv = linear(b.p[0], o.rms_norm.call(x, b.attention_norm, eps));
  hint(b.p[1]);
  const T att = attend(b, qkv, freqs, a, H, Hkv);  // (B, S, H * D)
  // The residual adds in place on the products' fresh outputs (x + y and y + x round alike): no new tensor.
  const T h = linear(b.p[1], att).add_(x);
  // SwiGLU (FusedFeedForward.forward): w2(silu(a) * b)
  hint(b.p[2]);
  const T ab = linear(b.p[2], o.rms_norm.call(h, b.ffn_norm, eps));  // (B, S, 2 hidden)
  hint(b.p[3]);
  TORCH_CHECK(ab.size(2) % 2 == 0, "llamaworks decode_block: w13's output ", ab.size(2), " is not two halves");
  const int64_t hidden = ab.size(2) / 2;
  const T g = at::silu(ab.narrow(2, 0, hidden)).mul_(ab.narrow(2, hidden, hidden));
  return linear(b.p[3], g).add_(h);
}

T decode_block(CT x, CT attention_norm, CT ffn_norm, double eps, at::IntArrayRef kinds, at::TensorList weights,
               at::IntArrayRef groups, CT freqs, CT input_pos, CT rows, T k_cache, T v_cache, CT mask, int64_t H,
               int64_t Hkv) {
  TORCH_CHECK(x.dim() == 3 && x.size(0) * x.size(1) <= 8, "llamaworks decode_block: x must be (B, S, dim) with ",
              "B * S <= 8, got ", x.sizes());
  TORCH_CHECK(kinds.size() == 4 && groups.size() == 4, "llamaworks decode_block: 4 projections (wqkv, wo, w13, ",
              "w2), got ", kinds.size(), " kinds and ", groups.size(), " group sizes");
  Block b{attention_norm, ffn_norm, k_cache, v_cache, {}};
  int64_t used = 0;
  read_projections(kinds, groups, weights, used, b.p, 4);
  TORCH_CHECK(used == static_cast<int64_t>(weights.size()), "llamaworks decode_block: kinds ", kinds, " take ",
              used, " tensors, got ", weights.size());
  // The inner calls skip the autograd keys (nothing here records gradients: NativeBlock calls this without
  // them), a few us of dispatch spared on each of the block's ~20 calls.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  StepAttention a;
  a.input_pos = input_pos;
  a.rows = rows;
  a.mask = mask;
  return in_team([&] { return block(b, x, eps, freqs, a, H, Hkv); });
}

// decode_plan / decode_step / decode_plan_free: a whole decode step (Transformer.forward with input_pos,
// logits out) in one call, over a plan built once per cache (inference/block.py's NativeTransformer):
// the per-block Python (module calls, the checks, the arguments' conversion: ~15 us a block on Zen 4)
// goes too. The plan holds references to the model's tensors (weights, caches, RoPE table) until freed.
struct Plan {
  at::Tensor embedding, norm, freqs;  // tok_embeddings.weight (V, dim), norm.weight, freqs_cis (P, D/2, 2)
  double eps = 1e-6;
  int64_t H = 0, Hkv = 0;
  bool paged = false;  // the blocks' caches are paged pools (decode_step_paged), else static (decode_step)
  std::vector<Block> blocks;
  std::vector<at::Tensor> weights;  // every projection's tensors: the Proj pointers point into it
  Proj output;
};

std::mutex plans_lock;
std::unordered_map<int64_t, std::shared_ptr<Plan>> plans;
int64_t next_plan = 1;

// tensors: embedding, norm, freqs, then per block attention_norm, ffn_norm, k_cache, v_cache (paged: the
// key and value pools), then every projection's tensors (block by block, wqkv wo w13 w2, then the output
// layer's). meta: n_layers, n_heads, n_kv_heads, paged (0 or 1), then kinds (4 per block, then the
// output's), then as many group sizes.
int64_t decode_plan(at::TensorList tensors, at::IntArrayRef meta, double eps) {
  TORCH_CHECK(meta.size() >= 4, "llamaworks decode_plan: meta starts with n_layers, n_heads, n_kv_heads, paged");
  const int64_t L = meta[0], n = 4 * L + 1;
  TORCH_CHECK(L >= 0 && static_cast<int64_t>(meta.size()) == 4 + 2 * n, "llamaworks decode_plan: meta must hold ",
              4 + 2 * n, " values for ", L, " layers, got ", meta.size());
  TORCH_CHECK(meta[3] == 0 || meta[3] == 1, "llamaworks decode_plan: paged must be 0 or 1, got ", meta[3]);
  TORCH_CHECK(static_cast<int64_t>(tensors.size()) >= 3 + 4 * L, "llamaworks decode_plan: ", tensors.size(),
              " tensors for ", L, " layers");
  auto plan = std::make_shared<Plan>();
  plan->embedding = tensors[0];
  plan->norm = tensors[1];
  plan->freqs = tensors[2];
  plan->eps = eps;
  plan->H = meta[1];
  plan->Hkv = meta[2];
  plan->paged = meta[3] == 1;
  const at::IntArrayRef kinds = meta.slice(4, n), groups = meta.slice(4 + n, n);
  plan->weights.assign(tensors.begin() + 3 + 4 * L, tensors.end());
  plan->blocks.resize(L);
  int64_t used = 0;
  for (int64_t l = 0; l < L; ++l) {
    Block& b = plan->blocks[l];
    b.attention_norm = tensors[3 + 4 * l];
    b.ffn_norm = tensors[4 + 4 * l];
    b.k_cache = tensors[5 + 4 * l];
    b.v_cache = tensors[6 + 4 * l];
    read_projections(kinds.slice(4 * l, 4), groups.slice(4 * l, 4), plan->weights, used, b.p, 4);
  }
  read_projections(kinds.slice(4 * L, 1), groups.slice(4 * L, 1), plan->weights, used, &plan->output, 1);
  TORCH_CHECK(used == static_cast<int64_t>(plan->weights.size()), "llamaworks decode_plan: the kinds take ", used,
              " projection tensors, got ", plan->weights.size());
  std::lock_guard<std::mutex> guard(plans_lock);
  plans[next_plan] = std::move(plan);
  return next_plan++;
}

void decode_plan_free(int64_t id) {
  std::lock_guard<std::mutex> guard(plans_lock);
  plans.erase(id);
}

std::shared_ptr<Plan> find_plan(int64_t id, bool paged, const char* what) {
  std::lock_guard<std::mutex> guard(plans_lock);
  auto it = plans.find(id);
  TORCH_CHECK(it != plans.end(), "llamaworks ", what, ": no plan ", id, " (freed, or never made)");
  TORCH_CHECK(it->second->paged == paged, "llamaworks ", what, ": plan ", id, " was made over ",
              paged ? "static caches" : "paged pools");
  return it->second;
}

// The embedding, every block, the final norm; then the output layer's fp32 logits, or (hidden) the
// normed hidden state in the model's dtype, as Transformer.forward(..., return_hidden=True) returns it.
T run_step(const Plan& plan, CT tokens, CT input_pos, const StepAttention& a, bool hidden) {
  const int64_t B = tokens.size(0), S = tokens.size(1);
  T h = plan.embedding.index_select(0, tokens.reshape({-1})).view({B, S, -1});  // (B, S, dim); checks the ids' range
  const T freqs = plan.freqs.index_select(0, input_pos.reshape({-1})).view({B, S, plan.freqs.size(1), 2});
  for (const Block& b : plan.blocks) h = block(b, h, plan.eps, freqs, a, plan.H, plan.Hkv);
  if (!hidden) hint(plan.output);
  h = ops().rms_norm.call(h, plan.norm, plan.eps);
  return hidden ? h : linear(plan.output, h).to(at::kFloat);
}

void check_tokens(CT tokens, const char* what) {
  TORCH_CHECK(tokens.dim() == 2 && tokens.size(0) * tokens.size(1) <= 8 && tokens.scalar_type() == at::kLong,
              "llamaworks ", what, ": tokens must be int64 (B, S) with B * S <= 8, got ", tokens.sizes());
}

// tokens (B, S) int64, B * S <= 8; input_pos (B, S) or (S,) int64; rows (B,) int64 or empty -> logits
// (B, S, V) fp32, equal to Transformer.forward's over the plan's modules.
T decode_step(int64_t id, CT tokens, CT input_pos_in, CT rows) {
  const std::shared_ptr<Plan> plan = find_plan(id, false, "decode_step");
  check_tokens(tokens, "decode_step");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t B = tokens.size(0), S = tokens.size(1);
  StepAttention a;
  a.input_pos = (input_pos_in.dim() == 1 ? input_pos_in.expand({B, S}) : input_pos_in).contiguous();
  a.rows = rows;
  const int64_t L = plan->blocks.empty() ? 0 : plan->blocks[0].k_cache.size(2);
  a.mask = at::arange(L, a.input_pos.options()).view({1, 1, 1, L}).le(a.input_pos.view({B, 1, S, 1}));
  return in_team([&] { return run_step(*plan, tokens, a.input_pos, a, false); });
}

// A ragged decode pass over paged pools (the serving engine's step when every row decodes one token):
// tokens and input_pos (1, n) int64, n <= 8, a sequence per token; slots (n,) each token's pool slot
// (block * block_size + offset); blocks (n, width) each token's sequence's table row -> logits (1, n, V)
// fp32, or the normed hidden state (hidden), equal to Transformer.forward's over the plan's modules
// with the table's Ragged layout of one group of one-token runs.
T decode_step_paged(int64_t id, CT tokens, CT input_pos, CT slots, CT blocks, bool hidden) {
  const std::shared_ptr<Plan> plan = find_plan(id, true, "decode_step_paged");
  check_tokens(tokens, "decode_step_paged");
  const int64_t n = tokens.numel();
  TORCH_CHECK(tokens.size(0) == 1 && input_pos.sizes() == tokens.sizes() && input_pos.scalar_type() == at::kLong,
              "llamaworks decode_step_paged: tokens and input_pos must both be int64 (1, n), got ", tokens.sizes(),
              " and ", input_pos.sizes());
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == n && slots.scalar_type() == at::kLong && blocks.dim() == 2 &&
                  blocks.size(0) == n && blocks.scalar_type() == at::kLong,
              "llamaworks decode_step_paged: slots (n,) and blocks (n, width) int64 for n = ", n, " tokens, got ",
              slots.sizes(), " and ", blocks.sizes());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  StepAttention a;
  a.paged = true;
  a.slots = slots.view({n, 1});
  a.blocks = blocks;
  a.pos = input_pos.contiguous().view({n, 1});
  a.row0 = at::zeros({1}, slots.options()).expand({n});
  return in_team([&] { return run_step(*plan, tokens, a.pos, a, hidden); });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llamaworks, m) {
  m.def("decode_block(Tensor x, Tensor attention_norm, Tensor ffn_norm, float eps, int[] kinds, Tensor[] weights, "
        "int[] group_sizes, Tensor freqs, Tensor input_pos, Tensor rows, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor mask, int n_heads, int n_kv_heads) -> Tensor");
  m.def("decode_step(int plan, Tensor tokens, Tensor input_pos, Tensor rows) -> Tensor");
  m.def("decode_step_paged(int plan, Tensor tokens, Tensor input_pos, Tensor slots, Tensor blocks, bool hidden) -> "
        "Tensor");
  m.def("decode_plan(Tensor[] tensors, int[] meta, float eps) -> int", &decode_plan);
  m.def("decode_plan_free(int plan) -> ()", &decode_plan_free);
}

TORCH_LIBRARY_IMPL(llamaworks, CPU, m) {
  m.impl("decode_block", &decode_block);
  m.impl("decode_step", &decode_step);
  m.impl("decode_step_paged", &decode_step_paged);
}
