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
  const float* xsum;       // sums of xb per group (M, K/group), for avx512bf16_int4 only
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
void avx512bf16_int4_prepare(const float* x, int64_t M, int64_t K, int64_t group, uint16_t* xb, float* xsum);

}  // namespace lw
