// GGUF block-format matmul kernels (q8_0, q4_0, q4_1) for XLA:CPU, called from JAX through
// jax.ffi (shardinfer/kernels/__init__.py).
//
//   y[M, N] = x[M, K] @ w[N, K].T with w in GGUF blocks of 32 along K, computed as llama.cpp
//   does: x is rounded to int8 blocks (one float32 scale per block of 32), each block pair's dot
//   is exact int32, and the float work is per block: d_w * d_x * idot (+ m_w * d_x * sum(x_q)).
//
// Layouts (row-major, what the JAX side stores; one plane per field rather than GGUF's
// interleaved 18/20/34-byte blocks):
//   q8_0: qs int8 [N, K/32, 32],  d f16 [N, K/32]                 w = d * qs
//   q4_0: qs uint8 [N, K/32, 16], d f16 [N, K/32]                 w = d * (nibble - 8)
//   q4_1: qs uint8 [N, K/32, 16], d, m f16 [N, K/32]              w = d * nibble + m
//   (q4: byte i of a block holds element i in its low nibble, element i + 16 in its high one.)
//
// Instruction sets are chosen at run time (`DetectIsas`): AVX-512 VNNI on 256-bit vectors
// (avx512vnni + avx512vl), AVX-VNNI, or AVX2 + FMA + F16C. The per-set code is
// gguf_matmul_isa.h, compiled three times with different targets; this file needs no -march.
// Where the CPU has AMX-INT8 (and Linux grants the tile state), the row-tiled path runs on AMX
// tiles instead (gguf_matmul_amx.h), with the same results to the bit.
//
// Two paths (gguf_matmul_isa.h), chosen per call by the caller (the `path` attribute) or else by
// the number of x rows (g_gemm_min_rows, 16):
// decode tiles (4 weight rows x 2 x rows, x in a pair layout, blocks reduced with horizontal
// adds; the weights read once per call, which is what matters when they come from memory), and
// for many rows the row-tiled path: 8 weight rows unpacked once into dpbusd's lane-per-row layout
// and used against every x row (x in its natural layout). Same rounding, same exact block dots,
// but the float sums over blocks go in another order, so a row's last bits depend on the path:
// a caller that needs them not to depend on how many rows share a call pins the path.
//
// Threads: the N rows are split into chunks, claimed from an atomic counter by the calling
// thread and by helpers scheduled on XLA's intra-op thread pool (ffi::ThreadPool); the caller
// waits only for chunks a helper has claimed, so a pool with no idle thread cannot deadlock it
// (it then does all the work itself), and small problems never touch the pool.

#include <cpuid.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

// AVX-VNNI (VEX-encoded dpbusd) needs GCC 11 / clang 12; older compilers build the other two.
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11)
#define SI_HAVE_AVXVNNI 1
#else
#define SI_HAVE_AVXVNNI 0
#endif
// AMX tiles (tdpbusd) need the same compilers, and Linux to grant a process their state.
#if SI_HAVE_AVXVNNI && defined(__linux__)
#define SI_HAVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#else
#define SI_HAVE_AMX 0
#endif

namespace ffi = xla::ffi;

namespace shardinfer_gguf {

enum class Fmt : int { kQ8_0 = 0, kQ4_0 = 1, kQ4_1 = 2 };

// How rounded x is laid out (gguf_matmul_isa.h): kNatural for the tests, a pair layout per
// weight family for the kernels.
enum class XLayout : int { kNatural = 0, kQ4Pairs = 1, kQ8Pairs = 2 };

// Everything one call's tiles read: the weights as given, x rounded to blocks, the output.
struct Problem {
  Fmt fmt;
  int64_t m_total, n_total, nb;  // x rows, output columns (weight rows), blocks per row
  int64_t nb_pad;                // nb rounded up to 8: row stride of dx, xsum, sx
  const uint8_t* qs;
  int64_t qs_row_bytes;  // 32 * nb (q8_0) or 16 * nb (q4)
  const uint16_t* d;     // fp16 bits
  const uint16_t* m;     // fp16 bits (q4_1) or null
  const int8_t* xq;      // [M, xq_row_bytes]: 32 * nb rounded up to 64, in a pair layout
  int64_t xq_row_bytes;
  const float* dx;       // [M, nb_pad], in groups of 8 in lane order [0 2 4 6 1 3 5 7],
  const int32_t* xsum;   //   zero-padded
  const float* sx;       // dx * xsum
  float* y;              // [M, N]
  bool gemm;             // the row-tiled path (x in XLayout::kNatural), else the decode tiles
  bool decode_order = false;  // gemm, but adding blocks as the decode tiles do (their bits)
  // x rounded and re-laid out once per call for every thread's chunks (the AMX path:
  // gguf_matmul_amx.h `prepare`), or null.
  const unsigned char* xpack = nullptr;
  const float* x = nullptr;  // x as given [M, 32 nb] (the AMX-BF16 path rounds it itself)
};

// fn(std::integral_constant<Fmt, F>{}) for the format f: the one switch from a run-time
// format to the per-format templates of every path.
template <typename Fn>
inline void WithFormat(Fmt f, Fn&& fn) {
  switch (f) {
    case Fmt::kQ8_0:
      fn(std::integral_constant<Fmt, Fmt::kQ8_0>{});
      break;
    case Fmt::kQ4_0:
      fn(std::integral_constant<Fmt, Fmt::kQ4_0>{});
      break;
    case Fmt::kQ4_1:
      fn(std::integral_constant<Fmt, Fmt::kQ4_1>{});
      break;
  }
}

}  // namespace shardinfer_gguf

// ---- the three instruction-set variants -------------------------------------------------------

namespace shardinfer_gguf {

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
#define SI_ISA_NS isa_avx2
#define SI_ISA_VNNI 0
#define SI_ISA_EVEX 0
#define SI_ISA_ROWS 4
#define SI_ISA_COLS 2
#include "gguf_matmul_isa.h"
#undef SI_ISA_NS
#undef SI_ISA_VNNI
#undef SI_ISA_EVEX
#undef SI_ISA_ROWS
#undef SI_ISA_COLS
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if SI_HAVE_AVXVNNI
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avxvnni"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
#endif
#define SI_ISA_NS isa_avxvnni
#define SI_ISA_VNNI 1
#define SI_ISA_EVEX 0
#define SI_ISA_ROWS 4
#define SI_ISA_COLS 2
#include "gguf_matmul_isa.h"
#undef SI_ISA_NS
#undef SI_ISA_VNNI
#undef SI_ISA_EVEX
#undef SI_ISA_ROWS
#undef SI_ISA_COLS
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // SI_HAVE_AVXVNNI

#if defined(__clang__)
#pragma clang attribute push( \
    __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni"))), \
    apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")
#endif
#define SI_ISA_NS isa_avx512vnni
#define SI_ISA_VNNI 1
#define SI_ISA_EVEX 1
#define SI_ISA_ROWS 4
#define SI_ISA_COLS 2
#include "gguf_matmul_isa.h"
#undef SI_ISA_NS
#undef SI_ISA_VNNI
#undef SI_ISA_EVEX
#undef SI_ISA_ROWS
#undef SI_ISA_COLS
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if SI_HAVE_AMX
#if defined(__clang__)
#pragma clang attribute push( \
    __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni,amx-tile,amx-int8,amx-bf16,avx512bf16"))), \
    apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni,amx-tile,amx-int8,amx-bf16,avx512bf16")
#endif
#include "gguf_matmul_amx.h"
#include "gguf_matmul_amx_bf16.h"
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // SI_HAVE_AMX

// ---- dispatch ---------------------------------------------------------------------------------

enum Isa : int { kNone = 0, kAvx2 = 1, kAvxVnni = 2, kAvx512Vnni = 3, kAmx = 4, kAmxBf16 = 5 };

// AMX-TILE and AMX-INT8, the OS saving tile state (XCR0 bits 17, 18), and Linux granting this
// process the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA).
static bool HaveAmx(unsigned xcr0_lo) {
#if SI_HAVE_AMX
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  if (!((d & (1u << 24)) && (d & (1u << 25)))) return false;
  if ((xcr0_lo & 0x60000) != 0x60000) return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  (void)xcr0_lo;
  return false;
#endif
}

// CPUID and XGETBV directly (GCC's and clang's __builtin_cpu_supports differ in which names they
// know): the instructions, and the OS saving the registers they use. A bit (1 << isa) for each
// instruction set this CPU can run. They are not nested: AMD's Zen 4 has AVX-512 VNNI but not
// the VEX-encoded AVX-VNNI, so "below the best" does not mean "supported".
static unsigned DetectIsas() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
  const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28),
             f16c = c & (1u << 29);
  if (!(fma && osxsave && avx && f16c)) return 0;
  unsigned xlo, xhi;
  __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
  (void)xhi;
  if ((xlo & 0x6) != 0x6) return 0;  // the OS saves XMM and YMM state
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
  if (!(b & (1u << 5))) return 0;  // AVX2
  unsigned isas = 1u << kAvx2;
  const bool avx512 = (b & (1u << 16)) && (b & (1u << 30)) && (b & (1u << 31)) &&  // F BW VL
                      (c & (1u << 11)) &&                                           // VNNI
                      (xlo & 0xE6) == 0xE6;  // and the OS saves opmask and ZMM state
  const bool amx_bf16 = d & (1u << 22);  // CPUID 7.0 EDX
  unsigned a1 = 0, b1, c1, d1;
  const bool leaf_7_1 = __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1);
  const bool avx512_bf16 = leaf_7_1 && (a1 & (1u << 5));
#if SI_HAVE_AVXVNNI
  if (leaf_7_1 && (a1 & (1u << 4))) isas |= 1u << kAvxVnni;
#endif
  if (avx512) {
    isas |= 1u << kAvx512Vnni;
    if (HaveAmx(xlo)) {
      isas |= 1u << kAmx;
      if (amx_bf16 && avx512_bf16) isas |= 1u << kAmxBf16;
    }
  }
  return isas;
}

static int BestOf(unsigned isas) {
  int best = kNone;
  for (int isa = kAvx2; isa <= kAmxBf16; ++isa)
    if (isas & (1u << isa)) best = isa;
  return best;
}

static const unsigned g_isas = DetectIsas();
static const int g_best_isa = BestOf(g_isas);
static std::atomic<int> g_isa{g_best_isa};
static std::atomic<int> g_max_threads{0};  // 0: the pool's size (+ the calling thread)
// Below this many block dots (N * K/32 * M) a call stays on the calling thread.
static std::atomic<int64_t> g_parallel_min{4096};
// Calls with at least this many x rows take the row-tiled path (gguf_matmul_isa.h); measured
// with benchmarks/kernels.py (section "prefill"): below it the decode tiles win.
constexpr int64_t kGemmMinRowsDefault = 16;
static std::atomic<int64_t> g_gemm_min_rows{kGemmMinRowsDefault};
// Calls pinned to the decode tiles' bits (path kPathFewRows) with at least this many x rows
// run the row-tiled loops in the tiles' order of sums instead (the same bits, the weights
// unpacked once for all rows).
constexpr int64_t kDecodeGemmMinRowsDefault = 32;  // 1.57x at 32 rows, slower at 16 (up projection)
static std::atomic<int64_t> g_decode_gemm_min_rows{kDecodeGemmMinRowsDefault};

struct Kernels {
  void (*quantize)(const float*, int64_t, int64_t, XLayout, const Problem&);
  void (*run)(const Problem&, int64_t, int64_t);
  void (*prepare)(Problem&) = nullptr;  // after quantize, before the chunks run (may be null)
  bool gemm_from_x = false;  // the row-tiled path reads x as given: no rounding to int8 blocks
};

static Kernels KernelsFor(int isa) {
  switch (isa) {
#if SI_HAVE_AMX
    case kAmxBf16:  // the row-tiled path in bfloat16 on tiles (from x as given); decode as AVX-512
      return {isa_avx512vnni::quantize_rows, isa_amx_bf16::run, isa_amx_bf16::prepare, true};
    case kAmx:  // the row-tiled path on tiles; x's rounding and the decode tiles as AVX-512's
      return {isa_avx512vnni::quantize_rows, isa_amx::run, isa_amx::prepare};
#endif
    case kAvx512Vnni:
      return {isa_avx512vnni::quantize_rows, isa_avx512vnni::run};
#if SI_HAVE_AVXVNNI
    case kAvxVnni:
      return {isa_avxvnni::quantize_rows, isa_avxvnni::run};
#endif
    default:
      return {isa_avx2::quantize_rows, isa_avx2::run};
  }
}

// ---- scratch and threads ----------------------------------------------------------------------

// x rounded to blocks: a per-thread buffer that only grows (the calling thread owns it for the
// call; helpers read it while the caller waits for them).
struct Scratch {
  std::vector<unsigned char> bytes;
  void* Get(size_t n) {
    if (bytes.size() < n + 64) bytes.resize(n + 64);
    auto addr = reinterpret_cast<uintptr_t>(bytes.data());
    return reinterpret_cast<void*>((addr + 63) & ~uintptr_t{63});
  }
};

static size_t Align64(size_t n) { return (n + 63) & ~size_t{63}; }

// Work shared by the caller and helpers; helpers that start after the call has ended find no
// chunk left and touch nothing but this (kept alive by their shared_ptr). A call may hold
// several weights that share one x (a layer's q, k and v): one problem each, their rows split
// into chunks together.
struct Chunk {
  int32_t problem;
  int64_t begin, end;
};

struct Shared {
  std::vector<Problem> ps;
  Kernels k;
  std::vector<Chunk> chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  int64_t Work() {
    int64_t mine = 0;
    const int64_t n_chunks = static_cast<int64_t>(chunks.size());
    for (;;) {
      const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= n_chunks) break;
      k.run(ps[chunks[c].problem], chunks[c].begin, chunks[c].end);
      ++mine;
    }
    if (mine) done.fetch_add(mine, std::memory_order_release);
    return mine;
  }
};

// What the last call did, for tests and benchmarks: the pool's size, the threads it asked for,
// its chunks, and how many of them the calling thread ran itself.
static std::atomic<int64_t> g_stat_pool{-1}, g_stat_threads{0}, g_stat_chunks{0}, g_stat_own{0};

static void Compute(const std::vector<Problem>& ps, const Kernels& k, ffi::ThreadPool* pool) {
  const Problem& p = ps[0];  // every problem has the same x (m_total, nb) and path
  int64_t n_all = 0;
  for (const Problem& q : ps) n_all += q.n_total;
  const int64_t work = n_all * p.nb * p.m_total;
  int64_t threads = 1;
  const int64_t pool_size = pool != nullptr ? pool->num_threads() : -1;
  g_stat_pool.store(pool_size, std::memory_order_relaxed);
  g_stat_threads.store(1, std::memory_order_relaxed);
  g_stat_chunks.store(1, std::memory_order_relaxed);
  g_stat_own.store(1, std::memory_order_relaxed);
  if (pool != nullptr && work >= g_parallel_min.load(std::memory_order_relaxed)) {
    threads = pool_size + 1;
    const int cap = g_max_threads.load(std::memory_order_relaxed);
    if (cap > 0) threads = std::min<int64_t>(threads, cap);
  }
  // Chunks start at a multiple of every variant's tile rows and panels: 8, or the AMX
  // panels' 16 on the row-tiled path (decode keeps 8: finer chunks for its small matmuls).
  const int64_t kRowAlign = p.gemm ? 16 : 8;
  if (threads <= 1 || n_all < 2 * kRowAlign) {
    for (const Problem& q : ps) k.run(q, 0, q.n_total);
    return;
  }
  // About 2 chunks per thread (helpers may start late or share their cores), none tiny: in a
  // decode step of SmolLM2 (211 calls, weights from DRAM) this beat 1 and 4 chunks per thread,
  // and a threshold of 2048-4096 block dots beat 16384 (9.1 -> 6.6-7 ms on 2 cores).
  const int64_t min_rows = std::max<int64_t>(kRowAlign, (g_parallel_min.load() / 4) /
                                                            std::max<int64_t>(1, p.nb * p.m_total));
  int64_t rows = (n_all + 2 * threads - 1) / (2 * threads);
  rows = std::max(rows, min_rows);
  rows = (rows + kRowAlign - 1) / kRowAlign * kRowAlign;
  auto sh = std::make_shared<Shared>();
  sh->ps = ps;
  sh->k = k;
  for (int32_t i = 0; i < static_cast<int32_t>(ps.size()); ++i)
    for (int64_t b = 0; b < ps[i].n_total; b += rows)
      sh->chunks.push_back({i, b, std::min(ps[i].n_total, b + rows)});
  const int64_t n_chunks = static_cast<int64_t>(sh->chunks.size());
  const int64_t helpers = std::min<int64_t>(threads - 1, n_chunks - 1);
  for (int64_t i = 0; i < helpers; ++i) pool->Schedule([sh] { sh->Work(); });
  const int64_t own = sh->Work();
  g_stat_threads.store(helpers + 1, std::memory_order_relaxed);
  g_stat_chunks.store(n_chunks, std::memory_order_relaxed);
  g_stat_own.store(own, std::memory_order_relaxed);
  // Whatever is not done yet has been claimed by a running helper.
  int spins = 0;
  while (sh->done.load(std::memory_order_acquire) < n_chunks) {
    if (++spins < 4096) {
      _mm_pause();
    } else {
      std::this_thread::yield();
    }
  }
}

// Which path a call takes: by its rows, the decode tiles, or the row-tiled path.
enum Path : int32_t { kPathByRows = 0, kPathFewRows = 1, kPathRowTiled = 2 };

// One weight of a call: its blocks (qs, d, m) of N rows, and where its y [M, N] goes.
struct Weight {
  const uint8_t* qs;
  const uint16_t* d;
  const uint16_t* m;
  int64_t n;
  float* y;
};

// y_i [M, N_i] = x [M, 32 nb] times the blocks of each weight i, x rounded (and packed) once
// for all of them; pool may be null.
static void MatmulMany(Fmt fmt, int isa, const float* x, int64_t M, int64_t nb,
                       const std::vector<Weight>& ws, ffi::ThreadPool* pool,
                       int32_t path = kPathByRows) {
  const int64_t qbytes = fmt == Fmt::kQ8_0 ? 32 : 16;
  const int64_t nb_pad = (nb + 7) / 8 * 8;
  const int64_t xq_row = 32 * ((nb + 1) / 2 * 2);
  const size_t xq_bytes = Align64(static_cast<size_t>(M * xq_row));
  const size_t plane = Align64(static_cast<size_t>(M * nb_pad * 4));
  static thread_local Scratch scratch;
  auto* base = static_cast<unsigned char*>(scratch.Get(xq_bytes + 3 * plane));
  Problem p;
  p.fmt = fmt;
  p.m_total = M;
  p.nb = nb;
  p.nb_pad = nb_pad;
  p.qs_row_bytes = qbytes * nb;
  p.xq = reinterpret_cast<const int8_t*>(base);
  p.xq_row_bytes = xq_row;
  auto* dx = reinterpret_cast<float*>(base + xq_bytes);
  auto* xsum = reinterpret_cast<int32_t*>(base + xq_bytes + plane);
  auto* sx = reinterpret_cast<float*>(base + xq_bytes + 2 * plane);
  if (nb_pad != nb) {  // the padding lanes must read as zero
    std::memset(dx, 0, plane);
    std::memset(xsum, 0, plane);
    std::memset(sx, 0, plane);
  }
  p.dx = dx;
  p.xsum = xsum;
  p.sx = sx;
  p.gemm = path == kPathByRows ? M >= g_gemm_min_rows.load(std::memory_order_relaxed)
                               : path == kPathRowTiled;
  // Decode pinned to the tiles' bits, with many rows: the row-tiled loops in the tiles' order.
  if (path == kPathFewRows && M >= g_decode_gemm_min_rows.load(std::memory_order_relaxed)) {
    p.gemm = true;
    p.decode_order = true;
  }
  p.x = x;
  const Kernels k = KernelsFor(isa);
  if (!(p.gemm && !p.decode_order && k.gemm_from_x))
    k.quantize(x, 0, M,
               p.gemm                ? XLayout::kNatural
               : fmt == Fmt::kQ8_0 ? XLayout::kQ8Pairs
                                   : XLayout::kQ4Pairs,
               p);
  if (k.prepare != nullptr) k.prepare(p);
  std::vector<Problem> ps;
  for (const Weight& w : ws) {
    if (w.n == 0) continue;
    Problem q = p;
    q.qs = w.qs;
    q.d = w.d;
    q.m = w.m;
    q.n_total = w.n;
    q.y = w.y;
    ps.push_back(q);
  }
  if (!ps.empty()) Compute(ps, k, pool);
}

// y [M, N] = x [M, 32 nb] times the blocks (qs, d, m) of N rows; pool may be null.
static void Matmul(Fmt fmt, int isa, const float* x, int64_t M, int64_t nb, const uint8_t* qs,
                   const uint16_t* d, const uint16_t* m, int64_t N, float* y,
                   ffi::ThreadPool* pool, int32_t path = kPathByRows) {
  MatmulMany(fmt, isa, x, M, nb, {Weight{qs, d, m, N, y}}, pool, path);
}

// One weight's buffers checked against x (dtypes, shapes): its Weight, or the error.
static ffi::ErrorOr<Weight> CheckWeight(Fmt fmt, ffi::AnyBuffer x, ffi::AnyBuffer qs,
                                        ffi::AnyBuffer d, const ffi::AnyBuffer* m,
                                        ffi::Result<ffi::AnyBuffer>& y) {
  using DT = ffi::DataType;
  const DT want_q = fmt == Fmt::kQ8_0 ? DT::S8 : DT::U8;
  if (x.element_type() != DT::F32 || qs.element_type() != want_q ||
      d.element_type() != DT::F16 || (m != nullptr && m->element_type() != DT::F16) ||
      y->element_type() != DT::F32)
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "shardinfer GGUF kernels: want x f32, qs s8 (q8_0) or u8 (q4), d and m f16, y f32"));
  const auto xd = x.dimensions();
  const auto qd = qs.dimensions();
  const auto dd = d.dimensions();
  const auto yd = y->dimensions();
  const int64_t qbytes = fmt == Fmt::kQ8_0 ? 32 : 16;
  if (xd.size() != 2 || qd.size() != 3 || dd.size() != 2 || yd.size() != 2)
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "shardinfer GGUF kernels: x, qs, d, y must be 2-, 3-, 2-, 2-D"));
  const int64_t M = xd[0], K = xd[1], N = qd[0], nb = qd[1];
  if (K != 32 * nb || qd[2] != qbytes || dd[0] != N || dd[1] != nb || yd[0] != M || yd[1] != N)
    return ffi::Unexpected(
        ffi::Error::InvalidArgument("shardinfer GGUF kernels: shapes do not agree"));
  if (m != nullptr) {
    const auto md = m->dimensions();
    if (md.size() != 2 || md[0] != N || md[1] != nb)
      return ffi::Unexpected(
          ffi::Error::InvalidArgument("shardinfer GGUF kernels: m must have d's shape"));
  }
  return Weight{static_cast<const uint8_t*>(qs.untyped_data()),
                static_cast<const uint16_t*>(d.untyped_data()),
                m != nullptr ? static_cast<const uint16_t*>(m->untyped_data()) : nullptr, N,
                static_cast<float*>(y->untyped_data())};
}

static ffi::Error RunChecked(Fmt fmt, ffi::ThreadPool* pool, ffi::AnyBuffer x,
                             const std::vector<Weight>& ws, int32_t path) {
  if (path < kPathByRows || path > kPathRowTiled)
    return ffi::Error::InvalidArgument("shardinfer GGUF kernels: path must be 0, 1 or 2");
  const int isa = g_isa.load(std::memory_order_relaxed);
  if (isa == kNone)
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                      "shardinfer GGUF kernels: this CPU lacks AVX2+FMA+F16C");
  const int64_t M = x.dimensions()[0], nb = x.dimensions()[1] / 32;
  if (M == 0) return ffi::Error::Success();
  if (nb == 0) {
    for (const Weight& w : ws) std::memset(w.y, 0, sizeof(float) * M * w.n);
    return ffi::Error::Success();
  }
  MatmulMany(fmt, isa, static_cast<const float*>(x.untyped_data()), M, nb, ws, pool, path);
  return ffi::Error::Success();
}

static ffi::Error Run(Fmt fmt, ffi::ThreadPool* pool, ffi::AnyBuffer x, ffi::AnyBuffer qs,
                      ffi::AnyBuffer d, const ffi::AnyBuffer* m, ffi::Result<ffi::AnyBuffer> y,
                      int32_t path) {
  auto w = CheckWeight(fmt, x, qs, d, m, y);
  if (w.has_error()) return w.error();
  return RunChecked(fmt, pool, x, {w.value()}, path);
}

// Several weights against one x: args (qs, d[, m]) per weight, one result each.
static ffi::Error RunMany(Fmt fmt, ffi::ThreadPool* pool, ffi::AnyBuffer x,
                          ffi::RemainingArgs args, ffi::RemainingRets rets, int32_t path) {
  const size_t per = fmt == Fmt::kQ4_1 ? 3 : 2;
  if (rets.size() == 0 || args.size() != per * rets.size())
    return ffi::Error::InvalidArgument(
        "shardinfer GGUF kernels: want (qs, d[, m]) per weight and one result each");
  std::vector<Weight> ws;
  for (size_t i = 0; i < rets.size(); ++i) {
    auto qs = args.get<ffi::AnyBuffer>(per * i);
    auto d = args.get<ffi::AnyBuffer>(per * i + 1);
    auto y = rets.get<ffi::AnyBuffer>(i);
    if (qs.has_error()) return qs.error();
    if (d.has_error()) return d.error();
    if (y.has_error()) return y.error();
    std::optional<ffi::AnyBuffer> m;
    if (per == 3) {
      auto mm = args.get<ffi::AnyBuffer>(per * i + 2);
      if (mm.has_error()) return mm.error();
      m = mm.value();
    }
    auto w = CheckWeight(fmt, x, qs.value(), d.value(), m ? &*m : nullptr, y.value());
    if (w.has_error()) return w.error();
    ws.push_back(w.value());
  }
  return RunChecked(fmt, pool, x, ws, path);
}

static ffi::Error Q8_0(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer qs, ffi::AnyBuffer d,
                       ffi::Result<ffi::AnyBuffer> y, int32_t path) {
  return Run(Fmt::kQ8_0, &pool, x, qs, d, nullptr, y, path);
}
static ffi::Error Q4_0(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer qs, ffi::AnyBuffer d,
                       ffi::Result<ffi::AnyBuffer> y, int32_t path) {
  return Run(Fmt::kQ4_0, &pool, x, qs, d, nullptr, y, path);
}
static ffi::Error Q4_1(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer qs, ffi::AnyBuffer d,
                       ffi::AnyBuffer m, ffi::Result<ffi::AnyBuffer> y, int32_t path) {
  return Run(Fmt::kQ4_1, &pool, x, qs, d, &m, y, path);
}
static ffi::Error Q8_0Many(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::RemainingArgs args,
                           ffi::RemainingRets rets, int32_t path) {
  return RunMany(Fmt::kQ8_0, &pool, x, args, rets, path);
}
static ffi::Error Q4_0Many(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::RemainingArgs args,
                           ffi::RemainingRets rets, int32_t path) {
  return RunMany(Fmt::kQ4_0, &pool, x, args, rets, path);
}
static ffi::Error Q4_1Many(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::RemainingArgs args,
                           ffi::RemainingRets rets, int32_t path) {
  return RunMany(Fmt::kQ4_1, &pool, x, args, rets, path);
}

}  // namespace shardinfer_gguf

// ---- exported symbols -------------------------------------------------------------------------

namespace sg = shardinfer_gguf;

// The handlers are the library's interface: visible even when built with -fvisibility=hidden.
#pragma GCC visibility push(default)
#define SI_BIND_ARGS(b) b.Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(ShardinferGgufQ8_0Matmul, sg::Q8_0,
                              SI_BIND_ARGS(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>())
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("path"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ShardinferGgufQ4_0Matmul, sg::Q4_0,
                              SI_BIND_ARGS(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>())
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("path"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ShardinferGgufQ4_1Matmul, sg::Q4_1,
                              SI_BIND_ARGS(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>())
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("path"));
// Several weights sharing one x (a layer's q, k, v or gate, up): x, then (qs, d[, m]) per weight.
#define SI_BIND_MANY(name, fn)                                                      \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, fn,                                           \
                                ffi::Ffi::Bind()                                    \
                                    .Ctx<ffi::ThreadPool>()                         \
                                    .Arg<ffi::AnyBuffer>()                          \
                                    .RemainingArgs()                                \
                                    .RemainingRets()                                \
                                    .Attr<int32_t>("path"));
SI_BIND_MANY(ShardinferGgufQ8_0MatmulMany, sg::Q8_0Many)
SI_BIND_MANY(ShardinferGgufQ4_0MatmulMany, sg::Q4_0Many)
SI_BIND_MANY(ShardinferGgufQ4_1MatmulMany, sg::Q4_1Many)
#pragma GCC visibility pop

// Plain C helpers for the Python side (ctypes) and the tests.
extern "C" {

// The instruction set in use: 0 none (the CPU lacks AVX2+FMA+F16C), 1 AVX2, 2 AVX-VNNI,
// 3 AVX-512 VNNI, 4 AVX-512 VNNI with AMX int8 tiles for the row-tiled path, 5 the same with
// AMX bfloat16 tiles.
__attribute__((visibility("default"))) int ShardinferGgufIsa() { return sg::g_isa.load(); }
__attribute__((visibility("default"))) int ShardinferGgufBestIsa() { return sg::g_best_isa; }
// Bit (1 << isa) set for each instruction set this CPU can run (not nested: see DetectIsas).
__attribute__((visibility("default"))) unsigned ShardinferGgufSupportedIsas() {
  return sg::g_isas;
}

// Uses instruction set `isa` from now on (for tests and benchmarks); refused (returns 0) when
// this CPU lacks it.
__attribute__((visibility("default"))) int ShardinferGgufSetIsa(int isa) {
  if (isa < sg::kAvx2 || isa > sg::kAmxBf16 || !(sg::g_isas & (1u << isa))) return 0;
  sg::g_isa.store(isa);
  return 1;
}

// At most `n` threads per call, the caller included (0: the intra-op pool's size + 1); calls
// with fewer than `min_work` block dots stay on the calling thread (min_work < 0: unchanged).
__attribute__((visibility("default"))) void ShardinferGgufSetThreads(int n, long long min_work) {
  sg::g_max_threads.store(n < 0 ? 0 : n);
  if (min_work >= 0) sg::g_parallel_min.store(min_work);
}

// Calls with at least `rows` x rows take the row-tiled path (rows < 0: the default; a huge
// value forces the decode tiles everywhere, for benchmarks and tests).
__attribute__((visibility("default"))) void ShardinferGgufSetGemmMinRows(long long rows) {
  sg::g_gemm_min_rows.store(rows < 0 ? sg::kGemmMinRowsDefault : rows);
}

// Calls pinned to the decode tiles with at least `rows` x rows take the row-tiled loops in the
// tiles' order (-1: the default, 32; a huge value: the tiles whatever the rows).
__attribute__((visibility("default"))) void ShardinferGgufSetDecodeGemmMinRows(long long rows) {
  sg::g_decode_gemm_min_rows.store(rows < 0 ? sg::kDecodeGemmMinRowsDefault : rows);
}

// The last call's threading (any thread's): out[0] the intra-op pool's size (-1: none),
// out[1] threads used (the caller included), out[2] chunks, out[3] chunks the caller ran.
__attribute__((visibility("default"))) void ShardinferGgufLastCall(long long* out) {
  out[0] = sg::g_stat_pool.load();
  out[1] = sg::g_stat_threads.load();
  out[2] = sg::g_stat_chunks.load();
  out[3] = sg::g_stat_own.load();
}

// y float32 [M, N] = x float32 [M, 32 nb] times a weight's blocks, on the calling thread only
// (benchmarks: the kernel without XLA). fmt: 0 q8_0, 1 q4_0, 2 q4_1. Returns 0 if unsupported.
__attribute__((visibility("default"))) int ShardinferGgufMatmulRaw(int fmt, const float* x,
                                                                   long long M, long long nb,
                                                                   const void* qs, const void* d,
                                                                   const void* m, long long N,
                                                                   float* y) {
  const int isa = sg::g_isa.load();
  if (isa == sg::kNone || fmt < 0 || fmt > 2 || M < 0 || N < 0 || nb < 1) return 0;
  sg::Matmul(static_cast<sg::Fmt>(fmt), isa, x, M, nb, static_cast<const uint8_t*>(qs),
             static_cast<const uint16_t*>(d), static_cast<const uint16_t*>(m), N, y, nullptr);
  return 1;
}

// x float32 [M, K] rounded as the kernels round it: xq int8 [M, K], dx float32 [M, K/32].
// Returns 0 when K is not a multiple of 32 or the CPU is not supported.
__attribute__((visibility("default"))) int ShardinferGgufQuantizeX(const float* x, long long M,
                                                                   long long K, int8_t* xq,
                                                                   float* dx) {
  const int isa = sg::g_isa.load();
  if (isa == sg::kNone || K % 32 != 0 || M < 0) return 0;
  const int64_t nb = K / 32, nb_pad = (nb + 7) / 8 * 8;
  std::vector<float> dxp(static_cast<size_t>(M * nb_pad)), sxp(dxp.size());
  std::vector<int32_t> sums(dxp.size());
  sg::Problem p{};
  p.m_total = M;
  p.nb = nb;
  p.nb_pad = nb_pad;
  p.xq = xq;
  p.xq_row_bytes = K;
  p.dx = dxp.data();
  p.xsum = sums.data();
  p.sx = sxp.data();
  sg::KernelsFor(isa).quantize(x, 0, M, sg::XLayout::kNatural, p);
  for (int64_t i = 0; i < M; ++i)
    std::memcpy(dx + i * nb, dxp.data() + i * nb_pad, sizeof(float) * nb);
  return 1;
}

}  // extern "C"
