// logprobs.h -- CPU row kernels of fastpo.token_logprobs (forward and backward).
//
// Per row i of the logits z [N, V], with s = z / tau and label y:
//   lse = logsumexp(s),  logp = s_y - lse,  entropy H = lse - sum_j softmax(s)_j s_j.
// The forward also saves, per row, the raw maximum m = max_j z_j and log_norm = log sum_j
// e^{(z_j - m) / tau} (so lse = m / tau + log_norm), from which the backward forms
// log p_j = (z_j - m) / tau - log_norm: exact near the maximum, where s_j - lse would subtract two
// large, independently rounded numbers. Rows whose label is ignore_index give
// logp = H = m = log_norm = 0 and a zero gradient row.
//
// Layout: row i starts at logits + i * row_stride (in elements, int64), the row itself is
// contiguous. Storage types In: float, double, bf16, f16 (numerics.h); the accumulation type is
// float, except double for double input (Traits<In>::Acc). The forward works block by block on
// Acc values (16-bit rows widened into a per-thread stack buffer of kBlock elements), with kLanes
// independent partial accumulators so that gcc vectorises the reductions without -ffast-math (a
// single scalar accumulator would force it to keep the order of the additions); the backward is
// one elementwise pass. Arguments are validated by the caller (fastpo_C.cpp); nothing here
// throws or allocates on the heap.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "numerics.h"

namespace fastpo {

// ---------------------------------------------------------------------------------------------
// Storage <-> accumulation type
// ---------------------------------------------------------------------------------------------
template <class In>
struct Traits {
  using Acc = float;
};
template <>
struct Traits<double> {
  using Acc = double;
};

inline float widen(float v) { return v; }
inline double widen(double v) { return v; }
inline float widen(bf16 v) { return bf16_to_float(v.bits); }
inline float widen(f16 v) { return f16_to_float(v.bits); }

inline void narrow(float v, float* p) { *p = v; }
inline void narrow(double v, double* p) { *p = v; }
inline void narrow(float v, bf16* p) { p->bits = float_to_bf16(v); }  // round to nearest even
inline void narrow(float v, f16* p) { p->bits = float_to_f16(v); }    // round to nearest even

template <class Out>
inline void zero_row(Out* dst, int64_t n) {
  std::memset(static_cast<void*>(dst), 0, static_cast<size_t>(n) * sizeof(Out));  // +0.0 in every format
}

// ---------------------------------------------------------------------------------------------
// Tuning constants
// ---------------------------------------------------------------------------------------------
template <class Acc>
struct Tune {
  // Block of the row processed at a time: its max pass leaves it in L1 for the exp pass.
  static constexpr int64_t kBlock = 2048;
  // Independent partial accumulators: one 512-bit vector of Acc.
  static constexpr int kLanes = 64 / static_cast<int>(sizeof(Acc));
};

// Work (logits) below which the OpenMP team is not woken.
constexpr int64_t kParallelMinWork = 1 << 16;

// ---------------------------------------------------------------------------------------------
// Block maximum
// ---------------------------------------------------------------------------------------------
// gcc does not vectorise a floating-point max reduction (a > m ? a : m) unless it may assume no
// NaNs and no signed zeros. Instead the maximum is taken over integer keys that order like the
// floats: key(f) = bits(f) for f >= +0 and bits(f) ^ 0x7fff...f for f < 0 (sign bit set), which is
// monotonic over -inf < ... < -0 < +0 < ... < +inf; an integer max reduction vectorises.
// A NaN with the sign bit clear orders above +inf (so the block max becomes NaN and poisons the
// row's sums); one with the sign bit set orders below -inf (ignored here, but its own exp poisons
// the sums, or the all -inf/NaN scan of forward_row catches it).
template <class Acc>
struct OrderedKey;
template <>
struct OrderedKey<float> {
  using I = int32_t;
  static I key(float f) {
    I i;
    std::memcpy(&i, &f, sizeof i);
    return i ^ ((i >> 31) & INT32_MAX);
  }
  static float value(I k) {
    const I i = k ^ ((k >> 31) & INT32_MAX);
    float f;
    std::memcpy(&f, &i, sizeof f);
    return f;
  }
};
template <>
struct OrderedKey<double> {
  using I = int64_t;
  static I key(double f) {
    I i;
    std::memcpy(&i, &f, sizeof i);
    return i ^ ((i >> 63) & INT64_MAX);
  }
  static double value(I k) {
    const I i = k ^ ((k >> 63) & INT64_MAX);
    double f;
    std::memcpy(&f, &i, sizeof f);
    return f;
  }
};

template <class Acc>
inline Acc block_max(const Acc* x, int64_t n) {
  using K = OrderedKey<Acc>;
  using I = typename K::I;
  constexpr int W = Tune<Acc>::kLanes;
  const I lowest = K::key(-std::numeric_limits<Acc>::infinity());
  I mx[W];
  for (int l = 0; l < W; ++l) mx[l] = lowest;
  int64_t j = 0;
  for (; j + W <= n; j += W)
    for (int l = 0; l < W; ++l) {
      const I k = K::key(x[j + l]);
      mx[l] = k > mx[l] ? k : mx[l];
    }
  for (; j < n; ++j) {
    const I k = K::key(x[j]);
    mx[0] = k > mx[0] ? k : mx[0];
  }
  I m = mx[0];
  for (int l = 1; l < W; ++l) m = mx[l] > m ? mx[l] : m;
  return K::value(m);
}

// ---------------------------------------------------------------------------------------------
// Logit transforms (TRL's order): z = k x, then z <- c tanh(z / c) with a softcap c > 0 (Gemma);
// the temperature then divides z. dz/dx = k (1 - tanh^2) = k (1 - (z / c)^2) (k without a softcap).
// ---------------------------------------------------------------------------------------------
template <class Acc>
struct LogitTransform {
  Acc scale = Acc(1), cap = Acc(0), inv_cap = Acc(0);  // cap 0: no softcap
  bool has_cap = false;
  LogitTransform() = default;
  LogitTransform(double k, double c)
      : scale(static_cast<Acc>(k)), cap(static_cast<Acc>(c)), inv_cap(c > 0 ? static_cast<Acc>(1.0 / c) : Acc(0)),
        has_cap(c > 0) {}
  bool active() const { return has_cap || scale != Acc(1); }
  // Which transform the hot loops instantiate (kTransformNone / kTransformScale / kTransformCap), so
  // that none of them holds a run-time choice: gcc leaves a loop with a select between the capped and
  // the plain value scalar (control flow, as it will not speculate the division), which made the
  // softcap forward ~13x and its backward ~45x slower than without.
  int kind() const;
  // z = c tanh(k x / c) (tanh_fast: vectorisable, within 1.3 ulp of tanh), or k x.
  Acc capped(Acc x) const { return cap * tanh_fast(x * scale * inv_cap); }
  Acc scaled(Acc x) const { return x * scale; }
  Acc operator()(Acc x) const { return has_cap ? capped(x) : scaled(x); }  // outside the hot loops
  Acc capped_derivative(Acc z) const {  // dz/dx from the transformed z
    const Acc t = z * inv_cap;
    return scale * (Acc(1) - t * t);
  }
  Acc derivative(Acc z) const { return has_cap ? capped_derivative(z) : scale; }
};

enum : int { kTransformNone = 0, kTransformScale = 1, kTransformCap = 2 };

template <class Acc>
inline int LogitTransform<Acc>::kind() const {
  return has_cap ? kTransformCap : (scale != Acc(1) ? kTransformScale : kTransformNone);
}

// The transform of one logit, chosen at compile time.
template <int kKind, class Acc>
inline Acc apply_transform(const LogitTransform<Acc>& tr, Acc x) {
  if constexpr (kKind == kTransformCap) return tr.capped(x);
  else if constexpr (kKind == kTransformScale) return tr.scaled(x);
  else return x;
}

template <int kKind, class Acc>
inline Acc transform_derivative(const LogitTransform<Acc>& tr, Acc z) {
  if constexpr (kKind == kTransformCap) return tr.capped_derivative(z);
  else if constexpr (kKind == kTransformScale) return tr.scale;
  else return Acc(1);
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------
// Row statistics computed by one forward instantiation: a bitmask template argument (the
// entropy and the optional, non-differentiated statistics; each adds one accumulator).
enum : int { kStatEntropy = 1, kStatSumSq = 2, kStatTop1 = 4, kStatMean = 8, kStatAll = 16 };

// Blocked two-level logsumexp. For each block of the row (raw values x, widened to Acc):
//   m_b = max_j x_j,  S_b = sum_j e^{d_j},  T_b = sum_j e^{d_j} d_j,  d_j = (x_j - m_b) / tau <= 0.
// The block is read twice (max, then sums); the second read hits L1. The blocks are merged into
// a running (M, S, T) in double: when the reference maximum moves from m to M' >= m, with
// delta = (m - M') / tau <= 0 and c = e^delta,
//   S' = c S,   T' = c (T + delta S)        (since e^{d + delta} (d + delta) = c e^d d + c delta e^d).
// At the end m = M, log_norm = log S (lse = M / tau + log S) and H = lse - sum p s = log S - T / S.
// The optional statistics: Q_b = sum_j e^{2 d_j} merges as Q' = c^2 Q (log sum_j p_j^2 = log Q - 2 log S);
// Z_b = sum_j x_j merges by addition (mean_logits = Z / (tau V)); for is_top1 the maximum of the
// raw values before the label, mbefore, is kept (a max over the block's prefix, which is in L1):
// is_top1 = x_y >= M && x_y > mbefore, i.e. the label is the first argmax (torch.argmax, TRL).
// Keeping d relative to the maximum avoids the cancellation of lse - E[s] when the logits are large
// (e.g. 1e4), and logp = (x_y - M) / tau - log S is formed without subtracting two large numbers.
// Entries equal to -inf give e^d = 0 and contribute 0 to T (the 0 * -inf product is avoided); a
// block that is entirely -inf is skipped. NaN anywhere in the row makes log_norm, logp and H NaN. A
// row that is entirely -inf gives log_norm = -inf and logp = NaN, as log_softmax does.
// `next` / `next_step`: the start of the row's next block in memory and the bytes of it per
// kLanes elements here; it is prefetched while this (L1-resident) block is being computed on, so
// the next max pass does not stall on DRAM (nullptr: nothing to prefetch).
struct BlockSums {
  double S = 0.0, T = 0.0, Q = 0.0, Z = 0.0;
};

template <int kStats, class Acc>
inline BlockSums block_sums(const Acc* x, int64_t n, Acc mb, Acc inv_t, const char* next, int64_t next_step) {
  constexpr bool kEntropy = kStats & kStatEntropy, kSumSq = kStats & kStatSumSq, kMean = kStats & kStatMean;
  constexpr int W = Tune<Acc>::kLanes;
  // e^d d -> 0 as d -> -inf, but 0 * -inf is NaN: d = -inf is replaced by 0 in the product. (A
  // select of the product itself, e == 0 ? 0 : e * d, would keep the loop scalar: gcc does not
  // speculate a possibly-trapping multiply under -ftrapping-math.)
  const Acc lowest = std::numeric_limits<Acc>::lowest();
  Acc se[W], te[W], qe[W], ze[W];
  for (int l = 0; l < W; ++l) se[l] = te[l] = qe[l] = ze[l] = Acc(0);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
#if defined(__GNUC__)
    if (next) __builtin_prefetch(next + (j / W) * next_step, 0, 3);
#endif
    for (int l = 0; l < W; ++l) {
      const Acc d = (x[j + l] - mb) * inv_t;
      const Acc e = exp_fast(d);
      se[l] += e;
      if (kEntropy) te[l] += e * (d > lowest ? d : Acc(0));
      if (kSumSq) qe[l] += e * e;
      if (kMean) ze[l] += x[j + l];
    }
  }
  for (; j < n; ++j) {
    const Acc d = (x[j] - mb) * inv_t;
    const Acc e = exp_fast(d);
    se[0] += e;
    if (kEntropy) te[0] += e * (d > lowest ? d : Acc(0));
    if (kSumSq) qe[0] += e * e;
    if (kMean) ze[0] += x[j];
  }
  BlockSums r;
  for (int l = 0; l < W; ++l) {
    r.S += static_cast<double>(se[l]);
    r.T += static_cast<double>(te[l]);
    r.Q += static_cast<double>(qe[l]);
    r.Z += static_cast<double>(ze[l]);
  }
  return r;
}

struct RowForward {
  double row_max;
  double log_norm;
  double logp;
  double entropy;
  double log_sum_sq;
  double is_top1;
  double mean;
};

// The block as Acc values: float / double rows are used in place; 16-bit rows are widened into the
// thread's block buffer first (one vectorised conversion loop, so that the loops above see plain
// floats -- widening inside them keeps gcc from vectorising).
inline const float* block_as_acc(const float* x, int64_t, float*) { return x; }
inline const double* block_as_acc(const double* x, int64_t, double*) { return x; }
template <class In>
inline const float* block_as_acc(const In* x, int64_t n, float* buf) {
  for (int64_t j = 0; j < n; ++j) buf[j] = widen(x[j]);
  return buf;
}
// The block's transformed values z (in the buffer), or block_as_acc when there is no transform.
// The transform is copied to a local first: inside an OpenMP region the caller's object is shared
// memory that the stores to buf might alias, which also kept the loop scalar.
template <int kKind, class In, class Acc>
inline void transform_block(const In* x, int64_t n, Acc* buf, LogitTransform<Acc> tr) {
  for (int64_t j = 0; j < n; ++j) buf[j] = apply_transform<kKind>(tr, widen(x[j]));
}
template <class In, class Acc>
inline const Acc* block_values(const In* x, int64_t n, Acc* buf, const LogitTransform<Acc>& tr) {
  if (tr.has_cap)
    transform_block<kTransformCap>(x, n, buf, tr);
  else if (tr.scale != Acc(1))
    transform_block<kTransformScale>(x, n, buf, tr);
  else
    return block_as_acc(x, n, buf);
  return buf;
}

// A truncated row (top-k / top-p, see fastpo/ops/truncation.py): the raw logits below the row's
// threshold thr count as -inf (the transforms allowed with a threshold are increasing, so the kept set
// is the same in x and in z). The block's values z, masked, in the buffer.
template <class In, class Acc>
inline const Acc* masked_block_values(const In* x, int64_t n, Acc* buf, const LogitTransform<Acc>& tr, Acc thr) {
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    const Acc w = widen(x[j]);
    buf[j] = w >= thr ? tr(w) : neg_inf;
  }
  return buf;
}

template <class In, int kStats, class Acc = typename Traits<In>::Acc>
inline RowForward forward_row(const In* x, int64_t V, int64_t label, Acc inv_t, Acc* buf,
                              const LogitTransform<Acc>& tr,
                              Acc thr = -std::numeric_limits<Acc>::infinity()) {
  constexpr int64_t B = Tune<Acc>::kBlock;
  constexpr bool kEntropy = kStats & kStatEntropy, kTop1 = kStats & kStatTop1;
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();

  bool any = false, nan_seen = false;
  Acc M = neg_inf, before = neg_inf;
  double S = 0.0, T = 0.0, Q = 0.0, Z = 0.0;
  for (int64_t b0 = 0; b0 < V; b0 += B) {
    const int64_t n = std::min(B, V - b0);
    const Acc* xb = thr > neg_inf ? masked_block_values(x + b0, n, buf, tr, thr) : block_values(x + b0, n, buf, tr);
    if (kTop1 && b0 < label) before = std::max(before, block_max(xb, std::min(n, label - b0)));
    const Acc mb = block_max(xb, n);
    if (mb == neg_inf) {  // every entry is -inf or NaN: -inf contributes nothing, NaN poisons the row
      for (int64_t j = 0; j < n; ++j) nan_seen = nan_seen || xb[j] != xb[j];
      if (kStats & kStatMean) Z += -std::numeric_limits<double>::infinity();
      continue;
    }
    const char* next = b0 + B < V ? reinterpret_cast<const char*>(x + b0 + B) : nullptr;
    const BlockSums b = block_sums<kStats>(xb, n, mb, inv_t, next, static_cast<int64_t>(Tune<Acc>::kLanes * sizeof(In)));
    Z += b.Z;

    if (!any) {
      M = mb;
      S = b.S;
      T = b.T;
      Q = b.Q;
      any = true;
    } else if (mb > M) {
      const double delta = (static_cast<double>(M) - static_cast<double>(mb)) * static_cast<double>(inv_t);
      const double c = std::exp(delta);
      T = c * (T + delta * S) + b.T;
      S = c * S + b.S;
      Q = c * c * Q + b.Q;
      M = mb;
    } else {
      const double delta = (static_cast<double>(mb) - static_cast<double>(M)) * static_cast<double>(inv_t);
      const double c = std::exp(delta);
      T += c * (b.T + delta * b.S);
      S += c * b.S;
      Q += c * c * b.Q;
    }
  }

  if (nan_seen) S = T = Q = Z = std::numeric_limits<double>::quiet_NaN();
  RowForward r;
  const double logS = std::log(S);  // S >= 1 whenever the row has a finite maximum
  r.row_max = static_cast<double>(M);
  r.log_norm = logS;
  // (x_y - M) in Acc, as the kernel's d values are, then scaled.
  const Acc zy = widen(x[label]) >= thr ? tr(widen(x[label])) : neg_inf;  // a truncated label: logp = -inf
  r.logp = static_cast<double>((zy - M) * inv_t) - logS;
  if (kEntropy) {
    const double H = logS - T / S;
    r.entropy = H > 0.0 ? H : (H == H ? 0.0 : H);  // H >= 0 mathematically; clip rounding noise
  } else {
    r.entropy = 0.0;
  }
  r.log_sum_sq = (kStats & kStatSumSq) ? std::log(Q) - 2.0 * logS : 0.0;
  r.is_top1 = kTop1 && zy >= M && zy > before ? 1.0 : 0.0;
  r.mean = (kStats & kStatMean) ? Z * static_cast<double>(inv_t) / static_cast<double>(V) : 0.0;
  return r;
}

// One [N] vector of per-row scalars, float32 or float64, any element stride (validated by caller).
struct RowVec {
  void* ptr = nullptr;
  bool is_double = false;
  int64_t stride = 1;  // in elements

  bool present() const { return ptr != nullptr; }
  double get(int64_t i) const {
    if (!ptr) return 0.0;
    return is_double ? static_cast<const double*>(ptr)[i * stride]
                     : static_cast<double>(static_cast<const float*>(ptr)[i * stride]);
  }
  void set(int64_t i, double v) const {
    if (!ptr) return;
    if (is_double)
      static_cast<double*>(ptr)[i * stride] = v;
    else
      static_cast<float*>(ptr)[i * stride] = static_cast<float>(v);
  }
};

// The forward's per-row outputs; an absent (nullptr) vector is neither computed nor written.
struct ForwardOut {
  RowVec logp, row_max, log_norm, entropy, log_sum_sq, is_top1, mean;
  int stats() const {
    return (entropy.present() ? kStatEntropy : 0) | (log_sum_sq.present() ? kStatSumSq : 0) |
           (is_top1.present() ? kStatTop1 : 0) | (mean.present() ? kStatMean : 0);
  }
  void set(int64_t i, const RowForward& r) const {
    logp.set(i, r.logp);
    row_max.set(i, r.row_max);
    log_norm.set(i, r.log_norm);
    entropy.set(i, r.entropy);
    log_sum_sq.set(i, r.log_sum_sq);
    is_top1.set(i, r.is_top1);
    mean.set(i, r.mean);
  }
};

template <class In, int kStats>
void forward_rows_impl(const In* logits, int64_t N, int64_t V, int64_t row_stride, const int64_t* labels,
                       const ForwardOut& out, double inv_temperature, int64_t ignore_index, double logit_scale,
                       double logit_softcap, RowVec inv_t_rows, RowVec thr_rows) {
  using Acc = typename Traits<In>::Acc;
  const Acc inv_t = static_cast<Acc>(inv_temperature);
  const bool per_row = inv_t_rows.present(), truncated = thr_rows.present();
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  const LogitTransform<Acc> tr(logit_scale, logit_softcap);
#ifdef _OPENMP
#pragma omp parallel if (N * V >= kParallelMinWork && N > 1)
#endif
  {
    alignas(64) Acc buf[Tune<Acc>::kBlock];  // per-thread block buffer (used for 16-bit inputs)
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t i = 0; i < N; ++i) {
      const int64_t y = labels[i];
      if (y == ignore_index) {
        out.set(i, RowForward{0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0});
        continue;
      }
      const Acc inv_ti = per_row ? static_cast<Acc>(inv_t_rows.get(i)) : inv_t;
      const Acc thr = truncated ? static_cast<Acc>(thr_rows.get(i)) : neg_inf;
      out.set(i, forward_row<In, kStats>(logits + i * row_stride, V, y, inv_ti, buf, tr, thr));
    }
  }
}

// Runtime statistics mask -> the instantiation for it (kStatAll of them).
template <class In, int kStats = 0>
void forward_rows_dispatch(int stats, const In* logits, int64_t N, int64_t V, int64_t row_stride,
                           const int64_t* labels, const ForwardOut& out, double inv_temperature, int64_t ignore_index,
                           double logit_scale, double logit_softcap, RowVec inv_t_rows, RowVec thr_rows) {
  if constexpr (kStats < kStatAll) {
    if (stats == kStats)
      forward_rows_impl<In, kStats>(logits, N, V, row_stride, labels, out, inv_temperature, ignore_index, logit_scale,
                                    logit_softcap, inv_t_rows, thr_rows);
    else
      forward_rows_dispatch<In, kStats + 1>(stats, logits, N, V, row_stride, labels, out, inv_temperature,
                                            ignore_index, logit_scale, logit_softcap, inv_t_rows, thr_rows);
  }
}

template <class In>
void forward_rows(const In* logits, int64_t N, int64_t V, int64_t row_stride, const int64_t* labels,
                  const ForwardOut& out, double inv_temperature, int64_t ignore_index, double logit_scale = 1.0,
                  double logit_softcap = 0.0, RowVec inv_t_rows = RowVec(), RowVec thr_rows = RowVec()) {
  // inv_t_rows (optional): a per-row 1 / temperature that replaces inv_temperature row by row.
  // thr_rows (optional): a per-row threshold on the raw logits; entries below it count as -inf.
  forward_rows_dispatch<In>(out.stats(), logits, N, V, row_stride, labels, out, inv_temperature, ignore_index,
                            logit_scale, logit_softcap, inv_t_rows, thr_rows);
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------
// Gradient of L(logp, H) with respect to the logits, for one row. Write s_j = z_j / tau,
// p_j = softmax(s)_j = e^{s_j - lse}, so log p_j = s_j - lse, and
//   logp = s_y - lse                       =>  d logp / d s_j = 1[j == y] - p_j;
//   H = -sum_k p_k log p_k                 (equal to lse - sum_k p_k s_k, as sum_k p_k = 1)
//       with d p_k / d s_j = p_k (1[k == j] - p_j):
//   d H / d s_j = -sum_k (d p_k / d s_j) (log p_k + 1)
//               = -p_j (log p_j + 1) + p_j sum_k p_k (log p_k + 1)
//               = -p_j (log p_j + 1) + p_j (1 - H)
//               = -p_j (log p_j + H).
// With g_l = dL/dlogp, g_H = dL/dH and ds_j/dz_j = 1/tau:
//   dL/dz_j = (1/tau) [ g_l (1[j == y] - p_j) - g_H p_j (log p_j + H) ],
// with log p_j = d_j = (z_j - m) / tau - log_norm from the forward's row maximum m and log_norm:
// z_j - m is exact (or one rounding of a small number) near the maximum, so p_j keeps float32
// accuracy at any |z| and tau, where e^{z_j / tau - lse} from a float32 lse would carry the
// rounding of lse (ulp(|lse|) / 2 in the exponent).
// The kernel writes the off-label expression -(1/tau) p_j (g_l + g_H (d_j + H)) for every j in one
// vectorised pass, then overwrites j = y with the full expression, computed from z_y read before
// the pass. Entries with p_j = 0 (in particular z_j = -inf, where d_j = -inf would make p_j d_j
// NaN) get exactly 0.
// In-place (grad_logits == logits) runs a loop over one pointer (read z_j, write its gradient), so
// the vectoriser never sees two pointers that might alias; otherwise a two-pointer loop.
// With a logit transform (kTransform), z = f(x) is recomputed from x and the gradient is multiplied
// by f'(x) (LogitTransform::derivative).
// A truncated row (kMask): entries whose raw logit is below the threshold thr had p = 0 and get 0.
template <class Acc, bool kEntropyGrad, int kTransform, bool kMask = false>
struct GradOffLabel {
  Acc inv_t, neg_inv_t, m, log_norm, H, gl, gH;
  LogitTransform<Acc> tr;
  Acc thr = -std::numeric_limits<Acc>::infinity();
  Acc operator()(Acc x) const {
    if (kMask && !(x >= thr)) return Acc(0);
    const Acc z = apply_transform<kTransform>(tr, x);
    const Acc d = (z - m) * inv_t - log_norm;
    const Acc p = exp_fast(d);
    Acc coef = gl;
    if (kEntropyGrad) coef += gH * ((d > std::numeric_limits<Acc>::lowest() ? d : Acc(0)) + H);
    const Acc g = neg_inv_t * p * coef;
    return kTransform != kTransformNone ? g * transform_derivative<kTransform>(tr, z) : g;
  }
};

// A truncated label (kMask, raw logit below thr) has logp = -inf, a constant: its g_l is dropped (the
// row's gradient is the entropy's only), and the label entry is an off-label one with p = 0.
template <class In, bool kEntropyGrad, int kTransform, bool kMask = false, class Acc = typename Traits<In>::Acc>
inline void backward_row(const In* x, In* gx, int64_t V, int64_t label, Acc m, Acc log_norm, Acc H, Acc gl, Acc gH,
                         Acc inv_t, const LogitTransform<Acc>& tr,
                         Acc thr = -std::numeric_limits<Acc>::infinity()) {
  const Acc xy = widen(x[label]);  // before the row is (possibly) overwritten
  const bool label_dropped = kMask && !(xy >= thr);
  if (label_dropped) gl = Acc(0);
  const Acc zy = apply_transform<kTransform>(tr, xy);
  const GradOffLabel<Acc, kEntropyGrad, kTransform, kMask> f{inv_t, -inv_t, m, log_norm, H, gl, gH, tr, thr};
  if (static_cast<const void*>(x) == static_cast<const void*>(gx)) {
    In* p = gx;
    for (int64_t j = 0; j < V; ++j) narrow(f(widen(p[j])), &p[j]);
  } else {
    for (int64_t j = 0; j < V; ++j) narrow(f(widen(x[j])), &gx[j]);
  }
  if (label_dropped) {
    narrow(Acc(0), &gx[label]);
    return;
  }
  // The label entry.
  const Acc d = (zy - m) * inv_t - log_norm;
  const Acc p = exp_fast(d);
  Acc g = gl * (Acc(1) - p);
  if (kEntropyGrad && p != Acc(0)) g -= gH * p * (d + H);
  g *= inv_t;
  if (kTransform != kTransformNone) g *= transform_derivative<kTransform>(tr, zy);
  narrow(g, &gx[label]);
}

template <class In, bool kEntropyGrad, int kTransform, bool kMask>
void backward_rows_impl(const In* logits, In* grad_logits, int64_t N, int64_t V, int64_t row_stride,
                        int64_t grad_row_stride, const int64_t* labels, RowVec row_max, RowVec log_norm,
                        RowVec entropy, RowVec grad_logp, RowVec grad_entropy, double inv_temperature,
                        int64_t ignore_index, double logit_scale, double logit_softcap, RowVec inv_t_rows,
                        RowVec thr_rows) {
  using Acc = typename Traits<In>::Acc;
  const Acc inv_t = static_cast<Acc>(inv_temperature);
  const bool per_row = inv_t_rows.present();
  const LogitTransform<Acc> tr(logit_scale, logit_softcap);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (N * V >= kParallelMinWork && N > 1)
#endif
  for (int64_t i = 0; i < N; ++i) {
    In* gx = grad_logits + i * grad_row_stride;
    const int64_t y = labels[i];
    if (y == ignore_index) {
      zero_row(gx, V);
      continue;
    }
    const Acc H = kEntropyGrad ? static_cast<Acc>(entropy.get(i)) : Acc(0);
    const Acc gH = kEntropyGrad ? static_cast<Acc>(grad_entropy.get(i)) : Acc(0);
    backward_row<In, kEntropyGrad, kTransform, kMask>(
        logits + i * row_stride, gx, V, y, static_cast<Acc>(row_max.get(i)), static_cast<Acc>(log_norm.get(i)), H,
        static_cast<Acc>(grad_logp.get(i)), gH, per_row ? static_cast<Acc>(inv_t_rows.get(i)) : inv_t, tr,
        kMask ? static_cast<Acc>(thr_rows.get(i)) : -std::numeric_limits<Acc>::infinity());
  }
}

template <class In>
void backward_rows(const In* logits, In* grad_logits, int64_t N, int64_t V, int64_t row_stride,
                   int64_t grad_row_stride, const int64_t* labels, RowVec row_max, RowVec log_norm, RowVec entropy,
                   RowVec grad_logp, RowVec grad_entropy, double inv_temperature, int64_t ignore_index,
                   double logit_scale = 1.0, double logit_softcap = 0.0, RowVec inv_t_rows = RowVec(),
                   RowVec thr_rows = RowVec()) {
  const int kind = LogitTransform<typename Traits<In>::Acc>(logit_scale, logit_softcap).kind();
#define FASTPO_BACKWARD_ROWS(E, T)                                                                              \
  (thr_rows.present() ? backward_rows_impl<In, E, T, true>(logits, grad_logits, N, V, row_stride, grad_row_stride,  \
                                                           labels, row_max, log_norm, entropy, grad_logp,            \
                                                           grad_entropy, inv_temperature, ignore_index, logit_scale, \
                                                           logit_softcap, inv_t_rows, thr_rows)                      \
                      : backward_rows_impl<In, E, T, false>(logits, grad_logits, N, V, row_stride, grad_row_stride, labels, row_max, log_norm, \
                               entropy, grad_logp, grad_entropy, inv_temperature, ignore_index, logit_scale,     \
                               logit_softcap, inv_t_rows, thr_rows))
#define FASTPO_BACKWARD_KIND(E)                           \
  (kind == kTransformCap     ? FASTPO_BACKWARD_ROWS(E, kTransformCap)   \
   : kind == kTransformScale ? FASTPO_BACKWARD_ROWS(E, kTransformScale) \
                             : FASTPO_BACKWARD_ROWS(E, kTransformNone))
  if (grad_entropy.present())
    FASTPO_BACKWARD_KIND(true);
  else
    FASTPO_BACKWARD_KIND(false);
#undef FASTPO_BACKWARD_KIND
#undef FASTPO_BACKWARD_ROWS
}

}  // namespace fastpo
