// Per-instruction-set body of the GGUF block matmul kernels; see gguf_matmul.cc.
//
// gguf_matmul.cc includes this file once per instruction set, each time inside a region that
// gives every function defined here that set as its target (GCC's `#pragma GCC target`, clang's
// `#pragma clang attribute`): SI_ISA_NS names the namespace, SI_ISA_VNNI says whether a dpbusd
// instruction exists (SI_ISA_EVEX: the AVX-512VL one, else AVX-VNNI's), SI_ISA_ROWS and
// SI_ISA_COLS give the tile (weight rows x x rows). So the file compiles without -march flags.
//
// The math, for each output row n of a tile and each x row m of it:
//   y[m, n] = sum_b d[n, b] * dx[m, b] * idot(n, m, b)     (+ m[n, b] * dx[m, b] * xsum[m, b])
// with idot the exact int32 dot of weight block b with x's int8 block b.
//
// Blocks are handled in pairs (b, b + 1) so that one 256-bit vector of int32 partial sums holds
// both: lanes 0-3 block b, lanes 4-7 block b + 1. For that, x is rounded into a pair layout
// matching how the weight bytes load (`XLayout`):
//   q4: one 32-byte load is two blocks' 16 bytes; its low nibbles are elements 0-15 of b and of
//       b + 1, its high nibbles elements 16-31: x pair = [x_b 0-15 | x_b+1 0-15 | x_b 16-31 |
//       x_b+1 16-31]. Two dot instructions per pair, one 32-byte weight load.
//   q8: P = [w_b 0-15 | w_b+1 16-31] (a blend of the loads at b and b + 1) and Q = [w_b 16-31 |
//       w_b+1 0-15] (the load at b + 16 bytes): x pair = [x_b 0-15 | x_b+1 16-31 | x_b 16-31 |
//       x_b+1 0-15].
// Four pairs (eight blocks) reduce with three horizontal adds to one vector of the eight exact
// block dots, in lane order [b0 b2 b4 b6 b1 b3 b5 b7]; x's per-block dx, xsum, sx are stored in
// that order, and the weight's d (and m) are permuted to it once per row and group. Then one
// int->float convert and one FMA by d * dx cover eight blocks.
//
// Making each byte product exact:
//   q4_0 / q4_1: nibbles are unsigned 0..15 and x is int8: u8 x s8 as is; q4_0's -8 is taken off
//     once per 8 blocks in int32 (idot = dot(nibble, xq) - 8 * xsum).
//   q8_0 with VNNI: w ^ 0x80 is w + 128 as an unsigned byte: idot = dot(w + 128, xq) - 128 * xsum.
//   q8_0 on AVX2: maddubs's int16 pair sums would overflow with w + 128, so |w| times
//     sign(xq, w): pair sums are at most 2 * 128 * 127 = 32512 < 32767. (q4 on AVX2: at most
//     2 * 15 * 127 = 3810.)

namespace SI_ISA_NS {

#define SI_INLINE inline __attribute__((always_inline))
#define SI_UNROLL _Pragma("GCC unroll 16")
#ifndef SI_PREFETCH_ROWS
#define SI_PREFETCH_ROWS 16
#endif

// acc + per-lane sums of 4 (unsigned u byte) * (signed s byte) products.
static SI_INLINE __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#if SI_ISA_VNNI && SI_ISA_EVEX
  return _mm256_dpbusd_epi32(acc, u, s);
#elif SI_ISA_VNNI
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  const __m256i p16 = _mm256_maddubs_epi16(u, s);
  return _mm256_add_epi32(acc, _mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
#endif
}

// Signed weight bytes w times signed x bytes, as lanes of 4-product sums (+ 128 * sum(x) per
// lane with VNNI, taken off later with the block's xsum).
static SI_INLINE __m256i dot_s8s8(__m256i acc, __m256i w, __m256i x) {
#if SI_ISA_VNNI
  return dot_u8s8(acc, _mm256_xor_si256(w, _mm256_set1_epi8(static_cast<char>(0x80))), x);
#else
  return dot_u8s8(acc, _mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
#endif
}

// The pair (2p, 2p + 1) of a weight row against x's pair p: lanes 0-3 block 2p, 4-7 block 2p + 1.
// `single`: only block 2p exists (the last of an odd row); nothing past it is read.
template <Fmt F>
static SI_INLINE __m256i pair_dot(const uint8_t* wrow, const int8_t* xpair, int64_t p,
                                  bool single) {
  const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xpair));
  const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xpair + 32));
  if constexpr (F == Fmt::kQ8_0) {
    const uint8_t* b = wrow + 64 * p;
    const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
    __m256i pv, qv;
    if (single) {
      pv = l0;                                     // [b 0-15 | b 16-31]; x's upper half is zero
      qv = _mm256_permute2x128_si256(l0, l0, 1);  // [b 16-31 | b 0-15]
    } else {
      const __m256i l2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32));
      pv = _mm256_blend_epi32(l0, l2, 0xF0);  // [b 0-15 | b+1 16-31]
      qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16));  // [b 16-31 | b+1 0-15]
    }
    return dot_s8s8(dot_s8s8(_mm256_setzero_si256(), pv, x0), qv, x1);
  } else {
    const uint8_t* b = wrow + 32 * p;
    const __m256i q =
        single ? _mm256_set_m128i(_mm_setzero_si128(),
                                   _mm_loadu_si128(reinterpret_cast<const __m128i*>(b)))
               : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
    const __m256i mask = _mm256_set1_epi8(0x0F);
    const __m256i lo = _mm256_and_si256(q, mask);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), mask);
    return dot_u8s8(dot_u8s8(_mm256_setzero_si256(), lo, x0), hi, x1);
  }
}

// Eight fp16 values p[0 .. cnt) (zeros past cnt) as floats in lane order [0 2 4 6 1 3 5 7].
// `row_start` is the row's first value: a short tail is read as the row's last 8 values when the
// row has 8 (so nothing past the row is touched), else copied.
static SI_INLINE __m256 load_scales(const uint16_t* p, int cnt, const uint16_t* row_start) {
  __m128i h;
  if (cnt == 8) {
    h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  } else {
#if SI_ISA_EVEX
    (void)row_start;
    h = _mm_maskz_loadu_epi16(static_cast<__mmask8>((1u << cnt) - 1), p);
#else
    if (p + cnt - 8 >= row_start) {
      // The 8 values ending at p + cnt, moved down by 8 - cnt lanes, zeros above.
      alignas(16) static const int8_t kShift[9][16] = {
          {-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1},
          {14, 15, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1},
          {12, 13, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1},
          {10, 11, 12, 13, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1},
          {8, 9, 10, 11, 12, 13, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1},
          {6, 7, 8, 9, 10, 11, 12, 13, 14, 15, -1, -1, -1, -1, -1, -1},
          {4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, -1, -1, -1, -1},
          {2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, -1, -1},
          {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}};
      h = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + cnt - 8)),
                           _mm_load_si128(reinterpret_cast<const __m128i*>(kShift[cnt])));
    } else {
      alignas(16) uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int i = 0; i < cnt; ++i) tmp[i] = p[i];
      h = _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
    }
#endif
  }
  return _mm256_permutevar8x32_ps(_mm256_cvtph_ps(h), _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
}

static SI_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Blocks g .. g + 7 of a tile (the first cnt when !kFull), added into acc.
template <Fmt F, int R, int C, bool kFull>
static SI_INLINE void group(const Problem& pr, const uint8_t* const* wrow,
                            const uint16_t* const* drow, const uint16_t* const* mrow,
                            const int8_t* const* xrow, const float* const* dxrow,
                            const int32_t* const* sumrow, const float* const* sxrow, int64_t g,
                            int cnt, __m256 (&acc)[R][C]) {
  const int64_t p0 = g / 2;
  const int npairs = kFull ? 4 : (cnt + 1) / 2;
  const bool last_single = !kFull && (cnt & 1);
  // Pairs 0 and 1 reduce to h[0] (b0 b0 b2 b2 | b1 b1 b3 b3), pairs 2 and 3 to h[1], each as
  // soon as its two pairs are done (fewer live registers than keeping all four).
  __m256i h[2][R][C];
  SI_UNROLL
  for (int half = 0; half < 2; ++half) {
    __m256i v[2][R][C];
    SI_UNROLL
    for (int e = 0; e < 2; ++e) {
      const int q = 2 * half + e;
      if (kFull || q < npairs) {
        const bool single = !kFull && last_single && q == npairs - 1;
        SI_UNROLL
        for (int c = 0; c < C; ++c)
          SI_UNROLL
          for (int r = 0; r < R; ++r)
            v[e][r][c] = pair_dot<F>(wrow[r], xrow[c] + 64 * (p0 + q), p0 + q, single);
      } else {
        SI_UNROLL
        for (int r = 0; r < R; ++r)
          SI_UNROLL
          for (int c = 0; c < C; ++c) v[e][r][c] = _mm256_setzero_si256();
      }
    }
    SI_UNROLL
    for (int r = 0; r < R; ++r)
      SI_UNROLL
      for (int c = 0; c < C; ++c)
        h[half][r][c] = (kFull || 2 * half < npairs)
                            ? _mm256_hadd_epi32(v[0][r][c], v[1][r][c])
                            : _mm256_setzero_si256();
  }
  __m256 dv[R], mv[R];
  SI_UNROLL
  for (int r = 0; r < R; ++r) {
    dv[r] = load_scales(drow[r] + g, kFull ? 8 : cnt, drow[r]);
    if constexpr (F == Fmt::kQ4_1) mv[r] = load_scales(mrow[r] + g, kFull ? 8 : cnt, mrow[r]);
  }
  (void)pr;
  SI_UNROLL
  for (int c = 0; c < C; ++c) {
    // dx, xsum, sx: lane order [0 2 4 6 1 3 5 7], zero-padded to a multiple of 8 blocks.
    const __m256 dxv = _mm256_loadu_ps(dxrow[c] + g);
    constexpr int kShift = F == Fmt::kQ4_0 ? 3 : (F == Fmt::kQ8_0 && SI_ISA_VNNI) ? 7 : 0;
    __m256i corr = _mm256_setzero_si256();
    if constexpr (kShift != 0)
      corr = _mm256_slli_epi32(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sumrow[c] + g)), kShift);
    __m256 sxv = _mm256_setzero_ps();
    if constexpr (F == Fmt::kQ4_1) sxv = _mm256_loadu_ps(sxrow[c] + g);
    SI_UNROLL
    for (int r = 0; r < R; ++r) {
      __m256i dots = _mm256_hadd_epi32(h[0][r][c], h[1][r][c]);  // b0 b2 b4 b6 | b1 b3 b5 b7
      if constexpr (kShift != 0) dots = _mm256_sub_epi32(dots, corr);
      acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), _mm256_mul_ps(dv[r], dxv), acc[r][c]);
      if constexpr (F == Fmt::kQ4_1) acc[r][c] = _mm256_fmadd_ps(mv[r], sxv, acc[r][c]);
    }
  }
}

// One tile: output rows [n0, n0 + R) and x rows [m0, m0 + C).
template <Fmt F, int R, int C>
static void tile(const Problem& p, int64_t n0, int64_t m0) {
  const int64_t nb = p.nb;
  const uint8_t* wrow[R];
  const uint16_t* drow[R];
  const uint16_t* mrow[R];
  SI_UNROLL
  for (int r = 0; r < R; ++r) {
    wrow[r] = p.qs + (n0 + r) * p.qs_row_bytes;
    drow[r] = p.d + (n0 + r) * nb;
    mrow[r] = F == Fmt::kQ4_1 ? p.m + (n0 + r) * nb : nullptr;
  }
  const int8_t* xrow[C];
  const float* dxrow[C];
  const int32_t* sumrow[C];
  const float* sxrow[C];
  SI_UNROLL
  for (int c = 0; c < C; ++c) {
    xrow[c] = p.xq + (m0 + c) * p.xq_row_bytes;
    dxrow[c] = p.dx + (m0 + c) * p.nb_pad;
    sumrow[c] = p.xsum + (m0 + c) * p.nb_pad;
    sxrow[c] = p.sx + (m0 + c) * p.nb_pad;
  }
  __m256 acc[R][C];
  SI_UNROLL
  for (int r = 0; r < R; ++r)
    SI_UNROLL
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  if (m0 == 0 && n0 + R + SI_PREFETCH_ROWS <= p.n_total) {
    // The rows SI_PREFETCH_ROWS ahead (the hardware prefetcher alone leaves DRAM bandwidth
    // unused): their qs, d and m bytes, a cache line at a time.
    const int64_t ahead = n0 + SI_PREFETCH_ROWS;
    const char* q = reinterpret_cast<const char*>(p.qs + ahead * p.qs_row_bytes);
    for (int64_t off = 0; off < R * p.qs_row_bytes; off += 64) _mm_prefetch(q + off, _MM_HINT_T0);
    const char* dp = reinterpret_cast<const char*>(p.d + ahead * nb);
    for (int64_t off = 0; off < R * nb * 2; off += 64) _mm_prefetch(dp + off, _MM_HINT_T0);
    if constexpr (F == Fmt::kQ4_1) {
      const char* mp = reinterpret_cast<const char*>(p.m + ahead * nb);
      for (int64_t off = 0; off < R * nb * 2; off += 64) _mm_prefetch(mp + off, _MM_HINT_T0);
    }
  }
  const int64_t full_end = nb & ~int64_t{7};
  for (int64_t g = 0; g < full_end; g += 8)
    group<F, R, C, true>(p, wrow, drow, mrow, xrow, dxrow, sumrow, sxrow, g, 8, acc);
  if (full_end < nb)
    group<F, R, C, false>(p, wrow, drow, mrow, xrow, dxrow, sumrow, sxrow, full_end,
                          static_cast<int>(nb - full_end), acc);
  SI_UNROLL
  for (int c = 0; c < C; ++c)
    SI_UNROLL
    for (int r = 0; r < R; ++r) p.y[(m0 + c) * p.n_total + n0 + r] = hsum(acc[r][c]);
}

// Rounds x rows [m_begin, m_end) to int8 blocks in `layout`: dx = max|x| / 127 (float32
// division), xq = x / dx (float32 division) rounded half away from zero, clipped to [-127, 127];
// a block with max|x| = 0 gets dx = 0 and xq = 0. Also xsum = the sum of a block's xq and
// sx = dx * xsum. kNatural: xq row = blocks in order, per-block values at their block index
// (for the tests); the pair layouts: as described at the top of this file.
static void quantize_rows(const float* x, int64_t m_begin, int64_t m_end, XLayout layout,
                          const Problem& p) {
  const __m256 sign_mask = _mm256_set1_ps(-0.0f);
  const __m256 half = _mm256_set1_ps(0.5f);
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t mi = m_begin; mi < m_end; ++mi) {
    const float* xr = x + mi * p.nb * 32;
    int8_t* qr = const_cast<int8_t*>(p.xq) + mi * p.xq_row_bytes;
    float* dxr = const_cast<float*>(p.dx) + mi * p.nb_pad;
    int32_t* sumr = const_cast<int32_t*>(p.xsum) + mi * p.nb_pad;
    float* sxr = const_cast<float*>(p.sx) + mi * p.nb_pad;
    if (layout != XLayout::kNatural && (p.nb & 1))  // the last pair's missing block reads as 0
      std::memset(qr + 32 * (p.nb - 1), 0, 64);
    for (int64_t b = 0; b < p.nb; ++b) {
      __m256 v[4];
      __m256 amax = _mm256_setzero_ps();
      SI_UNROLL
      for (int i = 0; i < 4; ++i) {
        v[i] = _mm256_loadu_ps(xr + 32 * b + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_mask, v[i]));
      }
      __m128 a4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      a4 = _mm_max_ps(a4, _mm_movehl_ps(a4, a4));
      a4 = _mm_max_ss(a4, _mm_movehdup_ps(a4));
      const float am = _mm_cvtss_f32(a4);
      __m256i bytes = _mm256_setzero_si256();
      float dxs = 0.0f;
      int32_t sum = 0;
      if (am > 0.0f) {
        dxs = am / 127.0f;
        const __m256 dxv = _mm256_set1_ps(dxs);
        __m256i iv[4];
        __m256i isum = _mm256_setzero_si256();
        SI_UNROLL
        for (int i = 0; i < 4; ++i) {
          const __m256 q = _mm256_div_ps(v[i], dxv);
          const __m256 t = _mm256_round_ps(q, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
          const __m256 frac = _mm256_andnot_ps(sign_mask, _mm256_sub_ps(q, t));
          const __m256 step = _mm256_or_ps(_mm256_and_ps(q, sign_mask), one);  // +-1 as q
          const __m256 ge = _mm256_cmp_ps(frac, half, _CMP_GE_OQ);
          __m256 rq = _mm256_add_ps(t, _mm256_and_ps(ge, step));
          rq = _mm256_min_ps(_mm256_max_ps(rq, lo), hi);
          iv[i] = _mm256_cvtps_epi32(rq);
          isum = _mm256_add_epi32(isum, iv[i]);
        }
        const __m256i p01 = _mm256_packs_epi32(iv[0], iv[1]);
        const __m256i p23 = _mm256_packs_epi32(iv[2], iv[3]);
        bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23), order);
        __m128i s4 =
            _mm_add_epi32(_mm256_castsi256_si128(isum), _mm256_extracti128_si256(isum, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        sum = _mm_cvtsi128_si32(s4);
      }
      // Where the block's two 16-byte halves go, and where its per-block values go.
      int64_t at_lo, at_hi, pos;
      const int64_t pair = 64 * (b / 2), odd = b & 1;
      switch (layout) {
        case XLayout::kNatural:
          at_lo = 32 * b, at_hi = 32 * b + 16, pos = b;
          break;
        case XLayout::kQ4Pairs:
          at_lo = pair + 16 * odd, at_hi = pair + 32 + 16 * odd;
          pos = (b & ~int64_t{7}) + odd * 4 + ((b & 7) >> 1);
          break;
        default:  // kQ8Pairs
          at_lo = pair + (odd ? 48 : 0), at_hi = pair + (odd ? 16 : 32);
          pos = (b & ~int64_t{7}) + odd * 4 + ((b & 7) >> 1);
          break;
      }
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + at_lo), _mm256_castsi256_si128(bytes));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + at_hi),
                       _mm256_extracti128_si256(bytes, 1));
      dxr[pos] = dxs;
      sumr[pos] = sum;
      sxr[pos] = dxs * static_cast<float>(sum);
    }
  }
}

// Output rows [n_begin, n_end) for every x row.
template <Fmt F>
static void run_rows(const Problem& p, int64_t n_begin, int64_t n_end) {
  constexpr int kR = SI_ISA_ROWS;
  constexpr int kC = SI_ISA_COLS;
  constexpr int64_t kMBlock = 64;  // x rows kept hot while a stretch of weight rows streams by
  {
    // The first SI_PREFETCH_ROWS rows (the tiles prefetch the rows that far ahead of them).
    const int64_t pf_end = n_begin + SI_PREFETCH_ROWS < n_end ? n_begin + SI_PREFETCH_ROWS : n_end;
    const char* q = reinterpret_cast<const char*>(p.qs + n_begin * p.qs_row_bytes);
    for (int64_t off = 0; off < (pf_end - n_begin) * p.qs_row_bytes; off += 64)
      _mm_prefetch(q + off, _MM_HINT_T0);
    const char* dp = reinterpret_cast<const char*>(p.d + n_begin * p.nb);
    for (int64_t off = 0; off < (pf_end - n_begin) * p.nb * 2; off += 64)
      _mm_prefetch(dp + off, _MM_HINT_T0);
    if constexpr (F == Fmt::kQ4_1) {
      const char* mp = reinterpret_cast<const char*>(p.m + n_begin * p.nb);
      for (int64_t off = 0; off < (pf_end - n_begin) * p.nb * 2; off += 64)
        _mm_prefetch(mp + off, _MM_HINT_T0);
    }
  }
  for (int64_t mb = 0; mb < p.m_total; mb += kMBlock) {
    const int64_t me = mb + kMBlock < p.m_total ? mb + kMBlock : p.m_total;
    int64_t n = n_begin;
    for (; n + kR <= n_end; n += kR) {
      int64_t m = mb;
      if constexpr (kC > 1)
        for (; m + kC <= me; m += kC) tile<F, kR, kC>(p, n, m);
      for (; m < me; ++m) tile<F, kR, 1>(p, n, m);
    }
    for (; n < n_end; ++n) {
      int64_t m = mb;
      if constexpr (kC > 1)
        for (; m + kC <= me; m += kC) tile<F, 1, kC>(p, n, m);
      for (; m < me; ++m) tile<F, 1, 1>(p, n, m);
    }
  }
}

// ---- many x rows: the row-tiled path (Problem::gemm) --------------------------------------------
//
// Why a second path: the tiles above re-load and re-unpack every weight block for each
// SI_ISA_COLS rows of x and spend three horizontal adds per 8 blocks per (weight row, x row);
// that is fine for decode, where the weights come from memory once, but with 64+ rows of x it is
// all of the cost. Here a panel of kPanel (8) weight rows is unpacked once into the layout a dot
// instruction wants and then used against every row of x:
//
//   panel block b, group j (0..7): one vector whose lane n holds w[n0 + n, b, 4j .. 4j + 3]
//   (4 bytes, natural element order; q4: the nibble values, q8_0: w ^ 0x80 = w + 128 with VNNI,
//   w as is on AVX2), so that dpbusd(acc, panel[b][j], broadcast(xq[m, b, 4j .. 4j + 3]))
//   adds 4 products to each of 8 weight rows at once. After the 8 groups each lane holds the
//   exact int32 dot of one weight row's block b with x row m's: no horizontal adds at all, and
//   x is read in the natural layout (XLayout::kNatural, per-block values at their block index).
//
// Then, per block, the float work is the same as the tiles': y += d * dx * idot (+ m * sx), in
// block order. A tile is kGemmRows rows of x against one panel, the panel's 8 weight vectors of
// a block held in registers across those rows. x is walked in chunks of kGemmMChunk rows (so it
// stays in L2 while the panels stream), each panel unpacked once per chunk.

constexpr int kPanel = 8;
#if SI_ISA_EVEX
constexpr int kGemmRows = 8;  // 32 vector registers: 8 weights + 8 accumulators + temps
#else
constexpr int kGemmRows = 4;  // 16 registers
#endif
constexpr int64_t kGemmMChunk = 256;

// Weight rows [n0, n0 + nvalid) (nvalid <= 8; missing lanes are zero and never stored) into the
// panel layout: w [nb][8 groups][8 rows][4 bytes], d (and m) as float [nb][8 rows].
template <Fmt F>
static void pack_panel(const Problem& p, int64_t n0, int nvalid, uint8_t* wp, float* dp,
                       float* mp) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i valid = _mm256_cmpgt_epi32(_mm256_set1_epi32(nvalid), lane);
  const __m256i offs = _mm256_mullo_epi32(lane, _mm256_set1_epi32(static_cast<int>(p.qs_row_bytes)));
  const uint8_t* base = p.qs + n0 * p.qs_row_bytes;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int64_t b = 0; b < p.nb; ++b) {
    __m256i* out = reinterpret_cast<__m256i*>(wp + 256 * b);
    // A masked gather reads nothing for the lanes past nvalid.
    if constexpr (F == Fmt::kQ8_0) {
      for (int j = 0; j < 8; ++j) {
        __m256i v = _mm256_mask_i32gather_epi32(
            _mm256_setzero_si256(), reinterpret_cast<const int*>(base + 32 * b + 4 * j), offs,
            valid, 1);
#if SI_ISA_VNNI
        v = _mm256_xor_si256(v, _mm256_set1_epi8(static_cast<char>(0x80)));
#endif
        _mm256_store_si256(out + j, v);
      }
    } else {
      // Bytes 4j .. 4j + 3 hold elements 4j .. (low nibbles) and 16 + 4j .. (high nibbles).
      for (int j = 0; j < 4; ++j) {
        const __m256i v = _mm256_mask_i32gather_epi32(
            _mm256_setzero_si256(), reinterpret_cast<const int*>(base + 16 * b + 4 * j), offs,
            valid, 1);
        _mm256_store_si256(out + j, _mm256_and_si256(v, low4));
        _mm256_store_si256(out + 4 + j, _mm256_and_si256(_mm256_srli_epi16(v, 4), low4));
      }
    }
    alignas(16) uint16_t hd[8] = {0, 0, 0, 0, 0, 0, 0, 0}, hm[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int i = 0; i < nvalid; ++i) {
      hd[i] = p.d[(n0 + i) * p.nb + b];
      if constexpr (F == Fmt::kQ4_1) hm[i] = p.m[(n0 + i) * p.nb + b];
    }
    _mm256_store_ps(dp + 8 * b, _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<__m128i*>(hd))));
    if constexpr (F == Fmt::kQ4_1)
      _mm256_store_ps(mp + 8 * b, _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<__m128i*>(hm))));
  }
}

static SI_INLINE __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// The exact int32 dots of one x block (32 bytes at xb) with the panel's block (w[8]), one per
// lane, before the q4_0 / q8_0-VNNI offset correction.
template <Fmt F>
static SI_INLINE __m256i panel_block_dot(const __m256i (&w)[8], const int8_t* xb) {
#if SI_ISA_VNNI
  // Two chains of four so the dpbusd latency overlaps.
  __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
  SI_UNROLL
  for (int j = 0; j < 8; j += 2) {
    a0 = dot_u8s8(a0, w[j], bcast4(xb + 4 * j));
    a1 = dot_u8s8(a1, w[j + 1], bcast4(xb + 4 * j + 4));
  }
  return _mm256_add_epi32(a0, a1);
#else
  if constexpr (F == Fmt::kQ8_0) {
    // |w| times x with w's sign; each int16 pair sum <= 2 * 128 * 127, so widen every step.
    __m256i a = _mm256_setzero_si256();
    SI_UNROLL
    for (int j = 0; j < 8; ++j)
      a = dot_u8s8(a, _mm256_abs_epi8(w[j]), _mm256_sign_epi8(bcast4(xb + 4 * j), w[j]));
    return a;
  } else {
    // Nibbles: each int16 pair sum <= 2 * 15 * 127, so all 8 groups add up in int16
    // (8 * 3810 = 30480 < 32767) before one widening madd.
    __m256i s = _mm256_setzero_si256();
    SI_UNROLL
    for (int j = 0; j < 8; ++j)
      s = _mm256_add_epi16(s, _mm256_maddubs_epi16(w[j], bcast4(xb + 4 * j)));
    return _mm256_madd_epi16(s, _mm256_set1_epi16(1));
  }
#endif
}

// x rows [m0, m0 + MT) against the packed panel of weight rows [n0, n0 + nvalid).
template <Fmt F, int MT>
static void gemm_tile(const Problem& p, const uint8_t* wp, const float* dp, const float* mp,
                      int64_t m0, int64_t n0, int nvalid) {
  __m256 acc[MT];
  SI_UNROLL
  for (int r = 0; r < MT; ++r) acc[r] = _mm256_setzero_ps();
  constexpr int kShift = F == Fmt::kQ4_0 ? 3 : (F == Fmt::kQ8_0 && SI_ISA_VNNI) ? 7 : 0;
  for (int64_t b = 0; b < p.nb; ++b) {
    __m256i w[8];
    SI_UNROLL
    for (int j = 0; j < 8; ++j)
      w[j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(wp + 256 * b + 32 * j));
    const __m256 dv = _mm256_load_ps(dp + 8 * b);
    __m256 mv = _mm256_setzero_ps();
    if constexpr (F == Fmt::kQ4_1) mv = _mm256_load_ps(mp + 8 * b);
    SI_UNROLL
    for (int r = 0; r < MT; ++r) {
      const int64_t m = m0 + r;
      __m256i dots = panel_block_dot<F>(w, p.xq + m * p.xq_row_bytes + 32 * b);
      if constexpr (kShift != 0)
        dots = _mm256_sub_epi32(dots, _mm256_set1_epi32(p.xsum[m * p.nb_pad + b] << kShift));
      const __m256 scale = _mm256_mul_ps(dv, _mm256_set1_ps(p.dx[m * p.nb_pad + b]));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), scale, acc[r]);
      if constexpr (F == Fmt::kQ4_1)
        acc[r] = _mm256_fmadd_ps(mv, _mm256_set1_ps(p.sx[m * p.nb_pad + b]), acc[r]);
    }
  }
  const __m256i store_mask =
      _mm256_cmpgt_epi32(_mm256_set1_epi32(nvalid), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  SI_UNROLL
  for (int r = 0; r < MT; ++r) {
    float* out = p.y + (m0 + r) * p.n_total + n0;
    if (nvalid == kPanel)
      _mm256_storeu_ps(out, acc[r]);
    else
      _mm256_maskstore_ps(out, store_mask, acc[r]);
  }
}

// gemm_tile with the decode tiles' order of float sums (Problem::decode_order), so the same
// bits as run_rows: each block's term goes to the accumulator of its class b mod 8 (the decode
// tiles' lanes), in block order, and the eight classes are added at the end as the tiles'
// horizontal sum adds their lanes: ((c0 + c1) + (c4 + c5)) + ((c2 + c3) + (c6 + c7)). The
// terms themselves are the same operations as the tiles' (d * dx, one FMA; q4_1's m * sx).
// Decode at a batch of 32+ rows takes this path: the weights unpacked once for all rows.
template <Fmt F, int MT>
static void gemm_tile_decode_order(const Problem& p, const uint8_t* wp, const float* dp,
                                   const float* mp, int64_t m0, int64_t n0, int nvalid) {
  constexpr int kShift = F == Fmt::kQ4_0 ? 3 : (F == Fmt::kQ8_0 && SI_ISA_VNNI) ? 7 : 0;
  __m256 cls[8][MT];
  for (int c = 0; c < 8; ++c) {
    __m256 acc[MT];
    SI_UNROLL
    for (int r = 0; r < MT; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = c; b < p.nb; b += 8) {
      __m256i w[8];
      SI_UNROLL
      for (int j = 0; j < 8; ++j)
        w[j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(wp + 256 * b + 32 * j));
      const __m256 dv = _mm256_load_ps(dp + 8 * b);
      __m256 mv = _mm256_setzero_ps();
      if constexpr (F == Fmt::kQ4_1) mv = _mm256_load_ps(mp + 8 * b);
      SI_UNROLL
      for (int r = 0; r < MT; ++r) {
        const int64_t m = m0 + r;
        __m256i dots = panel_block_dot<F>(w, p.xq + m * p.xq_row_bytes + 32 * b);
        if constexpr (kShift != 0)
          dots = _mm256_sub_epi32(dots, _mm256_set1_epi32(p.xsum[m * p.nb_pad + b] << kShift));
        const __m256 scale = _mm256_mul_ps(dv, _mm256_set1_ps(p.dx[m * p.nb_pad + b]));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), scale, acc[r]);
        if constexpr (F == Fmt::kQ4_1)
          acc[r] = _mm256_fmadd_ps(mv, _mm256_set1_ps(p.sx[m * p.nb_pad + b]), acc[r]);
      }
    }
    SI_UNROLL
    for (int r = 0; r < MT; ++r) cls[c][r] = acc[r];
  }
  const __m256i store_mask =
      _mm256_cmpgt_epi32(_mm256_set1_epi32(nvalid), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  SI_UNROLL
  for (int r = 0; r < MT; ++r) {
    const __m256 sum = _mm256_add_ps(
        _mm256_add_ps(_mm256_add_ps(cls[0][r], cls[1][r]), _mm256_add_ps(cls[4][r], cls[5][r])),
        _mm256_add_ps(_mm256_add_ps(cls[2][r], cls[3][r]), _mm256_add_ps(cls[6][r], cls[7][r])));
    float* out = p.y + (m0 + r) * p.n_total + n0;
    if (nvalid == kPanel)
      _mm256_storeu_ps(out, sum);
    else
      _mm256_maskstore_ps(out, store_mask, sum);
  }
}

// Output rows [n_begin, n_end) for every x row, by panels.
template <Fmt F, bool kDecodeOrder>
static void run_gemm(const Problem& p, int64_t n_begin, int64_t n_end) {
  // The unpacked panel: a per-thread buffer that only grows (8 rows: 256 bytes + 32 (+ 32) of
  // scales per block).
  static thread_local std::vector<unsigned char> buf;
  const size_t wbytes = static_cast<size_t>(256 * p.nb), sbytes = static_cast<size_t>(32 * p.nb);
  if (buf.size() < wbytes + 2 * sbytes + 64) buf.resize(wbytes + 2 * sbytes + 64);
  const auto addr = (reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t{63};
  auto* wp = reinterpret_cast<uint8_t*>(addr);
  auto* dp = reinterpret_cast<float*>(addr + wbytes);
  auto* mp = reinterpret_cast<float*>(addr + wbytes + sbytes);
  for (int64_t mb = 0; mb < p.m_total; mb += kGemmMChunk) {
    const int64_t me = mb + kGemmMChunk < p.m_total ? mb + kGemmMChunk : p.m_total;
    for (int64_t n0 = n_begin; n0 < n_end; n0 += kPanel) {
      const int nvalid = static_cast<int>(n_end - n0 < kPanel ? n_end - n0 : kPanel);
      pack_panel<F>(p, n0, nvalid, wp, dp, mp);
      int64_t m = mb;
      if constexpr (kDecodeOrder) {
        for (; m + 4 <= me; m += 4) gemm_tile_decode_order<F, 4>(p, wp, dp, mp, m, n0, nvalid);
        for (; m < me; ++m) gemm_tile_decode_order<F, 1>(p, wp, dp, mp, m, n0, nvalid);
      } else {
        for (; m + kGemmRows <= me; m += kGemmRows)
          gemm_tile<F, kGemmRows>(p, wp, dp, mp, m, n0, nvalid);
        if constexpr (kGemmRows > 4)
          for (; m + 4 <= me; m += 4) gemm_tile<F, 4>(p, wp, dp, mp, m, n0, nvalid);
        for (; m < me; ++m) gemm_tile<F, 1>(p, wp, dp, mp, m, n0, nvalid);
      }
    }
  }
}

static void run(const Problem& p, int64_t n_begin, int64_t n_end) {
  WithFormat(p.fmt, [&](auto f) {
    if (p.gemm && p.decode_order)
      run_gemm<decltype(f)::value, true>(p, n_begin, n_end);
    else if (p.gemm)
      run_gemm<decltype(f)::value, false>(p, n_begin, n_end);
    else
      run_rows<decltype(f)::value>(p, n_begin, n_end);
  });
}

#undef SI_INLINE
#undef SI_UNROLL

}  // namespace SI_ISA_NS
