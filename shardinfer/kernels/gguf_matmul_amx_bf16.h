// The row-tiled path (Problem::gemm) on AMX-BF16 tiles: many x rows (prefill); see gguf_matmul.cc.
//
// gguf_matmul.cc includes this file once, after gguf_matmul_amx.h, inside a region whose
// functions target AVX-512 and AMX-BF16. Decode (few rows) stays on the AVX-512 VNNI tiles.
//
// Why not the int8 tiles (gguf_matmul_amx.h): with x rounded to int8 blocks, every block of 32
// has its own scale on both sides, so each block's 16 x 16 dots must leave the tile to be
// scaled: that float work, not the tiles, is the int8 path's wall (~215 GMAC/s a core). Here
// the scales go into the operands instead, and a tile accumulates over all of K:
//   x: each value rounded to bfloat16 (round to nearest even);
//   w: each block dequantized in float32 (d * q, d * (q - 8), or fma(d, q, m) for q4_1),
//      then split into two bfloat16s, hi = bf16(w) and lo = bf16(w - hi): hi + lo is w to
//      2^-17 of itself (exact for q4_0).
//   y[m][n] = sum over blocks b of (x_b . hi_b, then x_b . lo_b), in float32, by tdpbf16ps.
// So x's rounding differs from the other paths' (8-bit blocks): bfloat16 keeps 8 bits per
// value, a block's int8 rounding 7 per block maximum. A row's result depends on nothing but
// its own x row and weight row (the same bits in any batch and on any mesh), but it is not the
// other paths' bits, nor block_matmul_reference's.
//
// Tiles: C tmm0..3 = 2 groups of 16 x rows x 2 panels of 16 weight rows (float32); A tmm4, 5 =
// the two groups' x for one block (16 rows x 32 bf16); B tmm6, 7 = the two panels' hi (then
// lo) for that block, in the dot's pair layout (row j holds, for each weight row n, its
// values 2j and 2j + 1).

namespace isa_amx_bf16 {

#define SI_INLINE inline __attribute__((always_inline))

constexpr int kTile = 16;
constexpr int64_t kChunkGroups = 32;  // x rows per pass over the weights: 512
constexpr int64_t kXBlockBytes = 1024;   // one group's x for one block: 16 rows x 32 bf16
constexpr int64_t kWBlockBytes = 2048;   // one panel's hi and lo for one block

static const isa_amx::TileConfig kTileConfig = {
    1, 0, {0}, {64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0},
    {16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0}};

// float32 -> bfloat16 bits (round to nearest even), one per 32-bit lane.
static SI_INLINE __m512i bf16_bits(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd)),
                           16);
}
static SI_INLINE __m512 bf16_value(__m512i bits) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
}
// Two vectors of 16 bf16 bits (elements 0..15, 16..31) -> 32 bf16 in order.
static SI_INLINE __m512i pack32(__m512i lo, __m512i hi) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(lo)),
                            _mm512_cvtepi32_epi16(hi), 1);
}

// x rows [m0, m0 + mvalid) as bf16 A tiles: xp [nb][16 rows][32] (rows past mvalid zero).
static void pack_x(const Problem& p, int64_t m0, int mvalid, uint8_t* xp) {
  const int64_t K = 32 * p.nb;
  for (int64_t b = 0; b < p.nb; ++b) {
    uint8_t* out = xp + kXBlockBytes * b;
    for (int r = 0; r < kTile; ++r) {
      __m512i row = _mm512_setzero_si512();
      if (r < mvalid) {
        const float* src = p.x + (m0 + r) * K + 32 * b;
        row = pack32(bf16_bits(_mm512_loadu_ps(src)), bf16_bits(_mm512_loadu_ps(src + 16)));
      }
      _mm512_store_si512(out + 64 * r, row);
    }
  }
}

static size_t group_bytes(int64_t nb) { return static_cast<size_t>(kXBlockBytes * nb); }

// Every x row packed once per call, by the calling thread, for all the threads' chunks.
static void prepare(Problem& p) {
  if (!p.gemm || p.decode_order) return;
  static thread_local std::vector<unsigned char> buf;
  const int64_t groups = (p.m_total + kTile - 1) / kTile;
  const size_t gbytes = group_bytes(p.nb);
  if (buf.size() < groups * gbytes + 64) buf.resize(groups * gbytes + 64);
  const auto base = (reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t{63};
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t m0 = kTile * g;
    pack_x(p, m0, static_cast<int>(std::min<int64_t>(kTile, p.m_total - m0)),
           reinterpret_cast<uint8_t*>(base + g * gbytes));
  }
  p.xpack = reinterpret_cast<const unsigned char*>(base);
}

// One weight row's block b dequantized to float32: elements 0..15 and 16..31.
template <Fmt F>
static SI_INLINE void dequantize(const Problem& p, int64_t n, int64_t b, __m512& w0, __m512& w1) {
  const __m512 d = _mm512_set1_ps(_cvtsh_ss(p.d[n * p.nb + b]));
  const uint8_t* src = p.qs + n * p.qs_row_bytes;
  if constexpr (F == Fmt::kQ8_0) {
    const __m128i* q = reinterpret_cast<const __m128i*>(src + 32 * b);
    w0 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q))));
    w1 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q + 1))));
  } else {
    const __m512i bytes = _mm512_cvtepu8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16 * b)));
    const __m512i low4 = _mm512_set1_epi32(0x0F);
    __m512i lo = _mm512_and_si512(bytes, low4), hi = _mm512_srli_epi32(bytes, 4);
    if constexpr (F == Fmt::kQ4_0) {
      lo = _mm512_sub_epi32(lo, _mm512_set1_epi32(8));
      hi = _mm512_sub_epi32(hi, _mm512_set1_epi32(8));
      w0 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(lo));
      w1 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(hi));
    } else {
      const __m512 m = _mm512_set1_ps(_cvtsh_ss(p.m[n * p.nb + b]));
      w0 = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(lo), m);
      w1 = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(hi), m);
    }
  }
}

// Weight rows [n0, n0 + nvalid) as B tiles: wp [nb][hi, lo][16 pair rows][16 weight rows x 2].
// vcvtne2ps2bf16 rounds to nearest even, as bf16_bits does (weights are never denormal: d is a
// float16, whose smallest value times a nibble is far above float32's denormals).
template <Fmt F>
static void pack_weights(const Problem& p, int64_t n0, int nvalid, uint8_t* wp) {
  for (int64_t b = 0; b < p.nb; ++b) {
    __m512 hi_rows[kTile], lo_rows[kTile];  // row n: its 32 values as 16 pairs (dwords)
#pragma GCC unroll 16
    for (int r = 0; r < kTile; ++r) {
      __m512i hi = _mm512_setzero_si512(), lo = _mm512_setzero_si512();
      if (r < nvalid) {
        __m512 w0, w1;
        dequantize<F>(p, n0 + r, b, w0, w1);
        hi = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(w1, w0));
        const __m512 h0 = bf16_value(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(hi)));
        const __m512 h1 = bf16_value(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(hi, 1)));
        lo = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(_mm512_sub_ps(w1, h1),
                                                           _mm512_sub_ps(w0, h0)));
      }
      hi_rows[r] = _mm512_castsi512_ps(hi);
      lo_rows[r] = _mm512_castsi512_ps(lo);
    }
    // [weight row][pair] -> [pair][weight row]: the dot's B layout.
    isa_amx::transpose16(hi_rows);
    isa_amx::transpose16(lo_rows);
    uint8_t* out = wp + kWBlockBytes * b;
#pragma GCC unroll 16
    for (int j = 0; j < kTile; ++j) {
      _mm512_store_ps(reinterpret_cast<float*>(out + 64 * j), hi_rows[j]);
      _mm512_store_ps(reinterpret_cast<float*>(out + 1024 + 64 * j), lo_rows[j]);
    }
  }
}

// C tile `tc` (16 x rows from m0, 16 weight rows from n0) into y.
#define SI_STORE_Y(tc, m0, mvalid, n0, nvalid)                                              \
  do {                                                                                      \
    float* dst = p.y + (m0) * p.n_total + (n0);                                             \
    if ((mvalid) == kTile && (nvalid) == kTile) {                                           \
      _tile_stored(tc, dst, 4 * p.n_total);                                                 \
    } else {                                                                                \
      alignas(64) float cbuf[kTile * kTile];                                                \
      _tile_stored(tc, cbuf, 64);                                                           \
      const __mmask16 keep = static_cast<__mmask16>((1u << (nvalid)) - 1);                  \
      for (int i = 0; i < (mvalid); ++i)                                                    \
        _mm512_mask_storeu_ps(dst + i * p.n_total, keep, _mm512_load_ps(cbuf + kTile * i)); \
    }                                                                                       \
  } while (0)

// Blocks [b0, b1) of groups g0 (and g1 when kTwoGroups) of packed x against panels w0 (and w1
// when kTwoPanels). The sums so far are in acc (4 tiles of 16 x 16 floats: C0..C3) unless
// b0 == 0; after the last block they go to y, otherwise back to acc. Splitting K this way
// keeps a panel pair's share of the weights (8 blocks: 32 KB) in L1 while x streams from L2;
// the float32 sums go through memory unchanged, so the split costs no bits.
template <bool kTwoGroups, bool kTwoPanels>
static void tiles(const Problem& p, const uint8_t* x0, const uint8_t* x1, int64_t m0, int mv0,
                  int mv1, const uint8_t* w0, const uint8_t* w1, int64_t n0, int nv0, int nv1,
                  int64_t b0, int64_t b1, float* acc) {
  constexpr int64_t kC = kTile * kTile;
  if (b0 == 0) {
    _tile_zero(0);
    if constexpr (kTwoPanels) _tile_zero(1);
    if constexpr (kTwoGroups) _tile_zero(2);
    if constexpr (kTwoGroups && kTwoPanels) _tile_zero(3);
  } else {
    _tile_loadd(0, acc, 64);
    if constexpr (kTwoPanels) _tile_loadd(1, acc + kC, 64);
    if constexpr (kTwoGroups) _tile_loadd(2, acc + 2 * kC, 64);
    if constexpr (kTwoGroups && kTwoPanels) _tile_loadd(3, acc + 3 * kC, 64);
  }
  // Per block: B6 and B7 hold the two panels' hi, then their lo; each tile is reloaded only
  // after the dots that read it have been issued two dots earlier (a tile load waits for them).
  for (int64_t b = b0; b < b1; ++b) {
    _tile_loadd(4, x0 + kXBlockBytes * b, 64);
    if constexpr (kTwoGroups) _tile_loadd(5, x1 + kXBlockBytes * b, 64);
    _tile_loadd(6, w0 + kWBlockBytes * b, 64);
    if constexpr (kTwoPanels) _tile_loadd(7, w1 + kWBlockBytes * b, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (kTwoGroups) _tile_dpbf16ps(2, 5, 6);
    if constexpr (kTwoPanels) _tile_dpbf16ps(1, 4, 7);
    if constexpr (kTwoGroups && kTwoPanels) _tile_dpbf16ps(3, 5, 7);
    _tile_loadd(6, w0 + kWBlockBytes * b + 1024, 64);
    if constexpr (kTwoPanels) _tile_loadd(7, w1 + kWBlockBytes * b + 1024, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (kTwoGroups) _tile_dpbf16ps(2, 5, 6);
    if constexpr (kTwoPanels) _tile_dpbf16ps(1, 4, 7);
    if constexpr (kTwoGroups && kTwoPanels) _tile_dpbf16ps(3, 5, 7);
  }
  if (b1 < p.nb) {
    _tile_stored(0, acc, 64);
    if constexpr (kTwoPanels) _tile_stored(1, acc + kC, 64);
    if constexpr (kTwoGroups) _tile_stored(2, acc + 2 * kC, 64);
    if constexpr (kTwoGroups && kTwoPanels) _tile_stored(3, acc + 3 * kC, 64);
    return;
  }
  SI_STORE_Y(0, m0, mv0, n0, nv0);
  if constexpr (kTwoPanels) SI_STORE_Y(1, m0, mv0, n0 + kTile, nv1);
  if constexpr (kTwoGroups) SI_STORE_Y(2, m0 + kTile, mv1, n0, nv0);
  if constexpr (kTwoGroups && kTwoPanels) SI_STORE_Y(3, m0 + kTile, mv1, n0 + kTile, nv1);
}
#undef SI_STORE_Y

constexpr int64_t kKBlocks = 8;  // blocks of K per pass (see `tiles`)

template <Fmt F>
static void run_gemm(const Problem& p, int64_t n_begin, int64_t n_end) {
  static thread_local std::vector<unsigned char> wbuf;
  const size_t panel = kWBlockBytes * p.nb;
  const size_t acc_bytes = 4 * kTile * kTile * sizeof(float) * (kChunkGroups / 2);
  if (wbuf.size() < 2 * panel + acc_bytes + 64) wbuf.resize(2 * panel + acc_bytes + 64);
  auto* w0 = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(wbuf.data()) + 63) &
                                        ~uintptr_t{63});
  uint8_t* w1 = w0 + panel;
  auto* acc = reinterpret_cast<float*>(w0 + 2 * panel);  // [group pair][4 tiles][16 x 16]
  const int64_t groups = (p.m_total + kTile - 1) / kTile;
  const size_t gbytes = group_bytes(p.nb);
  auto rows_in = [&](int64_t g) {
    return static_cast<int>(std::min<int64_t>(kTile, p.m_total - kTile * g));
  };
  _tile_loadconfig(&kTileConfig);
  for (int64_t c0 = 0; c0 < groups; c0 += kChunkGroups) {
    const int64_t c1 = std::min(groups, c0 + kChunkGroups);
    for (int64_t n0 = n_begin; n0 < n_end; n0 += 2 * kTile) {
      const int nv0 = static_cast<int>(std::min<int64_t>(kTile, n_end - n0));
      const int nv1 =
          static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(kTile, n_end - n0 - kTile)));
      pack_weights<F>(p, n0, nv0, w0);
      if (nv1 > 0) pack_weights<F>(p, n0 + kTile, nv1, w1);
      for (int64_t b0 = 0; b0 < p.nb; b0 += kKBlocks) {
        const int64_t b1 = std::min(p.nb, b0 + kKBlocks);
        for (int64_t g = c0; g < c1; g += 2) {
          const uint8_t* x0 = p.xpack + g * gbytes;
          const uint8_t* x1 = x0 + gbytes;
          const int64_t m0 = kTile * g;
          const bool two = g + 1 < c1;
          const int mv0 = rows_in(g), mv1 = two ? rows_in(g + 1) : 0;
          float* a = acc + 4 * kTile * kTile * ((g - c0) / 2);
          if (two && nv1 > 0)
            tiles<true, true>(p, x0, x1, m0, mv0, mv1, w0, w1, n0, nv0, nv1, b0, b1, a);
          else if (two)
            tiles<true, false>(p, x0, x1, m0, mv0, mv1, w0, w1, n0, nv0, nv1, b0, b1, a);
          else if (nv1 > 0)
            tiles<false, true>(p, x0, x1, m0, mv0, mv1, w0, w1, n0, nv0, nv1, b0, b1, a);
          else
            tiles<false, false>(p, x0, x1, m0, mv0, mv1, w0, w1, n0, nv0, nv1, b0, b1, a);
        }
      }
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

}  // namespace isa_amx_bf16
