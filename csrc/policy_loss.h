// policy_loss.h -- CPU kernel of fastpo.policy_loss and fastpo.value_loss: one fused pass per sequence.
//
// Same contract as the Triton kernels (kernels/policy_loss.py) and the spec (fastpo/reference/policy.py).
// Sequence i holds tokens [cu[i], cu[i+1]) of the flat inputs; a token counts when mask[t] != 0 (all
// count without a mask). Per counted token, with x = logp, C = 20 (the log-ratio clamp):
//
//   Δ  = clamp(x − old, ±C)                         d = clamp(ref − x, ±C)
//   r  = e^Δ (token ratio) or s_i = exp(mean_i Δ) (GSPO sequence ratio, token-gradient form)
//   pg = the surrogate (spec.surrogate, one inline function each below; "clip" is
//        max(−A·r, −A·clip(r, 1 − ε_low, 1 + ε_high)); with dual clip c and A < 0: min(pg, −c·A))
//   w  = rollout IS weight: e^{clamp(old − roll, ±C)} per token, or exp(its mean) per sequence;
//        truncated min(w, cap) or masked w·1[w <= cap]; a constant
//   k  = k1: −d,  k2: d²/2,  k3: e^d − d − 1,  abs: |d|, then clamped to ±kl_clamp; kX+ keeps that value
//        with the gradient of k2; kl_bias multiplies it by r (TRL's use_bias_correction_kl)
//   l  = w·pg + β·k − η·entropy
//
// Backward, derived per token (everything but x and entropy is a constant):
//   ∂r/∂x   = r·1[|x − old| <= C]   (token ratio),   s_i   (sequence ratio, token-gradient form)
//   ∂pg/∂x  = 0 where a clip branch is active (the clipped value or the dual cap is the max/min),
//             else −A·∂r/∂x; times w
//   ∂k/∂x   = −∂k/∂d · 1[|ref − x| <= C] · 1[|k| <= kl_clamp], with ∂k/∂d = −1, d, e^d − 1, sgn d for
//             k1/k2/k3/abs (kX+: d, and no kl_clamp gate); with kl_bias ∂(k·r)/∂x = r·∂k/∂x + k·∂r/∂x
//   each surrogate's derivative is derived above its function (sur_*)
//   ∂l/∂entropy = −η
// The aggregation multiplies each token's l by a per-sequence weight (1/n_i for seq_mean_token_mean,
// else 1) and the sum by a global scale 1/den. The kernel writes unit = ∂(Σ weighted l)/∂x per token,
// so the backward is grad_x = g·scale·unit (and likewise for the entropy).
//
// Value loss (spec.value): with e = x − R and e_c = clip(x, old ± clip) − R,
//   l = ½·max(e², e_c²),   ∂l/∂x = e where the unclipped branch is the max, else 0.
//
// Arguments are validated by the caller (fastpo_C.cpp); nothing here throws. Per-sequence sums are
// kept in double and reduced in sequence order, so results do not depend on the thread count.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "numerics.h"
#include "policy_surrogates.h"

namespace fastpo {

enum class Aggregation { kTokenMean, kSeqMeanTokenMean, kSeqMeanTokenSum, kTokenSumNorm, kTokenSum };

struct TokenLossSpec {
  bool value = false;             // the value loss instead of the policy loss
  bool seq_ratio = false;         // GSPO: one ratio per sequence
  double clip_low = 0.2, clip_high = 0.2;
  double dual_clip = 0.0;         // 0: off
  int kl = 0;                     // 0: no ref_logp; 1, 2, 3: k1, k2, k3
  double kl_coef = 0.0;
  double kl_clamp = std::numeric_limits<double>::infinity();
  double entropy_coef = 0.0;
  bool has_entropy = false;
  bool rollout = false, rollout_seq = false, rollout_mask = false;
  double rollout_cap = 2.0;
  Aggregation aggregation = Aggregation::kTokenMean;
  int64_t norm_length = 0;        // token_sum_norm's L; 0: the longest sequence
  double num_tokens = -1.0;       // token_mean's denominator; < 0: the counted tokens
  double value_clip = std::numeric_limits<double>::infinity();
  double log_ratio_clamp = 20.0;
  int surrogate = kClip;
  bool rollout_given = false;     // the rollout array holds the caller's weights (not log-probs)
  double delta = std::numeric_limits<double>::infinity();  // TRL's cap on the unclipped ratio
  double tau_pos = 1.0, tau_neg = 1.05;                      // SAPO
  double ratio_cap = 20.0;                                   // DPPO's truncation
  double dro_beta = 0.0;
  double vespo_k_pos = 2.0, vespo_l_pos = 3.0, vespo_k_neg = 3.0, vespo_l_neg = 2.0;
  bool kl_st = false, kl_bias = false, count_empty = false;
  int metric_level = 0;           // MetricLevel: the sums the token loop forms (0: all)
};

// Which of the metric sums the token loop forms (fastpo.ops.loss_spec.METRIC_LEVELS); the rest stay 0.
// Skipping a sum drops its store, its read and, where nothing else needs it, its arithmetic (without the
// ratio statistics the reinforce-type surrogates need no exp). The lean levels are built for the
// configs without ref_logp and entropy only (the caller asks for level 0 otherwise).
enum MetricLevel { kAllMetrics = 0, kClipKlMetrics = 1, kKlMetrics = 2, kNoMetrics = 3, kNumMetricLevels = 4 };

// The surrogates whose SurOut flags can be non-zero (the others' clip fractions are 0: no sum needed).
template <int SURR>
constexpr bool kHasClipFlags = SURR == kClip || SURR == kCispo || SURR == kDppoTv || SURR == kDppoKl || SURR == kGeoMean;

// The sums of the metric level MET for surrogate SURR.
template <int SURR, int MET>
struct MetricSums {
  static constexpr bool flags = MET <= kClipKlMetrics && kHasClipFlags<SURR>;
  static constexpr bool neg_delta = MET <= kKlMetrics;
  static constexpr bool ratio = MET == kAllMetrics;
};

// The metric level the token loop runs: the spec's, or every sum with ref_logp or entropy (the lean levels
// are built without them).
inline int effective_metric_level(const TokenLossSpec& s) {
  return s.kl == 0 && !s.has_entropy ? s.metric_level : kAllMetrics;
}

// The stats vector, in fastpo.ops.loss_spec.STATS order (value loss: kClipFrac holds vf_clip_frac).
enum Stat { kLoss, kScale, kClipFrac, kClipLow, kClipHigh, kDualClip, kPpoKl, kRefKl, kRatioMean, kRatioMin,
            kRatioMax, kEntropy, kNumStats };

template <class T>
struct TokenLossArgs {
  const T *x, *old, *adv;         // adv holds the returns for the value loss
  const T *ref, *ent, *roll;      // nullptr when absent
  const uint8_t* mask;            // nullptr: every token counts
  const int64_t* cu;
  int64_t num_seqs;
  T* unit;                        // [N]
  T* unit_ent;                    // [N] when spec.has_entropy, else nullptr
  // A float32 / float64 mask (non-zero = counted) instead of `mask` (which is then nullptr): verl's
  // response_mask is a float tensor. Each sequence's slice is turned into bytes in a per-thread buffer.
  const void* wide_mask = nullptr;
  int wide_mask_bytes = 0;        // 4 or 8
};

// The args of tokens [begin, begin + n) as a batch of their own ([0, n)), reading `m` as its mask.
template <class T>
TokenLossArgs<T> shifted_args(const TokenLossArgs<T>& a, int64_t begin, const uint8_t* m) {
  auto at = [begin](auto* p) { return p == nullptr ? p : p + begin; };
  TokenLossArgs<T> b = a;
  b.x = at(a.x), b.old = at(a.old), b.adv = at(a.adv), b.ref = at(a.ref), b.ent = at(a.ent), b.roll = at(a.roll);
  b.unit = at(a.unit), b.unit_ent = at(a.unit_ent);
  b.mask = m, b.wide_mask = nullptr, b.wide_mask_bytes = 0;
  return b;
}

// buf[t] = w[t] != 0 for t in [0, n) (NaN counts, as torch's `mask != 0`).
template <class W>
void bytes_of_mask(const W* __restrict w, int64_t n, uint8_t* __restrict buf) {
  for (int64_t t = 0; t < n; ++t) buf[t] = w[t] != W(0);
}

// One sequence's sums over its counted tokens.
struct SeqSums {
  double loss = 0, count = 0, clip_low = 0, clip_high = 0, dual = 0, neg_delta = 0, kl = 0, ratio = 0, entropy = 0;
  double ratio_min = std::numeric_limits<double>::infinity(), ratio_max = -std::numeric_limits<double>::infinity();
};

// Tokens from which the OpenMP team is woken (below, waking it costs more than the second core saves).
constexpr int64_t kLossParallelMinTokens = int64_t(1) << 18;


// Tokens per block: the token loop writes its per-token terms for a block into L1-resident arrays,
// and a second loop sums them.
constexpr int64_t kLossBlock = 256;

template <class T>
struct TokenTerms {
  alignas(64) T loss[kLossBlock], low[kLossBlock], high[kLossBlock], dual[kLossBlock], neg_delta[kLossBlock];
  alignas(64) T kl[kLossBlock], ratio[kLossBlock], ratio_min[kLossBlock], ratio_max[kLossBlock];
  alignas(64) T entropy[kLossBlock];
};

// The token loop of one block [begin, begin + n): each token's loss and derivative, and its terms of
// the sums. It is written so that gcc vectorises it: restrict pointers and local constants (stores
// could otherwise alias them), and only selects whose condition is a per-token comparison. A select
// on a loop-invariant flag, or on `a | b` of two flags, leaves gcc with control flow it does not
// if-convert, and the whole loop scalar; so the spec's switches are blends or sentinels instead:
//   * the GSPO ratio: r = r_token·(1 − is_seq) + s_i·is_seq, with is_seq ∈ {0, 1} (exact: both finite);
//   * dual clip: pg = min(pg, −c·A) for A < 0, with c = +inf when it is off (−inf·A = +inf);
//   * the KL estimator: c1·k1 + c2·k2 + c3·k3 with one of c1, c2, c3 equal to 1;
//   * which optional arrays exist: template arguments REF (ref_logp), IS (0: a per-sequence constant
//     weight, 1 when there is none; 1: per-token weights from rollout log-probs; 2: the caller's
//     per-token weights) and ENT (entropy); the surrogate SURR is one too.
// Masked tokens are computed too and dropped by the selects, so whatever they hold reaches nothing.
// MET (MetricLevel) drops the terms of the sums it does not form (MetricSums).
template <class T, int SURR, bool REF, int IS, bool ENT, int MET>
FASTPO_NO_SINK void policy_tokens(const TokenConsts<T>& consts, const TokenLossArgs<T>& a, int64_t begin, int64_t n,
                   TokenTerms<T>& out) {
  using Sums = MetricSums<SURR, MET>;
  const TokenConsts<T> k = consts;  // a local copy: no store below can alias it, so its reads are hoisted
  const uint8_t* __restrict m = a.mask + begin;
  const T* __restrict xs = a.x + begin;
  const T* __restrict olds = a.old + begin;
  const T* __restrict advs = a.adv + begin;
  const T* __restrict refs = REF ? a.ref + begin : nullptr;
  const T* __restrict ents = ENT ? a.ent + begin : nullptr;
  const T* __restrict rolls = IS != 0 ? a.roll + begin : nullptr;
  T* __restrict unit = a.unit + begin;
  T* __restrict unit_ent = ENT ? a.unit_ent + begin : nullptr;
  T* __restrict o_loss = out.loss;
  T* __restrict o_low = out.low;
  T* __restrict o_high = out.high;
  T* __restrict o_dual = out.dual;
  T* __restrict o_neg_delta = out.neg_delta;
  T* __restrict o_kl = out.kl;
  T* __restrict o_ratio = out.ratio;
  T* __restrict o_min = out.ratio_min;
  T* __restrict o_max = out.ratio_max;
  T* __restrict o_ent = out.entropy;
  const T C = k.C, kl_coef = k.kl_coef, kl_clamp = k.kl_clamp, kl_clamp_gate = k.kl_clamp_gate;
  const T c1 = k.c1, c2 = k.c2, c3 = k.c3, c4 = k.c4, kl_st = k.kl_st, kl_bias = k.kl_bias;
  const T ent_coef = k.ent_coef, ent_unit = -k.ent_coef * k.weight;
  const T cap = k.cap, cap_value = k.cap_value, weight = k.weight;
  const T is_seq = k.is_seq, seq_ratio = k.seq_ratio, seq_w = k.seq_w;
  const T inf = std::numeric_limits<T>::infinity();
  // Every output array is distinct from every input (the binding checks it; the terms are ours).
#pragma GCC ivdep
  for (int64_t t = 0; t < n; ++t) {
    const bool counted = m[t] != 0;
    const T x = xs[t], A = advs[t];
    const T raw_delta = x - olds[t];
    const T delta = clamp_abs(raw_delta, C);
    const T token_ratio = exp_fast(delta);
    const T token_d_ratio = std::abs(raw_delta) <= C ? token_ratio : T(0);
    const T ratio = token_ratio * (T(1) - is_seq) + seq_ratio * is_seq;
    const T d_ratio = token_d_ratio * (T(1) - is_seq) + seq_ratio * is_seq;
    const SurOut<T> sur = surrogate<SURR>(k, SurIn<T>{x, olds[t], A, raw_delta, delta, ratio, d_ratio});
    T pg = sur.loss, d_pg = sur.dloss;
    if (IS == 1) {
      const T raw_lw = olds[t] - rolls[t];
      const T w = exp_fast(clamp_abs<T>(raw_lw == raw_lw ? raw_lw : T(0), C));  // NaN rollout logp: Δ = 0 (TRL)
      const T w_capped = w > cap ? cap_value : w;  // truncated to the cap, or masked to 0
      pg *= w_capped;
      d_pg *= w_capped;
    } else if (IS == 2) {
      pg *= rolls[t];
      d_pg *= rolls[t];
    } else {
      pg *= seq_w;
      d_pg *= seq_w;
    }
    T loss = pg, d_loss = d_pg, kl = T(0);
    if (REF) {
      const T raw_d = refs[t] - x;
      const T d = clamp_abs(raw_d, C);
      const T ed = exp_fast(d);
      const T sgn = (d > T(0) ? T(1) : T(0)) - (d < T(0) ? T(1) : T(0));
      const T kl_raw = c1 * (-d) + c2 * (T(0.5) * d * d) + c3 * (ed - d - T(1)) + c4 * std::abs(d);
      const T dk_est = c1 * T(-1) + c2 * d + c3 * (ed - T(1)) + c4 * sgn;  // ∂k/∂d
      const T dk = dk_est * (T(1) - kl_st) + d * kl_st;                   // kX+: the gradient of k2
      const T k_val = clamp_abs(kl_raw, kl_clamp);
      const T live_d = std::abs(raw_d) <= C ? dk : T(0);                  // the clamps' derivatives
      const T dkx = std::abs(kl_raw) <= kl_clamp_gate ? -live_d : T(0);   // ∂k/∂x (∂d/∂x = −1)
      // KL·r (kl_bias = 1): ∂ = r·∂k/∂x + k·∂r/∂x; a blend, exact since both terms are finite
      const T bias = T(1) - kl_bias + kl_bias * ratio;
      kl = k_val * bias;
      loss += kl_coef * kl;
      d_loss += kl_coef * (dkx * bias + kl_bias * k_val * d_ratio);
    }
    T entropy = T(0);
    if (ENT) {
      entropy = ents[t];
      loss -= ent_coef * entropy;
      unit_ent[t] = counted ? ent_unit : T(0);
    }
    unit[t] = counted ? d_loss * weight : T(0);
    o_loss[t] = counted ? loss : T(0);
    if constexpr (Sums::flags) {
      o_low[t] = counted ? sur.low : T(0);
      o_high[t] = counted ? sur.high : T(0);
      o_dual[t] = counted ? sur.dual : T(0);
    }
    if constexpr (Sums::neg_delta) o_neg_delta[t] = counted ? -delta : T(0);
    if constexpr (REF) o_kl[t] = counted ? kl : T(0);
    if constexpr (Sums::ratio) {
      o_ratio[t] = counted ? ratio : T(0);
      o_min[t] = counted ? ratio : inf;
      o_max[t] = counted ? ratio : -inf;
    }
    if constexpr (ENT) o_ent[t] = counted ? entropy : T(0);
  }
}

// Adds a block's terms to a sequence's sums (in double): the sums the token loop formed (see MetricSums).
template <class T, class Sums, bool REF, bool ENT>
void add_terms(const TokenTerms<T>& b, int64_t n, SeqSums& out) {
  T loss = 0, low = 0, high = 0, dual = 0, neg_delta = 0, kl = 0, ratio = 0, entropy = 0;
  T rmin = std::numeric_limits<T>::infinity(), rmax = -std::numeric_limits<T>::infinity();
#ifdef _OPENMP
#pragma omp simd reduction(+ : loss, low, high, dual, neg_delta, kl, ratio, entropy) reduction(min : rmin) \
    reduction(max : rmax)
#endif
  for (int64_t t = 0; t < n; ++t) {
    loss += b.loss[t];
    if constexpr (Sums::flags) low += b.low[t], high += b.high[t], dual += b.dual[t];
    if constexpr (Sums::neg_delta) neg_delta += b.neg_delta[t];
    if constexpr (REF) kl += b.kl[t];
    if constexpr (Sums::ratio) ratio += b.ratio[t], rmin = std::min(rmin, b.ratio_min[t]), rmax = std::max(rmax, b.ratio_max[t]);
    if constexpr (ENT) entropy += b.entropy[t];
  }
  out.loss += loss, out.clip_low += low, out.clip_high += high, out.dual += dual, out.neg_delta += neg_delta;
  out.kl += kl, out.ratio += ratio, out.entropy += entropy;
  out.ratio_min = std::min<double>(out.ratio_min, rmin), out.ratio_max = std::max<double>(out.ratio_max, rmax);
}

template <class T, int SURR, bool REF, int IS, bool ENT, int MET>
void policy_blocks(const TokenConsts<T>& k, const TokenLossArgs<T>& a, int64_t begin, int64_t end, SeqSums& out) {
  TokenTerms<T> terms;
  for (int64_t b = begin; b < end; b += kLossBlock) {
    const int64_t n = std::min(kLossBlock, end - b);
    policy_tokens<T, SURR, REF, IS, ENT, MET>(k, a, b, n, terms);
    add_terms<T, MetricSums<SURR, MET>, REF, ENT>(terms, n, out);
  }
}

// Counted tokens of [begin, end).
inline int64_t count_tokens(const uint8_t* __restrict m, int64_t begin, int64_t end) {
  int64_t n = 0;
  for (int64_t t = begin; t < end; ++t) n += m[t] != 0;
  return n;
}

// Σ over the counted tokens of [begin, end) of clamp(p − q, ±C) (a select, so padding never leaks).
// NAN_ZERO: a NaN difference counts as 0 (the rollout log-probs: a token vLLM could not score, as TRL).
template <class T, bool NAN_ZERO = false>
double masked_log_ratio_sum(const T* __restrict p, const T* __restrict q, const uint8_t* __restrict m, int64_t begin,
                            int64_t end, T C) {
  T sum = 0;
#ifdef _OPENMP
#pragma omp simd reduction(+ : sum)
#endif
  for (int64_t t = begin; t < end; ++t) {
    T d = p[t] - q[t];
    if (NAN_ZERO) d = d == d ? d : T(0);
    sum += m[t] != 0 ? clamp_abs<T>(d, C) : T(0);
  }
  return static_cast<double>(sum);
}

// geo_mean's pass-1 sums over the counted tokens of [begin, end): Σ Δ̃ and Σ A (selects, so padding never leaks).
template <class T>
void geo_sums(const TokenLossArgs<T>& a, int64_t begin, int64_t end, T C, T clip_low, T clip_high, double* sum_tilde,
              double* sum_adv) {
  T st = 0, sa = 0;
  for (int64_t t = begin; t < end; ++t) {
    T g;
    const T d = geo_log_ratio(a.adv[t], clamp_abs<T>(a.x[t] - a.old[t], C), clip_low, clip_high, &g);
    st += a.mask[t] != 0 ? d : T(0);
    sa += a.mask[t] != 0 ? a.adv[t] : T(0);
  }
  *sum_tilde = st, *sum_adv = sa;
}

// Σ log(w + 1e-10) over the counted tokens of given weights (geo_mean's geometric mean, as verl).
template <class T>
double masked_log_weight_sum(const T* __restrict w, const uint8_t* __restrict m, int64_t begin, int64_t end) {
  double sum = 0;
  for (int64_t t = begin; t < end; ++t) sum += m[t] != 0 ? std::log(static_cast<double>(w[t]) + 1e-10) : 0.0;
  return sum;
}

// The token loops of one surrogate: every metric by [REF][IS][ENT]; the lean metric levels (1, 2, 3)
// without ref_logp and entropy by [level - 1][IS].
template <class T, int SURR>
struct SurrogateLoops {
  using Fn = void (*)(const TokenConsts<T>&, const TokenLossArgs<T>&, int64_t, int64_t, SeqSums&);
  static constexpr Fn kLoops[2][3][2] = {
      {{policy_blocks<T, SURR, false, 0, false, 0>, policy_blocks<T, SURR, false, 0, true, 0>},
       {policy_blocks<T, SURR, false, 1, false, 0>, policy_blocks<T, SURR, false, 1, true, 0>},
       {policy_blocks<T, SURR, false, 2, false, 0>, policy_blocks<T, SURR, false, 2, true, 0>}},
      {{policy_blocks<T, SURR, true, 0, false, 0>, policy_blocks<T, SURR, true, 0, true, 0>},
       {policy_blocks<T, SURR, true, 1, false, 0>, policy_blocks<T, SURR, true, 1, true, 0>},
       {policy_blocks<T, SURR, true, 2, false, 0>, policy_blocks<T, SURR, true, 2, true, 0>}}};
  // kClipKlMetrics equals kKlMetrics for a surrogate without clip flags: one instantiation serves both
  static constexpr int kLevel1 = kHasClipFlags<SURR> ? kClipKlMetrics : kKlMetrics;
  static constexpr Fn kLean[3][3] = {
      {policy_blocks<T, SURR, false, 0, false, kLevel1>, policy_blocks<T, SURR, false, 1, false, kLevel1>,
       policy_blocks<T, SURR, false, 2, false, kLevel1>},
      {policy_blocks<T, SURR, false, 0, false, kKlMetrics>, policy_blocks<T, SURR, false, 1, false, kKlMetrics>,
       policy_blocks<T, SURR, false, 2, false, kKlMetrics>},
      {policy_blocks<T, SURR, false, 0, false, kNoMetrics>, policy_blocks<T, SURR, false, 1, false, kNoMetrics>,
       policy_blocks<T, SURR, false, 2, false, kNoMetrics>}};
};

template <class T, int... S>
constexpr auto surrogate_table(std::integer_sequence<int, S...>) {
  using Fn = typename SurrogateLoops<T, 0>::Fn;
  return std::array<const Fn (*)[3][2], sizeof...(S)>{SurrogateLoops<T, S>::kLoops...};
}

template <class T, int... S>
constexpr auto lean_surrogate_table(std::integer_sequence<int, S...>) {
  using Fn = typename SurrogateLoops<T, 0>::Fn;
  return std::array<const Fn (*)[3], sizeof...(S)>{SurrogateLoops<T, S>::kLean...};
}

// One sequence: pass 1 counts its tokens and forms the sequence statistics (GSPO ratio, sequence IS
// weight, geo_mean's L_i, vespo's Σ Δ); pass 2 (policy_blocks) computes every token's loss and derivative.
template <class T>
void policy_sequence(const TokenLossSpec& s, const TokenLossArgs<T>& a, int64_t begin, int64_t end, SeqSums& out) {
  const T C = static_cast<T>(s.log_ratio_clamp);
  const bool geo = s.surrogate == kGeoMean, vespo = s.surrogate == kVespo;
  const double n = static_cast<double>(count_tokens(a.mask, begin, end));
  const double sum_delta = s.seq_ratio || vespo ? masked_log_ratio_sum(a.x, a.old, a.mask, begin, end, C) : 0.0;
  double sum_log_w = s.rollout_seq ? masked_log_ratio_sum<T, true>(a.old, a.roll, a.mask, begin, end, C) : 0.0;
  if (geo && s.rollout_given) sum_log_w = masked_log_weight_sum(a.roll, a.mask, begin, end);
  const double inv_n = n > 0 ? 1.0 / n : 0.0;
  TokenConsts<T> k;
  k.C = C;
  k.lo = static_cast<T>(1.0 - s.clip_low), k.hi = static_cast<T>(1.0 + s.clip_high);
  k.clip_low = static_cast<T>(s.clip_low), k.clip_high = static_cast<T>(s.clip_high);
  k.dual_c = s.dual_clip > 0 ? static_cast<T>(s.dual_clip) : std::numeric_limits<T>::infinity();
  k.delta = static_cast<T>(s.delta);
  k.tau_pos = static_cast<T>(s.tau_pos), k.tau_neg = static_cast<T>(s.tau_neg);
  k.ratio_cap = static_cast<T>(s.ratio_cap), k.dro_beta = static_cast<T>(s.dro_beta);
  const T vespo_log_w = static_cast<T>(std::min(std::max(sum_delta, std::log(1e-8)), 20.0));  // TRL's clamp
  k.vespo_phi_pos = vespo_phi(vespo_log_w, static_cast<T>(s.vespo_k_pos), static_cast<T>(s.vespo_l_pos));
  k.vespo_phi_neg = vespo_phi(vespo_log_w, static_cast<T>(s.vespo_k_neg), static_cast<T>(s.vespo_l_neg));
  k.kl_coef = static_cast<T>(s.kl_coef), k.kl_clamp = static_cast<T>(s.kl_clamp);
  k.kl_clamp_gate = s.kl_st ? std::numeric_limits<T>::infinity() : k.kl_clamp;
  k.c1 = s.kl == 1, k.c2 = s.kl == 2, k.c3 = s.kl == 3, k.c4 = s.kl == 4;
  k.kl_st = s.kl_st ? T(1) : T(0), k.kl_bias = s.kl_bias ? T(1) : T(0);
  k.ent_coef = static_cast<T>(s.entropy_coef);
  k.cap = static_cast<T>(s.rollout_cap), k.cap_value = s.rollout_mask ? T(0) : k.cap;
  k.weight = s.aggregation == Aggregation::kSeqMeanTokenMean ? static_cast<T>(inv_n) : T(1);
  k.is_seq = s.seq_ratio ? T(1) : T(0);
  k.seq_ratio = static_cast<T>(std::exp(sum_delta * inv_n));
  const T seq_w = exp_fast(static_cast<T>(sum_log_w * inv_n));
  k.seq_w = s.rollout_seq ? (seq_w > k.cap ? k.cap_value : seq_w) : geo && s.rollout_given ? seq_w : T(1);
  k.geo_loss = T(0);
  if (geo) {
    double sum_tilde, sum_adv;
    geo_sums(a, begin, end, C, k.clip_low, k.clip_high, &sum_tilde, &sum_adv);
    k.geo_loss = static_cast<T>(-(sum_adv * inv_n) * std::exp(sum_tilde * inv_n)) * k.seq_w;
    k.seq_w = T(1);  // in geo_loss already
  }

  static constexpr auto kTable = surrogate_table<T>(std::make_integer_sequence<int, kNumSurrogates>{});
  static constexpr auto kLeanTable = lean_surrogate_table<T>(std::make_integer_sequence<int, kNumSurrogates>{});
  // IS 0: a per-sequence constant weight (seq_w); 1: per-token weights from rollout log-probs; 2: given weights
  const int is = !s.rollout || s.rollout_seq || geo ? 0 : s.rollout_given ? 2 : 1;
  const int level = effective_metric_level(s);
  if (level != kAllMetrics)
    kLeanTable[s.surrogate][level - 1][is](k, a, begin, end, out);
  else
    kTable[s.surrogate][s.kl != 0][is][s.has_entropy](k, a, begin, end, out);  // kTable[i] -> its kLoops[REF]
  out.count = n;
  out.loss *= static_cast<double>(k.weight);
}

template <class T>
void value_sequence(const TokenLossSpec& s, const TokenLossArgs<T>& a, int64_t begin, int64_t end, SeqSums& out) {
  const uint8_t* m = a.mask;
  const T clip = static_cast<T>(s.value_clip);
  const double n = static_cast<double>(count_tokens(m, begin, end));
  const T weight = s.aggregation == Aggregation::kSeqMeanTokenMean && n > 0 ? static_cast<T>(1.0 / n) : T(1);
  for (int64_t t = begin; t < end; ++t) {
    if (!m[t]) {
      a.unit[t] = T(0);
      continue;
    }
    const T x = a.x[t], old = a.old[t], ret = a.adv[t];
    const T err = x - ret;
    const T clipped_err = std::min(std::max(x, old - clip), old + clip) - ret;
    const bool clipped = clipped_err * clipped_err > err * err;
    out.loss += T(0.5) * (clipped ? clipped_err * clipped_err : err * err);
    a.unit[t] = (clipped ? T(0) : err) * weight;
    out.clip_high += clipped;
  }
  out.count = n;
  out.loss *= weight;
}

// Fills unit (and unit_ent) and stats[kNumStats]; see the top of this file.
template <class T>
void token_loss_forward(const TokenLossSpec& s, const TokenLossArgs<T>& args, T* stats) {
  const int64_t B = args.num_seqs;
  const int64_t N = B > 0 ? args.cu[B] : 0;
  std::vector<SeqSums> sums(static_cast<size_t>(B));
  // The token loops read a mask: without one, every token counts.
  std::vector<uint8_t> all_counted;
  TokenLossArgs<T> a = args;
  if (a.mask == nullptr && a.wide_mask == nullptr) {
    all_counted.assign(static_cast<size_t>(N), 1);
    a.mask = all_counted.data();
  }
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 8) if (N >= kLossParallelMinTokens && B > 1)
#endif
  for (int64_t i = 0; i < B; ++i) {
    int64_t begin = a.cu[i], end = a.cu[i + 1];
    TokenLossArgs<T> seq = a;
    if (a.wide_mask != nullptr) {  // this sequence's mask as bytes, in an L1/L2-resident buffer
      thread_local std::vector<uint8_t> buf;
      buf.resize(static_cast<size_t>(std::max<int64_t>(end - begin, 1)));
      if (a.wide_mask_bytes == 8)
        bytes_of_mask(static_cast<const double*>(a.wide_mask) + begin, end - begin, buf.data());
      else
        bytes_of_mask(static_cast<const float*>(a.wide_mask) + begin, end - begin, buf.data());
      seq = shifted_args(a, begin, buf.data());
      end -= begin, begin = 0;
    }
    if (s.value)
      value_sequence<T>(s, seq, begin, end, sums[i]);
    else
      policy_sequence<T>(s, seq, begin, end, sums[i]);
  }

  SeqSums total;
  double nonempty = 0;
  int64_t longest = 0;
  for (int64_t i = 0; i < B; ++i) {
    const SeqSums& q = sums[i];
    total.loss += q.loss, total.count += q.count, total.clip_low += q.clip_low, total.clip_high += q.clip_high;
    total.dual += q.dual, total.neg_delta += q.neg_delta, total.kl += q.kl, total.ratio += q.ratio;
    total.entropy += q.entropy;
    total.ratio_min = std::min(total.ratio_min, q.ratio_min);
    total.ratio_max = std::max(total.ratio_max, q.ratio_max);
    nonempty += q.count > 0;
    longest = std::max(longest, a.cu[i + 1] - a.cu[i]);
  }
  double den;
  switch (s.aggregation) {
    case Aggregation::kTokenMean: den = s.num_tokens >= 0 ? s.num_tokens : total.count; break;
    case Aggregation::kTokenSumNorm:
      den = static_cast<double>(B) * static_cast<double>(s.norm_length > 0 ? s.norm_length : longest);
      break;
    case Aggregation::kTokenSum: den = 1.0; break;
    default: den = s.count_empty ? static_cast<double>(B) : nonempty;
  }
  const double scale = den > 0 ? 1.0 / den : 0.0;
  const double inv_total = total.count > 0 ? 1.0 / total.count : 0.0;
  double st[kNumStats] = {};
  st[kLoss] = total.loss * scale;
  st[kScale] = scale;
  if (s.value) {
    st[kClipFrac] = total.clip_high * inv_total;
  } else {
    st[kClipFrac] = (total.clip_low + total.clip_high) * inv_total;
    st[kClipLow] = total.clip_low * inv_total;
    st[kClipHigh] = total.clip_high * inv_total;
    st[kDualClip] = total.dual * inv_total;
    st[kPpoKl] = total.neg_delta * inv_total;
    st[kRefKl] = total.kl * inv_total;
    st[kRatioMean] = total.ratio * inv_total;
    const bool ratio_range = total.count > 0 && effective_metric_level(s) == kAllMetrics;
    st[kRatioMin] = ratio_range ? total.ratio_min : 0.0;  // 0 where the metric level forms no ratio statistics
    st[kRatioMax] = ratio_range ? total.ratio_max : 0.0;
    st[kEntropy] = total.entropy * inv_total;
  }
  for (int k = 0; k < kNumStats; ++k) stats[k] = static_cast<T>(st[k]);
}

}  // namespace fastpo
