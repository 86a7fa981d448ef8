// selection.h -- Clip-Cov / KL-Cov token selection (Cui et al. 2025, arXiv 2505.22617, as verl 0.9's
// clip_cov / kl_cov) in one pass over the counted tokens, given the batch means.
//
//   cov_t = (A_t − mean A)·(logp_t − mean logp)        (float ops in the input dtype, as torch's)
//
// Clip-Cov candidates: counted t, not already clipped by PPO (−A·clip(r, 1−cl, 1+ch) > −A·r with
// r = exp(logp − old)), clip_cov_lb < cov_t < clip_cov_ub; returned as flat indices in ascending order
// (torch.nonzero's order). KL-Cov: the k counted tokens of largest cov_t (NaN counts as largest, as
// torch.topk), ties broken by the lower flat index, by a size-k heap (no sort of [N]); returned in
// descending order of (cov, −index).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

namespace fastpo {

// PPO's clip test −A·clip(r, lo, hi) > −A·r without exp where its outcome does not depend on r's last
// bits: for d = logp − old strictly inside (log lo, log hi) by a margin of 1e-5, r lies in (lo, hi) for
// any exp within a few ulps, so clip(r) = r and the test is false; beyond the margin (and for a normal
// |A|) the gap between r and the bound outlasts the rounding of the products, so the test is A < 0
// below lo and A > 0 above hi. Everything else (the margins, NaN, 0, huge or subnormal A, lo >= hi)
// evaluates the expression itself with std::exp.
template <typename scalar_t>
struct ClipTest {
  scalar_t lo, hi, in_lo, in_hi, out_lo, out_hi;
  bool band;
  ClipTest(scalar_t lo_, scalar_t hi_) : lo(lo_), hi(hi_) {
    band = lo > 0 && lo < hi && std::isfinite(static_cast<double>(hi));
    const double eps = 1e-5, llo = band ? std::log(static_cast<double>(lo)) : 0.0,
                 lhi = band ? std::log(static_cast<double>(hi)) : 0.0;
    in_lo = scalar_t(llo + eps), in_hi = scalar_t(lhi - eps), out_lo = scalar_t(llo - eps), out_hi = scalar_t(lhi + eps);
  }
  bool exact(scalar_t d, scalar_t a) const {
    const scalar_t r = std::exp(d);
    const scalar_t c = std::min(std::max(r, lo), hi);
    return (-a) * c > (-a) * r;
  }
  bool operator()(scalar_t d, scalar_t a) const {
    if (!band) return exact(d, a);
    if (d > in_lo && d < in_hi) return false;
    const scalar_t m = std::fabs(a);
    if (!(m >= scalar_t(1e-30) && m <= scalar_t(1e30))) return exact(d, a);
    if (d <= out_lo) return a < 0;
    if (d >= out_hi) return a > 0;
    return exact(d, a);
  }
};

template <typename scalar_t>
void clip_cov_candidates(const scalar_t* x, const scalar_t* old, const scalar_t* adv, const uint8_t* mask, int64_t N,
                         scalar_t mean_a, scalar_t mean_x, scalar_t lo, scalar_t hi, scalar_t lb, scalar_t ub,
                         std::vector<int64_t>& out) {
  const ClipTest<scalar_t> clipped(lo, hi);
  for (int64_t i = 0; i < N; ++i) {
    if (!mask[i]) continue;
    const scalar_t a = adv[i];
    const scalar_t cov = (a - mean_a) * (x[i] - mean_x);
    if (!(cov < ub && cov > lb)) continue;  // most tokens: no clip test needed
    if (!clipped(scalar_t(x[i] - old[i]), a)) out.push_back(i);
  }
}

// a ranks above b: larger cov (NaN largest), then the lower index.
template <typename scalar_t>
inline bool ranks_above(const std::pair<scalar_t, int64_t>& a, const std::pair<scalar_t, int64_t>& b) {
  const bool na = std::isnan(a.first), nb = std::isnan(b.first);
  if (na != nb) return na;
  if (!na && a.first != b.first) return a.first > b.first;
  return a.second < b.second;
}

template <typename scalar_t>
void cov_topk(const scalar_t* x, const scalar_t* adv, const uint8_t* mask, int64_t N, scalar_t mean_a,
              scalar_t mean_x, int64_t k, std::vector<std::pair<scalar_t, int64_t>>& heap) {
  heap.clear();
  if (k <= 0) return;
  heap.reserve(static_cast<size_t>(k));
  auto cmp = ranks_above<scalar_t>;  // heap front = the lowest-ranked of those kept
  for (int64_t i = 0; i < N; ++i) {
    if (!mask[i]) continue;
    const std::pair<scalar_t, int64_t> e{(adv[i] - mean_a) * (x[i] - mean_x), i};
    if (static_cast<int64_t>(heap.size()) < k) {
      heap.push_back(e);
      std::push_heap(heap.begin(), heap.end(), cmp);
    } else if (cmp(e, heap.front())) {
      std::pop_heap(heap.begin(), heap.end(), cmp);
      heap.back() = e;
      std::push_heap(heap.begin(), heap.end(), cmp);
    }
  }
  std::sort_heap(heap.begin(), heap.end(), cmp);  // ascending under cmp = best first
}

// The batch statistics the selection starts from: Σ A, Σ logp (in double) and the count over the counted
// tokens, in one pass (selects, so NaN / inf padding never reaches the sums).
template <typename scalar_t>
void masked_sums(const scalar_t* __restrict x, const scalar_t* __restrict adv, const uint8_t* __restrict mask,
                 int64_t N, double* sum_a, double* sum_x, int64_t* count) {
  double sa = 0, sx = 0;
  int64_t n = 0;
#ifdef _OPENMP
#pragma omp simd reduction(+ : sa, sx, n)
#endif
  for (int64_t i = 0; i < N; ++i) {
    const bool c = mask[i] != 0;
    sa += c ? static_cast<double>(adv[i]) : 0.0;
    sx += c ? static_cast<double>(x[i]) : 0.0;
    n += c;
  }
  *sum_a = sa, *sum_x = sx, *count = n;
}

}  // namespace fastpo
