// Causal self-attention for a prompt (prefill) on CPU, called from JAX through jax.ffi
// (shardinfer/kernels/attention.py).
//
//   out[b, t, h] = sum_s softmax_s(q[b, t, h] . k[b, s, h / G]) v[b, s, h / G]
//   over the keys s that query t sees: pos[b, s] <= pos[b, t] (and pos[b, t] - pos[b, s] <
//   window, for a sliding window).
//
// What XLA does with this (a [T, S] score matrix per head, its masked softmax, a second
// matmul) was about half of a 512-token prefill of SmolLM2 with GGUF block weights: it computes
// the masked future too, and its reductions and exp ran a few cycles per element. Here the
// keys come in groups of 32 and a group no query of a tile sees is never touched (causal: about
// half of them), and exp is a vector polynomial.
//
// Layouts (float32 unless said): q [B, T, H, D] (already scaled by 1/sqrt(D)); kt [B, KV, D, S]
// (the keys transposed: the KV cache's layout); v [B, KV, S, D]; pos int32 [B, T] with S == T;
// out [B, T, H, D]. H = KV * G, query head h uses kv head h / G. D must be a multiple of 64.
//
// Each output row depends only on its own query, keys and values: scores are sums over
// head_dim in order, weighted values sums over keys in order, unseen keys add exact zeros. So
// a row comes out the same bits in any batch, any tile and on any mesh. AVX-512 and AVX2 run
// the same 16-float vector code (prefill_attention_isa.h), so they agree too.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace shardinfer_attention {

constexpr int64_t kKeyGroup = 32;  // keys per group: the unit of skipping and of score tiles

struct Problem {
  int64_t B, T, S, S_pad, H, KV, G, D;
  int32_t window;                       // 0: none
  const float* q;                       // [B, T, H, D]
  const float* kt;                      // [B, KV, D, S_pad]
  const float* v;                       // [B, KV, S_pad, D]
  const int32_t* qpos;                  // [B, T]
  const int32_t* kpos;                  // [B, S_pad], INT32_MAX past S
  const int32_t* group_min;             // [B, S_pad / 32]: each key group's least position
  const int32_t* group_max;             // and its greatest
  float* out;                           // [B, T, H, D]
};

// Query rows [t0, t1) of batch row b against kv head h.
struct Item {
  int64_t b, h, t0, t1;
};

// Floats of scratch an item needs (RunItem's layout).
static int64_t ScratchFloats(const Problem& p, int64_t rows) {
  const int64_t n_vec = rows * p.G;
  return (n_vec + 8) * p.S_pad + n_vec + p.D + 8 * p.D + p.S_pad / kKeyGroup + 16;
}

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace avx2 {
constexpr int kQueries = 3;       // 3 queries x 32 keys: 12 ymm accumulators
constexpr int kValueQueries = 2;  // 2 queries x 32 columns: 8 ymm accumulators
constexpr int kValueCols = 2;
#include "prefill_attention_isa.h"
}  // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,avx512f"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f")
#endif
namespace avx512 {
constexpr int kQueries = 8;       // 8 queries x 32 keys: 16 zmm accumulators
constexpr int kValueQueries = 4;  // 4 queries x 64 columns: 16 zmm accumulators
constexpr int kValueCols = 4;
#include "prefill_attention_isa.h"
}  // namespace avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

using RunFn = void (*)(const Problem&, const Item&, float*);

// 0: neither (the CPU lacks AVX2 + FMA), 1: AVX2, 2: AVX-512F.
static int DetectIsa() {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return 0;
  return __builtin_cpu_supports("avx512f") ? 2 : 1;
}
static const int g_best_isa = DetectIsa();
static std::atomic<int> g_isa{g_best_isa};

// Work shared by the calling thread and helpers on XLA's intra-op pool, as in gguf_matmul.cc:
// items are claimed from a counter, the caller waits only for items a helper claimed, and a
// helper that starts after the call ended finds nothing left (it holds only this).
struct Shared {
  Problem p;
  RunFn run;
  std::vector<Item> items;
  int64_t scratch_floats = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Work() {
    std::vector<float> scratch;
    int64_t mine = 0;
    for (;;) {
      const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= static_cast<int64_t>(items.size())) break;
      if (scratch.empty()) scratch.resize(scratch_floats);
      run(p, items[i], scratch.data());
      ++mine;
    }
    if (mine) done.fetch_add(mine, std::memory_order_release);
  }
};

static void Compute(const Problem& p, RunFn run, ffi::ThreadPool* pool) {
  auto sh = std::make_shared<Shared>();
  sh->p = p;
  sh->run = run;
  // Items of a few rows, latest rows first: under a causal mask they see the most keys, so
  // the long items start early and the short ones fill in at the end.
  const int64_t rows = std::max<int64_t>(1, 24 / p.G);
  for (int64_t t0 = (p.T - 1) / rows * rows; t0 >= 0; t0 -= rows)
    for (int64_t b = 0; b < p.B; ++b)
      for (int64_t h = 0; h < p.KV; ++h) sh->items.push_back({b, h, t0, std::min(p.T, t0 + rows)});
  sh->scratch_floats = ScratchFloats(p, rows);
  const int64_t work = p.B * p.H * p.T * p.S * p.D;
  int64_t helpers = 0;
  if (pool != nullptr && work >= (int64_t{1} << 20))
    helpers = std::min<int64_t>(pool->num_threads(), static_cast<int64_t>(sh->items.size()) - 1);
  for (int64_t i = 0; i < helpers; ++i) pool->Schedule([sh] { sh->Work(); });
  sh->Work();
  int spins = 0;
  while (sh->done.load(std::memory_order_acquire) < static_cast<int64_t>(sh->items.size())) {
    if (++spins < 4096) {
      _mm_pause();
    } else {
      std::this_thread::yield();
    }
  }
}

static ffi::Error Run(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> kt,
                      ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> pos,
                      ffi::ResultBuffer<ffi::F32> out, int32_t window) {
  const int isa = g_isa.load(std::memory_order_relaxed);
  if (isa == 0)
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                      "shardinfer prefill attention: this CPU lacks AVX2+FMA");
  const auto qd = q.dimensions(), kd = kt.dimensions(), vd = v.dimensions(),
             pd = pos.dimensions(), od = out->dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || pd.size() != 2 || od.size() != 4)
    return ffi::Error::InvalidArgument(
        "shardinfer prefill attention: q, kt, v, pos, out must be 4-, 4-, 4-, 2-, 4-D");
  Problem p;
  p.B = qd[0], p.T = qd[1], p.H = qd[2], p.D = qd[3], p.KV = kd[1], p.S = kd[3];
  if (p.KV == 0 || p.H % p.KV || kd[0] != p.B || kd[2] != p.D || p.S != p.T ||
      vd[0] != p.B || vd[1] != p.KV || vd[2] != p.S || vd[3] != p.D || pd[0] != p.B ||
      pd[1] != p.T || od[0] != p.B || od[1] != p.T || od[2] != p.H || od[3] != p.D)
    return ffi::Error::InvalidArgument("shardinfer prefill attention: shapes do not agree");
  if (p.D % 64)
    return ffi::Error::InvalidArgument(
        "shardinfer prefill attention: head_dim must be a multiple of 64");
  if (window < 0)
    return ffi::Error::InvalidArgument("shardinfer prefill attention: window must be >= 0");
  if (p.B == 0 || p.T == 0 || p.H == 0) return ffi::Error::Success();
  p.G = p.H / p.KV;
  p.window = window;
  p.S_pad = (p.S + kKeyGroup - 1) / kKeyGroup * kKeyGroup;
  p.q = q.typed_data();
  p.qpos = pos.typed_data();
  p.out = out->typed_data();
  // Keys padded to whole groups (copies only when S is not a multiple of 32): the padding is
  // never seen (position INT32_MAX) and is zero, so it adds exact zeros.
  const int64_t n_groups = p.S_pad / kKeyGroup;
  std::vector<int32_t> kpos(p.B * p.S_pad, INT32_MAX), gmin(p.B * n_groups),
      gmax(p.B * n_groups);
  std::vector<float> kt_pad, v_pad;
  for (int64_t b = 0; b < p.B; ++b) {
    std::memcpy(&kpos[b * p.S_pad], p.qpos + b * p.T, sizeof(int32_t) * p.S);
    for (int64_t g = 0; g < n_groups; ++g) {
      const int32_t* first = &kpos[b * p.S_pad + g * kKeyGroup];
      const int64_t n = std::min(kKeyGroup, p.S - g * kKeyGroup);
      gmin[b * n_groups + g] = *std::min_element(first, first + n);
      gmax[b * n_groups + g] = *std::max_element(first, first + n);
    }
  }
  p.kpos = kpos.data();
  p.group_min = gmin.data();
  p.group_max = gmax.data();
  if (p.S_pad == p.S) {
    p.kt = kt.typed_data();
    p.v = v.typed_data();
  } else {
    kt_pad.assign(p.B * p.KV * p.D * p.S_pad, 0.0f);
    v_pad.assign(p.B * p.KV * p.S_pad * p.D, 0.0f);
    for (int64_t bh = 0; bh < p.B * p.KV; ++bh) {
      for (int64_t d = 0; d < p.D; ++d)
        std::memcpy(&kt_pad[(bh * p.D + d) * p.S_pad], kt.typed_data() + (bh * p.D + d) * p.S,
                    sizeof(float) * p.S);
      std::memcpy(&v_pad[bh * p.S_pad * p.D], v.typed_data() + bh * p.S * p.D,
                  sizeof(float) * p.S * p.D);
    }
    p.kt = kt_pad.data();
    p.v = v_pad.data();
  }
  Compute(p, isa == 2 ? avx512::RunItem : avx2::RunItem, &pool);
  return ffi::Error::Success();
}

}  // namespace shardinfer_attention

namespace sa = shardinfer_attention;

#pragma GCC visibility push(default)
XLA_FFI_DEFINE_HANDLER_SYMBOL(ShardinferPrefillAttention, sa::Run,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("window"));
#pragma GCC visibility pop

extern "C" {
// The instruction set the attention uses: 0 none, 1 AVX2, 2 AVX-512F.
__attribute__((visibility("default"))) int ShardinferAttentionIsa() { return sa::g_isa.load(); }
__attribute__((visibility("default"))) int ShardinferAttentionBestIsa() { return sa::g_best_isa; }
// Tests: use instruction set `isa` (0 < isa <= the best); returns whether it was taken.
__attribute__((visibility("default"))) int ShardinferAttentionSetIsa(int isa) {
  if (isa < 1 || isa > sa::g_best_isa) return 0;
  sa::g_isa.store(isa);
  return 1;
}
}
