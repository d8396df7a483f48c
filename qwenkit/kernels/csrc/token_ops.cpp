// Token-wise ops of a transformer block that PyTorch runs as a chain of small kernels: RMSNorm (8 ops in
// PyTorch) and rotary + the KV cache write (6 ops for rotary, 2 index writes for a float cache, ~20 ops for
// an int8 one). At decode each of those ops costs more in dispatch than in arithmetic, once per layer and token.
// Both keep the rounding steps of the official formulas (fp32 math, casts where the model casts).
#include <cmath>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include "common.h"

namespace QK_NS {
namespace {

// No multiply-add contraction: rotary's x * cos + roll(x) * sin is two rounded products and a rounded sum in
// PyTorch, and so it is here (the cache then holds the same keys with and without these kernels). Not inlined:
// a function inlined into another is compiled with the caller's options.
#define QK_EXACT __attribute__((noinline, optimize("fp-contract=off")))

// v rounded to the precision of t (fp32 unchanged).
QK_INLINE float round_to(float v, FT t) {
  switch (t) {
    case FT::F32: return v;
    case FT::BF16: return bf16_to_f32(f32_to_bf16(v));
    default: return _cvtsh_ss(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT));
  }
}

QK_EXACT void rms_row(const void* x, FT t, int64_t i, int64_t C, const float* w, float eps, float* xf, void* out) {
  load_f32(x, t, i, C, xf);
  // sum of squares: each square rounded, then summed (pow(2).mean()); the order of the sum is this kernel's
  vf acc[4] = {fzero(), fzero(), fzero(), fzero()};
  int64_t c = 0;
  for (; c + 4 * kL <= C; c += 4 * kL)
    for (int j = 0; j < 4; ++j) {
      const vf v = fload(xf + c + j * kL);
      acc[j] = fadd(acc[j], fmul(v, v));
    }
  float ss = freduce_add(fadd(fadd(acc[0], acc[1]), fadd(acc[2], acc[3])));
  for (; c < C; ++c) ss += xf[c] * xf[c];
  const float r = 1.f / std::sqrt(ss / float(C) + eps);
  for (c = 0; c < C; ++c) st1(out, t, i + c, round_to(xf[c] * r, t) * w[c]);
}

// The rotary of one head vector (D values from element `i` of x, type t) -> fp32 `o`: o = x * cos + roll(x, D/2)
// * signed_sin, times `scale` when it is not 1 (logn), as apply_rotary in the model.
QK_EXACT void rotate(const void* x, FT t, int64_t i, int64_t D, const float* cs, const float* sn, float scale,
                     float* xf, float* o) {
  load_f32(x, t, i, D, xf);
  const int64_t h = D / 2;
  for (int64_t d = 0; d < D; ++d) {
    const float a = xf[d] * cs[d], b = xf[d < h ? d + h : d - h] * sn[d];
    o[d] = a + b;
  }
  if (scale != 1.f)
    for (int64_t d = 0; d < D; ++d) o[d] *= scale;
}

// One token's key or value head (fp32 `src`, already rounded to the activation dtype) into the cache: as it is
// (float caches) or as int8 with one scale, symmetric with rounding (KVCache's quantize_int8).
QK_EXACT void store_kv(const float* src, int64_t D, void* cache, FT ct, bool int8, int64_t i, float* scale) {
  if (!int8) {
    for (int64_t d = 0; d < D; ++d) st1(cache, ct, i + d, src[d]);
    return;
  }
  float amax = 0.f;
  bool nan = false;
  for (int64_t d = 0; d < D; ++d) nan |= std::isnan(src[d]), amax = std::max(amax, std::fabs(src[d]));
  const float s = nan ? std::numeric_limits<float>::quiet_NaN() : amax / 127.f;
  const float div = std::max(s, std::numeric_limits<float>::min());  // clamp_min(tiny): guards s == 0 only
  int8_t* q = static_cast<int8_t*>(cache) + i;
  for (int64_t d = 0; d < D; ++d) {
    const float v = std::nearbyint(src[d] / div);  // round half to even, as torch.round
    q[d] = int8_t(std::isnan(v) ? 0 : std::clamp(v, -127.f, 127.f));
  }
  *scale = s;
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() >= 1, "x must be a contiguous CPU tensor");
  const FT t = ft_of(x, "x");
  const int64_t C = x.size(-1), M = C ? x.numel() / C : 0;
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == C && weight.is_contiguous() &&
                  weight.scalar_type() == x.scalar_type(),
              "weight must be a contiguous [C] tensor of x's dtype");
  at::Tensor out = at::empty_like(x);
  std::vector<float> w(C);
  load_f32(weight.data_ptr(), t, 0, C, w.data());
  const void* xp = x.data_ptr();
  void* op = out.data_ptr();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    std::vector<float> xf(C);
    for (int64_t m = m0; m < m1; ++m) rms_row(xp, t, m * C, C, w.data(), float(eps), xf.data(), op);
  });
  return out;
}

// qkv [N, 3, H, D] (N tokens, contiguous), cos / signed sin [N, D] fp32, q_scale [N] fp32 or none; token n is
// row rows[n] at position positions[n]. Rotates q and k as apply_rotary (k's scale is 1), writes k and v into
// the layer's cache k_cache / v_cache [B, H, S, D] (last dim contiguous; int8 with fp32 scales [B, H, S]), and
// returns the rotated q [N, H, D] in qkv's dtype.
at::Tensor rotary_kv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                     const std::optional<at::Tensor>& q_scale, const at::Tensor& rows, const at::Tensor& positions,
                     at::Tensor& k_cache, at::Tensor& v_cache, const std::optional<at::Tensor>& k_scale,
                     const std::optional<at::Tensor>& v_scale) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.dim() == 4 && qkv.size(1) == 3 && qkv.is_contiguous(),
              "qkv must be a contiguous CPU tensor [N, 3, H, D]");
  const FT t = ft_of(qkv, "qkv");
  const int64_t N = qkv.size(0), H = qkv.size(2), D = qkv.size(3);
  TORCH_CHECK(D % 2 == 0, "head_dim must be even");
  for (const at::Tensor* c : {&cos, &sin})
    TORCH_CHECK(c->scalar_type() == at::kFloat && c->is_contiguous() && c->dim() == 2 && c->size(0) == N &&
                    c->size(1) == D,
                "cos and sin must be contiguous fp32 [N, D]");
  for (const at::Tensor* r : {&rows, &positions})
    TORCH_CHECK(r->scalar_type() == at::kLong && r->is_contiguous() && r->numel() == N,
                "rows and positions must be contiguous int64 [N]");
  if (q_scale.has_value())
    TORCH_CHECK(q_scale->scalar_type() == at::kFloat && q_scale->is_contiguous() && q_scale->numel() == N,
                "q_scale must be contiguous fp32 [N]");
  const bool int8 = k_cache.scalar_type() == at::kChar;
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type() && k_cache.dim() == 4 && v_cache.dim() == 4 &&
                  k_cache.sizes() == v_cache.sizes() && k_cache.size(1) == H && k_cache.size(3) == D &&
                  k_cache.stride(3) == 1 && v_cache.stride(3) == 1 && k_cache.device().is_cpu() &&
                  v_cache.device().is_cpu(),
              "k_cache and v_cache must be CPU tensors [B, H, S, D] of one dtype, last dim contiguous");
  const FT ct = int8 ? FT::F32 : ft_of(k_cache, "k_cache");
  if (int8)
    for (const auto* s : {&k_scale, &v_scale})
      TORCH_CHECK(s->has_value() && (*s)->scalar_type() == at::kFloat && (*s)->dim() == 3 &&
                      (*s)->size(0) == k_cache.size(0) && (*s)->size(1) == H && (*s)->size(2) == k_cache.size(2),
                  "an int8 cache needs fp32 scales [B, H, S]");
  const int64_t B = k_cache.size(0), S = k_cache.size(2);
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n)
    TORCH_CHECK(rp[n] >= 0 && rp[n] < B && pp[n] >= 0 && pp[n] < S, "token ", n, " (row ", rp[n], ", position ",
                pp[n], ") is outside the cache [", B, ", ", S, "]");
  at::Tensor q = at::empty({N, H, D}, qkv.options());
  const void* xp = qkv.data_ptr();
  void* qp = q.data_ptr();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const float* qs = q_scale.has_value() ? q_scale->data_ptr<float>() : nullptr;
  void* kc = k_cache.data_ptr();
  void* vc = v_cache.data_ptr();
  float* ksp = int8 ? k_scale->data_ptr<float>() : nullptr;
  float* vsp = int8 ? v_scale->data_ptr<float>() : nullptr;
  const auto kst = k_cache.strides(), vst = v_cache.strides();
  const auto kss = int8 ? k_scale->strides() : kst, vss = int8 ? v_scale->strides() : vst;
  at::parallel_for(0, N * H, 64, [&](int64_t i0, int64_t i1) {
    std::vector<float> xf(D), o(D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / H, h = i % H, b = rp[n], p = pp[n];
      const float* cs = cp + n * D;
      const float* sn = sp + n * D;
      const int64_t base = n * 3 * H * D + h * D;  // q of (n, h); k at + H * D, v at + 2 H * D
      rotate(xp, t, base, D, cs, sn, qs ? qs[n] : 1.f, xf.data(), o.data());
      for (int64_t d = 0; d < D; ++d) st1(qp, t, (n * H + h) * D + d, o[d]);
      rotate(xp, t, base + H * D, D, cs, sn, 1.f, xf.data(), o.data());
      for (int64_t d = 0; d < D; ++d) o[d] = round_to(o[d], t);  // k as the model's dtype, then cached
      store_kv(o.data(), D, kc, ct, int8, b * kst[0] + h * kst[1] + p * kst[2],
               int8 ? ksp + b * kss[0] + h * kss[1] + p * kss[2] : nullptr);
      load_f32(xp, t, base + 2 * H * D, D, xf.data());
      store_kv(xf.data(), D, vc, ct, int8, b * vst[0] + h * vst[1] + p * vst[2],
               int8 ? vsp + b * vss[0] + h * vss[1] + p * vss[2] : nullptr);
    }
  });
  return q;
}

}  // namespace QK_NS
