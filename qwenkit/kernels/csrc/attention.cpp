// Decode attention over a KV cache: a few query rows per (batch row, head) against up to S cached keys/values,
// reading each key and value once (flash-decoding's online softmax, one pass over the cache). Written once
// against simd.h, compiled once per kernel set; parallel over (batch row, head) pairs.
//
// Cache kinds: fp32, bf16 and fp16 keys/values are widened to fp32 in registers, all math in fp32. An int8 cache is
// read as int8 and never dequantized: scores are int32 dot products of the keys with q quantized per row to int16
// (vpmaddwd, as the quantized GEMV; error ~1e-5 relative, far below the cache's own), times q's and the key's
// scales; values are widened to fp32 and weighted by p times the value's scale. Softmax (max, exp, sums) is fp32.
// Query t of row b attends keys 0..lengths[b, t] - 1 of its row (the model passes position + 1); a query with
// length 0 gets zeros (SDPA's answer for a fully masked row).
//
// Per (b, h) and group of up to kMaxQ queries: for each block of kBlock keys, scores s = (scale * q) . k for all
// queries of the group (each key row loaded once for all of them), then per query m' = max(m, max s),
// p = exp(s - m'), l = l * exp(m - m') + sum p, o = o * exp(m - m') + p . V (each value row loaded once); the
// output is o / l.
#include <cmath>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include "common.h"

namespace QK_NS {
namespace {

enum class KV { F32, BF16, F16, I8 };

constexpr int kMaxQ = 8;          // queries per pass over the keys (more are done in several passes)
constexpr int64_t kBlock = 128;   // keys per online-softmax step (scores of one block stay in L1)
constexpr int64_t kMaxInt8D = 4096;  // int8 keys: int32 lanes sum D / kL products of 127 * 32767 at most
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// fp32 accumulators per step (queries x keys for scores, queries x column vectors for values): half the
// register file.
constexpr int kAccRegs = kL == 16 ? 16 : 8;

// ---------------------------------------------------------------- vector exp (x <= 0 in use)

#if defined(QK_ISA_AVX512)
QK_INLINE vf fround_(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
QK_INLINE vf fpow2i(vf n) {  // 2**n for integral n in [-126, 127]
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
QK_INLINE vf fkeep_ge(vf x, vf lim, vf y) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, lim, _CMP_GE_OQ), y); }
#else
QK_INLINE vf fround_(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
QK_INLINE vf fpow2i(vf n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
QK_INLINE vf fkeep_ge(vf x, vf lim, vf y) { return _mm256_and_ps(_mm256_cmp_ps(x, lim, _CMP_GE_OQ), y); }
#endif

// exp(x) for x <= 0 to ~2 ulp: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by Cephes' expf polynomial; 0 below the
// fp32 normal range (so -inf, the masked score, gives exactly 0; so does NaN).
QK_INLINE vf fexp(vf x) {
  const vf lo = fset1(-87.33654f);
  const vf xc = fmax_(x, lo);
  const vf n = fround_(fmul(xc, fset1(1.44269504088896341f)));
  vf r = ffma(n, fset1(-0.693359375f), xc);
  r = ffma(n, fset1(2.12194440e-4f), r);
  vf p = fset1(1.9875691500e-4f);
  p = ffma(p, r, fset1(1.3981999507e-3f));
  p = ffma(p, r, fset1(8.3334519073e-3f));
  p = ffma(p, r, fset1(4.1665795894e-2f));
  p = ffma(p, r, fset1(1.6666665459e-1f));
  p = ffma(p, r, fset1(5.0000001201e-1f));
  p = ffma(p, fmul(r, r), fadd(r, fset1(1.f)));
  return fkeep_ge(x, lo, fmul(p, fpow2i(n)));
}

// ---------------------------------------------------------------- cache element loads

template <KV T>
constexpr int64_t kv_bytes() { return T == KV::F32 ? 4 : T == KV::I8 ? 1 : 2; }

template <KV T>
QK_INLINE vf kv_load(const char* row, int64_t d) {  // kL values from element d, as fp32
  if constexpr (T == KV::F32) return fload(reinterpret_cast<const float*>(row) + d);
  else if constexpr (T == KV::BF16) return fload_bf16(reinterpret_cast<const uint16_t*>(row) + d);
  else if constexpr (T == KV::F16) return fload_f16(reinterpret_cast<const uint16_t*>(row) + d);
  else return fload_s8(reinterpret_cast<const uint8_t*>(row) + d);
}

template <KV T>
QK_INLINE float kv_load1(const char* row, int64_t d) {
  if constexpr (T == KV::F32) return reinterpret_cast<const float*>(row)[d];
  else if constexpr (T == KV::BF16) return bf16_to_f32(reinterpret_cast<const uint16_t*>(row)[d]);
  else if constexpr (T == KV::F16) return _cvtsh_ss(reinterpret_cast<const uint16_t*>(row)[d]);
  else return float(reinterpret_cast<const int8_t*>(row)[d]);
}

// ---------------------------------------------------------------- one (row, head, query group)

struct Args {
  const void* q;
  FT qt;
  int64_t qsb, qsh, qst;  // q [B, H, T, D] strides in elements (d stride 1 is not required: read per element)
  int64_t qsd;
  const char* k;
  const char* v;
  int64_t ksb, ksh, kss, vsb, vsh, vss;  // in bytes
  const float* kscale;  // int8 only: [B, H, S] with unit stride along S
  const float* vscale;
  int64_t kcb, kch, vcb, vch;  // scale strides in elements
  const int64_t* len;  // [B, T] contiguous
  int64_t B, H, T, D, S;
  float scale;
  void* out;  // [B, T, H, D] contiguous, dtype ot
  FT ot;
};

// Scratch of one task, reused across tasks of a thread.
struct Work {
  int64_t Dp;  // padded row stride of q and o (a multiple of kL)
  std::vector<float> q, o;  // [kMaxQ, Dp]
  std::vector<int16_t> q16;  // int8 keys: q quantized per query row, [kMaxQ, Dp]
  float qs[kMaxQ];           // and its scales
  alignas(64) float s[kMaxQ][kBlock];
  alignas(64) float p[kMaxQ][kBlock];   // softmax weights of the block (0 past each query's length)
  alignas(64) float pv[kMaxQ][kBlock];  // int8: p times the value scale
  float m[kMaxQ], l[kMaxQ];
  int64_t n[kMaxQ];  // keys of the current block each query sees
  int64_t j0;        // first key of the current block
  const char* vb;    // value rows of this (row, head), for the prefetch
  int64_t vss, row_bytes;
};

// s[t][j] = q_t . k_j for KB keys from j and MT queries (q pre-scaled); int8 keys times their scale. One fp32
// accumulator per (key, query): KB * MT independent FMA chains hide the FMA latency (one chain per key ran at
// about a third of the speed); each sum is reduced across lanes once, at the end.
template <KV T, int MT, int KB>
QK_INLINE void key_scores(const char* kb, int64_t kss, const float* ksc, int64_t j, int64_t D, Work& w) {
  const float* q = w.q.data();
  const int64_t Dp = w.Dp;
  vf acc[KB][MT];
#pragma GCC unroll 16
  for (int i = 0; i < KB; ++i)
#pragma GCC unroll 8
    for (int t = 0; t < MT; ++t) acc[i][t] = fzero();
  const int64_t Dv = D / kL * kL;
  for (int64_t d = 0; d < Dv; d += kL) {
    vf qv[MT];
#pragma GCC unroll 8
    for (int t = 0; t < MT; ++t) qv[t] = fload(q + t * Dp + d);
#pragma GCC unroll 16
    for (int i = 0; i < KB; ++i) {
      const vf kv = kv_load<T>(kb + (j + i) * kss, d);
#pragma GCC unroll 8
      for (int t = 0; t < MT; ++t) acc[i][t] = ffma(kv, qv[t], acc[i][t]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < KB; ++i) {
    const char* row = kb + (j + i) * kss;
    const float sc = ksc ? ksc[j + i] : 1.f;
#pragma GCC unroll 8
    for (int t = 0; t < MT; ++t) {
      float r = freduce_add(acc[i][t]);
      for (int64_t e = Dv; e < D; ++e) r += q[t * Dp + e] * kv_load1<T>(row, e);
      w.s[t][j - w.j0 + i] = r * sc;
    }
  }
}

// int8 keys: q as int16 (per-row absmax scale) times the keys widened to int16, int32 sums (vpmaddwd).
template <int MT, int KB>
QK_INLINE void key_scores_i8(const char* kb, int64_t kss, const float* ksc, int64_t j, int64_t D, Work& w) {
  const int16_t* q = w.q16.data();
  const int64_t Dp = w.Dp;
  vi acc[KB][MT];
#pragma GCC unroll 16
  for (int i = 0; i < KB; ++i)
#pragma GCC unroll 8
    for (int t = 0; t < MT; ++t) acc[i][t] = izero();
  const int64_t Dv = D / (2 * kL) * (2 * kL);
  for (int64_t d = 0; d < Dv; d += 2 * kL) {
    vi qv[MT];
#pragma GCC unroll 8
    for (int t = 0; t < MT; ++t) qv[t] = iload(q + t * Dp + d);
#pragma GCC unroll 16
    for (int i = 0; i < KB; ++i) {
      const vi kv = iload_s8w(reinterpret_cast<const uint8_t*>(kb + (j + i) * kss) + d);
#pragma GCC unroll 8
      for (int t = 0; t < MT; ++t) acc[i][t] = idot16(acc[i][t], kv, qv[t]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < KB; ++i) {
    const int8_t* row = reinterpret_cast<const int8_t*>(kb + (j + i) * kss);
#pragma GCC unroll 8
    for (int t = 0; t < MT; ++t) {
      float r = freduce_add(icvt_f(acc[i][t]));
      int32_t tail = 0;
      for (int64_t e = Dv; e < D; ++e) tail += int32_t(q[t * Dp + e]) * row[e];
      w.s[t][j - w.j0 + i] = (r + float(tail)) * w.qs[t] * ksc[j + i];
    }
  }
}

// Software prefetch of n cache rows from row j (every 64-byte line of each). The score pass reads KB rows at a
// time, interleaved, and the value pass a block of rows after it; the hardware prefetchers alone left the int8
// cache at 5.0 GB/s from memory (1 thread, Zen 3; 7.5 with this; fp32 7.2 -> 8.0; torch.sum ~10-12 then).
QK_INLINE void prefetch_rows(const char* base, int64_t stride, int64_t j, int64_t n, int64_t row_bytes) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t off = 0; off < row_bytes; off += 64) _mm_prefetch(base + (j + i) * stride + off, _MM_HINT_T0);
}

// Scores of one block; meanwhile the value rows of this block and the key rows of the next one are prefetched.
template <KV T, int MT>
QK_NO_PRE void block_scores(const char* kb, int64_t kss, const float* ksc, int64_t nb, int64_t D, Work& w) {
  constexpr int KB = kAccRegs / MT > 0 ? kAccRegs / MT : 1;
  const int64_t j1 = w.j0 + nb;
  int64_t j = w.j0;
  for (; j + KB <= j1; j += KB) {
    prefetch_rows(w.vb, w.vss, j, KB, w.row_bytes);
    prefetch_rows(kb, kss, j + kBlock, KB, w.row_bytes);
    if constexpr (T == KV::I8) key_scores_i8<MT, KB>(kb, kss, ksc, j, D, w);
    else key_scores<T, MT, KB>(kb, kss, ksc, j, D, w);
  }
  for (; j < j1; ++j) {
    prefetch_rows(w.vb, w.vss, j, 1, w.row_bytes);
    if constexpr (T == KV::I8) key_scores_i8<MT, 1>(kb, kss, ksc, j, D, w);
    else key_scores<T, MT, 1>(kb, kss, ksc, j, D, w);
  }
}

// o[t][d0 .. d0 + NV kL) += sum_j p[t][j] * v_j[d0 ..] over keys j0..j0+nb-1; each value row read once.
template <KV T, int MT, int NV>
QK_NO_PRE void block_values_cols(const char* vb, int64_t vss, const float (*p)[kBlock], int64_t j0, int64_t nb,
                                 int64_t d0, Work& w) {
  float* o = w.o.data();
  const int64_t Dp = w.Dp;
  vf acc[MT][NV];
#pragma GCC unroll 8
  for (int t = 0; t < MT; ++t)
#pragma GCC unroll 16
    for (int c = 0; c < NV; ++c) acc[t][c] = fload(o + t * Dp + d0 + c * kL);
  for (int64_t j = 0; j < nb; ++j) {
    const char* row = vb + (j0 + j) * vss;
    vf pj[MT];
#pragma GCC unroll 8
    for (int t = 0; t < MT; ++t) pj[t] = fset1(p[t][j]);
#pragma GCC unroll 16
    for (int c = 0; c < NV; ++c) {
      const vf x = kv_load<T>(row, d0 + c * kL);
#pragma GCC unroll 8
      for (int t = 0; t < MT; ++t) acc[t][c] = ffma(pj[t], x, acc[t][c]);
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < MT; ++t)
#pragma GCC unroll 16
    for (int c = 0; c < NV; ++c) fstore(o + t * Dp + d0 + c * kL, acc[t][c]);
}

// Columns d.. of the value pass in strips of NV vectors, then narrower strips, then a scalar tail.
template <KV T, int MT, int NV>
void block_values_from(const char* vb, int64_t vss, const float (*p)[kBlock], int64_t j0, int64_t nb, int64_t d,
                       int64_t D, Work& w) {
  for (; d + NV * kL <= D; d += NV * kL) block_values_cols<T, MT, NV>(vb, vss, p, j0, nb, d, w);
  if constexpr (NV > 1) {
    block_values_from<T, MT, NV / 2>(vb, vss, p, j0, nb, d, D, w);
  } else {
    for (; d < D; ++d)
      for (int64_t j = 0; j < nb; ++j) {
        const float x = kv_load1<T>(vb + (j0 + j) * vss, d);
        for (int t = 0; t < MT; ++t) w.o[t * w.Dp + d] += p[t][j] * x;
      }
  }
}

// One query: a whole 128-wide row per strip (16 accumulators on avx2, a few spilled) beat two strips of 8 by
// ~10% from memory: each value row is then read in one go.
template <KV T, int MT>
void block_values(const char* vb, int64_t vss, const float (*p)[kBlock], int64_t j0, int64_t nb, int64_t D,
                  Work& w) {
  constexpr int NV = MT == 1 ? 16 : (kAccRegs / MT > 0 ? kAccRegs / MT : 1);
  block_values_from<T, MT, NV>(vb, vss, p, j0, nb, 0, D, w);
}

// Online-softmax update of one block for query t: p[t] = exp(s - m'), rescale l and o by exp(m - m').
inline void softmax_block(int t, int64_t nb, int64_t D, const float* vsc, int64_t j0, Work& w) {
  const int64_t n = w.n[t], nv = (n + kL - 1) / kL * kL, nbv = (nb + kL - 1) / kL * kL;
  float* s = w.s[t];
  float* p = w.p[t];
  if (n == 0) {
    std::fill(p, p + nbv, 0.f);
    if (vsc) std::fill(w.pv[t], w.pv[t] + nbv, 0.f);
    return;
  }
  for (int64_t j = n; j < nv; ++j) s[j] = kNegInf;
  vf mx = fset1(kNegInf);
  for (int64_t j = 0; j < nv; j += kL) mx = fmax_(mx, fload(s + j));
  const float m_new = std::max(w.m[t], freduce_max(mx));
  const vf neg_m = fset1(-m_new);
  vf sum = fzero();
  for (int64_t j = 0; j < nv; j += kL) {
    const vf e = fexp(fadd(fload(s + j), neg_m));
    fstore(p + j, e);
    sum = fadd(sum, e);
  }
  std::fill(p + nv, p + nbv, 0.f);
  const float corr = w.m[t] == kNegInf ? 0.f : std::exp(w.m[t] - m_new);
  w.l[t] = w.l[t] * corr + freduce_add(sum);
  w.m[t] = m_new;
  if (corr != 1.f) {
    float* o = w.o.data() + t * w.Dp;
    for (int64_t d = 0; d < D; ++d) o[d] *= corr;
  }
  if (vsc) {  // int8 values: fold each key's value scale into its weight
    float* pv = w.pv[t];
    for (int64_t j = 0; j < n; ++j) pv[j] = p[j] * vsc[j0 + j];
    std::fill(pv + n, pv + nbv, 0.f);
  }
}

template <KV T, int MT>
QK_NO_PRE void attend_group(const Args& a, int64_t b, int64_t h, int64_t t0, Work& w) {
  const int64_t D = a.D, Dp = w.Dp;
  const char* kb = a.k + b * a.ksb + h * a.ksh;
  const char* vb = a.v + b * a.vsb + h * a.vsh;
  const float* ksc = a.kscale ? a.kscale + b * a.kcb + h * a.kch : nullptr;
  const float* vsc = a.vscale ? a.vscale + b * a.vcb + h * a.vch : nullptr;
  w.vb = vb, w.vss = a.vss, w.row_bytes = D * kv_bytes<T>();
  int64_t len[MT], longest = 0;
  for (int t = 0; t < MT; ++t) {
    len[t] = a.len[b * a.T + t0 + t];
    longest = std::max(longest, len[t]);
    w.m[t] = kNegInf, w.l[t] = 0.f;
    for (int64_t d = 0; d < D; ++d)
      w.q[t * Dp + d] = a.scale * ld1(a.q, a.qt, b * a.qsb + h * a.qsh + (t0 + t) * a.qst + d * a.qsd);
    std::fill(w.o.begin() + t * Dp, w.o.begin() + (t + 1) * Dp, 0.f);
    if constexpr (T == KV::I8) {
      float amax = 0.f;
      for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::fabs(w.q[t * Dp + d]));
      w.qs[t] = amax / 32767.f;
      const float inv = amax > 0.f ? 32767.f / amax : 0.f;
      for (int64_t d = 0; d < D; ++d) w.q16[t * Dp + d] = int16_t(std::lrintf(w.q[t * Dp + d] * inv));
    }
  }
  for (int64_t j0 = 0; j0 < longest; j0 += kBlock) {
    const int64_t nb = std::min(kBlock, longest - j0);
    w.j0 = j0;
    block_scores<T, MT>(kb, a.kss, ksc, nb, D, w);
    int64_t seen = 0;  // keys of this block that any query sees
    for (int t = 0; t < MT; ++t) {
      w.n[t] = std::clamp<int64_t>(len[t] - j0, 0, nb);
      seen = std::max(seen, w.n[t]);
      softmax_block(t, nb, D, vsc, j0, w);
    }
    block_values<T, MT>(vb, a.vss, vsc ? w.pv : w.p, j0, seen, D, w);
  }
  for (int t = 0; t < MT; ++t) {
    const float inv = w.l[t] > 0.f ? 1.f / w.l[t] : 0.f;
    const int64_t base = ((b * a.T + t0 + t) * a.H + h) * D;
    for (int64_t d = 0; d < D; ++d) st1(a.out, a.ot, base + d, w.o[t * Dp + d] * inv);
  }
}

template <KV T>
void attend_group_m(const Args& a, int64_t b, int64_t h, int64_t t0, int64_t mt, Work& w) {
  switch (mt) {
    case 1: return attend_group<T, 1>(a, b, h, t0, w);
    case 2: return attend_group<T, 2>(a, b, h, t0, w);
    case 3: return attend_group<T, 3>(a, b, h, t0, w);
    case 4: return attend_group<T, 4>(a, b, h, t0, w);
    case 5: return attend_group<T, 5>(a, b, h, t0, w);
    case 6: return attend_group<T, 6>(a, b, h, t0, w);
    case 7: return attend_group<T, 7>(a, b, h, t0, w);
    default: return attend_group<T, 8>(a, b, h, t0, w);
  }
}

template <KV T>
void attend_all(const Args& a) {
  const int64_t groups = (a.T + kMaxQ - 1) / kMaxQ, per = (a.T + groups - 1) / groups;  // balanced groups
  at::parallel_for(0, a.B * a.H, 1, [&](int64_t i0, int64_t i1) {
    Work w;
    w.Dp = (a.D + kL - 1) / kL * kL;
    w.q.assign(kMaxQ * w.Dp, 0.f);
    w.o.assign(kMaxQ * w.Dp, 0.f);
    w.q16.assign(kMaxQ * w.Dp, 0);
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t t0 = 0; t0 < a.T; t0 += per) attend_group_m<T>(a, i / a.H, i % a.H, t0, std::min(per, a.T - t0), w);
  });
}

KV kv_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return KV::F32;
    case at::kBFloat16: return KV::BF16;
    case at::kHalf: return KV::F16;
    case at::kChar: return KV::I8;
    default: TORCH_CHECK(false, "k/v must be float32, bfloat16, float16 or int8, got ", t.scalar_type());
  }
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
                            const at::Tensor& lengths, double scale) {
  TORCH_CHECK(q.dim() == 4 && q.device().is_cpu(), "q must be a 4-D CPU tensor [B, H, T, D]");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && k.sizes() == v.sizes() && k.device().is_cpu() && v.device().is_cpu(),
              "k and v must be 4-D CPU tensors of the same shape [B, H, S, D]");
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == D, "k/v [B, H, S, D] do not match q ", q.sizes());
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "k/v need unit stride along D");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "k and v must have the same dtype");
  const int64_t S = k.size(2);
  const KV kind = kv_of(k);
  Args a{};
  a.q = q.data_ptr(), a.qt = ft_of(q, "q");
  a.qsb = q.stride(0), a.qsh = q.stride(1), a.qst = q.stride(2), a.qsd = q.stride(3);
  const int64_t eb = k.element_size();
  a.k = static_cast<const char*>(k.data_ptr()), a.v = static_cast<const char*>(v.data_ptr());
  a.ksb = k.stride(0) * eb, a.ksh = k.stride(1) * eb, a.kss = k.stride(2) * eb;
  a.vsb = v.stride(0) * eb, a.vsh = v.stride(1) * eb, a.vss = v.stride(2) * eb;
  if (kind == KV::I8) {
    TORCH_CHECK(k_scale.has_value() && v_scale.has_value(), "an int8 cache needs k_scale and v_scale");
    for (const at::Tensor* sc : {&*k_scale, &*v_scale})
      TORCH_CHECK(sc->scalar_type() == at::kFloat && sc->dim() == 3 && sc->size(0) == B && sc->size(1) == H &&
                      sc->size(2) == S && sc->stride(2) == 1 && sc->device().is_cpu(),
                  "k_scale/v_scale must be float32 [B, H, S] with unit stride along S");
    a.kscale = k_scale->data_ptr<float>(), a.vscale = v_scale->data_ptr<float>();
    a.kcb = k_scale->stride(0), a.kch = k_scale->stride(1), a.vcb = v_scale->stride(0), a.vch = v_scale->stride(1);
    TORCH_CHECK(D <= kMaxInt8D, "an int8 cache needs D <= ", kMaxInt8D, " (int32 sums)");
  } else {
    TORCH_CHECK(!k_scale.has_value() && !v_scale.has_value(), "scales are for an int8 cache only");
  }
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.dim() == 2 && lengths.size(0) == B &&
                  lengths.size(1) == T && lengths.is_contiguous(),
              "lengths must be a contiguous int64 tensor [B, T]");
  a.len = lengths.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * T; ++i)
    TORCH_CHECK(a.len[i] >= 0 && a.len[i] <= S, "lengths must lie in [0, S = ", S, "], got ", a.len[i]);
  a.B = B, a.H = H, a.T = T, a.D = D, a.S = S, a.scale = static_cast<float>(scale);
  at::Tensor out = at::empty({B, T, H, D}, q.options());
  a.out = out.data_ptr(), a.ot = ft_of(out, "out");
  if (B * H * T * D == 0) return out;
  switch (kind) {
    case KV::F32: attend_all<KV::F32>(a); break;
    case KV::BF16: attend_all<KV::BF16>(a); break;
    case KV::F16: attend_all<KV::F16>(a); break;
    case KV::I8: attend_all<KV::I8>(a); break;
  }
  return out;
}

}  // namespace QK_NS
