// One-row (decode) products out = x @ w.T for up to a few activation rows, per instruction set.
// Each entry point computes output columns [n0, n1) of out (M, N) for all M rows of x (M, K);
// the caller (ops.cpp) splits the columns across threads. Every load is unaligned or masked:
// no pointer here needs any alignment.
#pragma once
#include <cstdint>

namespace lw {

struct Gemv {
  const float* x;          // (M, K), row-major, contiguous
  int64_t M, K, N;         // activation rows, reduction length, output columns (= weight rows)
  const void* w;           // (N, K) fp32 / bf16 / int8, or (N, K/2) repacked int4 (see gemv_body.h)
  const float* scales;     // int8: (N); int4: (N, K/group)
  const float* offsets;    // int4: (N, K/group), zero - 8 * scale; else null
  int64_t group;           // int4 group size (a multiple of 32); else 0
  float* out;              // (M, N)
  const uint16_t* xb;      // x rounded to bf16 (M, K), for avx512bf16_int4 only; else null
  const float* xsum;       // sums of x as taken per group (M, K/group): xb for avx512bf16_int4,
                           // the dequantised xq for int4_q8_avx2; else null
  // int8 weights with quantised activations (the *_q8 kernels; made by quantize_rows):
  const int8_t* xq = nullptr;    // x in int8 per block of 32 columns (M, K), |q| <= 127
  const float* xd = nullptr;     // each block's scale repeated 8 times (M, K/4): one per 4 columns
  const int32_t* xc = nullptr;   // -128 * the sum of each 4 columns of xq (M, K/4), for int8_vnni
};

using GemvFn = void (*)(const Gemv&, int64_t n0, int64_t n1);

// The four kinds, in this order in each table below.
enum Kind { F32 = 0, BF16 = 1, INT8 = 2, INT4 = 3 };

// Rows of x handled by one pass over the weights; more rows are done in chunks of this many.
constexpr int64_t MAX_ROWS = 8;

extern const GemvFn scalar_kernels[4];
extern const GemvFn avx2_kernels[4];
extern const GemvFn avx512_kernels[4];
extern const GemvFn avx512bf16_int4;  // needs Gemv::xb and Gemv::xsum, made by:
extern const GemvFn avx512bf16_bf16;  // bf16 weights, bf16 activations in Gemv::xb (x unused)
// int8 weights times activations quantised per block of 32 columns as llama.cpp's Q8_0 (its
// Q8_0 x Q8_0 dot, with one fp32 scale per weight row instead of per block): integer dot
// products per block (exact), each block's sum scaled by its activation scale in fp32. K must
// be a multiple of 32. int8_vnni: AVX512_VNNI vpdpbusd; int8_q8_avx2: AVX2 maddubs (the sign trick).
extern const GemvFn int8_vnni;
extern const GemvFn int8_q8_avx2;
// int4 weights times the same activations (AVX2 maddubs, nibbles as the unsigned operand);
// needs Gemv::xsum: per row and group, the sum of the dequantised activations.
extern const GemvFn int4_q8_avx2;
// int4 weights times activations quantised per block of 128 columns (quantize_rows_q8_128) with
// AVX512_VNNI vpdpbusd (nibbles as the unsigned operand), for group sizes that are multiples of
// 128; Gemv::xd holds one scale per block (M, K/128) and Gemv::xsum the group sums as above.
extern const GemvFn int4_vnni;
// Per row and block of 128: d = max|x| / 127, q = round-half-even(x * (127 / max|x|)), in the
// column order int4_vnni reads (see there); xsum (M, K/group): sum of d * q per group.
void quantize_rows_q8_128(const float* x, int64_t M, int64_t K, int64_t group, int8_t* xq, float* xd, float* xsum);
// The activations as those kernels take them (Gemv::xq, xd, xc): per row and block of 32,
// d = max|x| / 127 and q = round-half-even(x * (127 / max|x|)) (0 for an all-zero block).
void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* xq, float* xd, int32_t* xc);
// Per row and group of `group` columns (a multiple of 32), the sum of the activations quantize_rows
// made, dequantised: sum over the group's blocks of d * sum(q) (Gemv::xsum for int4_q8_avx2 and the
// AVX2 int4 tiles).
void group_sums_q8(const float* xd, const int32_t* xc, int64_t M, int64_t K, int64_t group, float* xsum);
void avx512bf16_int4_prepare(const float* x, int64_t M, int64_t K, int64_t group, uint16_t* xb, float* xsum);

// Decode attention (attn_body.h): out (B, H, S, D) = softmax(q k^T / sqrt(D), masked) v for
// S query rows per sequence and head against L cached keys, each query row reading only the
// keys its mask lets it see. q, k, v and out all fp32 or all bf16, last dimension contiguous,
// other strides in elements; GQA: head h reads cache head h / (H / Hkv).
constexpr int64_t MAX_HEAD_DIM = 256;
struct Attention {
  const void* q;           // (B, H, S, D), strides qs
  const void* k;           // (B, Hkv, L, D), strides ks
  const void* v;           // (B, Hkv, L, D), strides vs
  const bool* mask;        // (B, 1 or H, S, L) broadcast, strides ms (0 where broadcast)
  void* out;               // (B, H, S, D), contiguous
  bool bf16;
  int64_t B, H, Hkv, S, L, D;
  int64_t qs[3], ks[3], vs[3], ms[4];
  float scale;
};
// Query rows [r0, r1) of B * H * S (row (b * H + h) * S + s); scores: L floats of scratch.
using AttentionFn = void (*)(const Attention&, int64_t r0, int64_t r1, float* scores);
extern const AttentionFn scalar_attention;
extern const AttentionFn avx2_attention;
extern const AttentionFn avx512_attention;

// Paged decode attention (attn_body.h): the same, with keys and values read through a block
// table from one layer's pools (inference/paged.py) instead of a contiguous cache, each query
// over its own sequence's keys only: no gather copy, no key past the query's position read.
struct PagedAttention {
  const void* q;           // (B, H, S, D), strides qs
  const void* k;           // pool (Hkv, N, Bs, D), contiguous: N blocks of Bs positions
  const void* v;           // the same for values
  const int64_t* blocks;   // (B, W), contiguous: physical block of each logical block
  const int64_t* pos;      // (B, S), contiguous: query s of sequence b sees keys 0..pos[b, s]
  void* out;               // (B, H, S, D), contiguous
  bool bf16;               // q and out bf16 (else fp32)
  bool kv_bf16;            // the pools bf16 (else fp32): a bf16 cache under an fp32 model too
  int64_t B, H, Hkv, S, D, N, Bs, W;
  int64_t qs[3];
  float scale;
};
// Query rows [r0, r1) of H * B * S, head first (row (h * B + b) * S + s): an even split over
// threads then gives each thread a share of every sequence, long or short. scores: Bs floats.
using PagedAttentionFn = void (*)(const PagedAttention&, int64_t r0, int64_t r1, float* scores);
extern const PagedAttentionFn scalar_attention_paged;
extern const PagedAttentionFn avx2_attention_paged;
extern const PagedAttentionFn avx512_attention_paged;

}  // namespace lw
