// bind_rl.cpp -- fastpo._C bindings of the RL kernels: GAE (advantages.h) and the fused per-token
// policy / value loss (policy_loss.h). The compute runs with the GIL released.
#include "bind_util.h"
#include "advantages.h"
#include "policy_loss.h"

namespace fastpo_bind {

namespace {

void gae(const py::object& rewards_obj, const py::object& values_obj, const py::object& mask_obj,
         const py::object& cu_obj, const py::object& adv_obj, const py::object& ret_obj, double gamma, double lam) {
  if (!std::isfinite(gamma) || !std::isfinite(lam))
    throw py::value_error("gamma, lam: must be finite, got gamma=" + std::to_string(gamma) +
                          " lam=" + std::to_string(lam));
  const py::buffer_info rb = request(rewards_obj, "rewards", false);
  if (rb.ndim != 1) throw py::value_error("rewards: expected a 1-D array [N], got shape " + shape_str(rb));
  const int64_t N = rb.shape[0];
  check_vector(rb, "rewards", N, true, "rewards");
  const bool dbl = is_f64(rb);
  const py::buffer_info vb = request(values_obj, "values", false);
  const py::buffer_info ab = request(adv_obj, "advantages", true);
  const py::buffer_info tb = request(ret_obj, "returns", true);
  const std::pair<const py::buffer_info*, const char*> same_dtype[] = {{&vb, "values"}, {&ab, "advantages"},
                                                                         {&tb, "returns"}};
  for (const auto& [b, name] : same_dtype) {
    check_vector(*b, name, N, true, "rewards");
    if (is_f64(*b) != dbl)
      throw py::value_error(std::string(name) + ": must have the dtype of rewards (" + (dbl ? "float64" : "float32") +
                            "), got format '" + b->format + "'");
  }
  const uint8_t* m = nullptr;
  py::buffer_info mb;
  if (!mask_obj.is_none()) {
    mb = request(mask_obj, "mask", false);
    m = static_cast<const uint8_t*>(check_vector(mb, "mask", N, false, "rewards"));
  }
  const py::buffer_info cb = request(cu_obj, "cu_seqlens", false);
  const int64_t* cu = check_cu_seqlens(cb, N);
  const int64_t B = cb.shape[0] - 1;
  check_disjoint({{&ab, "advantages"}, {&tb, "returns"}}, {{&rb, "rewards"}, {&vb, "values"}, {m ? &mb : nullptr, "mask"}});

  py::gil_scoped_release nogil;
  if (dbl)
    fastpo::gae_scan<double>(static_cast<const double*>(rb.ptr), static_cast<const double*>(vb.ptr), m, cu, B, gamma,
                             lam, static_cast<double*>(ab.ptr), static_cast<double*>(tb.ptr));
  else
    fastpo::gae_scan<float>(static_cast<const float*>(rb.ptr), static_cast<const float*>(vb.ptr), m, cu, B, gamma,
                            lam, static_cast<float*>(ab.ptr), static_cast<float*>(tb.ptr));
}

// ---------------------------------------------------------------------------------------------
// Policy / value loss

// The loss spec from a dict with fastpo.ops.loss_spec.TokenLossSpec's fields (plus the derived
// rollout_seq, rollout_mask and the aggregation by name); a missing key raises ValueError.
fastpo::TokenLossSpec parse_loss_spec(const py::dict& d) {
  size_t read = 0;  // every key must be read: a key this build does not know is an error, not a default
  auto get = [&d, &read](const char* key) -> py::object {
    if (!d.contains(key)) throw py::value_error(std::string("spec: missing key '") + key + "'");
    ++read;
    return d[key];
  };
  fastpo::TokenLossSpec s;
  s.value = get("value").cast<bool>();
  s.seq_ratio = get("seq_ratio").cast<bool>();
  s.clip_low = get("clip_low").cast<double>();
  s.clip_high = get("clip_high").cast<double>();
  s.dual_clip = get("dual_clip").cast<double>();
  s.kl = get("kl").cast<int>();
  s.kl_coef = get("kl_coef").cast<double>();
  s.kl_clamp = get("kl_clamp").cast<double>();
  s.entropy_coef = get("entropy_coef").cast<double>();
  s.has_entropy = get("has_entropy").cast<bool>();
  s.rollout = get("rollout").cast<int>() != 0;
  s.rollout_seq = get("rollout_seq").cast<bool>();
  s.rollout_mask = get("rollout_mask").cast<bool>();
  s.rollout_cap = get("rollout_cap").cast<double>();
  s.norm_length = get("norm_length").cast<int64_t>();
  s.num_tokens = get("num_tokens").cast<double>();
  s.value_clip = get("value_clip").cast<double>();
  s.log_ratio_clamp = get("log_ratio_clamp").cast<double>();
  s.surrogate = get("surrogate").cast<int>();
  s.rollout_given = get("rollout_given").cast<bool>();
  s.delta = get("delta").cast<double>();
  s.tau_pos = get("tau_pos").cast<double>();
  s.tau_neg = get("tau_neg").cast<double>();
  s.ratio_cap = get("ratio_cap").cast<double>();
  s.dro_beta = get("dro_beta").cast<double>();
  s.vespo_k_pos = get("vespo_k_pos").cast<double>();
  s.vespo_l_pos = get("vespo_l_pos").cast<double>();
  s.vespo_k_neg = get("vespo_k_neg").cast<double>();
  s.vespo_l_neg = get("vespo_l_neg").cast<double>();
  s.kl_st = get("kl_st").cast<bool>();
  s.kl_bias = get("kl_bias").cast<bool>();
  s.count_empty = get("count_empty").cast<bool>();
  s.metric_level = get("metric_level").cast<int>();
  const std::string agg = get("aggregation").cast<std::string>();
  if (agg == "token_mean") s.aggregation = fastpo::Aggregation::kTokenMean;
  else if (agg == "seq_mean_token_mean") s.aggregation = fastpo::Aggregation::kSeqMeanTokenMean;
  else if (agg == "seq_mean_token_sum") s.aggregation = fastpo::Aggregation::kSeqMeanTokenSum;
  else if (agg == "token_sum_norm") s.aggregation = fastpo::Aggregation::kTokenSumNorm;
  else if (agg == "token_sum") s.aggregation = fastpo::Aggregation::kTokenSum;
  else throw py::value_error("spec: unknown aggregation '" + agg + "'");
  if (s.kl < 0 || s.kl > 4) throw py::value_error("spec: kl must be 0, 1, 2, 3 or 4, got " + std::to_string(s.kl));
  if (s.surrogate < 0 || s.surrogate >= fastpo::kNumSurrogates)
    throw py::value_error("spec: unknown surrogate code " + std::to_string(s.surrogate));
  if (s.metric_level < 0 || s.metric_level >= fastpo::kNumMetricLevels)
    throw py::value_error("spec: metric_level must be 0, 1, 2 or 3, got " + std::to_string(s.metric_level));
  if (s.rollout_given && !s.rollout) throw py::value_error("spec: rollout_given needs rollout != 0");
  if (read != d.size())
    throw py::value_error("spec: " + std::to_string(d.size() - read) + " unknown key(s); the extension is older "
                          "than fastpo.ops.loss_spec (rebuild it: pip install -e .)");
  if (s.rollout_seq && !s.rollout) throw py::value_error("spec: rollout_seq needs rollout != 0");
  return s;
}

void token_loss_forward(const py::object& x_obj, const py::object& old_obj, const py::object& adv_obj,
                        const py::object& ref_obj, const py::object& ent_obj, const py::object& roll_obj,
                        const py::object& mask_obj, const py::object& cu_obj, const py::object& unit_obj,
                        const py::object& unit_ent_obj, const py::object& stats_obj, const py::dict& spec_dict) {
  const fastpo::TokenLossSpec s = parse_loss_spec(spec_dict);
  const py::buffer_info xb = request(x_obj, "x", false);
  if (xb.ndim != 1) throw py::value_error("x: expected a 1-D array [N], got shape " + shape_str(xb));
  const int64_t N = xb.shape[0];
  check_vector(xb, "x", N, true, "x");
  const bool dbl = is_f64(xb);
  // Every float array: [N] of x's dtype; the optional ones present exactly when the spec uses them.
  auto floats = [&](const py::object& obj, const char* name, bool wanted, bool writable, py::buffer_info& b) {
    if (obj.is_none()) {
      if (wanted) throw py::value_error(std::string(name) + ": required by the spec, got None");
      return false;
    }
    if (!wanted) throw py::value_error(std::string(name) + ": not used by the spec; pass None");
    b = request(obj, name, writable);
    check_vector(b, name, N, true, "x");
    if (is_f64(b) != dbl)
      throw py::value_error(std::string(name) + ": must have the dtype of x (" + (dbl ? "float64" : "float32") +
                            "), got format '" + b.format + "'");
    return true;
  };
  py::buffer_info ob, ab, rb, eb, wb, ub, ueb, mb;
  floats(old_obj, "old", true, false, ob);
  floats(adv_obj, "adv", true, false, ab);
  const bool has_ref = floats(ref_obj, "ref", !s.value && s.kl != 0, false, rb);
  const bool has_ent = floats(ent_obj, "entropy", !s.value && s.has_entropy, false, eb);
  const bool has_roll = floats(roll_obj, "rollout", !s.value && s.rollout, false, wb);
  floats(unit_obj, "unit", true, true, ub);
  const bool has_unit_ent = floats(unit_ent_obj, "unit_entropy", !s.value && s.has_entropy, true, ueb);
  const uint8_t* m = nullptr;
  const void* wide_mask = nullptr;  // a float32 / float64 mask (non-zero = counted)
  int wide_mask_bytes = 0;
  if (!mask_obj.is_none()) {
    mb = request(mask_obj, "mask", false);
    if (is_f32(mb) || is_f64(mb)) {
      wide_mask = check_vector(mb, "mask", N, true, "x");
      wide_mask_bytes = static_cast<int>(mb.itemsize);
    } else {
      const char c = format_char(mb);
      if (mb.itemsize != 1 || (c != '?' && c != 'B'))
        throw py::value_error("mask: expected bool, uint8, float32 or float64, got format '" + mb.format +
                              "' itemsize " + std::to_string(mb.itemsize));
      m = static_cast<const uint8_t*>(check_vector(mb, "mask", N, false, "x"));
    }
  }
  const py::buffer_info cb = request(cu_obj, "cu_seqlens", false);
  const int64_t* cu = check_cu_seqlens(cb, N);
  const py::buffer_info sb = request(stats_obj, "stats", true);
  check_vector(sb, "stats", fastpo::kNumStats, true, "the number of stats");
  if (is_f64(sb) != dbl) throw py::value_error("stats: must have the dtype of x");
  check_disjoint({{&ub, "unit"}, {has_unit_ent ? &ueb : nullptr, "unit_entropy"}, {&sb, "stats"}},
                 {{&xb, "x"}, {&ob, "old"}, {&ab, "adv"}, {has_ref ? &rb : nullptr, "ref"},
                  {has_ent ? &eb : nullptr, "entropy"}, {has_roll ? &wb : nullptr, "rollout"},
                  {m || wide_mask ? &mb : nullptr, "mask"}});

  auto run = [&](auto tag) {
    using T = decltype(tag);
    auto ptr = [](const py::buffer_info& b, bool present) { return present ? static_cast<const T*>(b.ptr) : nullptr; };
    const fastpo::TokenLossArgs<T> args{ptr(xb, true), ptr(ob, true), ptr(ab, true), ptr(rb, has_ref),
                                        ptr(eb, has_ent), ptr(wb, has_roll), m, cu, cb.shape[0] - 1,
                                        static_cast<T*>(ub.ptr), has_unit_ent ? static_cast<T*>(ueb.ptr) : nullptr,
                                        wide_mask, wide_mask_bytes};
    py::gil_scoped_release nogil;
    fastpo::token_loss_forward<T>(s, args, static_cast<T*>(sb.ptr));
  };
  if (dbl)
    run(double{});
  else
    run(float{});
}

}  // namespace

void bind_rl(py::module_& m) {
  m.def("gae", &gae, py::arg("rewards"), py::arg("values"), py::arg("mask"), py::arg("cu_seqlens"),
        py::arg("advantages"), py::arg("returns"), py::arg("gamma"), py::arg("lam"),
        R"doc(GAE over the counted tokens of each sequence (see advantages.h).

rewards, values, advantages, returns: contiguous 1-D [N] arrays of one dtype, float32 or float64 (callers
upcast 16-bit inputs first); mask: contiguous [N] bool/uint8 or None (all counted); cu_seqlens: contiguous
int64 [B+1], 0 = cu[0] <= ... <= cu[B] = N. Writes advantages and returns (0 at masked tokens); outputs
must not overlap the inputs or each other. Raises ValueError on bad input before writing anything.)doc");
  m.def("token_loss_forward", &token_loss_forward, py::arg("x"), py::arg("old"), py::arg("adv"), py::arg("ref"),
        py::arg("entropy"), py::arg("rollout"), py::arg("mask"), py::arg("cu_seqlens"), py::arg("unit"),
        py::arg("unit_entropy"), py::arg("stats"), py::arg("spec"),
        R"doc(Fused per-token policy (or value) loss over sequences, see policy_loss.h.

x, old, adv (returns for the value loss), ref, entropy, rollout, unit, unit_entropy: contiguous 1-D [N]
arrays of x's dtype (float32 or float64); ref / entropy / rollout / unit_entropy are given exactly when the
spec uses them, else None. mask: contiguous [N] bool/uint8/float32/float64 (non-zero = counted) or None;
cu_seqlens: contiguous int64 [B+1].
spec: a dict of fastpo.ops.loss_spec.TokenLossSpec's fields plus rollout_seq, rollout_mask, aggregation
(by name) and log_ratio_clamp. Writes unit (the per-token derivative up to the global scale), unit_entropy
and stats [12] (loss, scale, metrics). Raises ValueError on bad input before writing anything.)doc");
}

}  // namespace fastpo_bind
