// The body of llamaworks::prefill_attention's work item (prefill_attn.cpp), included once per
// instruction set: at baseline flags with I = Scalar, and inside avx2 and avx512 target regions with
// I = Avx2 and Avx512, each in its own namespace, so that nothing compiled for one can run on another.
// Needs Prefill, Scratch, QT, KT, RB, widen and to_bf16 (prefill_attn.cpp).
//
// Layout: query rows in the vector lanes. A row block is RB consecutive positions of one query
// head; its queries are held transposed, qt (D, RB), and so is its running output, ot (D, RB).
// Scores of a key tile are (KT, RB): key j's scores for the block's rows are
// sum_d k[j][d] * qt[d], a broadcast of one key element times a vector of queries, so a key is
// read (from the cache itself in fp32) with no transpose and no horizontal sum, and the
// softmax's maximum, sum and rescaling are per lane. Likewise ot[d] += v[j][d] * p[j].

// Key/value rows of one tile as fp32: pointers into the source (fp32) or widened into scratch (bf16).
inline const float* tile_rows(const void* base, const int64_t* st, int64_t b, int64_t hk, int64_t c0, int64_t n,
                              int64_t D, bool bf, float* scratch, int64_t& stride) {
  if (!bf) {
    stride = st[2];
    return static_cast<const float*>(base) + b * st[0] + hk * st[1] + c0 * st[2];
  }
  const uint16_t* src = static_cast<const uint16_t*>(base) + b * st[0] + hk * st[1] + c0 * st[2];
  for (int64_t j = 0; j < n; ++j)
    for (int64_t d = 0; d < D; ++d) scratch[j * D + d] = widen(src[j * st[2] + d]);
  stride = D;
  return scratch;
}

void prefill_item(const Prefill& a, int64_t b, int64_t hk, int64_t s0, Scratch& sc) {
  using V = I::V;
  // KJ keys' scores and DJ head dimensions' outputs in registers at once: KJ x NR accumulators.
  constexpr int W = I::W, NR = RB / W, KJ = I::KJ, DJ = I::DJ;
  const int64_t D = a.D, group = a.H / a.Hkv, nq = std::min(QT, a.S - s0);
  const int64_t per_head = (nq + RB - 1) / RB, blocks = group * per_head;
  const bool bf = a.bf16;  // q and out; the keys and values: a.kv_bf16 (tile_rows)
  const int elt = bf ? 2 : 4;
  // Block x = g * per_head + i: query head hk * group + g, positions s0 + i * RB ... (fewer at the end).
  for (int64_t x = 0; x < blocks; ++x) {
    const int64_t h = hk * group + x / per_head, p0 = s0 + (x % per_head) * RB;
    float* qt = sc.qt.data() + x * D * RB;
    for (int r = 0; r < RB; ++r) {
      if (p0 + r < s0 + nq) {
        const char* qp = static_cast<const char*>(a.q) + (b * a.qs[0] + h * a.qs[1] + (p0 + r) * a.qs[2]) * elt;
        for (int64_t d = 0; d < D; ++d)
          qt[d * RB + r] = (bf ? widen(reinterpret_cast<const uint16_t*>(qp)[d])
                               : reinterpret_cast<const float*>(qp)[d]) * a.scale;
      } else {
        for (int64_t d = 0; d < D; ++d) qt[d * RB + r] = 0.0f;
      }
    }
    std::fill(sc.ot.begin() + x * D * RB, sc.ot.begin() + (x + 1) * D * RB, 0.0f);
    std::fill(sc.m.begin() + x * RB, sc.m.begin() + (x + 1) * RB, -INFINITY);
    std::fill(sc.l.begin() + x * RB, sc.l.begin() + (x + 1) * RB, 0.0f);
  }
  const int64_t prefix_tiles = (a.P + KT - 1) / KT, chunk_end = s0 + nq;
  const int64_t tiles = prefix_tiles + (chunk_end + KT - 1) / KT;
  float* s = sc.s.data();  // (KT, RB) scores, then probabilities
  for (int64_t t = 0; t < tiles; ++t) {
    const bool prefix = t < prefix_tiles;
    const int64_t c0 = prefix ? t * KT : (t - prefix_tiles) * KT;  // first key of the tile in its part
    const int64_t n = std::min<int64_t>(KT, (prefix ? a.P : chunk_end) - c0);
    int64_t kst, vst;
    const float* kr = tile_rows(prefix ? a.kp : a.kc, prefix ? a.kps : a.kcs, b, hk, c0, n, D, a.kv_bf16,
                                sc.kt.data(), kst);
    const float* vr = tile_rows(prefix ? a.vp : a.vc, prefix ? a.vps : a.vcs, b, hk, c0, n, D, a.kv_bf16,
                                sc.vt.data(), vst);
    for (int64_t x = 0; x < blocks; ++x) {
      const int64_t p0 = s0 + (x % per_head) * RB;
      if (!prefix && p0 + RB - 1 < c0) continue;  // no row of the block sees a key of this tile
      const float* qt = sc.qt.data() + x * D * RB;
      float* ot = sc.ot.data() + x * D * RB;
      float* m = sc.m.data() + x * RB;
      float* l = sc.l.data() + x * RB;
      // Scores, KJ keys at a time (past the tile's end: the last key again, masked below).
      for (int64_t j0 = 0; j0 < n; j0 += KJ) {
        const float* kj[KJ];
        for (int u = 0; u < KJ; ++u) kj[u] = kr + std::min<int64_t>(j0 + u, n - 1) * kst;
        V acc[KJ][NR];
        for (int u = 0; u < KJ; ++u)
          for (int w = 0; w < NR; ++w) acc[u][w] = I::zero();
        for (int64_t d = 0; d < D; ++d) {
          V qv[NR];
          for (int w = 0; w < NR; ++w) qv[w] = I::load(qt + d * RB + w * W);
          for (int u = 0; u < KJ; ++u) {
            const V kb = I::set1(kj[u][d]);
            for (int w = 0; w < NR; ++w) acc[u][w] = I::fma(kb, qv[w], acc[u][w]);
          }
        }
        for (int u = 0; u < KJ && j0 + u < KT; ++u)
          for (int w = 0; w < NR; ++w) I::store(s + (j0 + u) * RB + w * W, acc[u][w]);
      }
      // Masks: keys past the tile's end; in the chunk, key c0 + j for rows at positions below it.
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
      // Online softmax per lane: every row that reaches here has seen a key (its first tile
      // holds key 0 or a prefix key), so its maximum is finite; padding lanes see scores of 0.
      V corr[NR], sum[NR];
      for (int w = 0; w < NR; ++w) {
        corr[w] = I::exp(I::sub(I::load(m + w * W), mx[w]));  // 0 on a row's first tile (m = -inf)
        I::store(m + w * W, mx[w]);
        sum[w] = I::zero();
      }
      for (int64_t j = 0; j < n; ++j)
        for (int w = 0; w < NR; ++w) {
          const V p = I::exp(I::sub(I::load(s + j * RB + w * W), mx[w]));
          I::store(s + j * RB + w * W, p);
          sum[w] = I::add(sum[w], p);
        }
      for (int w = 0; w < NR; ++w) I::store(l + w * W, I::fma(I::load(l + w * W), corr[w], sum[w]));
      // ot = ot * corr + sum_j v[j] p[j], DJ head dimensions at a time.
      for (int64_t d0 = 0; d0 < D; d0 += DJ) {
        V o[DJ][NR];
        for (int u = 0; u < DJ; ++u)
          for (int w = 0; w < NR; ++w) o[u][w] = I::mul(I::load(ot + (d0 + u) * RB + w * W), corr[w]);
        for (int64_t j = 0; j < n; ++j) {
          V p[NR];
          for (int w = 0; w < NR; ++w) p[w] = I::load(s + j * RB + w * W);
          const float* vj = vr + j * vst + d0;
          for (int u = 0; u < DJ; ++u) {
            const V vb = I::set1(vj[u]);
            for (int w = 0; w < NR; ++w) o[u][w] = I::fma(vb, p[w], o[u][w]);
          }
        }
        for (int u = 0; u < DJ; ++u)
          for (int w = 0; w < NR; ++w) I::store(ot + (d0 + u) * RB + w * W, o[u][w]);
      }
    }
  }
  // out = ot / l, transposed back, in the inputs' dtype.
  for (int64_t x = 0; x < blocks; ++x) {
    const int64_t h = hk * group + x / per_head, p0 = s0 + (x % per_head) * RB;
    const float* ot = sc.ot.data() + x * D * RB;
    for (int r = 0; r < RB && p0 + r < s0 + nq; ++r) {
      const float lr = sc.l[x * RB + r], inv = lr > 0.0f ? 1.0f / lr : 0.0f;
      const int64_t base = ((b * a.H + h) * a.S + p0 + r) * D;
      for (int64_t d = 0; d < D; ++d) {
        const float val = ot[d * RB + r] * inv;
        if (bf)
          static_cast<uint16_t*>(a.out)[base + d] = to_bf16(val);
        else
          static_cast<float*>(a.out)[base + d] = val;
      }
    }
  }
}
