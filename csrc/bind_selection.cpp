// bind_selection.cpp -- fastpo._C bindings of the Clip-Cov / KL-Cov selection pass (selection.h).
// Arrays: contiguous 1-D float32/float64 (one dtype) and a bool/uint8 mask; the GIL is released.
#include "bind_util.h"
#include "selection.h"

#include <pybind11/numpy.h>

namespace fastpo_bind {

namespace {

struct Inputs {
  std::vector<py::buffer_info> bufs;
  const uint8_t* mask = nullptr;
  int64_t N = 0;
  bool dbl = false;
};

Inputs check_inputs(std::initializer_list<std::pair<const py::object*, const char*>> floats, const py::object& mask) {
  Inputs in;
  for (const auto& [obj, name] : floats) {
    in.bufs.push_back(request(*obj, name, false));
    const py::buffer_info& b = in.bufs.back();
    if (in.bufs.size() == 1) {
      if (b.ndim != 1) throw py::value_error(std::string(name) + ": expected a 1-D array [N], got shape " + shape_str(b));
      in.N = b.shape[0];
      in.dbl = is_f64(b);
    }
    check_vector(b, name, in.N, true, "logp");
    if (is_f64(b) != in.dbl)
      throw py::value_error(std::string(name) + ": must have logp's dtype (" + (in.dbl ? "float64" : "float32") +
                            "), got format '" + b.format + "'");
  }
  in.bufs.push_back(request(mask, "mask", false));
  in.mask = static_cast<const uint8_t*>(check_vector(in.bufs.back(), "mask", in.N, false, "logp"));
  return in;
}

py::array_t<int64_t> to_array(const std::vector<int64_t>& v) {
  py::array_t<int64_t> out(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), out.mutable_data());
  return out;
}

py::array_t<int64_t> clip_cov_candidates(const py::object& x, const py::object& old, const py::object& adv,
                                         const py::object& mask, double mean_a, double mean_x, double lo, double hi,
                                         double lb, double ub) {
  const Inputs in = check_inputs({{&x, "logp"}, {&old, "old_logp"}, {&adv, "advantages"}}, mask);
  std::vector<int64_t> idx;
  {
    py::gil_scoped_release nogil;
    if (in.dbl)
      fastpo::clip_cov_candidates<double>(static_cast<const double*>(in.bufs[0].ptr),
                                          static_cast<const double*>(in.bufs[1].ptr),
                                          static_cast<const double*>(in.bufs[2].ptr), in.mask, in.N, mean_a, mean_x,
                                          lo, hi, lb, ub, idx);
    else
      fastpo::clip_cov_candidates<float>(static_cast<const float*>(in.bufs[0].ptr),
                                         static_cast<const float*>(in.bufs[1].ptr),
                                         static_cast<const float*>(in.bufs[2].ptr), in.mask, in.N, float(mean_a),
                                         float(mean_x), float(lo), float(hi), float(lb), float(ub), idx);
  }
  return to_array(idx);
}

template <typename scalar_t>
py::tuple topk_result(const std::vector<std::pair<scalar_t, int64_t>>& heap) {
  py::array_t<scalar_t> vals(static_cast<py::ssize_t>(heap.size()));
  py::array_t<int64_t> idx(static_cast<py::ssize_t>(heap.size()));
  for (size_t j = 0; j < heap.size(); ++j) {
    vals.mutable_data()[j] = heap[j].first;
    idx.mutable_data()[j] = heap[j].second;
  }
  return py::make_tuple(vals, idx);
}

py::tuple cov_topk(const py::object& x, const py::object& adv, const py::object& mask, double mean_a, double mean_x,
                   int64_t k) {
  const Inputs in = check_inputs({{&x, "logp"}, {&adv, "advantages"}}, mask);
  if (k < 0) throw py::value_error("k: must be >= 0, got " + std::to_string(k));
  if (in.dbl) {
    std::vector<std::pair<double, int64_t>> heap;
    {
      py::gil_scoped_release nogil;
      fastpo::cov_topk<double>(static_cast<const double*>(in.bufs[0].ptr), static_cast<const double*>(in.bufs[1].ptr),
                               in.mask, in.N, mean_a, mean_x, k, heap);
    }
    return topk_result(heap);
  }
  std::vector<std::pair<float, int64_t>> heap;
  {
    py::gil_scoped_release nogil;
    fastpo::cov_topk<float>(static_cast<const float*>(in.bufs[0].ptr), static_cast<const float*>(in.bufs[1].ptr),
                            in.mask, in.N, float(mean_a), float(mean_x), k, heap);
  }
  return topk_result(heap);
}

py::tuple masked_sums(const py::object& x, const py::object& adv, const py::object& mask) {
  const Inputs in = check_inputs({{&x, "logp"}, {&adv, "advantages"}}, mask);
  double sa = 0, sx = 0;
  int64_t n = 0;
  {
    py::gil_scoped_release nogil;
    if (in.dbl)
      fastpo::masked_sums<double>(static_cast<const double*>(in.bufs[0].ptr), static_cast<const double*>(in.bufs[1].ptr),
                                  in.mask, in.N, &sa, &sx, &n);
    else
      fastpo::masked_sums<float>(static_cast<const float*>(in.bufs[0].ptr), static_cast<const float*>(in.bufs[1].ptr),
                                 in.mask, in.N, &sa, &sx, &n);
  }
  return py::make_tuple(sa, sx, n);
}

}  // namespace

void bind_selection(py::module_& m) {
  m.def("masked_sums", &masked_sums, py::arg("logp"), py::arg("advantages"), py::arg("mask"),
        "(Σ advantages, Σ logp, count) over the counted tokens, the sums in float64.");
  m.def("clip_cov_candidates", &clip_cov_candidates, py::arg("logp"), py::arg("old_logp"), py::arg("advantages"),
        py::arg("mask"), py::arg("mean_a"), py::arg("mean_x"), py::arg("ratio_low"), py::arg("ratio_high"),
        py::arg("lb"), py::arg("ub"),
        "Clip-Cov's candidate tokens (flat indices, ascending): counted, not PPO-clipped, lb < cov < ub.");
  m.def("cov_topk", &cov_topk, py::arg("logp"), py::arg("advantages"), py::arg("mask"), py::arg("mean_a"),
        py::arg("mean_x"), py::arg("k"),
        "KL-Cov: (cov values, flat indices) of the k counted tokens of largest covariance, best first "
        "(NaN largest, ties by the lower index).");
}

}  // namespace fastpo_bind
