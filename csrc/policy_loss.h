// policy_loss.h -- CPU kernel of fastpo.policy_loss and fastpo.value_loss: one fused pass per sequence.
//
// Same contract as the Triton kernels (kernels/policy_loss.py) and the spec (fastpo/reference/policy.py).
// Sequence i holds tokens [cu[i], cu[i+1]) of the flat inputs; a token counts when mask[t] != 0 (all
// count without a mask). Per counted token, with x = logp, C = 20 (the log-ratio clamp):
//
//   Δ  = clamp(x − old, ±C)                         d = clamp(ref − x, ±C)
//   r  = e^Δ (token ratio) or s_i = exp(mean_i Δ) (GSPO sequence ratio, token-gradient form)
//   pg = max(−A·r, −A·clip(r, 1 − ε_low, 1 + ε_high)); with dual clip c and A < 0: min(pg, −c·A)
//   w  = rollout IS weight: e^{clamp(old − roll, ±C)} per token, or exp(its mean) per sequence;
//        truncated min(w, cap) or masked w·1[w <= cap]; a constant
//   k  = k1: −d,  k2: d²/2,  k3: e^d − d − 1, then clamped to ±kl_clamp
//   l  = w·pg + β·k − η·entropy
//
// Backward, derived per token (everything but x and entropy is a constant):
//   ∂r/∂x   = r·1[|x − old| <= C]   (token ratio),   s_i   (sequence ratio, token-gradient form)
//   ∂pg/∂x  = 0 where a clip branch is active (the clipped value or the dual cap is the max/min),
//             else −A·∂r/∂x; times w
//   ∂k/∂x   = −∂k/∂d · 1[|ref − x| <= C] · 1[|k| <= kl_clamp], with ∂k/∂d = −1, d, e^d − 1 for k1/k2/k3
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
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "numerics.h"

namespace fastpo {

enum class Aggregation { kTokenMean, kSeqMeanTokenMean, kSeqMeanTokenSum, kTokenSumNorm };

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
};

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
};

// One sequence's sums over its counted tokens.
struct SeqSums {
  double loss = 0, count = 0, clip_low = 0, clip_high = 0, dual = 0, neg_delta = 0, kl = 0, ratio = 0, entropy = 0;
  double ratio_min = std::numeric_limits<double>::infinity(), ratio_max = -std::numeric_limits<double>::infinity();
};

template <class T>
inline T clamp_abs(T v, T bound) { return std::min(std::max(v, -bound), bound); }

// Tokens from which the OpenMP team is woken (below, waking it costs more than the second core saves).
constexpr int64_t kLossParallelMinTokens = int64_t(1) << 18;

// One sequence: pass 1 counts its tokens and forms the sequence means (GSPO ratio, sequence IS
// weight); pass 2 computes every token's loss and derivative. The loop is scalar (gcc does not
// vectorise its data-dependent choices, even written as selects): about 15 ns a token on one core
// of the 2-core dev machine with k3 KL, for ~25 bytes of memory traffic, so a hand-vectorised
// version has headroom left.
template <class T>
void policy_sequence(const TokenLossSpec& s, const TokenLossArgs<T>& a, int64_t begin, int64_t end, SeqSums& out) {
  const T C = static_cast<T>(s.log_ratio_clamp);
  const uint8_t* m = a.mask;  // never null here
  double n = 0, sum_delta = 0, sum_log_w = 0;
  for (int64_t t = begin; t < end; ++t) {
    if (!m[t]) continue;
    n += 1;
    if (s.seq_ratio) sum_delta += clamp_abs<T>(a.x[t] - a.old[t], C);
    if (s.rollout_seq) sum_log_w += clamp_abs<T>(a.old[t] - a.roll[t], C);
  }
  const double inv_n = n > 0 ? 1.0 / n : 0.0;
  const T weight = s.aggregation == Aggregation::kSeqMeanTokenMean ? static_cast<T>(inv_n) : T(1);
  const T seq_ratio = static_cast<T>(std::exp(sum_delta * inv_n));
  const T cap = static_cast<T>(s.rollout_cap);
  auto is_weight = [&](T log_w) {
    const T w = exp_fast(log_w);
    return w > cap ? (s.rollout_mask ? T(0) : cap) : w;  // truncate to the cap, or mask
  };
  const T seq_w = s.rollout_seq ? is_weight(static_cast<T>(sum_log_w * inv_n)) : T(1);
  const T lo = static_cast<T>(1.0 - s.clip_low), hi = static_cast<T>(1.0 + s.clip_high);
  const T dual_c = static_cast<T>(s.dual_clip), kl_coef = static_cast<T>(s.kl_coef);
  const T kl_clamp = static_cast<T>(s.kl_clamp), ent_coef = static_cast<T>(s.entropy_coef);

  for (int64_t t = begin; t < end; ++t) {
    if (!m[t]) {  // whatever a masked token holds never reaches a sum
      a.unit[t] = T(0);
      if (a.unit_ent) a.unit_ent[t] = T(0);
      continue;
    }
    const T x = a.x[t], A = a.adv[t];
    const T raw_delta = x - a.old[t];
    const T delta = clamp_abs(raw_delta, C);
    T ratio, d_ratio;
    if (s.seq_ratio) {
      ratio = d_ratio = seq_ratio;
    } else {
      ratio = exp_fast(delta);
      d_ratio = std::abs(raw_delta) <= C ? ratio : T(0);
    }
    const T unclipped = -A * ratio;
    const T clipped_value = -A * std::min(std::max(ratio, lo), hi);
    const bool clipped = clipped_value > unclipped;
    T pg = clipped ? clipped_value : unclipped;
    T d_pg = clipped ? T(0) : -A * d_ratio;
    bool dual = false;
    if (s.dual_clip > 0) {
      const T dual_cap = -dual_c * A;
      dual = A < 0 && pg > dual_cap;
      if (dual) pg = dual_cap, d_pg = T(0);
    }
    if (s.rollout) {
      const T w = s.rollout_seq ? seq_w : is_weight(clamp_abs<T>(a.old[t] - a.roll[t], C));
      pg *= w;
      d_pg *= w;
    }
    T loss = pg, d_loss = d_pg, kl = T(0);
    if (s.kl) {
      const T raw_d = a.ref[t] - x;
      const T d = clamp_abs(raw_d, C);
      T dk;
      if (s.kl == 1) {
        kl = -d, dk = T(-1);
      } else if (s.kl == 2) {
        kl = T(0.5) * d * d, dk = d;
      } else {
        const T ed = exp_fast(d);
        kl = ed - d - T(1), dk = ed - T(1);
      }
      const bool live = std::abs(raw_d) <= C && std::abs(kl) <= kl_clamp;
      kl = clamp_abs(kl, kl_clamp);
      loss += kl_coef * kl;
      if (live) d_loss -= kl_coef * dk;  // ∂d/∂x = −1
    }
    T entropy = T(0);
    if (s.has_entropy) {
      entropy = a.ent[t];
      loss -= ent_coef * entropy;
      a.unit_ent[t] = -ent_coef * weight;
    }
    a.unit[t] = d_loss * weight;
    out.loss += loss;
    out.clip_low += clipped && A < 0;
    out.clip_high += clipped && A > 0;
    out.dual += dual;
    out.neg_delta -= delta;
    out.kl += kl;
    out.ratio += ratio;
    out.ratio_min = std::min<double>(out.ratio_min, ratio);
    out.ratio_max = std::max<double>(out.ratio_max, ratio);
    out.entropy += entropy;
  }
  out.count = n;
  out.loss *= weight;
}

template <class T>
void value_sequence(const TokenLossSpec& s, const TokenLossArgs<T>& a, int64_t begin, int64_t end, SeqSums& out) {
  const uint8_t* m = a.mask;
  const T clip = static_cast<T>(s.value_clip);
  double n = 0;
  for (int64_t t = begin; t < end; ++t) n += m[t] != 0;
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
  if (a.mask == nullptr) {
    all_counted.assign(static_cast<size_t>(N), 1);
    a.mask = all_counted.data();
  }
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 8) if (N >= kLossParallelMinTokens && B > 1)
#endif
  for (int64_t i = 0; i < B; ++i) {
    if (s.value)
      value_sequence<T>(s, a, a.cu[i], a.cu[i + 1], sums[i]);
    else
      policy_sequence<T>(s, a, a.cu[i], a.cu[i + 1], sums[i]);
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
    default: den = nonempty;
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
    st[kRatioMin] = total.count > 0 ? total.ratio_min : 0.0;
    st[kRatioMax] = total.count > 0 ? total.ratio_max : 0.0;
    st[kEntropy] = total.entropy * inv_total;
  }
  for (int k = 0; k < kNumStats; ++k) stats[k] = static_cast<T>(st[k]);
}

}  // namespace fastpo
