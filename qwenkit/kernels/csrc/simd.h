// The instruction-set layer of the qwenkit CPU kernels: one fp32 vector type `vf` and one integer vector type
// `vi` of kL 32-bit lanes, and the few operations the kernels need, for each kernel set. The kernels in quant.cpp
// and bf16.cpp are written once against this header; cpu.py compiles them once per set with -DQK_ISA_<SET>
// (and the set's -march), which also names the C++ namespace and the torch op library (torch.ops.<QK_NS>).
//   QK_ISA_AVX512: AVX-512 F/BW/VL/DQ + VNNI + BF16 (x86-64-v4), kL = 16; vpdpwssd and vdpbf16ps.
//   QK_ISA_AVX2:   AVX2 + FMA + F16C (x86-64-v3), kL = 8; vpmaddwd + vpaddd in place of vpdpwssd, no bf16 dot.
#pragma once

#include <immintrin.h>

#include <cstdint>

#if defined(QK_ISA_AVX512)
#define QK_NS qwenkit_avx512
#elif defined(QK_ISA_AVX2)
#define QK_NS qwenkit_avx2
#else
#error "compile with -DQK_ISA_AVX512 or -DQK_ISA_AVX2"
#endif

#define QK_INLINE __attribute__((always_inline)) inline

namespace QK_NS {

#if defined(QK_ISA_AVX512)

constexpr int kL = 16;         // 32-bit lanes per vector
constexpr bool kBf16Dot = true;  // vdpbf16ps: bf16 pairs times bf16 pairs, fp32 sums
using vf = __m512;
using vi = __m512i;

QK_INLINE vf fzero() { return _mm512_setzero_ps(); }
QK_INLINE vf fset1(float v) { return _mm512_set1_ps(v); }
QK_INLINE vf fload(const float* p) { return _mm512_loadu_ps(p); }
QK_INLINE void fstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
QK_INLINE vf fadd(vf a, vf b) { return _mm512_add_ps(a, b); }
QK_INLINE vf fmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
QK_INLINE vf ffma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }  // a * b + c
QK_INLINE float freduce_add(vf v) { return _mm512_reduce_add_ps(v); }
QK_INLINE vf fabs_(vf v) { return _mm512_abs_ps(v); }
QK_INLINE vf fmax_(vf a, vf b) { return _mm512_max_ps(a, b); }
QK_INLINE float freduce_max(vf v) { return _mm512_reduce_max_ps(v); }
QK_INLINE bool fany_nan(vf v) { return _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) != 0; }
QK_INLINE vf fblend_hi(vf lo, vf hi) { return _mm512_mask_blend_ps(0xff00, lo, hi); }  // upper half from hi
// kL bf16 / fp16 / uint8 / int8 values -> fp32
QK_INLINE vf fload_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
QK_INLINE vf fload_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
QK_INLINE vf fload_u8(const uint8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p))); }
QK_INLINE vf fload_s8(const uint8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))); }
// kL 4-bit values from kL / 2 bytes (byte j: value 2j in the low nibble, 2j + 1 in the high) -> fp32
QK_INLINE vf fload_u4(const uint8_t* p) {
  const __m128i b = _mm_loadl_epi64((const __m128i*)p), m = _mm_set1_epi8(0x0f);
  const __m128i v = _mm_unpacklo_epi8(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 4), m));
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v));
}
QK_INLINE void fstore_bf16(uint16_t* p, vf v) { _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(v)); }
// acc += 2 kL bf16 products (pairs of w and x per lane)
QK_INLINE vf fdot_bf16(vf acc, const uint16_t* w, const uint16_t* x) {
  return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(w), (__m512bh)_mm512_loadu_si512(x));
}

QK_INLINE vi izero() { return _mm512_setzero_si512(); }
QK_INLINE vi iset1_16(int16_t v) { return _mm512_set1_epi16(v); }
QK_INLINE vi iset1_32(int32_t v) { return _mm512_set1_epi32(v); }
QK_INLINE vi iload(const int16_t* p) { return _mm512_loadu_si512(p); }  // 2 kL int16
QK_INLINE vi iload_s8w(const uint8_t* p) { return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)p)); }
QK_INLINE vi iload_u8w(const uint8_t* p) { return _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)p)); }
QK_INLINE vi iand(vi a, vi b) { return _mm512_and_si512(a, b); }
QK_INLINE vi isrli16(vi a, int n) { return _mm512_srli_epi16(a, n); }
QK_INLINE vi iadd(vi a, vi b) { return _mm512_add_epi32(a, b); }
QK_INLINE vi idot16(vi acc, vi a, vi b) { return _mm512_dpwssd_epi32(acc, a, b); }  // acc += pairs of a * b
QK_INLINE vf icvt_f(vi v) { return _mm512_cvtepi32_ps(v); }
QK_INLINE vi fround_i(vf v) { return _mm512_cvtps_epi32(v); }  // round to nearest even
QK_INLINE void istore(int32_t* p, vi v) { _mm512_storeu_si512(p, v); }
QK_INLINE vi islli16(vi a, int n) { return _mm512_slli_epi16(a, n); }
QK_INLINE vi israi16(vi a, int n) { return _mm512_srai_epi16(a, n); }
QK_INLINE vi iload_words(const void* p, int n) {  // n <= kL 32-bit words, the rest 0 (nothing read past them)
  return n == kL ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi32(__mmask16((1u << n) - 1), p);
}
// r[i] word j -> r[j] word i (a kL x kL transpose of 32-bit words): 32-bit, 64-bit, then two 128-bit stages.
QK_INLINE void transpose_words(vi (&r)[kL]) {
  vi t[kL];
#pragma GCC unroll 8
  for (int i = 0; i < kL; i += 2) t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]), t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
#pragma GCC unroll 4
  for (int i = 0; i < kL; i += 4) {  // r[i + c], 128-bit lane l: rows i..i+3, word 4 l + c
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]), r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]), r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {  // t[c]: rows 0-3 / 4-7 words c and c + 8; t[4 + c]: words c + 4, c + 12
    t[c] = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88), t[4 + c] = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xdd);
    t[8 + c] = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88), t[12 + c] = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xdd);
  }
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0x88), r[c + 8] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0xdd);
    r[c + 4] = _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0x88), r[c + 12] = _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0xdd);
  }
}

#else  // QK_ISA_AVX2

constexpr int kL = 8;
constexpr bool kBf16Dot = false;  // bf16 activations are widened to fp32 once per call instead
using vf = __m256;
using vi = __m256i;

QK_INLINE vf fzero() { return _mm256_setzero_ps(); }
QK_INLINE vf fset1(float v) { return _mm256_set1_ps(v); }
QK_INLINE vf fload(const float* p) { return _mm256_loadu_ps(p); }
QK_INLINE void fstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
QK_INLINE vf fadd(vf a, vf b) { return _mm256_add_ps(a, b); }
QK_INLINE vf fmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
QK_INLINE vf ffma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
QK_INLINE float freduce_add(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
QK_INLINE vf fabs_(vf v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), v); }
QK_INLINE vf fmax_(vf a, vf b) { return _mm256_max_ps(a, b); }
QK_INLINE float freduce_max(vf v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
QK_INLINE bool fany_nan(vf v) { return _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) != 0; }
QK_INLINE vf fblend_hi(vf lo, vf hi) { return _mm256_blend_ps(lo, hi, 0xf0); }
QK_INLINE vf fload_bf16(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
QK_INLINE vf fload_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
QK_INLINE vf fload_u8(const uint8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p))); }
QK_INLINE vf fload_s8(const uint8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p))); }
QK_INLINE vf fload_u4(const uint8_t* p) {
  int32_t word;
  __builtin_memcpy(&word, p, 4);
  const __m128i b = _mm_cvtsi32_si128(word), m = _mm_set1_epi8(0x0f);
  const __m128i v = _mm_unpacklo_epi8(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 4), m));
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
}
QK_INLINE void fstore_bf16(uint16_t* p, vf v) {  // round to nearest even; NaN stays (quiet) NaN
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);  // 8 words in lanes 0-1
  _mm_storeu_si128((__m128i*)p, _mm256_castsi256_si128(packed));
}

QK_INLINE vi izero() { return _mm256_setzero_si256(); }
QK_INLINE vi iset1_16(int16_t v) { return _mm256_set1_epi16(v); }
QK_INLINE vi iset1_32(int32_t v) { return _mm256_set1_epi32(v); }
QK_INLINE vi iload(const int16_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
QK_INLINE vi iload_s8w(const uint8_t* p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)p)); }
QK_INLINE vi iload_u8w(const uint8_t* p) { return _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)p)); }
QK_INLINE vi iand(vi a, vi b) { return _mm256_and_si256(a, b); }
QK_INLINE vi isrli16(vi a, int n) { return _mm256_srli_epi16(a, n); }
QK_INLINE vi iadd(vi a, vi b) { return _mm256_add_epi32(a, b); }
QK_INLINE vi idot16(vi acc, vi a, vi b) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)); }
QK_INLINE vf icvt_f(vi v) { return _mm256_cvtepi32_ps(v); }
QK_INLINE vi fround_i(vf v) { return _mm256_cvtps_epi32(v); }
QK_INLINE void istore(int32_t* p, vi v) { _mm256_storeu_si256((__m256i*)p, v); }
QK_INLINE vi islli16(vi a, int n) { return _mm256_slli_epi16(a, n); }
QK_INLINE vi israi16(vi a, int n) { return _mm256_srai_epi16(a, n); }
QK_INLINE vi iload_words(const void* p, int n) {  // n <= kL 32-bit words, the rest 0 (nothing read past them)
  if (n == kL) return _mm256_loadu_si256((const __m256i*)p);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_maskload_epi32((const int*)p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane));
}
// r[i] word j -> r[j] word i (kL x kL 32-bit words): 32-bit, 64-bit, then the 128-bit stage.
QK_INLINE void transpose_words(vi (&r)[kL]) {
  vi t[kL];
#pragma GCC unroll 4
  for (int i = 0; i < kL; i += 2) t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]), t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
#pragma GCC unroll 2
  for (int i = 0; i < kL; i += 4) {  // r[i + c], 128-bit lane l: rows i..i+3, word 4 l + c
    r[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]), r[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]), r[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    t[c] = _mm256_permute2x128_si256(r[c], r[4 + c], 0x20), t[c + 4] = _mm256_permute2x128_si256(r[c], r[4 + c], 0x31);
  }
#pragma GCC unroll 8
  for (int i = 0; i < kL; ++i) r[i] = t[i];
}
// No bf16 dot on this set: callers check kBf16Dot, so this is declared only (a use would not link).
vf fdot_bf16(vf acc, const uint16_t* w, const uint16_t* x);

#endif

}  // namespace QK_NS
