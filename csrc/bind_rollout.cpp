// bind_rollout.cpp -- fastpo._C binding of the rollout_corr/* row-statistics pass (rollout_stats.h).
// Arrays: contiguous 1-D [B·T] float32/float64 (one dtype) and a bool/uint8 mask; the GIL is released.
#include "bind_util.h"
#include "rollout_stats.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <tuple>

namespace fastpo_bind {

namespace {

using Option = std::tuple<int, double, double, bool, bool>;  // kind, lo, hi, two_sided, token_level

py::array_t<double> rollout_row_stats(const py::object& logp, const py::object& rollout, const py::object& mask,
                                      int64_t B, int64_t T, double upper, double lower, double lo, bool icepop, double log_bound,
                                      const std::vector<Option>& options) {
  if (B < 0 || T < 0) throw py::value_error("B, T: must be >= 0, got " + std::to_string(B) + ", " + std::to_string(T));
  const int64_t N = B * T;
  const py::buffer_info lb = request(logp, "logp", false), rb = request(rollout, "rollout_logp", false),
                        mb = request(mask, "mask", false);
  check_vector(lb, "logp", N, true, "B * T");
  check_vector(rb, "rollout_logp", N, true, "B * T");
  const uint8_t* m = static_cast<const uint8_t*>(check_vector(mb, "mask", N, false, "B * T"));
  if (is_f64(lb) != is_f64(rb))
    throw py::value_error("rollout_logp: must have logp's dtype (format '" + lb.format + "'), got format '" +
                          rb.format + "'");
  std::vector<fastpo::RejectionOption> opts;
  for (const auto& [kind, olo, ohi, two, tok] : options) {
    if (kind < 1 || kind > 3) throw py::value_error("options: kind must be 1, 2 or 3 (k1..k3), got " + std::to_string(kind));
    opts.push_back({kind, olo, ohi, two, tok});
  }
  const int64_t F = fastpo::rollout_col::kBase + fastpo::rollout_col::kPerOption * static_cast<int64_t>(opts.size());
  py::array_t<double> table({B, F});
  double* out = table.mutable_data();
  const fastpo::RolloutISBounds is{upper, lower, lo, icepop, log_bound};
  {
    py::gil_scoped_release nogil;
    if (is_f64(lb))
      fastpo::rollout_row_stats<double>(static_cast<const double*>(lb.ptr), static_cast<const double*>(rb.ptr), m, B,
                                        T, is, opts, out);
    else
      fastpo::rollout_row_stats<float>(static_cast<const float*>(lb.ptr), static_cast<const float*>(rb.ptr), m, B, T,
                                       is, opts, out);
  }
  return table;
}

}  // namespace

void bind_rollout(py::module_& m) {
  m.def("rollout_row_stats", &rollout_row_stats, py::arg("logp"), py::arg("rollout_logp"), py::arg("mask"),
        py::arg("B"), py::arg("T"), py::arg("upper"), py::arg("lower"), py::arg("lo"), py::arg("icepop"), py::arg("log_bound"),
        py::arg("options"),
        "The [B, F] float64 table of per-row sums behind verl's rollout_corr/* metrics (rollout_stats.h); "
        "options: [(kind 1..3, lo, hi, two_sided, token_level)] per rejection option.");
}

}  // namespace fastpo_bind
