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

template <typename scalar_t>
void clip_cov_candidates(const scalar_t* x, const scalar_t* old, const scalar_t* adv, const uint8_t* mask, int64_t N,
                         scalar_t mean_a, scalar_t mean_x, scalar_t lo, scalar_t hi, scalar_t lb, scalar_t ub,
                         std::vector<int64_t>& out) {
  for (int64_t i = 0; i < N; ++i) {
    if (!mask[i]) continue;
    const scalar_t a = adv[i];
    const scalar_t r = std::exp(scalar_t(x[i] - old[i]));
    const scalar_t c = std::min(std::max(r, lo), hi);
    if ((-a) * c > (-a) * r) continue;  // clipped by PPO already
    const scalar_t cov = (a - mean_a) * (x[i] - mean_x);
    if (cov < ub && cov > lb) out.push_back(i);
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

}  // namespace fastpo
