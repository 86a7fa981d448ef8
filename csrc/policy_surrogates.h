// policy_surrogates.h -- the per-token objectives of fastpo.policy_loss (PolicyLossConfig.surrogate), one
// inline function each with its derivative, and the per-sequence constants they read. policy_loss.h's
// token loop calls surrogate<SURR>, SURR a compile-time code (fastpo.ops.loss_spec.SURROGATE_CODES); the
// spec is fastpo/reference/surrogates.py and the Triton twins are in kernels/policy_surrogates.py.
//
// Each returns l, ∂l/∂x (x = logp) and the 0/1 flags behind clip_frac_low / _high / dual_clip_frac. They are
// written with selects on per-token comparisons only, so that gcc if-converts and vectorises the token loop.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include "numerics.h"

namespace fastpo {

// fastpo.ops.loss_spec.SURROGATE_CODES
enum Surrogate { kClip, kCispo, kSapo, kReinforce, kDppoTv, kDppoKl, kDro, kGeoMean, kVespo, kRatio, kNumSurrogates };

// Per-sequence constants of the token loop (see policy_tokens).
template <class T>
struct TokenConsts {
  T C, lo, hi, dual_c, kl_coef, kl_clamp, c1, c2, c3, ent_coef, cap, cap_value, weight, is_seq, seq_ratio, seq_w;
  T c4, kl_st, kl_clamp_gate, kl_bias;                 // abs KL; straight-through; the clamp's gradient gate; KL·r
  T clip_low, clip_high, delta, tau_pos, tau_neg, ratio_cap, dro_beta;
  T geo_loss;                                          // geo_mean: the sequence's L_i (times its weight)
  T vespo_phi_pos, vespo_phi_neg;                      // vespo: the sequence's φ for A >= 0 and for A < 0
};

// One token's policy term: l, ∂l/∂x and the 0/1 flags behind clip_frac_low / _high / dual_clip_frac.
template <class T>
struct SurOut {
  T loss, dloss, low, high, dual;
};

// Per-token inputs of a surrogate: x = logp, the clamped and raw log-ratio, the ratio r and ∂r/∂x.
template <class T>
struct SurIn {
  T x, old, A, raw_delta, delta, ratio, d_ratio;
};

// clip: r' = min(r, δ); l = max(−A·r', −A·clip(r, lo, hi)); ∂l/∂x = −A·∂r/∂x through the branch that is
// the max, 0 where that branch is flat (the clipped one outside [lo, hi], the other beyond δ); dual cap c (A < 0): min(l, −c·A), ∂ = 0 where the cap binds (c = +inf: off).
template <class T>
inline SurOut<T> sur_clip(const TokenConsts<T>& k, const SurIn<T>& in) {
  const T A = in.A, r = in.ratio;
  const T r1 = std::min(r, k.delta);
  const T unclipped = -A * r1;
  const T clipped_value = -A * std::min(std::max(r, k.lo), k.hi);
  const bool clipped = clipped_value > unclipped;
  const T pg_clip = clipped ? clipped_value : unclipped;
  const T dual_cap = -k.dual_c * A;
  const bool dual = (A < T(0)) & (pg_clip > dual_cap);
  const T pg = std::min(pg_clip, A < T(0) ? dual_cap : pg_clip);
  // the max's branch carries the gradient: clip(r, lo, hi) passes it inside [lo, hi] (with δ < hi the
  // clipped branch can win there), r' = min(r, δ) up to δ
  const bool inside = (r >= k.lo) & (r <= k.hi);
  const T dr = -A * in.d_ratio;
  T d = clipped ? (inside ? dr : T(0)) : (r > k.delta ? T(0) : dr);
  d = dual ? T(0) : d;
  const T neg = A < T(0) ? T(1) : T(0), pos = A > T(0) ? T(1) : T(0);
  // the bounds' flags from r' (TRL's clip_ratio metrics; without δ the same as "the clipped branch")
  return {pg, d, r1 < k.lo ? neg : T(0), r1 > k.hi ? pos : T(0), dual ? T(1) : T(0)};
}

// cispo: l = −sg(clip(r, lo, hi))·A·x, ∂l/∂x = −clip(r, lo, hi)·A (lo = 0 for TRL's upper-only form).
template <class T>
inline SurOut<T> sur_cispo(const TokenConsts<T>& k, const SurIn<T>& in) {
  const T w = std::min(std::max(in.ratio, k.lo), k.hi);
  // the upper-only form (lo = 0, TRL) counts r > hi with A > 0 only (TRL's cispo_clip_ratio); verl's both
  const bool high = in.ratio > k.hi && (in.A > T(0) || k.lo > T(0));
  return {-w * in.A * in.x, -w * in.A, in.ratio < k.lo ? T(1) : T(0), high ? T(1) : T(0), T(0)};
}

// sapo: s = σ(τ(r − 1)), τ = tau_pos for A > 0 else tau_neg; l = −s·(4/τ)·A, ∂l/∂x = −4·A·s·(1 − s)·∂r/∂x.
template <class T>
inline SurOut<T> sur_sapo(const TokenConsts<T>& k, const SurIn<T>& in) {
  const T tau = in.A > T(0) ? k.tau_pos : k.tau_neg;
  const T s = T(1) / (T(1) + exp_fast(-tau * (in.ratio - T(1))));
  return {-s * (T(4) / tau) * in.A, T(-4) * in.A * s * (T(1) - s) * in.d_ratio, T(0), T(0), T(0)};
}

// reinforce (verl gpg / bypass REINFORCE): l = −A·x, ∂l/∂x = −A.
template <class T>
inline SurOut<T> sur_reinforce(const TokenConsts<T>&, const SurIn<T>& in) {
  return {-in.A * in.x, -in.A, T(0), T(0), T(0)};
}

// dppo: l = −A·sg(min(r, C))·x·valid, ∂l/∂x = −A·min(r, C)·valid, with valid the trust region of the token
// probability p = e^x: TV: p − p_old <= ε_high (A > 0), >= −ε_low (else); KL: the binary KL
// D = p_old·(old − x) + (1 − p_old)·log((1 − p_old + 1e-8)/(1 − p + 1e-8)) <= ε_high or p <= p_old (A > 0),
// D <= ε_low or p >= p_old (else). log_fast (not std::log): the token loop vectorises.
template <class T, bool KL_REGION>
inline SurOut<T> sur_dppo(const TokenConsts<T>& k, const SurIn<T>& in) {
  const T p = exp_fast(in.x), p_old = exp_fast(in.old), A = in.A;
  bool valid;
  if (KL_REGION) {
    const T kl = p_old * (in.old - in.x) + (T(1) - p_old) * log_fast((T(1) - p_old + T(1e-8)) / (T(1) - p + T(1e-8)));
    const bool pos = A > T(0);  // bool arithmetic, not a select of two `|`s: gcc if-converts it
    valid = (pos & ((kl <= k.clip_high) | (p <= p_old))) | ((!pos) & ((kl <= k.clip_low) | (p >= p_old)));
  } else {
    const T diff = p - p_old;
    const bool pos = A > T(0);
    valid = (pos & (diff <= k.clip_high)) | ((!pos) & (diff >= -k.clip_low));
  }
  const T t = std::min(in.ratio, k.ratio_cap);
  const T inv = valid ? T(0) : T(1);
  return {valid ? -A * t * in.x : T(0), valid ? -A * t : T(0), A <= T(0) ? inv : T(0), A > T(0) ? inv : T(0),
          valid && in.ratio > k.ratio_cap ? T(1) : T(0)};
}

// dro: l = −(A·x − ½β(x − old)²), ∂l/∂x = −A + β(x − old) (the raw log-ratio: no exp, so no clamp).
template <class T>
inline SurOut<T> sur_dro(const TokenConsts<T>& k, const SurIn<T>& in) {
  const T lr = in.raw_delta;
  return {-(in.A * in.x - T(0.5) * k.dro_beta * lr * lr), -in.A + k.dro_beta * lr, T(0), T(0), T(0)};
}

// GMPO's sign-aware clip of the log-ratio: Δ̃ = sgn(A)·min(sgn(A)·Δ, sgn(A)·clamp(Δ, −ε_low, ε_high)), with
// ∂Δ̃/∂Δ = 1 on the unclipped side, 0 where the bound binds or A = 0.
template <class T>
inline T geo_log_ratio(T A, T delta, T clip_low, T clip_high, T* grad) {
  const T bound = std::min(std::max(delta, -clip_low), clip_high);
  const bool pos = A > T(0), neg = A < T(0);
  const bool binds = (pos & (delta > clip_high)) | (neg & (delta < -clip_low));
  *grad = (pos | neg) & !binds ? T(1) : T(0);
  return pos ? std::min(delta, bound) : neg ? std::max(delta, bound) : T(0);
}

// geo_mean: every token carries its sequence's L_i = −Ā_i·exp(mean Δ̃)·w_i (k.geo_loss, from pass 1);
// ∂L_i/∂x_t = L_i·g_t/n_i, g_t = ∂Δ̃_t/∂Δ_t·1[|x − old| <= C]. It returns ∂l/∂x = L_i·g_t: seq_mean_token_mean's
// weight 1/n_i supplies the 1/n_i (other aggregations sum n_i copies of L_i, whose derivative is L_i·g_t too).
template <class T>
inline SurOut<T> sur_geo_mean(const TokenConsts<T>& k, const SurIn<T>& in) {
  T g;
  geo_log_ratio(in.A, in.delta, k.clip_low, k.clip_high, &g);
  g = std::abs(in.raw_delta) <= k.C ? g : T(0);
  const bool outside = in.delta != std::min(std::max(in.delta, -k.clip_low), k.clip_high);
  return {k.geo_loss, k.geo_loss * g, outside & (in.A < T(0)) ? T(1) : T(0), outside & (in.A > T(0)) ? T(1) : T(0),
          T(0)};
}

// vespo: l = −sg(φ)·A·x, ∂l/∂x = −φ·A, φ = exp(λ + k·log w − λ·w) with log w the sequence's clamped Σ Δ and
// (k, λ) = (k_pos, λ_pos) for A >= 0 else (k_neg, λ_neg); a non-finite φ counts as 0 (TRL).
// φ depends on the sequence and the sign of A only: vespo_phi computes both per sequence (in policy_sequence).
template <class T>
inline T vespo_phi(T log_w, T kk, T lam) {
  const T phi = std::exp(lam + kk * log_w - lam * std::exp(log_w));
  return std::abs(phi) < std::numeric_limits<T>::infinity() ? phi : T(0);
}

template <class T>
inline SurOut<T> sur_vespo(const TokenConsts<T>& k, const SurIn<T>& in) {
  const T phi = in.A >= T(0) ? k.vespo_phi_pos : k.vespo_phi_neg;
  return {-phi * in.A * in.x, -phi * in.A, T(0), T(0), T(0)};
}

// ratio: l = −A·r, ∂l/∂x = −A·∂r/∂x (the unclipped IS policy gradient; verl's kl_cov base).
template <class T>
inline SurOut<T> sur_ratio(const TokenConsts<T>&, const SurIn<T>& in) {
  return {-in.A * in.ratio, -in.A * in.d_ratio, T(0), T(0), T(0)};
}

// The surrogate of the compile-time code SURR.
template <int SURR, class T>
inline SurOut<T> surrogate(const TokenConsts<T>& k, const SurIn<T>& in) {
  if constexpr (SURR == kClip) return sur_clip(k, in);
  else if constexpr (SURR == kCispo) return sur_cispo(k, in);
  else if constexpr (SURR == kSapo) return sur_sapo(k, in);
  else if constexpr (SURR == kReinforce) return sur_reinforce(k, in);
  else if constexpr (SURR == kDppoTv) return sur_dppo<T, false>(k, in);
  else if constexpr (SURR == kDppoKl) return sur_dppo<T, true>(k, in);
  else if constexpr (SURR == kDro) return sur_dro(k, in);
  else if constexpr (SURR == kGeoMean) return sur_geo_mean(k, in);
  else if constexpr (SURR == kVespo) return sur_vespo(k, in);
  else return sur_ratio(k, in);
}

}  // namespace fastpo
