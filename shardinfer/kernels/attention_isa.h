// The attention's arithmetic for one instruction set (prefill and decode): included by
// attention.cc once per target (AVX2 + FMA, AVX-512F), inside a namespace and a `#pragma GCC target`. The
// code is written on 16-float GCC vectors, one zmm register with AVX-512 and two ymm with AVX2,
// so both targets do the same operations in the same order and give the same bits.
//
// Not a standalone header: attention.cc defines Problem, Item, DecodeProblem and the constants
// first.

typedef float V16 __attribute__((vector_size(64), aligned(4)));
typedef int32_t I16 __attribute__((vector_size(64), aligned(4)));

static inline __attribute__((always_inline)) V16 Load(const float* p) {
  V16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
static inline __attribute__((always_inline)) void Store(float* p, V16 v) {
  std::memcpy(p, &v, sizeof v);
}
// (Not V16{} + x: that is an addition of 0, which the compiler must keep for x = -0.)
static inline __attribute__((always_inline)) V16 Splat(float x) {
  return V16{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
}

// exp(x) for x <= 0 (a score minus its row's maximum; -inf and anything below -87 give
// exp(-87), which the caller's mask turns into 0). 2^n * P(r) with n = round(x / ln 2),
// r = x - n ln 2 in two parts (Cody-Waite), P the degree-6 Taylor polynomial: |r| <= 0.35,
// so its error (r^7 / 7!) stays under 5e-8 relative.
static inline __attribute__((always_inline)) V16 Exp(V16 x) {
  const V16 lo = Splat(-87.0f);
  x = x < lo ? lo : x;
  const V16 shifter = Splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  V16 t = x * Splat(1.44269504088896341f) + shifter;
  const V16 n = t - shifter;
  V16 r = x - n * Splat(0.693359375f);  // ln 2's high part: n * it is exact
  r = r - n * Splat(-2.12194440e-4f);   // and the rest
  V16 p = Splat(1.0f / 720.0f);
  p = p * r + Splat(1.0f / 120.0f);
  p = p * r + Splat(1.0f / 24.0f);
  p = p * r + Splat(1.0f / 6.0f);
  p = p * r + Splat(0.5f);
  p = p * r + Splat(1.0f);
  p = p * r + Splat(1.0f);
  const I16 bits = (__builtin_convertvector(n, I16) + 127) << 23;  // 2^n, n >= -126
  V16 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// Scores of kQueries query vectors (qd [D][kQueries]: the tile's queries, head_dim first)
// against keys [j0, j0 + 32): each a sum over head_dim in order, one fused multiply-add per
// term (kt is [D, S]: keys along its rows).
// NQ queries (qd [D][NQ]); a query's scores do not depend on NQ or on the others.
template <int NQ = kQueries>
static inline __attribute__((always_inline)) void ScoreTile(const float* qd, const float* kt,
                                                             int64_t S, int64_t D, int64_t j0,
                                                             float* const* out) {
  V16 acc[NQ][2];
  for (int i = 0; i < NQ; ++i) acc[i][0] = acc[i][1] = V16{};
  for (int64_t d = 0; d < D; ++d) {
    const float* row = kt + d * S + j0;
    const V16 k0 = Load(row), k1 = Load(row + 16);
#pragma GCC unroll 8
    for (int i = 0; i < NQ; ++i) {
      const V16 qi = Splat(qd[d * NQ + i]);
      acc[i][0] = qi * k0 + acc[i][0];
      acc[i][1] = qi * k1 + acc[i][1];
    }
  }
  for (int i = 0; i < NQ; ++i) {
    Store(out[i] + j0, acc[i][0]);
    Store(out[i] + j0 + 16, acc[i][1]);
  }
}

// out[i][c0 .. c0 + 16 kValueCols) = sum over the listed key groups' keys j of p[i][j] * v[j]
// (p[i] = p0 + i * stride): keys in order, one fused multiply-add per term (p is 0 where a key
// is not seen). `resume`: the sum goes on from what out holds (a float32 store and load lose
// nothing, so two calls over groups A then B give the bits of one call over A and B).
static inline __attribute__((always_inline)) void ValueTile(const float* p0, int64_t stride,
                                                             const float* v, int64_t D,
                                                             int64_t c0, const int32_t* groups,
                                                             int64_t n_groups, float* const* out,
                                                             bool resume = false) {
  V16 acc[kValueQueries][kValueCols];
  for (int i = 0; i < kValueQueries; ++i)
    for (int c = 0; c < kValueCols; ++c)
      acc[i][c] = resume ? Load(out[i] + c0 + 16 * c) : V16{};
  for (int64_t g = 0; g < n_groups; ++g) {
    const int64_t j_begin = int64_t{groups[g]} * kKeyGroup;
    for (int64_t j = j_begin; j < j_begin + kKeyGroup; ++j) {
      const float* row = v + j * D + c0;
      V16 vj[kValueCols];
      for (int c = 0; c < kValueCols; ++c) vj[c] = Load(row + 16 * c);
#pragma GCC unroll 8
      for (int i = 0; i < kValueQueries; ++i) {
        const V16 pj = Splat(p0[i * stride + j]);
        for (int c = 0; c < kValueCols; ++c) acc[i][c] = pj * vj[c] + acc[i][c];
      }
    }
  }
  for (int i = 0; i < kValueQueries; ++i)
    for (int c = 0; c < kValueCols; ++c) Store(out[i] + c0 + 16 * c, acc[i][c]);
}

// One row's softmax over the seen keys, in place: p = exp(s - max) where seen, else 0.
// Returns the sum of p (16 lanes, then the lanes in order).
static inline float SoftmaxRow(float* s, const int32_t* kpos, int32_t qpos, int32_t window,
                               const int32_t* groups, int64_t n_groups) {
  const I16 qp = I16{qpos, qpos, qpos, qpos, qpos, qpos, qpos, qpos,
                     qpos, qpos, qpos, qpos, qpos, qpos, qpos, qpos};
  V16 top = Splat(-INFINITY);
  for (int64_t g = 0; g < n_groups; ++g) {
    for (int64_t j = int64_t{groups[g]} * kKeyGroup, e = j + kKeyGroup; j < e; j += 16) {
      I16 kp;
      std::memcpy(&kp, kpos + j, sizeof kp);
      I16 seen = kp <= qp;
      if (window > 0) seen &= (qp - kp) < (I16{} + window);
      const V16 x = Load(s + j);
      const V16 masked = seen ? x : Splat(-INFINITY);
      top = masked > top ? masked : top;
      Store(s + j, masked);
    }
  }
  float m = -INFINITY;
  for (int l = 0; l < 16; ++l) m = std::max(m, top[l]);
  if (m == -INFINITY) m = 0.0f;  // nothing seen: every p is 0
  const V16 mv = Splat(m);
  V16 sum = V16{};
  for (int64_t g = 0; g < n_groups; ++g) {
    for (int64_t j = int64_t{groups[g]} * kKeyGroup, e = j + kKeyGroup; j < e; j += 16) {
      const V16 x = Load(s + j);
      const V16 e16 = Exp(x - mv);
      const V16 p = x == Splat(-INFINITY) ? V16{} : e16;
      sum += p;
      Store(s + j, p);
    }
  }
  float total = 0.0f;
  for (int l = 0; l < 16; ++l) total += sum[l];
  return total;
}

// One work item: query rows [t0, t1) of batch row b and kv head h, with its G query heads.
// A query vector's result depends on nothing but its own row, whatever shares its tiles:
// every score and value sum runs over the keys in order, and keys it does not see add exact
// zeros (p = 0) or are skipped.
static void RunItem(const Problem& pr, const Item& it, float* scratch) {
  const int64_t S = pr.S_pad, D = pr.D, H = pr.H, G = pr.G, T = pr.T;
  const float* kt = pr.kt + (it.b * pr.KV + it.h) * D * S;
  const float* v = pr.v + (it.b * pr.KV + it.h) * S * D;
  const int32_t* kpos = pr.kpos + it.b * S;
  const int32_t* qpos = pr.qpos + it.b * T;
  const int64_t n_vec = (it.t1 - it.t0) * G;  // query vectors (row, head), row-major
  // scores [n_vec + kValueQueries, S_pad] (then the softmax weights; the extra rows stay 0),
  // totals [n_vec], spare [D] (where a tail tile's extra rows go), qd [D, kQueries], groups.
  float* scores = scratch;
  float* totals = scores + (n_vec + kValueQueries) * S;
  float* spare = totals + n_vec;
  float* qd = spare + D;
  int32_t* groups = reinterpret_cast<int32_t*>(qd + D * kQueries);
  auto row_of = [&](int64_t n) { return it.t0 + n / G; };
  auto head_of = [&](int64_t n) { return it.h * G + n % G; };
  // The key groups any row of the item sees: only these are computed (the causal future and
  // what is past a sliding window are skipped). Every row's scores and weights are written
  // over all of them, so the value sums read no stale scratch.
  int32_t pmin = INT32_MAX, pmax = INT32_MIN;
  for (int64_t t = it.t0; t < it.t1; ++t) {
    pmin = std::min(pmin, qpos[t]);
    pmax = std::max(pmax, qpos[t]);
  }
  const int64_t all_groups = S / kKeyGroup;
  const int32_t* gmin = pr.group_min + it.b * all_groups;
  const int32_t* gmax = pr.group_max + it.b * all_groups;
  int64_t n_groups = 0;
  for (int64_t g = 0; g < all_groups; ++g) {
    if (gmin[g] > pmax) continue;
    if (pr.window > 0 && pmin - gmax[g] >= pr.window) continue;
    groups[n_groups++] = static_cast<int32_t>(g);
  }
  for (int64_t first = 0; first < n_vec; first += kQueries) {
    float* sv[kQueries];
    for (int i = 0; i < kQueries; ++i) {  // a tail tile repeats its last vector
      const int64_t n = std::min(first + i, n_vec - 1);
      const float* qn = pr.q + ((it.b * T + row_of(n)) * H + head_of(n)) * D;
      for (int64_t d = 0; d < D; ++d) qd[d * kQueries + i] = qn[d];
      sv[i] = scores + n * S;
    }
    for (int64_t g = 0; g < n_groups; ++g)
      ScoreTile(qd, kt, S, D, int64_t{groups[g]} * kKeyGroup, sv);
    for (int64_t n = first; n < std::min(first + kQueries, n_vec); ++n)
      totals[n] = SoftmaxRow(scores + n * S, kpos, qpos[row_of(n)], pr.window, groups, n_groups);
  }
  // Weights of a tail tile's missing rows: zero (their sums go to `spare`).
  std::memset(scores + n_vec * S, 0, sizeof(float) * S * kValueQueries);
  for (int64_t first = 0; first < n_vec; first += kValueQueries) {
    for (int64_t c0 = 0; c0 < D; c0 += 16 * kValueCols) {
      float* dst[kValueQueries];
      for (int i = 0; i < kValueQueries; ++i) {
        const int64_t n = first + i;
        dst[i] = n < n_vec ? pr.out + ((it.b * T + row_of(n)) * H + head_of(n)) * D : spare;
      }
      ValueTile(scores + first * S, S, v, D, c0, groups, n_groups, dst);
    }
    for (int64_t n = first; n < std::min(first + kValueQueries, n_vec); ++n) {
      float* o = pr.out + ((it.b * T + row_of(n)) * H + head_of(n)) * D;
      const float total = totals[n] > 0.0f ? totals[n] : 1.0f;  // 0: nothing seen, o is 0
      for (int64_t c = 0; c < D; ++c) o[c] = o[c] / total;
    }
  }
}

// ---- decode: one query row per batch row, against the KV cache --------------------------------
//
// One work item: batch row b's G query heads of kv head h, at position pos = pr.pos[b]. The row
// sees the cache's slots s < pos (slot s holds position s; with a window, pos - s < window) and
// its own new key and value, at slot pos. It runs the prefill's steps on the prefill's layout
// (key groups of 32 by slot, the same score, softmax and value sums, unseen keys adding exact
// zeros), so a decode row gets the bits the prefill kernel gives that row of the whole prompt.
// Only the groups up to pos's are read: the cache past the row's position costs nothing. The
// group holding pos is copied to scratch first, with the new key and value put at pos and zeros
// after it (those slots of the cache are stale or unwritten).
static void RunDecodeItem(const DecodeProblem& pr, int64_t b, int64_t h, float* scratch) {
  const int64_t S = pr.S, D = pr.D, G = pr.G, H = pr.KV * pr.G;
  const int32_t pos = pr.pos[b];
  if (pos < 0 || pos >= S) {  // no such slot (a padding row): zeros, nothing read
    for (int64_t n = 0; n < G; ++n) std::fill_n(pr.out + (b * H + h * G + n) * D, D, 0.0f);
    return;
  }
  const int64_t last = pos / kKeyGroup, j_last = last * kKeyGroup;
  const int64_t n_vec = G;
  const int64_t S_seen = j_last + kKeyGroup;  // slots of the groups read, the last included
  // scores [n_vec + kValueQueries, S_seen], totals [n_vec], qd [D, kQueries], the last
  // group's keys [D, 32] and values [32, D], spare [D], the group list (DecodeScratchFloats).
  float* scores = scratch;
  float* totals = scores + (n_vec + kValueQueries) * S_seen;
  float* qd = totals + n_vec;
  float* kt_last = qd + D * kQueries;
  float* v_last = kt_last + D * kKeyGroup;
  float* spare = v_last + kKeyGroup * D;
  int32_t* groups = reinterpret_cast<int32_t*>(spare + D);
  const float* kt = pr.kt + (b * pr.KV + h) * D * S;
  const float* v = pr.v + (b * pr.KV + h) * S * D;
  const float* k_new = pr.k_new + (b * pr.KV + h) * D;
  const float* v_new = pr.v_new + (b * pr.KV + h) * D;
  // The last group: cached slots before pos, the new key and value at pos, zeros after.
  const int64_t n_cached = pos - j_last;
  if (j_last + kKeyGroup <= S) {  // the group lies in the cache: two vector loads a row
    const int32_t nc = static_cast<int32_t>(n_cached);
    const I16 lane = I16{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const I16 ncv = I16{} + nc, ncv_hi = I16{} + (nc - 16);
    for (int64_t d = 0; d < D; ++d) {
      const float* src = kt + d * S + j_last;
      const V16 own = Splat(k_new[d]);
      const V16 a = Load(src), c = Load(src + 16);
      Store(kt_last + d * kKeyGroup, lane < ncv ? a : (lane == ncv ? own : V16{}));
      Store(kt_last + d * kKeyGroup + 16, lane < ncv_hi ? c : (lane == ncv_hi ? own : V16{}));
    }
  } else {
    for (int64_t d = 0; d < D; ++d) {
      float* row = kt_last + d * kKeyGroup;
      std::memcpy(row, kt + d * S + j_last, sizeof(float) * n_cached);
      row[n_cached] = k_new[d];
      std::fill(row + n_cached + 1, row + kKeyGroup, 0.0f);
    }
  }
  std::memcpy(v_last, v + j_last * D, sizeof(float) * n_cached * D);
  std::memcpy(v_last + n_cached * D, v_new, sizeof(float) * D);
  std::fill(v_last + (n_cached + 1) * D, v_last + kKeyGroup * D, 0.0f);
  // The groups the row sees (as the prefill picks them for a one-row tile).
  int64_t n_groups = 0;
  for (int64_t g = 0; g <= last; ++g) {
    if (pr.window > 0 && pos - (g * kKeyGroup + kKeyGroup - 1) >= pr.window) continue;
    groups[n_groups++] = static_cast<int32_t>(g);
  }
  const bool last_only = n_groups == 1;  // groups[n_groups - 1] == last always
  // Tiles of exactly the queries there are (G is often 3 or 4, fewer than kQueries).
  static_assert(kQueries <= 8, "the switch below covers tiles of 1 to 8 queries");
  for (int64_t first = 0; first < n_vec; first += kQueries) {
    const int nq = static_cast<int>(std::min<int64_t>(kQueries, n_vec - first));
    float* sv[kQueries];
    float* sv_last[kQueries];
    for (int i = 0; i < nq; ++i) {
      const float* qn = pr.q + (b * H + h * G + first + i) * D;
      for (int64_t d = 0; d < D; ++d) qd[d * nq + i] = qn[d];
      sv[i] = scores + (first + i) * S_seen;
      sv_last[i] = sv[i] + j_last;
    }
    auto tiles = [&](auto nq_const) {
      constexpr int NQ = decltype(nq_const)::value;
      for (int64_t g = 0; g + 1 < n_groups; ++g)
        ScoreTile<NQ>(qd, kt, S, D, int64_t{groups[g]} * kKeyGroup, sv);
      ScoreTile<NQ>(qd, kt_last, kKeyGroup, D, 0, sv_last);
    };
    switch (nq) {
#define SI_SCORES_CASE(n)                                 \
  case n:                                                 \
    if constexpr (n <= kQueries) tiles(std::integral_constant<int, n>{}); \
    break;
      SI_SCORES_CASE(1)
      SI_SCORES_CASE(2)
      SI_SCORES_CASE(3)
      SI_SCORES_CASE(4)
      SI_SCORES_CASE(5)
      SI_SCORES_CASE(6)
      SI_SCORES_CASE(7)
      SI_SCORES_CASE(8)
#undef SI_SCORES_CASE
    }
  }
  for (int64_t n = 0; n < n_vec; ++n)
    totals[n] = SoftmaxRow(scores + n * S_seen, pr.slot_pos, pos, pr.window, groups, n_groups);
  std::memset(scores + n_vec * S_seen, 0, sizeof(float) * S_seen * kValueQueries);
  const int32_t last_group[1] = {0};
  for (int64_t first = 0; first < n_vec; first += kValueQueries) {
    for (int64_t c0 = 0; c0 < D; c0 += 16 * kValueCols) {
      float* dst[kValueQueries];
      for (int i = 0; i < kValueQueries; ++i) {
        const int64_t n = first + i;
        dst[i] = n < n_vec ? pr.out + (b * H + h * G + n) * D : spare;
      }
      if (!last_only)
        ValueTile(scores + first * S_seen, S_seen, v, D, c0, groups, n_groups - 1, dst);
      ValueTile(scores + first * S_seen + j_last, S_seen, v_last, D, c0, last_group, 1, dst,
                !last_only);
    }
    for (int64_t n = first; n < std::min(first + kValueQueries, n_vec); ++n) {
      float* o = pr.out + (b * H + h * G + n) * D;
      const float total = totals[n] > 0.0f ? totals[n] : 1.0f;
      for (int64_t c = 0; c < D; ++c) o[c] = o[c] / total;
    }
  }
}
