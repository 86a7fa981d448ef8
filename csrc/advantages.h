// advantages.h -- CPU kernel of fastpo.gae: the GAE reverse scan over the counted tokens.
//
// Sequence i holds tokens [cu[i], cu[i+1]) of the flat arrays r (rewards), v (values) and the
// optional mask m (nullptr = every token counts). Walking each sequence backwards over its
// counted tokens only:
//   delta_t = r_t + gamma * V_next - v_t,   A_t = delta_t + gamma * lam * A_next,   R_t = A_t + v_t,
// where V_next / A_next belong to the next *counted* token of the sequence (0 past the last one).
// Masked tokens write 0 to both outputs and leave the carried (V_next, A_next) untouched.
//
// The recurrence is serial within a sequence; large batches run sequences in parallel (OpenMP).
// Accumulation is in the storage type T (float or double), as the eager loops it replaces.
// Arguments are validated by the caller (fastpo_C.cpp); nothing here throws or allocates.
#pragma once

#include <cstdint>

namespace fastpo {

// Tokens below which the OpenMP team is not woken. The scan is memory bound (17 bytes per float32
// token: about 1.6 ms per million tokens on one core of the 2-core dev machine, 1.0 ms on two),
// while a team on a shared, oversubscribed machine stalls for milliseconds on a descheduled thread
// (median 6-20 ms at a million tokens there): only batches where a second core pays for that risk
// go parallel.
constexpr int64_t kGaeParallelMinTokens = int64_t(1) << 22;

// Sequence [begin, end), backwards. Per token: a = r_t + gamma * V_next - v_t + gamma_lam * A_next;
// a counted token takes (A_next, V_next) <- (a, v_t) and outputs (a, a + v_t); a masked one keeps
// the carry and outputs 0. Selects, not products with the mask: a masked token's (possibly inf/NaN)
// padding never reaches the carry or the outputs.
template <class T>
inline void gae_sequence(const T* r, const T* v, const uint8_t* m, int64_t begin, int64_t end, T gamma,
                         T gamma_lam, T* adv, T* ret) {
  T next_value = 0, next_adv = 0;
  for (int64_t t = end - 1; t >= begin; --t) {
    const bool counted = m == nullptr || m[t] != 0;
    const T vt = v[t];
    const T a = r[t] + gamma * next_value - vt + gamma_lam * next_adv;
    next_adv = counted ? a : next_adv;
    next_value = counted ? vt : next_value;
    adv[t] = counted ? a : T(0);
    ret[t] = counted ? a + vt : T(0);
  }
}

template <class T>
void gae_scan(const T* r, const T* v, const uint8_t* m, const int64_t* cu, int64_t num_seqs, double gamma,
              double lam, T* adv, T* ret) {
  const T g = static_cast<T>(gamma), gl = static_cast<T>(gamma * lam);
  const int64_t num_tokens = num_seqs > 0 ? cu[num_seqs] : 0;
  (void)num_tokens;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 4) if (num_tokens >= kGaeParallelMinTokens && num_seqs > 1)
#endif
  for (int64_t i = 0; i < num_seqs; ++i) gae_sequence<T>(r, v, m, cu[i], cu[i + 1], g, gl, adv, ret);
}

}  // namespace fastpo
