// The row-tiled path (Problem::gemm) on AMX tiles; see gguf_matmul.cc.
//
// gguf_matmul.cc includes this file once, inside a region whose functions target AVX-512 and
// AMX-INT8, after the AVX-512 VNNI variant (isa_avx512vnni), whose x rounding and decode tiles
// this set shares: only calls with many x rows (prefill) come here.
//
// Why: one AMX dot instruction (tdpbusd / tdpbssd) multiplies a 16 x 32 tile of bytes by a
// 32 x 16 one into 16 x 16 int32 sums, 8192 byte products, where a 256-bit vpdpbusd does 32.
// Measured on a 2-core Xeon (SmolLM2's up projection, 512 rows, 1 thread): 2.0 ms against the
// AVX-512 path's 3.6 (~220 against ~125 GMAC/s). What is left is in three about equal parts:
// the tile loads, dots and stores (each block's 16 x 16 sums must come out of the tile for
// its own scales), the float work per block below (~2 cycles per 16 sums: it is what the
// results' bits are made of), and packing x and the weights plus writing y.
//
// The tiles, per block b (32 values along K):
//   A (tmm2 / tmm4): 16 weight rows x 32 bytes, the row's block b in element order: q4_1's
//     nibbles as unsigned bytes (tdpbusd), q4_0's nibble - 8 and q8_0's weights as signed ones
//     (tdpbssd), so no dot needs a correction by x's sums;
//   B (tmm3 / tmm5): x's block b for 16 x rows in the layout the dot wants: row j (of 8) holds,
//     for each x row i, its bytes 4j .. 4j + 3;
//   C (tmm0, 1, 6, 7): the 16 x 16 exact int32 block dots, C[n][m], stored and then read a row
//     (one weight row, 16 x rows) at a time.
// Then the float work, per weight row n, on a vector of 16 x rows, block after block:
//   acc[n] = fma(cvt(C[n]), d[n] * dx, acc[n])   (+ fma(m[n], sx, acc[n]) for q4_1)
// the same operations, element for element, as the AVX-512 row-tiled path's (which holds 8
// weight rows in a vector and walks x rows instead): so this path's results are that path's
// bits, and block_matmul_reference's.
//
// Tile state is per thread: every call of `run` configures the tiles and releases them at the
// end (XLA's pool threads run other code between calls).

namespace isa_amx {

#define SI_INLINE inline __attribute__((always_inline))

constexpr int kTile = 16;         // weight rows (A, C rows) and x rows (B, C columns) per tile
constexpr int64_t kChunkGroups = 32;  // 512 x rows: at K = 1536, 1 MB packed

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// tmm0, tmm1, tmm6, tmm7: C (16 rows of 16 int32); tmm2, tmm4: A (16 weight rows x 32
// bytes); tmm3, tmm5: B (8 rows of 16 x rows x 4 bytes). A constant: GCC dropped the stores
// into a local config as dead (it does not see ldtilecfg read them), which left every tile
// unconfigured.
static const TileConfig kTileConfig = {
    1, 0, {0}, {64, 64, 32, 64, 32, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0},
    {16, 16, 16, 8, 16, 8, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0}};

static void configure_tiles() { _tile_loadconfig(&kTileConfig); }

// Weight rows [n0, n0 + nvalid) (nvalid <= 16; the rest zero): wp [nb][16 rows][32 bytes],
// d (and m) as float [nb][16].
template <Fmt F>
static void pack_weights(const Problem& p, int64_t n0, int nvalid, uint8_t* wp, float* dp,
                         float* mp) {
  const __m128i low4 = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
  for (int64_t b = 0; b < p.nb; ++b) {
    uint8_t* out = wp + 512 * b;
    for (int r = 0; r < kTile; ++r) {
      uint8_t* row = out + 32 * r;
      if (r >= nvalid) {
        std::memset(row, 0, 32);
        continue;
      }
      const uint8_t* src = p.qs + (n0 + r) * p.qs_row_bytes;
      if constexpr (F == Fmt::kQ8_0) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32 * b));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(row), v);
      } else {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16 * b));
        __m128i lo = _mm_and_si128(v, low4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low4);
        if constexpr (F == Fmt::kQ4_0) {  // signed nibble - 8
          lo = _mm_sub_epi8(lo, eight);
          hi = _mm_sub_epi8(hi, eight);
        }
        _mm_storeu_si128(reinterpret_cast<__m128i*>(row), lo);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(row + 16), hi);
      }
    }
    for (int r = 0; r < kTile; ++r) {
      const bool ok = r < nvalid;
      dp[16 * b + r] = ok ? _cvtsh_ss(p.d[(n0 + r) * p.nb + b]) : 0.0f;
      if constexpr (F == Fmt::kQ4_1) mp[16 * b + r] = ok ? _cvtsh_ss(p.m[(n0 + r) * p.nb + b]) : 0.0f;
    }
  }
}

// x rows [m0, m0 + mvalid) (mvalid <= 16; the rest zero), rounded in XLayout::kNatural:
// xp [nb][8][16 rows][4 bytes], and dx, sx as [nb][16].
static void pack_x(const Problem& p, int64_t m0, int mvalid, int8_t* xp, float* dxp,
                   float* sxp) {
  const __mmask16 rows = static_cast<__mmask16>((1u << mvalid) - 1);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i xoff = _mm512_mullo_epi32(lane, _mm512_set1_epi32(static_cast<int>(p.xq_row_bytes)));
  const __m512i voff = _mm512_mullo_epi32(lane, _mm512_set1_epi32(static_cast<int>(p.nb_pad)));
  const int8_t* xbase = p.xq + m0 * p.xq_row_bytes;
  const float* dbase = p.dx + m0 * p.nb_pad;
  const float* sbase = p.sx + m0 * p.nb_pad;
  for (int64_t b = 0; b < p.nb; ++b) {
    int8_t* out = xp + 512 * b;
    // Masked gathers: rows past mvalid read nothing and come out zero.
    for (int j = 0; j < 8; ++j)
      _mm512_store_si512(out + 64 * j, _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), rows,
                                                                   xoff, xbase + 32 * b + 4 * j, 1));
    _mm512_store_ps(dxp + 16 * b,
                    _mm512_mask_i32gather_ps(_mm512_setzero_ps(), rows, voff, dbase + b, 4));
    _mm512_store_ps(sxp + 16 * b,
                    _mm512_mask_i32gather_ps(_mm512_setzero_ps(), rows, voff, sbase + b, 4));
  }
}

// Bytes of one packed group of 16 x rows: xp, dx, sx.
static size_t group_bytes(int64_t nb) { return static_cast<size_t>(512 * nb + 2 * 64 * nb); }

// Every x row packed once per call, by the calling thread, for all the threads' chunks.
static void prepare(Problem& p) {
  if (!p.gemm || p.decode_order) return;
  static thread_local std::vector<unsigned char> buf;
  const int64_t groups = (p.m_total + kTile - 1) / kTile;
  const size_t gbytes = group_bytes(p.nb);
  if (buf.size() < groups * gbytes + 64) buf.resize(groups * gbytes + 64);
  const auto base = (reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t{63};
  for (int64_t g = 0; g < groups; ++g) {
    auto* at = reinterpret_cast<unsigned char*>(base + g * gbytes);
    const int64_t m0 = kTile * g;
    pack_x(p, m0, static_cast<int>(std::min<int64_t>(kTile, p.m_total - m0)),
           reinterpret_cast<int8_t*>(at), reinterpret_cast<float*>(at + 512 * p.nb),
           reinterpret_cast<float*>(at + 576 * p.nb));
  }
  p.xpack = reinterpret_cast<const unsigned char*>(base);
}

// The float work of block b from its stored dots c [16 weight rows][16 x rows].
template <Fmt F>
static SI_INLINE void add_block(const int32_t* c, int64_t b, const float* dp, const float* mp,
                                const float* dxp, const float* sxp,
                                __m512 (&acc)[kTile]) {
  const __m512 dxv = _mm512_load_ps(dxp + 16 * b);
  __m512 sxv = _mm512_setzero_ps();
  if constexpr (F == Fmt::kQ4_1) sxv = _mm512_load_ps(sxp + 16 * b);
#pragma GCC unroll 16
  for (int r = 0; r < kTile; ++r) {
    __m512i dots = _mm512_load_si512(reinterpret_cast<const void*>(c + 16 * r));
    const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(dp[16 * b + r]), dxv);
    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), scale, acc[r]);
    if constexpr (F == Fmt::kQ4_1)
      acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(mp[16 * b + r]), sxv, acc[r]);
  }
}

// r[i] = row i of a 16 x 16 matrix -> r[i] = its column i.
static SI_INLINE void transpose16(__m512 (&r)[kTile]) {
  __m512 t[kTile], u[kTile];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);      // per 128-bit lane: a0 b0 a1 b1
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);  //                   a2 b2 a3 b3
  }
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {  // rows 4g .. 4g + 3: per lane, columns 0 1 2 3 of the four
    u[4 * g] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
    u[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
    u[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    u[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
  }
  // u[4g + c], lane l: rows 4g .. 4g + 3 of column 4l + c. Gather the lanes across g.
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88);  // col c, c+8 of rows 0-7
    const __m512 v1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);  // col c+4, c+12
    const __m512 v2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);  // the same, rows 8-15
    const __m512 v3 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
    r[c] = _mm512_shuffle_f32x4(v0, v2, 0x88);
    r[c + 8] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
    r[c + 4] = _mm512_shuffle_f32x4(v1, v3, 0x88);
    r[c + 12] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
  }
}

// One packed weight panel (wp, dp, mp) against one packed group of 16 x rows; writes
// y[m0 + i][n0 + r] for i < mvalid, r < nvalid.
template <Fmt F>
static void tile16(const Problem& p, const uint8_t* wp, const float* dp, const float* mp,
                      const int8_t* xp, const float* dxp, const float* sxp,
                      int64_t m0, int mvalid, int64_t n0, int nvalid) {
  alignas(64) int32_t cbuf[2 * 4 * kTile * kTile];
  __m512 acc[kTile];
#pragma GCC unroll 16
  for (int r = 0; r < kTile; ++r) acc[r] = _mm512_setzero_ps();
  // Four blocks at a time: their dots into four C tiles, stored into one of two buffers, then
  // their float work. (Meant to let dots and float work overlap; measured, it is no faster
  // than one C tile block by block, nor than a 2- or 3-deep pipeline: ~2 ms each.)
  const int64_t nb = p.nb;
#define SI_AMX_DOT(tc, ta, tb, blk)                                  \
  if ((blk) < nb) {                                                  \
    _tile_loadd(ta, wp + 512 * (blk), 32);                           \
    _tile_loadd(tb, xp + 512 * (blk), 64);                           \
    _tile_zero(tc);                                                  \
    /* q4_1's nibbles are unsigned bytes; q4_0's nibble - 8 and   */ \
    /* q8_0's weights signed. (Tile numbers must be literals: the */ \
    /* intrinsics paste them into the instruction's text.)        */ \
    if constexpr (F == Fmt::kQ4_1)                                   \
      _tile_dpbusd(tc, ta, tb);                                      \
    else                                                             \
      _tile_dpbssd(tc, ta, tb);                                      \
  }
#define SI_AMX_STORE(tc, i) \
  if (g + (i) < nb) _tile_stored(tc, cb + kTile * kTile * (i), 64);
  for (int64_t g = 0, k = 0; g < nb; g += 4, k ^= 1) {
    int32_t* cb = cbuf + 4 * kTile * kTile * k;
    SI_AMX_DOT(0, 2, 3, g)
    SI_AMX_DOT(1, 4, 5, g + 1)
    SI_AMX_DOT(6, 2, 3, g + 2)
    SI_AMX_DOT(7, 4, 5, g + 3)
    SI_AMX_STORE(0, 0)
    SI_AMX_STORE(1, 1)
    SI_AMX_STORE(6, 2)
    SI_AMX_STORE(7, 3)
    const int64_t ge = std::min<int64_t>(nb, g + 4);
    for (int64_t b = g; b < ge; ++b)
      add_block<F>(cb + kTile * kTile * (b - g), b, dp, mp, dxp, sxp, acc);
  }
#undef SI_AMX_DOT
#undef SI_AMX_STORE
  // acc[r] holds weight row n0 + r for 16 x rows: transposed, each x row's 16 outputs are one
  // (masked) store.
  transpose16(acc);
  const __mmask16 keep = static_cast<__mmask16>((1u << nvalid) - 1);
  float* out = p.y + m0 * p.n_total + n0;
#pragma GCC unroll 16
  for (int i = 0; i < kTile; ++i)
    if (i < mvalid) _mm512_mask_storeu_ps(out + i * p.n_total, keep, acc[i]);
}

template <Fmt F>
static void run_gemm(const Problem& p, int64_t n_begin, int64_t n_end) {
  // One weight panel at a time, in a per-thread buffer that only grows, against the packed
  // groups of x rows (`prepare`) kChunkGroups at a time (so they stay in L2 while the panels
  // stream by).
  static thread_local std::vector<unsigned char> wbuf;
  const int64_t nb = p.nb;
  const size_t wbytes = 512 * nb, sbytes = 64 * nb;
  if (wbuf.size() < wbytes + 2 * sbytes + 64) wbuf.resize(wbytes + 2 * sbytes + 64);
  const auto wa = (reinterpret_cast<uintptr_t>(wbuf.data()) + 63) & ~uintptr_t{63};
  auto* wp = reinterpret_cast<uint8_t*>(wa);
  auto* dp = reinterpret_cast<float*>(wa + wbytes);
  auto* mp = reinterpret_cast<float*>(wa + wbytes + sbytes);
  const int64_t groups = (p.m_total + kTile - 1) / kTile;
  const size_t gbytes = group_bytes(nb);
  configure_tiles();
  for (int64_t g0 = 0; g0 < groups; g0 += kChunkGroups)
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kTile) {
    const int nvalid = static_cast<int>(std::min<int64_t>(kTile, n_end - n0));
    pack_weights<F>(p, n0, nvalid, wp, dp, mp);
    for (int64_t g = g0; g < std::min(groups, g0 + kChunkGroups); ++g) {
      const unsigned char* at = p.xpack + g * gbytes;
      const int64_t m0 = kTile * g;
      tile16<F>(p, wp, dp, mp, reinterpret_cast<const int8_t*>(at),
                   reinterpret_cast<const float*>(at + 512 * nb),
                   reinterpret_cast<const float*>(at + 576 * nb), m0,
                   static_cast<int>(std::min<int64_t>(kTile, p.m_total - m0)), n0, nvalid);
    }
  }
  _tile_release();
}

static void run(const Problem& p, int64_t n_begin, int64_t n_end) {
  if (!p.gemm || p.decode_order) {
    isa_avx512vnni::run(p, n_begin, n_end);
    return;
  }
  WithFormat(p.fmt, [&](auto f) { run_gemm<decltype(f)::value>(p, n_begin, n_end); });
}

#undef SI_INLINE

}  // namespace isa_amx
