// Attention on CPU, called from JAX through jax.ffi (shardinfer/kernels/attention.py): the
// causal self-attention of a prompt (prefill), and a decode step's one query per row against
// the KV cache (see "decode" below).
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
// the same 16-float vector code (attention_isa.h), so they agree too.
//
// Decode: q [B, H, D] (one query per row, scaled), the cache's kt [B, KV, D, S] and v
// [B, KV, S, D] (slot s holds position s), this step's k_new, v_new [B, KV, D] and pos int32
// [B] -> out [B, H, D]. Row b attends the slots before pos[b] (within the window) and its own
// new key at pos[b], reading nothing of the cache past pos[b]: XLA's formulation reads every
// slot of the cache's capacity, and at batch 32 its multiply-and-reduce was a third of a step.
// A decode row gets the bits the prefill gives the same row of the whole prompt.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <type_traits>
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

// Decode: one query row per batch row against the cache (RunDecodeItem in attention_isa.h).
struct DecodeProblem {
  int64_t B, S, KV, G, D;
  int32_t window;          // 0: none
  const float* q;          // [B, KV * G, D]
  const float* kt;         // [B, KV, D, S]: the cache's keys
  const float* v;          // [B, KV, S, D]: its values
  const float* k_new;      // [B, KV, D]: this step's key and value, at slot pos
  const float* v_new;      // [B, KV, D]
  const int32_t* pos;      // [B]
  const int32_t* slot_pos; // [S rounded up to 32]: 0, 1, 2, ... (slot s holds position s)
  float* out;              // [B, KV * G, D]
};

// Floats of scratch a decode item needs (RunDecodeItem's layout; kQueries <= 8,
// kValueQueries <= 4 in every variant).
static int64_t DecodeScratchFloats(const DecodeProblem& p) {
  const int64_t s_seen = (p.S + kKeyGroup - 1) / kKeyGroup * kKeyGroup;
  return (p.G + 4) * s_seen + p.G + 8 * p.D + 2 * kKeyGroup * p.D + p.D + s_seen / kKeyGroup +
         16;
}

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
#include "attention_isa.h"
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
#include "attention_isa.h"
}  // namespace avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

using RunFn = void (*)(const Problem&, const Item&, float*);
using DecodeFn = void (*)(const DecodeProblem&, int64_t, int64_t, float*);

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
  std::function<void(int64_t, float*)> run;  // item i, with its scratch
  int64_t n_items = 0;
  int64_t scratch_floats = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Work() {
    std::vector<float> scratch;
    int64_t mine = 0;
    for (;;) {
      const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n_items) break;
      if (scratch.empty()) scratch.resize(scratch_floats);
      run(i, scratch.data());
      ++mine;
    }
    if (mine) done.fetch_add(mine, std::memory_order_release);
  }
};

// Runs items 0 .. n_items - 1 on the calling thread and, when `parallel`, helpers.
static void RunItems(std::shared_ptr<Shared> sh, bool parallel, ffi::ThreadPool* pool) {
  int64_t helpers = 0;
  if (pool != nullptr && parallel)
    helpers = std::min<int64_t>(pool->num_threads(), sh->n_items - 1);
  for (int64_t i = 0; i < helpers; ++i) pool->Schedule([sh] { sh->Work(); });
  sh->Work();
  int spins = 0;
  while (sh->done.load(std::memory_order_acquire) < sh->n_items) {
    if (++spins < 4096) {
      _mm_pause();
    } else {
      std::this_thread::yield();
    }
  }
}

static void Compute(const Problem& p, RunFn run, ffi::ThreadPool* pool) {
  // Items of a few rows, latest rows first: under a causal mask they see the most keys, so
  // the long items start early and the short ones fill in at the end.
  std::vector<Item> items;
  const int64_t rows = std::max<int64_t>(1, 24 / p.G);
  for (int64_t t0 = (p.T - 1) / rows * rows; t0 >= 0; t0 -= rows)
    for (int64_t b = 0; b < p.B; ++b)
      for (int64_t h = 0; h < p.KV; ++h) items.push_back({b, h, t0, std::min(p.T, t0 + rows)});
  auto sh = std::make_shared<Shared>();
  sh->n_items = static_cast<int64_t>(items.size());
  sh->scratch_floats = ScratchFloats(p, rows);
  sh->run = [p, run, items = std::move(items)](int64_t i, float* scratch) {
    run(p, items[i], scratch);
  };
  RunItems(sh, p.B * p.H * p.T * p.S * p.D >= (int64_t{1} << 20), pool);
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


// ---- decode -------------------------------------------------------------------------------------

static ffi::Error RunDecode(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                            ffi::Buffer<ffi::F32> kt, ffi::Buffer<ffi::F32> v,
                            ffi::Buffer<ffi::F32> k_new, ffi::Buffer<ffi::F32> v_new,
                            ffi::Buffer<ffi::S32> pos, ffi::ResultBuffer<ffi::F32> out,
                            int32_t window) {
  const int isa = g_isa.load(std::memory_order_relaxed);
  if (isa == 0)
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                      "shardinfer decode attention: this CPU lacks AVX2+FMA");
  const auto qd = q.dimensions(), kd = kt.dimensions(), vd = v.dimensions(),
             knd = k_new.dimensions(), vnd = v_new.dimensions(), pd = pos.dimensions(),
             od = out->dimensions();
  if (qd.size() != 3 || kd.size() != 4 || vd.size() != 4 || knd.size() != 3 ||
      vnd.size() != 3 || pd.size() != 1 || od.size() != 3)
    return ffi::Error::InvalidArgument(
        "shardinfer decode attention: q, kt, v, k_new, v_new, pos, out must be 3-, 4-, 4-, 3-, "
        "3-, 1-, 3-D");
  DecodeProblem p;
  p.B = qd[0], p.D = qd[2], p.KV = kd[1], p.S = kd[3];
  const int64_t H = qd[1];
  if (p.KV == 0 || H % p.KV || kd[0] != p.B || kd[2] != p.D || vd[0] != p.B ||
      vd[1] != p.KV || vd[2] != p.S || vd[3] != p.D || knd[0] != p.B || knd[1] != p.KV ||
      knd[2] != p.D || vnd[0] != p.B || vnd[1] != p.KV || vnd[2] != p.D || pd[0] != p.B ||
      od[0] != p.B || od[1] != H || od[2] != p.D)
    return ffi::Error::InvalidArgument("shardinfer decode attention: shapes do not agree");
  if (p.D % 64)
    return ffi::Error::InvalidArgument(
        "shardinfer decode attention: head_dim must be a multiple of 64");
  if (window < 0)
    return ffi::Error::InvalidArgument("shardinfer decode attention: window must be >= 0");
  if (p.B == 0 || H == 0) return ffi::Error::Success();
  if (p.S == 0) {
    std::fill_n(out->typed_data(), p.B * H * p.D, 0.0f);
    return ffi::Error::Success();
  }
  p.G = H / p.KV;
  p.window = window;
  p.q = q.typed_data();
  p.kt = kt.typed_data();
  p.v = v.typed_data();
  p.k_new = k_new.typed_data();
  p.v_new = v_new.typed_data();
  p.pos = pos.typed_data();
  p.out = out->typed_data();
  std::vector<int32_t> slot_pos((p.S + kKeyGroup - 1) / kKeyGroup * kKeyGroup);
  for (size_t s = 0; s < slot_pos.size(); ++s) slot_pos[s] = static_cast<int32_t>(s);
  p.slot_pos = slot_pos.data();
  // One item per (batch row, kv head); split over threads when the keys read are many.
  int64_t keys_read = 0;
  for (int64_t b = 0; b < p.B; ++b)
    keys_read += std::min<int64_t>(p.S, std::max<int32_t>(p.pos[b], 0) + 1);
  const DecodeFn run = isa == 2 ? avx512::RunDecodeItem : avx2::RunDecodeItem;
  auto sh = std::make_shared<Shared>();
  sh->n_items = p.B * p.KV;
  sh->scratch_floats = DecodeScratchFloats(p);
  sh->run = [p, run](int64_t i, float* scratch) { run(p, i / p.KV, i % p.KV, scratch); };
  RunItems(sh, keys_read * H * p.D >= (int64_t{1} << 18), &pool);
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
XLA_FFI_DEFINE_HANDLER_SYMBOL(ShardinferDecodeAttention, sa::RunDecode,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
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
