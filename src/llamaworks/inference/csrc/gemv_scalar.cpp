// Portable kernels for any CPU (no vector extension assumed): the same blocking, one lane.
#include <cstring>

#include "gemv.h"

namespace lw {
namespace {
struct Isa {
  using V = float;
  static constexpr int W = 1;
  static constexpr int nb(int m) { return m == 1 ? 4 : 2; }
  static constexpr int nb4(int m) { return nb(m); }
  static constexpr int64_t PREFETCH_ROWS_BELOW = INT64_MAX;
  static inline V zero() { return 0.0f; }
  static inline V set1(float v) { return v; }
  static inline V load(const float* p) { return *p; }
  static inline V fma(V a, V b, V c) { return a * b + c; }
  static inline float hsum(V v) { return v; }
  static inline V bf16(const uint16_t* p) {
    const uint32_t bits = static_cast<uint32_t>(*p) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
  static inline V i8(const int8_t* p) { return static_cast<float>(*p); }
  static inline void u4(const uint8_t* p, V& lo, V& hi) {
    lo = static_cast<float>(*p & 15);
    hi = static_cast<float>(*p >> 4);
  }
};
}  // namespace

#define LW_KERNELS scalar_kernels
#include "gemv_body.h"
#define LW_ATTENTION scalar_attention
#include "attn_body.h"
}  // namespace lw
