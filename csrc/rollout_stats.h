// rollout_stats.h -- the per-row sums behind verl 0.9's rollout_corr/* diagnostics (rollout IS weights,
// rejection sampling, training/rollout mismatch) in one pass over [B, T]; fastpo.ops.rollout_metrics
// finishes the batch metrics from this [B, F] table (and builds the same table with torch elsewhere).
//
// Over the counted tokens t of row b (mask != 0; padding is selected to logp = rollout = 0 before any
// arithmetic, so NaN / inf there reach no sum), with d = logp − rollout (in the input dtype, as torch's lr) and
// dc = clamp(d, ±log_bound) (verl's 20):
//   raw = e^dc, w = min(raw, upper) (TIS) or raw·1[lower <= raw <= upper] (IcePop);
//   columns: n, Σ logp, Σ rollout, Σ d, Σ (e^d − d − 1), Σ raw², Σ w, Σ w², max w, min w,
//            #(raw > upper), #(raw < lo), Σ raw, #(raw outside [lower, upper]), #(rejected by any
//            token-level option), then 8 per rejection option (below).
// A rejection option has a statistic s of dc: k1 = −dc, k2 = ½dc², k3 = e^dc − 1 − dc, and bounds
// [lo, hi] (k1: keep lo <= s <= hi; k2 / k3: keep s <= hi, lo = 0 only clamps):
//   Σ s, Σ c, Σ c² with c = clamp(s, lo, hi), max s, min s, #(s > hi), #(s < lo), #(rejected).
// Sums run in the input dtype within blocks of 256 tokens and in double across them; max / min of an
// empty row are −inf / +inf. Nothing here has a gradient.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "numerics.h"

namespace fastpo {

namespace rollout_col {
constexpr int kCount = 0, kSumLogp = 1, kSumRollout = 2, kSumDelta = 3, kSumK3 = 4, kSumRatio2 = 5, kSumW = 6,
              kSumW2 = 7, kMaxW = 8, kMinW = 9, kHigh = 10, kLow = 11, kSumRaw = 12, kOob = 13, kAnyReject = 14,
              kBase = 15;
// per rejection option j, at kBase + kPerOption * j + ...
constexpr int kPerOption = 8, kSumS = 0, kSumC = 1, kSumC2 = 2, kMaxS = 3, kMinS = 4, kAbove = 5, kBelow = 6,
              kRejected = 7;
}  // namespace rollout_col

struct RolloutISBounds {
  double upper, lower, lo;  // lo: the "low" fraction's bound (1/upper for TIS, lower for IcePop)
  bool icepop;
  double log_bound;  // the log-ratio clamp (verl's SAFETY_BOUND, 20); a runtime value (see clamp_abs)
};

struct RejectionOption {
  int kind;  // 1, 2, 3: k1, k2, k3
  double lo, hi;
  bool two_sided;    // k1: lo <= s <= hi is kept
  bool token_level;  // its rejections count per token (seq-level options are finished per row)
};

// 1 when a <= x <= b, else 0, as nested selects on one comparison each (gcc if-converts those; a select
// on `p & q` or on a loop-invariant flag leaves control flow, and the loop scalar: see policy_loss.h).
template <typename scalar_t>
inline scalar_t within(scalar_t x, scalar_t a, scalar_t b) {
  return x >= a ? (x <= b ? scalar_t(1) : scalar_t(0)) : scalar_t(0);
}

// Each row is walked in blocks of kStatBlock tokens, in two loops per block (as policy_loss.h): the first
// writes every token's terms into L1-resident arrays, the second reduces each array (a sum in the input
// dtype, then added in double; counts stay exact in float). One loop doing all the reductions at once does
// not vectorise (gcc's omp-simd reduction of a dozen accumulators falls back to scalar code).
constexpr int64_t kStatBlock = 256;

template <typename S, int K>
struct BlockTerms {
  alignas(64) S v[K][kStatBlock];
};

// Σ / max / min of v[0..n) through kLanes independent partials: a vectorised reduction with one
// accumulator is bound by the add latency, not the throughput (the inner lane loop vectorises as is;
// the partials are combined in a fixed order, so the result does not depend on the vector width).
constexpr int64_t kLanes = 64;

struct SumOp {
  template <typename S> static S id() { return S(0); }
  template <typename S> static S f(S a, S b) { return a + b; }
};
struct MaxOp {
  template <typename S> static S id() { return -std::numeric_limits<S>::infinity(); }
  template <typename S> static S f(S a, S b) { return std::max(a, b); }
};
struct MinOp {
  template <typename S> static S id() { return std::numeric_limits<S>::infinity(); }
  template <typename S> static S f(S a, S b) { return std::min(a, b); }
};

template <class Op, typename S>
S lane_reduce(const S* __restrict v, int64_t n) {
  alignas(64) S part[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) part[l] = Op::template id<S>();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) part[l] = Op::f(part[l], v[i + l]);
  for (int64_t l = 0; i + l < n; ++l) part[l] = Op::f(part[l], v[i + l]);
  S out = Op::template id<S>();
  for (int64_t l = 0; l < kLanes; ++l) out = Op::f(out, part[l]);
  return out;
}

// acc[k] += Σ terms k over n tokens, except column kmax (max into acc[kmax]) and kmin (min).
template <typename S, int K>
void reduce_block(const BlockTerms<S, K>& b, int64_t n, int kmax, int kmin, double* acc) {
  for (int k = 0; k < K; ++k) {
    if (k == kmax) acc[k] = std::max(acc[k], static_cast<double>(lane_reduce<MaxOp>(b.v[k], n)));
    else if (k == kmin) acc[k] = std::min(acc[k], static_cast<double>(lane_reduce<MinOp>(b.v[k], n)));
    else acc[k] += static_cast<double>(lane_reduce<SumOp>(b.v[k], n));
  }
}

// The base columns' per-token terms of one block, from select_row's x, r and 0/1 mask m. The IS mode
// is a sentinel, not a switch: w = min(raw, cap) when wlo <= raw <= whi, else 0, with (wlo, whi, cap)
// = (−inf, +inf, upper) for TIS and (lower, upper, +inf) for IcePop.
template <typename S>
FASTPO_NO_SINK void base_terms(const S* __restrict x, const S* __restrict r, const S* __restrict m, int64_t n,
                               S bound, S up, S lower, S lo, S wlo, S whi, S cap, BlockTerms<S, rollout_col::kOob + 1>& out) {
  using namespace rollout_col;
  const S inf = std::numeric_limits<S>::infinity();
  S *__restrict cnt = out.v[kCount], *__restrict sx = out.v[kSumLogp], *__restrict sr = out.v[kSumRollout],
    *__restrict sd = out.v[kSumDelta], *__restrict k3 = out.v[kSumK3], *__restrict q = out.v[kSumRatio2],
    *__restrict sw = out.v[kSumW], *__restrict sw2 = out.v[kSumW2], *__restrict mx = out.v[kMaxW],
    *__restrict mn = out.v[kMinW], *__restrict high = out.v[kHigh], *__restrict low = out.v[kLow],
    *__restrict raw_ = out.v[kSumRaw], *__restrict oob = out.v[kOob];
  for (int64_t t = 0; t < n; ++t) {
    const S c = m[t], d = x[t] - r[t];
    const S raw = exp_fast(clamp_abs(d, bound));
    const S w = raw >= wlo ? (raw <= whi ? std::min(raw, cap) : S(0)) : S(0);
    cnt[t] = c, sx[t] = x[t], sr[t] = r[t], sd[t] = d;
    k3[t] = c * ((exp_fast(d) - d) - S(1));
    q[t] = c * (raw * raw);
    sw[t] = c * w, sw2[t] = c * (w * w), raw_[t] = c * raw;
    high[t] = c * (raw > up ? S(1) : S(0));
    low[t] = c * (raw < lo ? S(1) : S(0));
    oob[t] = c * (S(1) - within(raw, lower, up));
    mx[t] = c != S(0) ? w : -inf;
    mn[t] = c != S(0) ? w : inf;
  }
}

template <typename scalar_t>
void rollout_base_row(const scalar_t* x, const scalar_t* r, const scalar_t* m, int64_t T, const RolloutISBounds& is,
                      BlockTerms<scalar_t, rollout_col::kOob + 1>& terms, double* row) {
  using namespace rollout_col;
  using S = scalar_t;
  const S inf = std::numeric_limits<S>::infinity();
  const S up = S(is.upper), lower = S(is.lower), lo = S(is.lo);
  const S wlo = is.icepop ? lower : -inf, whi = is.icepop ? up : inf, cap = is.icepop ? inf : up;
  for (int k = 0; k <= kOob; ++k) row[k] = 0.0;
  row[kMaxW] = -static_cast<double>(inf), row[kMinW] = static_cast<double>(inf);
  for (int64_t t0 = 0; t0 < T; t0 += kStatBlock) {
    const int64_t n = std::min(kStatBlock, T - t0);
    base_terms(x + t0, r + t0, m + t0, n, S(is.log_bound), up, lower, lo, wlo, whi, cap, terms);
    reduce_block(terms, n, kMaxW, kMinW, row);
  }
}

// The statistic of a clamped log-ratio dc (k1 = −dc, k2 = ½dc², k3 = e^dc − 1 − dc).
template <int KIND, typename scalar_t>
inline scalar_t rejection_stat(scalar_t dc, scalar_t e_dc) {
  if constexpr (KIND == 1) return -dc;
  else if constexpr (KIND == 2) return scalar_t(0.5) * (dc * dc);
  else return (e_dc - scalar_t(1)) - dc;
}

// One rejection option's per-token terms of one block; token-level options also raise `rejected[t]` to 1
// for the counted tokens they reject (mark = 1; 0 for seq-level ones). One-sided options keep s <= hi:
// their keep test's floor keep_lo is −inf (a sentinel).
template <int KIND, typename S>
FASTPO_NO_SINK void rejection_terms(const S* __restrict x, const S* __restrict r, const S* __restrict m, int64_t n,
                                    S bound, S lo, S hi, S keep_lo, S mark, S* __restrict rejected,
                                    BlockTerms<S, rollout_col::kPerOption>& out) {
  using namespace rollout_col;
  const S inf = std::numeric_limits<S>::infinity();
  S *__restrict ss = out.v[kSumS], *__restrict sc = out.v[kSumC], *__restrict sc2 = out.v[kSumC2],
    *__restrict mx = out.v[kMaxS], *__restrict mn = out.v[kMinS], *__restrict above = out.v[kAbove],
    *__restrict below = out.v[kBelow], *__restrict rej = out.v[kRejected];
  for (int64_t t = 0; t < n; ++t) {
    const S c = m[t];
    const S dc = clamp_abs(S(x[t] - r[t]), bound);
    const S s = rejection_stat<KIND>(dc, KIND == 3 ? exp_fast(dc) : S(0));
    const S cl = std::min(std::max(s, lo), hi);
    const S drop = c * (S(1) - within(s, keep_lo, hi));
    ss[t] = c * s, sc[t] = c * cl, sc2[t] = c * (cl * cl);
    above[t] = c * (s > hi ? S(1) : S(0));
    below[t] = c * (s < lo ? S(1) : S(0));
    rej[t] = drop;
    rejected[t] = std::max(rejected[t], drop * mark);
    mx[t] = c != S(0) ? s : -inf;
    mn[t] = c != S(0) ? s : inf;
  }
}

// One rejection option's 8 columns of one row.
template <int KIND, typename scalar_t>
void rejection_row(const scalar_t* x, const scalar_t* r, const scalar_t* m, int64_t T, double log_bound,
                   const RejectionOption& opt,
                   scalar_t* rejected, BlockTerms<scalar_t, rollout_col::kPerOption>& terms, double* out) {
  using namespace rollout_col;
  using S = scalar_t;
  const S inf = std::numeric_limits<S>::infinity();
  const S lo = S(opt.lo), hi = S(opt.hi), keep_lo = opt.two_sided ? lo : -inf, mark = opt.token_level ? S(1) : S(0);
  for (int k = 0; k < kPerOption; ++k) out[k] = 0.0;
  out[kMaxS] = -static_cast<double>(inf), out[kMinS] = static_cast<double>(inf);
  for (int64_t t0 = 0; t0 < T; t0 += kStatBlock) {
    const int64_t n = std::min(kStatBlock, T - t0);
    rejection_terms<KIND>(x + t0, r + t0, m + t0, n, S(log_bound), lo, hi, keep_lo, mark, rejected + t0, terms);
    reduce_block(terms, n, kMaxS, kMinS, out);
  }
}

// One row's inputs as the stat loops read them: x = logp, r = rollout and m = 1 on counted tokens, all 0
// at padding (a select, so NaN / inf there reach no arithmetic); floats only, so the loops vectorise.
template <typename scalar_t>
FASTPO_NO_SINK void select_row(const scalar_t* __restrict logp, const scalar_t* __restrict rollout,
                               const uint8_t* __restrict mask, int64_t T, scalar_t* __restrict x,
                               scalar_t* __restrict r, scalar_t* __restrict m) {
  for (int64_t t = 0; t < T; ++t) {
    const bool on = mask[t] != 0;
    const scalar_t lp = logp[t], rl = rollout[t];
    x[t] = on ? lp : scalar_t(0);
    r[t] = on ? rl : scalar_t(0);
    m[t] = on ? scalar_t(1) : scalar_t(0);
  }
}

constexpr int64_t kRolloutParallelMinTokens = 1 << 16;

// The [B, F] table (F = kBase + kPerOption · options.size()) of rows × T tokens, row-major inputs.
template <typename scalar_t>
void rollout_row_stats(const scalar_t* logp, const scalar_t* rollout, const uint8_t* mask, int64_t B, int64_t T,
                       const RolloutISBounds& is, const std::vector<RejectionOption>& options, double* table) {
  using namespace rollout_col;
  const int64_t F = kBase + kPerOption * static_cast<int64_t>(options.size());
#ifdef _OPENMP
#pragma omp parallel if (B * T >= kRolloutParallelMinTokens && B > 1)
#endif
  {
  std::vector<scalar_t> x(static_cast<size_t>(T)), r(static_cast<size_t>(T)), m(static_cast<size_t>(T));
  std::vector<scalar_t> rejected(options.empty() ? 0 : static_cast<size_t>(T));
  auto base = std::make_unique<BlockTerms<scalar_t, kOob + 1>>();
  auto opt_terms = std::make_unique<BlockTerms<scalar_t, kPerOption>>();
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 4)
#endif
  for (int64_t b = 0; b < B; ++b) {
    const int64_t off = b * T;
    select_row(logp + off, rollout + off, mask + off, T, x.data(), r.data(), m.data());
    if (!options.empty()) std::fill(rejected.begin(), rejected.end(), scalar_t(0));
    double* row = table + b * F;
    rollout_base_row(x.data(), r.data(), m.data(), T, is, *base, row);
    for (size_t j = 0; j < options.size(); ++j) {
      double* out = row + kBase + kPerOption * static_cast<int64_t>(j);
      const RejectionOption& o = options[j];
      if (o.kind == 1) rejection_row<1>(x.data(), r.data(), m.data(), T, is.log_bound, o, rejected.data(), *opt_terms, out);
      else if (o.kind == 2) rejection_row<2>(x.data(), r.data(), m.data(), T, is.log_bound, o, rejected.data(), *opt_terms, out);
      else rejection_row<3>(x.data(), r.data(), m.data(), T, is.log_bound, o, rejected.data(), *opt_terms, out);
    }
    double any = 0;
    for (size_t t = 0; t < rejected.size(); ++t) any += static_cast<double>(rejected[t]);
    row[kAnyReject] = any;
  }
  }
}

}  // namespace fastpo
