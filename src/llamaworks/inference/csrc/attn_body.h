// Decode attention (few query rows against a KV cache), written once over gemv_body.h's vector
// interface (Isa: V, W, zero, set1, load, fma, hsum, bf16) and included by each instruction-set
// file after it defines Isa; LW_ATTENTION names the entry point it defines (gemv.h's Attention),
// and LW_ATTENTION with _paged appended the paged one (gemv.h's PagedAttention).
//
// Why not SDPA: at decode a query row attends to a static cache under a mask, and torch's CPU
// SDPA computes every cache position whatever the mask says (cost grows with the cache, not
// with the sequence), in bf16 through a path 5x slower than fp32 (Zen 4, no AMX: 238 us per
// layer at 8 heads x 256 positions). Here a masked-off key costs one byte read: each query row
// reads only the keys and values it may see, once, and the softmax is exact in fp32.
namespace {

template <bool BF16>
inline V load_act(const void* p, int64_t i) {
  if constexpr (BF16)
    return Isa::bf16(static_cast<const uint16_t*>(p) + i);
  else
    return Isa::load(static_cast<const float*>(p) + i);
}

inline uint16_t to_bf16(float f) {  // round to nearest even (finite values)
  uint32_t bits;
  __builtin_memcpy(&bits, &f, sizeof bits);
  bits += 0x7FFF + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}

// Query rows [r0, r1) of (B * H * S), row r = (b * H + h) * S + s; `scores` holds L floats.
template <bool BF16>
void attention_rows(const Attention& a, int64_t r0, int64_t r1, float* scores) {
  constexpr int64_t MAXV = MAX_HEAD_DIM / W;
  const int64_t nv = a.D / W, group = a.H / a.Hkv;
  const int elt = BF16 ? 2 : 4;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t s = r % a.S, h = (r / a.S) % a.H, b = r / (a.S * a.H), hk = h / group;
    const char* qp = static_cast<const char*>(a.q) + (b * a.qs[0] + h * a.qs[1] + s * a.qs[2]) * elt;
    const char* kp = static_cast<const char*>(a.k) + (b * a.ks[0] + hk * a.ks[1]) * elt;
    const char* vp = static_cast<const char*>(a.v) + (b * a.vs[0] + hk * a.vs[1]) * elt;
    const bool* mp = a.mask + b * a.ms[0] + h * a.ms[1] + s * a.ms[2];
    V qv[MAXV];
    for (int64_t i = 0; i < nv; ++i) qv[i] = Isa::fma(load_act<BF16>(qp, i * W), Isa::set1(a.scale), Isa::zero());
    float mx = -__builtin_inff();
    for (int64_t j = 0; j < a.L; ++j) {
      if (!mp[j * a.ms[3]]) continue;
      const char* kj = kp + j * a.ks[2] * elt;
      V acc0 = Isa::zero(), acc1 = Isa::zero();  // two chains: the FMA latency, not its rate
      int64_t i = 0;
      for (; i + 1 < nv; i += 2) {
        acc0 = Isa::fma(qv[i], load_act<BF16>(kj, i * W), acc0);
        acc1 = Isa::fma(qv[i + 1], load_act<BF16>(kj, (i + 1) * W), acc1);
      }
      if (i < nv) acc0 = Isa::fma(qv[i], load_act<BF16>(kj, i * W), acc0);
      const float sc = Isa::hsum(Isa::fma(acc0, Isa::set1(1.0f), acc1));
      scores[j] = sc;
      mx = sc > mx ? sc : mx;
    }
    V o[MAXV];
    for (int64_t i = 0; i < nv; ++i) o[i] = Isa::zero();
    float sum = 0.0f;
    if (mx != -__builtin_inff()) {
      for (int64_t j = 0; j < a.L; ++j) {
        if (!mp[j * a.ms[3]]) continue;
        const float p = __builtin_expf(scores[j] - mx);
        sum += p;
        const V pv = Isa::set1(p);
        const char* vj = vp + j * a.vs[2] * elt;
        for (int64_t i = 0; i < nv; ++i) o[i] = Isa::fma(pv, load_act<BF16>(vj, i * W), o[i]);
      }
    }
    // A row that may see no key (never at decode) gives zeros, where SDPA gives NaN.
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    char* op = static_cast<char*>(a.out) + r * a.D * elt;
    for (int64_t i = 0; i < nv; ++i) {
      float buf[W];
      __builtin_memcpy(buf, &o[i], sizeof buf);
      for (int l = 0; l < W; ++l) {
        const float val = buf[l] * inv;
        if constexpr (BF16)
          reinterpret_cast<uint16_t*>(op)[i * W + l] = to_bf16(val);
        else
          reinterpret_cast<float*>(op)[i * W + l] = val;
      }
    }
  }
}

void attention(const Attention& a, int64_t r0, int64_t r1, float* scores) {
  if (a.bf16)
    attention_rows<true>(a, r0, r1, scores);
  else
    attention_rows<false>(a, r0, r1, scores);
}

// Paged: query rows [r0, r1) of (H * B * S), row r = (h * B + b) * S + s. One pass over the
// sequence's blocks with an online softmax (Milakov & Gimelshein 2018): per block of Bs keys,
// the scores, the new running maximum, the running sum and output rescaled once, then the
// block's values added. fp32 throughout; `scores` holds Bs floats. BF16: q and out in bf16;
// KV_BF16: the pools (an fp32 model may keep a bf16 cache: serve --kv-dtype).
template <bool BF16, bool KV_BF16>
void paged_rows(const PagedAttention& a, int64_t r0, int64_t r1, float* scores) {
  constexpr int64_t MAXV = MAX_HEAD_DIM / W;
  const int64_t nv = a.D / W, group = a.H / a.Hkv;
  const int elt = BF16 ? 2 : 4, kelt = KV_BF16 ? 2 : 4;
  const int64_t block_elems = a.Bs * a.D, head_elems = a.N * block_elems, seen_max = a.W * a.Bs;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t s = r % a.S, b = (r / a.S) % a.B, h = r / (a.S * a.B), hk = h / group;
    const char* qp = static_cast<const char*>(a.q) + (b * a.qs[0] + h * a.qs[1] + s * a.qs[2]) * elt;
    const char* kh = static_cast<const char*>(a.k) + hk * head_elems * kelt;
    const char* vh = static_cast<const char*>(a.v) + hk * head_elems * kelt;
    const int64_t* table = a.blocks + b * a.W;
    // Keys 0..pos seen, as the model's mask (key position <= query position) over W * Bs keys.
    int64_t n = a.pos[b * a.S + s] + 1;
    n = n < 0 ? 0 : n > seen_max ? seen_max : n;
    V qv[MAXV], o[MAXV];
    for (int64_t i = 0; i < nv; ++i) {
      qv[i] = Isa::fma(load_act<BF16>(qp, i * W), Isa::set1(a.scale), Isa::zero());
      o[i] = Isa::zero();
    }
    float mx = -__builtin_inff(), sum = 0.0f;
    for (int64_t j0 = 0; j0 < n; j0 += a.Bs) {
      const int64_t off = table[j0 / a.Bs] * block_elems * kelt, m = n - j0 < a.Bs ? n - j0 : a.Bs;
      const char* kb = kh + off;
      const char* vb = vh + off;
      float bmx = mx;
      for (int64_t t = 0; t < m; ++t) {
        const char* kj = kb + t * a.D * kelt;
        V acc0 = Isa::zero(), acc1 = Isa::zero();
        int64_t i = 0;
        for (; i + 1 < nv; i += 2) {
          acc0 = Isa::fma(qv[i], load_act<KV_BF16>(kj, i * W), acc0);
          acc1 = Isa::fma(qv[i + 1], load_act<KV_BF16>(kj, (i + 1) * W), acc1);
        }
        if (i < nv) acc0 = Isa::fma(qv[i], load_act<KV_BF16>(kj, i * W), acc0);
        const float sc = Isa::hsum(Isa::fma(acc0, Isa::set1(1.0f), acc1));
        scores[t] = sc;
        bmx = sc > bmx ? sc : bmx;
      }
      if (bmx > mx) {  // a new maximum: what was summed so far shrinks by exp(old - new)
        const float c = __builtin_expf(mx - bmx);  // 0 on the first block (mx = -inf)
        sum *= c;
        for (int64_t i = 0; i < nv; ++i) o[i] = Isa::fma(o[i], Isa::set1(c), Isa::zero());
        mx = bmx;
      }
      for (int64_t t = 0; t < m; ++t) {
        const float p = __builtin_expf(scores[t] - mx);
        sum += p;
        const V pv = Isa::set1(p);
        const char* vj = vb + t * a.D * kelt;
        for (int64_t i = 0; i < nv; ++i) o[i] = Isa::fma(pv, load_act<KV_BF16>(vj, i * W), o[i]);
      }
    }
    // A query that sees no key (a negative position: never in the engine) gives zeros.
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    char* op = static_cast<char*>(a.out) + ((b * a.H + h) * a.S + s) * a.D * elt;
    for (int64_t i = 0; i < nv; ++i) {
      float buf[W];
      __builtin_memcpy(buf, &o[i], sizeof buf);
      for (int l = 0; l < W; ++l) {
        const float val = buf[l] * inv;
        if constexpr (BF16)
          reinterpret_cast<uint16_t*>(op)[i * W + l] = to_bf16(val);
        else
          reinterpret_cast<float*>(op)[i * W + l] = val;
      }
    }
  }
}

void paged_attention(const PagedAttention& a, int64_t r0, int64_t r1, float* scores) {
  if (a.bf16)
    paged_rows<true, true>(a, r0, r1, scores);  // ops.cpp: a bf16 q comes with bf16 pools
  else if (a.kv_bf16)
    paged_rows<false, true>(a, r0, r1, scores);
  else
    paged_rows<false, false>(a, r0, r1, scores);
}

}  // namespace

const AttentionFn LW_ATTENTION = attention;
// LW_ATTENTION's name with _paged appended (avx512_attention_paged, ...): gemv.h declares them.
#define LW_PAGED_CAT2(a, b) a##b
#define LW_PAGED_CAT(a, b) LW_PAGED_CAT2(a, b)
const PagedAttentionFn LW_PAGED_CAT(LW_ATTENTION, _paged) = paged_attention;
#undef LW_PAGED_CAT
#undef LW_PAGED_CAT2
