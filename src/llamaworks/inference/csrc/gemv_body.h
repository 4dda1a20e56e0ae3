// The kernels, written once over a small vector interface and included by each instruction-set
// file (gemv_avx512.cpp, gemv_avx2.cpp, gemv_scalar.cpp) after it defines `struct Isa` in an
// anonymous namespace:
//   V, W            the float vector type and its lanes (16, 8 or 1; W divides 16)
//   nb(M), nb4(M)   weight rows read together for M activation rows (register blocking), for
//                   the dense kinds and for int4 (which holds scales and offsets as well)
//   zero, set1, load (W floats), fma(a, b, c) = a*b + c, hsum (sum of lanes)
//   bf16(p)         W bf16 values widened to float
//   i8(p)           W int8 values to float
//   u4(p, lo, hi)   W bytes of the repacked int4 layout: low nibbles, high nibbles as floats
// Included inside namespace lw, in the instruction set's target region; LW_KERNELS names the
// table it defines. No function here has external linkage except that table, so nothing
// compiled for one instruction set can be picked by the linker for another.
//
// Blocking: NB weight rows x M activation rows of accumulators; each weight vector is loaded
// once and multiplied into all M rows, so the weights (the bytes that matter at decode) are
// read exactly once per call whatever M is, and the activations (M x K, small) come from cache.
//
// int4 layout (made by native.py's repack_int4 from Int4Linear's portable one): each output
// row is K/2 bytes in blocks of 16 bytes per 32 columns; byte j of a block holds column j in its
// low nibble and column 16 + j in its high nibble, so W consecutive bytes widen to W
// consecutive columns twice over, with no shuffles.

namespace {

using V = Isa::V;
constexpr int W = Isa::W;

template <int KIND> struct Dense;
template <> struct Dense<F32> {
  using T = float;
  static inline V load(const T* p) { return Isa::load(p); }
};
template <> struct Dense<BF16> {
  using T = uint16_t;
  static inline V load(const T* p) { return Isa::bf16(p); }
};
template <> struct Dense<INT8> {
  using T = int8_t;
  static inline V load(const T* p) { return Isa::i8(p); }
};

// Output columns n .. n+NB-1 for all M rows: fp32, bf16 or int8 (per-row scale) weights.
template <int KIND, int M, int NB>
inline void dense_block(const Gemv& g, int64_t n) {
  using T = typename Dense<KIND>::T;
  const int64_t K = g.K;
  const T* w = static_cast<const T*>(g.w) + n * K;
  V acc[M][NB];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NB; ++j) acc[m][j] = Isa::zero();
  // The next block's rows, prefetched in address order at the pace this block is read: the
  // hardware prefetchers lose track of NB short interleaved streams (rows of 2 KB: 32000x512
  // read at 11 GB/s without this). Long rows, where the ISA says so, are left to them.
  const char* ahead = reinterpret_cast<const char*>(w + NB * K);
  const bool prefetch = K * static_cast<int64_t>(sizeof(T)) < Isa::PREFETCH_ROWS_BELOW;
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    V wv[NB];
    if (prefetch)
      for (int j = 0; j < NB; ++j) __builtin_prefetch(ahead + (k * NB + j * W) * sizeof(T), 0, 3);
    for (int j = 0; j < NB; ++j) wv[j] = Dense<KIND>::load(w + j * K + k);
    for (int m = 0; m < M; ++m) {
      const V xv = Isa::load(g.x + m * K + k);
      for (int j = 0; j < NB; ++j) acc[m][j] = Isa::fma(xv, wv[j], acc[m][j]);
    }
  }
  if (k < K) {
    // The tail (K not a multiple of W) through zero-filled copies: never a read past the end.
    const int64_t rem = K - k;
    V wv[NB];
    for (int j = 0; j < NB; ++j) {
      T buf[W] = {};
      __builtin_memcpy(buf, w + j * K + k, rem * sizeof(T));
      wv[j] = Dense<KIND>::load(buf);
    }
    for (int m = 0; m < M; ++m) {
      float xb[W] = {};
      __builtin_memcpy(xb, g.x + m * K + k, rem * sizeof(float));
      const V xv = Isa::load(xb);
      for (int j = 0; j < NB; ++j) acc[m][j] = Isa::fma(xv, wv[j], acc[m][j]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NB; ++j) {
      float s = Isa::hsum(acc[m][j]);
      if (KIND == INT8) s *= g.scales[n + j];
      g.out[m * g.N + n + j] = s;
    }
}

// Output columns n .. n+NB-1, int4 groups: each weight is dequantised in registers,
// q * scale + offset (offset = zero - 8 * scale, Int4Linear's (q - 8) * scale + zero).
template <int M, int NB>
inline void int4_block(const Gemv& g, int64_t n) {
  const int64_t K = g.K, half = K / 2, groups = K / g.group;
  const uint8_t* w = static_cast<const uint8_t*>(g.w) + n * half;
  const uint8_t* ahead = w + NB * half;  // the next block's rows, as in dense_block
  V acc[M][NB];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NB; ++j) acc[m][j] = Isa::zero();
  for (int64_t gi = 0; gi < groups; ++gi) {
    V s[NB], o[NB];
    for (int j = 0; j < NB; ++j) {
      s[j] = Isa::set1(g.scales[(n + j) * groups + gi]);
      o[j] = Isa::set1(g.offsets[(n + j) * groups + gi]);
    }
    for (int64_t k = gi * g.group; k < (gi + 1) * g.group; k += 32) {
      for (int c = 0; c < 16; c += W) {
        V lo[NB], hi[NB];
        for (int j = 0; j < NB; ++j) __builtin_prefetch(ahead + (k / 2 + c) * NB + j * W, 0, 3);
        for (int j = 0; j < NB; ++j) {
          Isa::u4(w + j * half + k / 2 + c, lo[j], hi[j]);  // columns k+c.., k+16+c..
          lo[j] = Isa::fma(lo[j], s[j], o[j]);
          hi[j] = Isa::fma(hi[j], s[j], o[j]);
        }
        for (int m = 0; m < M; ++m) {
          const V xl = Isa::load(g.x + m * K + k + c);
          const V xh = Isa::load(g.x + m * K + k + 16 + c);
          for (int j = 0; j < NB; ++j) {
            acc[m][j] = Isa::fma(xl, lo[j], acc[m][j]);
            acc[m][j] = Isa::fma(xh, hi[j], acc[m][j]);
          }
        }
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NB; ++j) g.out[m * g.N + n + j] = Isa::hsum(acc[m][j]);
}

template <int KIND, int M, int NB>
inline void block(const Gemv& g, int64_t n) {
  if (KIND == INT4)
    int4_block<M, NB>(g, n);
  else
    dense_block<(KIND == INT4 ? F32 : KIND), M, NB>(g, n);
}

template <int KIND, int M>
void columns(const Gemv& g, int64_t n0, int64_t n1) {
  constexpr int NB = KIND == INT4 ? Isa::nb4(M) : Isa::nb(M);
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) block<KIND, M, NB>(g, n);
  for (; n < n1; ++n) block<KIND, M, 1>(g, n);
}

template <int KIND>
void kernel(const Gemv& g, int64_t n0, int64_t n1) {
  switch (g.M) {  // 1 <= M <= MAX_ROWS, checked by the caller
    case 1: return columns<KIND, 1>(g, n0, n1);
    case 2: return columns<KIND, 2>(g, n0, n1);
    case 3: return columns<KIND, 3>(g, n0, n1);
    case 4: return columns<KIND, 4>(g, n0, n1);
    case 5: return columns<KIND, 5>(g, n0, n1);
    case 6: return columns<KIND, 6>(g, n0, n1);
    case 7: return columns<KIND, 7>(g, n0, n1);
    default: return columns<KIND, 8>(g, n0, n1);
  }
}

}  // namespace

const GemvFn LW_KERNELS[4] = {kernel<F32>, kernel<BF16>, kernel<INT8>, kernel<INT4>};
