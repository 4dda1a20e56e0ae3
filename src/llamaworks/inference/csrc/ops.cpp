// The llamaworks:: operators (registered with TORCH_LIBRARY, so torch.compile graphs call them
// as extern kernels without a graph break; native.py registers their fake implementations),
// the run-time choice of instruction set, and the threading.
//
// gemv_f32 / gemv_bf16 / gemv_int8 / gemv_int4: out (M, N) = x (M, K) @ dequantised(w).T, in
// x's dtype (fp32 or bf16; computed in fp32). Made for decode (M <= 8: the weights are read
// once); more rows run in chunks of 8 over cache-sized slices of the weight. gemv_int8 on AVX2
// and up quantises x per block of 32 columns first (as llama.cpp's Q8_0 does) for integer dot
// products (gemv.h's int8_vnni / int8_q8_avx2); where K % 32 != 0, and on the portable level,
// it takes the float path (x as it is).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "gemv.h"
#include "parallel.h"

namespace lw {
// Compiled at the baseline flags, as every caller's sums were: inside an FMA target region the
// compiler would contract d * sum + total into one FMA and change the sums' last bits.
void group_sums_q8(const float* xd, const int32_t* xc, int64_t M, int64_t K, int64_t group, float* xsum) {
  const int64_t groups = K / group;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t gi = 0; gi < groups; ++gi) {
      float sum = 0.0f;  // per block: d * sum(q) = d * -(the block's 8 xc) / 128
      for (int64_t b = gi * group / 32; b < (gi + 1) * group / 32; ++b) {
        int32_t q = 0;
        for (int i = 0; i < 8; ++i) q += xc[(m * K) / 4 + b * 8 + i];
        sum += xd[(m * K) / 4 + b * 8] * static_cast<float>(-q / 128);
      }
      xsum[m * groups + gi] = sum;
    }
}
}  // namespace lw

namespace {

enum Level { SCALAR = 0, AVX2 = 1, AVX512 = 2, AVX512VNNI = 3, AVX512BF16 = 4 };  // native.py's ISAS

// Bits of lw_cpu_features(), named in native.py (FEATURE_BITS).
enum Feature { F_AVX2 = 1, F_FMA = 2, F_AVX512F = 4, F_AVX512BW = 8, F_AVX512VL = 16, F_AVX512VNNI = 32,
               F_AVX512BF16 = 64 };

int cpu_features() {
  // __builtin_cpu_supports also checks that the OS saves the vector state (XCR0).
  __builtin_cpu_init();
  int f = 0;
  if (__builtin_cpu_supports("avx2")) f |= F_AVX2;
  if (__builtin_cpu_supports("fma")) f |= F_FMA;
  if (__builtin_cpu_supports("avx512f")) f |= F_AVX512F;
  if (__builtin_cpu_supports("avx512bw")) f |= F_AVX512BW;
  if (__builtin_cpu_supports("avx512vl")) f |= F_AVX512VL;
  if (__builtin_cpu_supports("avx512vnni")) f |= F_AVX512VNNI;
  if (__builtin_cpu_supports("avx512bf16")) f |= F_AVX512BF16;
  return f;
}

int best_level(int f) {
  // native.py's ISA_NEEDS: each level needs what the one below does.
  const int vnni = F_AVX512VNNI | F_AVX512BW | F_AVX512F | F_AVX2 | F_FMA;
  const int bf16 = F_AVX512BF16 | vnni;
  if ((f & bf16) == bf16) return AVX512BF16;
  if ((f & vnni) == vnni) return AVX512VNNI;
  if ((f & (F_AVX512F | F_AVX2 | F_FMA)) == (F_AVX512F | F_AVX2 | F_FMA)) return AVX512;
  if ((f & (F_AVX2 | F_FMA)) == (F_AVX2 | F_FMA)) return AVX2;
  return SCALAR;
}

// The kernels in use: the best the CPU has until native.py (or a test) picks another.
std::atomic<int> level{best_level(cpu_features())};

const lw::GemvFn avx512bf16_kernels[4] = {lw::avx512_kernels[lw::F32], lw::avx512_kernels[lw::BF16],
                                           lw::avx512_kernels[lw::INT8], lw::avx512bf16_int4};

const lw::GemvFn* table() {
  switch (level.load(std::memory_order_relaxed)) {
    case AVX512BF16: return avx512bf16_kernels;
    case AVX512VNNI:
    case AVX512: return lw::avx512_kernels;
    case AVX2: return lw::avx2_kernels;
    default: return lw::scalar_kernels;
  }
}

// Weight rows per unit of work handed to threads (a multiple of every NB: 1, 2, 3, 4).
constexpr int64_t BLOCK = 48;
// Work below this many weight bytes stays on one thread (a fork/join costs a few us).
constexpr int64_t GRAIN_BYTES = 1 << 16;
// With more than MAX_ROWS rows, the weight is walked in slices of about this many bytes, each
// multiplied into every chunk of rows while it is in the L2 cache.
constexpr int64_t SLICE_BYTES = 1 << 16;

at::Tensor run(lw::Kind kind, const at::Tensor& x_in, const at::Tensor& w, int64_t K, int64_t row_bytes,
               const float* scales, const float* offsets, int64_t group) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == K, "llamaworks gemv: x must be (rows, ", K, "), got ",
              x_in.sizes());
  TORCH_CHECK(x_in.device().is_cpu() && w.device().is_cpu(), "llamaworks gemv: CPU tensors only");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16,
              "llamaworks gemv: x must be float32 or bfloat16, got ", x_in.scalar_type());
  TORCH_CHECK(w.is_contiguous(), "llamaworks gemv: the weight must be contiguous");
  const int lvl = level.load(std::memory_order_relaxed);
  // bf16 weights and activations on AVX512_BF16: bf16 dot products straight from x.
  const bool bf16_dots = kind == lw::BF16 && lvl == AVX512BF16 && x_in.scalar_type() == at::kBFloat16;
  const at::Tensor x = bf16_dots ? x_in.contiguous() : x_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), N = w.size(0);
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return out.to(x_in.scalar_type());
  lw::Gemv g{bf16_dots ? nullptr : x.data_ptr<float>(), M, K, N, w.data_ptr(), scales, offsets, group,
             out.data_ptr<float>(), nullptr, nullptr};
  lw::GemvFn fn = bf16_dots ? lw::avx512bf16_bf16 : table()[kind];
  if (bf16_dots) g.xb = static_cast<const uint16_t*>(x.data_ptr());
  std::vector<uint16_t> xb;
  std::vector<float> xsum;
  // int4 from avx512vnni up for groups of 128, 256, ...: activations quantised per block of
  // 128 and vpdpbusd (gemv.h's int4_vnni); 1.4x avx512bf16's bf16 dot products at one row and
  // 1.4-1.9x at 8 (Zen 4, one thread, warm), so those stay for groups of 32 and 64 only.
  const bool int4_vnni = kind == lw::INT4 && lvl >= AVX512VNNI && group % 128 == 0;
  if (kind == lw::INT4 && lvl == AVX512BF16 && !int4_vnni) {
    // The bf16 dot-product kernel's activations, rounded to nearest even, and their group sums.
    xb.resize(M * K);
    xsum.resize(M * (K / group));
    lw::avx512bf16_int4_prepare(g.x, M, K, group, xb.data(), xsum.data());
    g.xb = xb.data();
    g.xsum = xsum.data();
  }
  // int8 weights: the integer kernels with x quantised per block, where there is one.
  std::vector<int8_t> xq;
  std::vector<float> xd;
  std::vector<int32_t> xc;
  if (kind == lw::INT8 && lvl >= AVX2 && K % 32 == 0) {
    xq.resize(M * K);
    xd.resize(M * K / 4);
    xc.resize(M * K / 4);
    lw::quantize_rows(g.x, M, K, xq.data(), xd.data(), xc.data());
    g.xq = xq.data();
    g.xd = xd.data();
    g.xc = xc.data();
    fn = lvl >= AVX512VNNI ? lw::int8_vnni : lw::int8_q8_avx2;
  }
  // int4 weights below avx512bf16 otherwise: the same quantised activations as int8 and maddubs
  // (the bf16 dot products stay ahead where they run), with the group sums of the dequantised
  // activations.
  if (int4_vnni) {
    xq.resize(M * K);
    xd.resize(M * K / 128);
    xsum.resize(M * (K / group));
    lw::quantize_rows_q8_128(g.x, M, K, group, xq.data(), xd.data(), xsum.data());
    g.xq = xq.data();
    g.xd = xd.data();
    g.xsum = xsum.data();
    fn = lw::int4_vnni;
  }
  if (kind == lw::INT4 && lvl >= AVX2 && lvl < AVX512BF16 && !int4_vnni) {
    const int64_t groups = K / group;
    xq.resize(M * K);
    xd.resize(M * K / 4);
    xc.resize(M * K / 4);
    xsum.resize(M * groups);
    lw::quantize_rows(g.x, M, K, xq.data(), xd.data(), xc.data());
    lw::group_sums_q8(xd.data(), xc.data(), M, K, group, xsum.data());
    g.xq = xq.data();
    g.xd = xd.data();
    g.xc = xc.data();
    g.xsum = xsum.data();
    fn = lw::int4_q8_avx2;
  }
  const int64_t blocks = (N + BLOCK - 1) / BLOCK;
  const int64_t grain = std::max<int64_t>(1, GRAIN_BYTES / (BLOCK * row_bytes));
  const int64_t slice = M <= lw::MAX_ROWS ? N : std::max<int64_t>(BLOCK, SLICE_BYTES / row_bytes / BLOCK * BLOCK);
  lw::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    const int64_t end = std::min(N, b1 * BLOCK);
    for (int64_t n0 = b0 * BLOCK; n0 < end; n0 += slice) {
      const int64_t n1 = std::min(end, n0 + slice);
      for (int64_t m0 = 0; m0 < M; m0 += lw::MAX_ROWS) {
        lw::Gemv part = g;
        part.x = g.x ? g.x + m0 * K : nullptr;
        part.M = std::min(lw::MAX_ROWS, M - m0);
        part.out = g.out + m0 * N;
        if (g.xb) part.xb = g.xb + m0 * K;
        if (g.xsum) part.xsum = g.xsum + m0 * (K / group);
        if (g.xq) {
          part.xq = g.xq + m0 * K;
          part.xd = g.xd + m0 * (int4_vnni ? K / 128 : K / 4);
          if (g.xc) part.xc = g.xc + m0 * K / 4;
        }
        fn(part, n0, n1);
      }
    }
  });
  return out.to(x_in.scalar_type());
}

}  // namespace

namespace {

void check_weight(const at::Tensor& w, at::ScalarType dtype, const char* what) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == dtype, "llamaworks gemv: ", what, " must be a 2-d ", dtype,
              " tensor, got ", w.scalar_type(), " ", w.sizes());
}

at::Tensor gemv_f32(const at::Tensor& x, const at::Tensor& w) {
  check_weight(w, at::kFloat, "weight");
  return run(lw::F32, x, w, w.size(1), w.size(1) * 4, nullptr, nullptr, 0);
}

at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& w) {
  check_weight(w, at::kBFloat16, "weight");
  return run(lw::BF16, x, w, w.size(1), w.size(1) * 2, nullptr, nullptr, 0);
}

at::Tensor gemv_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  check_weight(w, at::kChar, "weight");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == w.size(0),
              "llamaworks gemv_int8: scales must be ", w.size(0), " contiguous float32 values, got ",
              scales.scalar_type(), " ", scales.sizes());
  return run(lw::INT8, x, w, w.size(1), w.size(1), scales.data_ptr<float>(), nullptr, 0);
}

at::Tensor gemv_int4(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, const at::Tensor& offsets,
                     int64_t group_size) {
  check_weight(w, at::kByte, "weight");
  const int64_t K = w.size(1) * 2;
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0 && K % group_size == 0, "llamaworks gemv_int4: group size ",
              group_size, " must be a multiple of 32 dividing ", K);
  for (const at::Tensor* t : {&scales, &offsets})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 && t->size(0) == w.size(0) &&
                    t->size(1) == K / group_size,
                "llamaworks gemv_int4: scales and offsets must be contiguous float32 (", w.size(0), ", ",
                K / group_size, "), got ", t->scalar_type(), " ", t->sizes());
  return run(lw::INT4, x, w, K, w.size(1), scales.data_ptr<float>(), offsets.data_ptr<float>(), group_size);
}

// dequant_int4(weight, scales, offsets, group_size) -> (N, K) fp32: gemv_int4's operands widened, each
// value q * scale + offset (the decode kernels' arithmetic, so a prompt's products and a decode step's
// see the same weights), for prompts over the kernels' rows where no tiled kernel runs: one threaded
// pass at memory speed, where the PyTorch ops of quant.dequantize_int4 take several (small's weights:
// 15 ms per 128-token prompt on Zen 3). Plain C++ over the repacked layout (16 bytes per 32 columns,
// byte j: column j low nibble, column 16 + j high), vectorised by the compiler for the baseline ISA.
at::Tensor dequant_int4(const at::Tensor& w, const at::Tensor& scales, const at::Tensor& offsets, int64_t group_size) {
  check_weight(w, at::kByte, "weight");
  const int64_t N = w.size(0), half = w.size(1), K = half * 2;
  TORCH_CHECK(w.is_contiguous() && group_size > 0 && group_size % 32 == 0 && K % group_size == 0,
              "llamaworks dequant_int4: a contiguous weight and a group size that is a multiple of 32 dividing ", K,
              ", got ", group_size);
  const int64_t groups = K / group_size;
  for (const at::Tensor* t : {&scales, &offsets})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == N * groups,
                "llamaworks dequant_int4: scales and offsets must be contiguous float32 (", N, ", ", groups, ")");
  at::Tensor out = at::empty({N, K}, w.options().dtype(at::kFloat));
  const uint8_t* src = w.data_ptr<uint8_t>();
  const float* sc = scales.data_ptr<float>();
  const float* of = offsets.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = src + n * half;
      float* o = dst + n * K;
      for (int64_t k = 0; k < K; k += 32) {
        const float s = sc[n * groups + k / group_size], a = of[n * groups + k / group_size];
        const uint8_t* b = row + k / 2;
        for (int j = 0; j < 16; ++j) {
          o[k + j] = static_cast<float>(b[j] & 15) * s + a;
          o[k + 16 + j] = static_cast<float>(b[j] >> 4) * s + a;
        }
      }
    }
  });
  return out;
}

// decode_attention(q, k, v, mask): SDPA with a boolean mask (True: attend) and the default
// scale 1 / sqrt(head_dim), for decode (gemv.h's Attention). q (B, H, S, D); k, v (B, Hkv, L, D);
// mask broadcastable to (B, H, S, L); all fp32 or all bf16.
at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                            const at::Tensor& mask) {
  // Any other strides are read as they are; a last dimension with gaps is copied first.
  const auto rows = [](const at::Tensor& t) { return t.dim() == 4 && t.stride(3) != 1 ? t.contiguous() : t; };
  const at::Tensor q = rows(q_in), k = rows(k_in), v = rows(v_in);
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "llamaworks decode_attention: q, k, v must be 4-d");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && mask.device().is_cpu(),
              "llamaworks decode_attention: CPU tensors only");
  const at::ScalarType dt = q.scalar_type();
  TORCH_CHECK((dt == at::kFloat || dt == at::kBFloat16) && k.scalar_type() == dt && v.scalar_type() == dt,
              "llamaworks decode_attention: q, k, v must all be float32 or all bfloat16");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "llamaworks decode_attention: the mask must be bool");
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3), Hkv = k.size(1), L = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == Hkv && v.size(2) == L && k.size(3) == D &&
                  v.size(3) == D && Hkv > 0 && H % Hkv == 0,
              "llamaworks decode_attention: shapes q ", q.sizes(), " k ", k.sizes(), " v ", v.sizes());
  TORCH_CHECK(D % 16 == 0 && D <= lw::MAX_HEAD_DIM, "llamaworks decode_attention: head_dim ", D,
              " must be a multiple of 16 up to ", lw::MAX_HEAD_DIM);
  const at::Tensor m = mask.expand({B, H, S, L});
  at::Tensor out = at::empty({B, H, S, D}, q.options());
  if (out.numel() == 0) return out;
  lw::Attention a{q.data_ptr(), k.data_ptr(), v.data_ptr(), m.data_ptr<bool>(), out.data_ptr(), dt == at::kBFloat16,
                  B, H, Hkv, S, L, D,
                  {q.stride(0), q.stride(1), q.stride(2)}, {k.stride(0), k.stride(1), k.stride(2)},
                  {v.stride(0), v.stride(1), v.stride(2)}, {m.stride(0), m.stride(1), m.stride(2), m.stride(3)},
                  1.0f / std::sqrt(static_cast<float>(D))};
  const int lvl = level.load(std::memory_order_relaxed);
  const lw::AttentionFn fn = lvl >= AVX512 ? lw::avx512_attention : lvl == AVX2 ? lw::avx2_attention
                                                                                 : lw::scalar_attention;
  // A row reads up to L keys and values of D elements. In a decode step the cache is cold (the
  // step's weights, streamed since this layer's last call, evicted it), so the rows wait on
  // memory, and two threads read it about twice as fast: from 2^15 elements a row's share of
  // the cache outweighs a fork/join. (It was 2^18, which kept the A, small and base presets'
  // 8-12 heads on one thread at a cache of 256.)
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, L * D));
  lw::parallel_for(0, B * H * S, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> scores(L);
    fn(a, r0, r1, scores.data());
  });
  return out;
}

// paged_attention(q, k_pool, v_pool, blocks, pos): decode_attention over a paged cache
// (inference/paged.py), read through the block table: q (B, H, S, D); k_pool, v_pool (Hkv, N,
// Bs, D) contiguous; blocks (B, W) int64 physical block ids; pos (B, S) int64, query s of row b
// attending keys 0..pos[b, s] (the model's mask), all fp32 or all bf16. Equals
// decode_attention(q, gathered keys, gathered values, key position <= pos) without the gather.
at::Tensor paged_attention(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& blocks_in, const at::Tensor& pos_in) {
  const at::Tensor q = q_in.dim() == 4 && q_in.stride(3) != 1 ? q_in.contiguous() : q_in;
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "llamaworks paged_attention: q and the pools must be 4-d");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && blocks_in.device().is_cpu() &&
                  pos_in.device().is_cpu(),
              "llamaworks paged_attention: CPU tensors only");
  const at::ScalarType dt = q.scalar_type(), kt = k.scalar_type();
  TORCH_CHECK((dt == at::kFloat || dt == at::kBFloat16) && (kt == dt || (dt == at::kFloat && kt == at::kBFloat16)) &&
                  v.scalar_type() == kt,
              "llamaworks paged_attention: q and the pools must all be float32 or all bfloat16, or q float32 with "
              "bfloat16 pools");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && k.sizes() == v.sizes(),
              "llamaworks paged_attention: the pools must be contiguous and of one shape, got ", k.sizes(), " ",
              v.sizes());
  TORCH_CHECK(blocks_in.scalar_type() == at::kLong && pos_in.scalar_type() == at::kLong && blocks_in.dim() == 2 &&
                  pos_in.dim() == 2,
              "llamaworks paged_attention: blocks (B, W) and pos (B, S) must be int64");
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(0), N = k.size(1), Bs = k.size(2), W = blocks_in.size(1);
  TORCH_CHECK(k.size(3) == D && Hkv > 0 && H % Hkv == 0 && blocks_in.size(0) == B && pos_in.size(0) == B &&
                  pos_in.size(1) == S && Bs > 0,
              "llamaworks paged_attention: shapes q ", q.sizes(), " pools ", k.sizes(), " blocks ", blocks_in.sizes(),
              " pos ", pos_in.sizes());
  TORCH_CHECK(D % 16 == 0 && D <= lw::MAX_HEAD_DIM, "llamaworks paged_attention: head_dim ", D,
              " must be a multiple of 16 up to ", lw::MAX_HEAD_DIM);
  const at::Tensor blocks = blocks_in.contiguous(), pos = pos_in.contiguous();
  const int64_t* bp = blocks.data_ptr<int64_t>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  // Every block a query reads must lie in the pool (a wrong id would read outside it).
  int64_t keys = 0;
  for (int64_t b = 0; b < B; ++b) {
    int64_t last = -1;
    for (int64_t s = 0; s < S; ++s) last = std::max(last, pp[b * S + s]);
    const int64_t n = std::min(last + 1, W * Bs);
    keys += std::max<int64_t>(0, n);
    for (int64_t j = 0; j * Bs < n; ++j)
      TORCH_CHECK(bp[b * W + j] >= 0 && bp[b * W + j] < N, "llamaworks paged_attention: block id ", bp[b * W + j],
                  " of row ", b, " outside the pool's ", N, " blocks");
  }
  at::Tensor out = at::empty({B, H, S, D}, q.options());
  if (out.numel() == 0) return out;
  lw::PagedAttention a{q.data_ptr(), k.data_ptr(), v.data_ptr(), bp, pp, out.data_ptr(), dt == at::kBFloat16,
                       kt == at::kBFloat16, B, H, Hkv, S, D, N, Bs, W, {q.stride(0), q.stride(1), q.stride(2)},
                       1.0f / std::sqrt(static_cast<float>(D))};
  const int lvl = level.load(std::memory_order_relaxed);
  const lw::PagedAttentionFn fn = lvl >= AVX512 ? lw::avx512_attention_paged
                                  : lvl == AVX2 ? lw::avx2_attention_paged
                                                : lw::scalar_attention_paged;
  // As decode_attention: below ~2^18 multiply-adds per thread a fork/join costs more. Rows
  // differ in length, so the grain comes from the mean.
  const int64_t rows = B * H * S, per_row = std::max<int64_t>(1, keys / B * D);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / per_row);
  lw::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> scores(Bs);
    fn(a, r0, r1, scores.data());
  });
  return out;
}

}  // namespace

// Plain C entry points for the instruction-set choice (native.py calls them through ctypes).
extern "C" {
int lw_cpu_features() { return cpu_features(); }
int lw_level() { return level.load(); }
// Returns the level set, or -1 (nothing changed) for one the CPU cannot run.
int lw_set_level(int l) {
  if (l < SCALAR || l > best_level(cpu_features())) return -1;
  level.store(l);
  return l;
}
}

TORCH_LIBRARY(llamaworks, m) {
  m.def("gemv_f32(Tensor x, Tensor weight) -> Tensor");
  m.def("gemv_bf16(Tensor x, Tensor weight) -> Tensor");
  m.def("gemv_int8(Tensor x, Tensor weight, Tensor scales) -> Tensor");
  m.def("gemv_int4(Tensor x, Tensor weight, Tensor scales, Tensor offsets, int group_size) -> Tensor");
  m.def("dequant_int4(Tensor weight, Tensor scales, Tensor offsets, int group_size) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask) -> Tensor");
  m.def("paged_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor blocks, Tensor pos) -> Tensor");
}

TORCH_LIBRARY_IMPL(llamaworks, CPU, m) {
  m.impl("gemv_f32", &gemv_f32);
  m.impl("gemv_bf16", &gemv_bf16);
  m.impl("gemv_int8", &gemv_int8);
  m.impl("gemv_int4", &gemv_int4);
  m.impl("dequant_int4", &dequant_int4);
  m.impl("decode_attention", &decode_attention);
  m.impl("paged_attention", &paged_attention);
}
