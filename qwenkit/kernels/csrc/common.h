// Shared helpers of the qwenkit CPU kernels, for every kernel set (simd.h): dtype tags, scalar and vector loads
// of fp32/bf16/fp16 tensors, weight prefetch, activation-row tiling, and the op entry points that ops.cpp
// registers. What the kernels do and how fast they are is written down in qwenkit/kernels/cpu.py.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include "simd.h"

namespace QK_NS {

// GCC's partial redundancy elimination turns the accumulator arrays of the kernels into register copies and
// stack spills inside the inner loops (2-3x slower with 8 activation rows), so the kernels turn it off.
#define QK_NO_PRE __attribute__((optimize("no-tree-pre")))

// Software prefetch of the weight stream into L2, kPrefetch bytes ahead (one per 64-byte line): the int8
// GEMV read ~53 GB/s from memory on 2 threads without it and ~65 with it (AVX-512, Zen 5); 2 KiB ahead was no
// better than none.
constexpr int64_t kPrefetch = 8192;
QK_INLINE void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p) + kPrefetch, _MM_HINT_T1); }

// Activation rows per pass over the weight: as many as keep their x within kXBudget bytes, so x stays in L1
// while the weights stream past; more rows are done in several balanced passes.
constexpr int64_t kMaxTile = 8;
constexpr int64_t kXBudget = 32768;
inline int64_t tile_rows(int64_t M, int64_t x_row_bytes) {
  const int64_t fit = std::clamp<int64_t>(kXBudget / std::max<int64_t>(1, x_row_bytes), 1, kMaxTile);
  const int64_t passes = std::max<int64_t>(1, (M + fit - 1) / fit);
  return std::max<int64_t>(1, (M + passes - 1) / passes);
}

// Several passes (M above one tile) run block by block of weight rows, each block small enough for L2: the
// passes after the first read it from L2, not memory. kWBlockBytes of weight rows per block.
constexpr int64_t kWBlockBytes = 1 << 18;

// pass(m0, mt, n0, n1) for every tile of activation rows and range of weight rows, parallel over the weight rows.
template <class Pass>
void for_tiles(int64_t M, int64_t tile, int64_t N, int64_t w_row_bytes, const Pass& pass) {
  const int64_t block = tile < M ? std::max<int64_t>(16, kWBlockBytes / std::max<int64_t>(1, w_row_bytes)) : N;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t b0 = n0; b0 < n1; b0 += block) {
      const int64_t b1 = std::min(n1, b0 + block);
      for (int64_t m0 = 0; m0 < M; m0 += tile) pass(m0, std::min(tile, M - m0), b0, b1);
    }
  });
}

enum class FT { F32, BF16, F16 };

inline FT ft_of(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return FT::F32;
    case at::kBFloat16: return FT::BF16;
    case at::kHalf: return FT::F16;
    default: TORCH_CHECK(false, what, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

QK_INLINE float bf16_to_f32(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

QK_INLINE float ld1(const void* p, FT t, int64_t i) {
  switch (t) {
    case FT::F32: return static_cast<const float*>(p)[i];
    case FT::BF16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return _cvtsh_ss(static_cast<const uint16_t*>(p)[i]);
  }
}

// kL consecutive values of a float tensor as fp32.
QK_INLINE vf ldv(const void* p, FT t, int64_t i) {
  switch (t) {
    case FT::F32: return fload(static_cast<const float*>(p) + i);
    case FT::BF16: return fload_bf16(static_cast<const uint16_t*>(p) + i);
    default: return fload_f16(static_cast<const uint16_t*>(p) + i);
  }
}

// n values of a float tensor from element i -> dst as fp32 (vectors, then a scalar tail).
inline void load_f32(const void* p, FT t, int64_t i, int64_t n, float* dst) {
  int64_t j = 0;
  for (; j + kL <= n; j += kL) fstore(dst + j, ldv(p, t, i + j));
  for (; j < n; ++j) dst[j] = ld1(p, t, i + j);
}

// Rows of a contiguous [M, K] fp32/bf16 tensor -> dst as fp32, rows `stride` apart (K + 16 keeps rows from
// being 4 KiB apart, which aliases in L1). Parallel over 16-row chunks: a decode-sized x converts inline.
inline void widen_rows(const at::Tensor& x, int64_t stride, std::vector<float>& dst) {
  const int64_t M = x.size(0), K = x.size(1);
  const FT t = x.scalar_type() == at::kBFloat16 ? FT::BF16 : x.scalar_type() == at::kHalf ? FT::F16 : FT::F32;
  dst.resize(M * stride);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) load_f32(x.data_ptr(), t, m * K, K, dst.data() + m * stride);
  });
}

inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return uint16_t(u >> 16);
}

inline void st1(void* p, FT t, int64_t i, float v) {
  switch (t) {
    case FT::F32: static_cast<float*>(p)[i] = v; break;
    case FT::BF16: static_cast<uint16_t*>(p)[i] = f32_to_bf16(v); break;
    default: static_cast<uint16_t*>(p)[i] = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT); break;
  }
}

// The GEMMs' register tiles (quant.cpp's int16 GEMM, gemm.cpp's fp32 GEMM): blocks of kGN = 2 vectors of output
// channels, kGM rows of x per tile (avx512: 12 rows x 2 accumulators = 24 of the 32 registers; avx2: 6, 12 of 16).
constexpr int kGN = 2 * kL;
constexpr int kGM = kL == 16 ? 12 : 6;

// n <= kGN values r0 (first kL), r1 (next kL) -> out[o ..] of dtype t: vector stores for a whole bf16 / fp32
// block, element by element otherwise (a block at the last channels, fp16).
QK_INLINE void store_2v(void* out, FT t, int64_t o, int64_t n, vf r0, vf r1) {
  if (n == kGN && t == FT::BF16) {
    fstore_bf16(static_cast<uint16_t*>(out) + o, r0);
    fstore_bf16(static_cast<uint16_t*>(out) + o + kL, r1);
  } else if (n == kGN && t == FT::F32) {
    fstore(static_cast<float*>(out) + o, r0);
    fstore(static_cast<float*>(out) + o + kL, r1);
  } else {
    alignas(64) float r[kGN];
    fstore(r, r0), fstore(r + kL, r1);
    for (int64_t j = 0; j < n; ++j) st1(out, t, o + j, r[j]);
  }
}

// A weight the fp32 GEMM (gemm.cpp) widens to fp32 while packing: bf16 (bits 16), or int8 / packed int4 with
// scales (and offsets) per group of `group` k, [N, G] in dtype st (ot).
struct FloatWeight {
  const void* w;
  int bits;
  int64_t row_bytes, K, N;
  const void* scales = nullptr;
  const void* offsets = nullptr;  // may be null
  FT st = FT::F32, ot = FT::F32;
  int64_t G = 1, group = 1;
};
at::Tensor gemm_f32(const at::Tensor& x, const FloatWeight& w, const std::optional<at::Tensor>& bias);

// Op entry points (schemas in ops.cpp).
at::Tensor gemv_quant(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                      const std::optional<at::Tensor>& offsets, int64_t group_size,
                      const std::optional<at::Tensor>& bias, int64_t bits);
at::Tensor gemm_quant(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                      const std::optional<at::Tensor>& offsets, int64_t group_size,
                      const std::optional<at::Tensor>& bias, int64_t bits);
at::Tensor gemm_dequant(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                        const std::optional<at::Tensor>& offsets, int64_t group_size,
                        const std::optional<at::Tensor>& bias, int64_t bits);
void dequant(const at::Tensor& qweight, const at::Tensor& scales, const std::optional<at::Tensor>& offsets,
             int64_t group_size, int64_t bits, at::Tensor& out);
at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     bool widen_x);
at::Tensor gemm_bf16(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);
std::vector<double> dot_rates();
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
                            const at::Tensor& lengths, double scale);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor rotary_kv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                     const std::optional<at::Tensor>& q_scale, const at::Tensor& rows, const at::Tensor& positions,
                     at::Tensor& k_cache, at::Tensor& v_cache, const std::optional<at::Tensor>& k_scale,
                     const std::optional<at::Tensor>& v_scale);

}  // namespace QK_NS
