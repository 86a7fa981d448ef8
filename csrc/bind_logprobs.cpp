// bind_logprobs.cpp -- fastpo._C bindings of the log-prob row kernels (logprobs.h): checks, dtype dispatch.
// The compute runs with the GIL released, parallel over rows with OpenMP when available.
#include "bind_util.h"
#include "logprobs.h"

namespace fastpo_bind {

namespace {

// The optional per-row 1 / temperature [N]: each entry finite and > 0.
RowVec check_inv_temperature_rows(const py::object& obj, int64_t N, std::vector<py::buffer_info>& keep) {
  const RowVec v = check_rowvec(obj, "inv_temperature_rows", N, false, true, keep);
  for (int64_t i = 0; v.present() && i < N; ++i) {
    const double t = v.get(i);
    if (!(t > 0.0) || !std::isfinite(t))
      throw py::value_error("inv_temperature_rows: entry " + std::to_string(i) +
                            " must be a finite number > 0 (1 / temperature), got " + std::to_string(t));
  }
  return v;
}

// (number of labels outside [0, V) that are not ignore_index, the first of them) for a contiguous
// int64 labels [N]: the public ops' label range check on CPU, without a torch temporary per test.
py::tuple count_bad_labels(const py::object& labels_obj, int64_t V, int64_t ignore_index) {
  const py::buffer_info b = request(labels_obj, "labels", false);
  if (b.ndim != 1 || !is_i64(b) || (b.shape[0] > 1 && b.strides[0] != 8))
    throw py::value_error("labels: expected a contiguous 1-D int64 array, got format '" + b.format + "' shape " +
                          shape_str(b));
  const int64_t* y = static_cast<const int64_t*>(b.ptr);
  const int64_t N = b.shape[0];
  int64_t bad = 0, first = 0;
  for (int64_t i = 0; i < N; ++i) {
    const bool out = y[i] != ignore_index && (y[i] < 0 || y[i] >= V);
    if (out && bad == 0) first = y[i];
    bad += out;
  }
  return py::make_tuple(bad, first);
}

void logprob_forward(const py::object& logits_obj, const py::object& labels_obj, const py::object& logp_obj,
                     const py::object& row_max_obj, const py::object& log_norm_obj, const py::object& entropy_obj,
                     double inv_temperature, int64_t ignore_index, const std::string& dtype,
                     const py::object& log_sum_sq_obj, const py::object& is_top1_obj, const py::object& mean_obj,
                     double logit_scale, double logit_softcap, const py::object& inv_t_rows_obj,
                     const py::object& thr_rows_obj) {
  const DType dt = parse_dtype(dtype);
  check_inv_temperature(inv_temperature);
  check_logit_transform(logit_scale, logit_softcap);
  const py::buffer_info lb = request(logits_obj, "logits", false);
  const Matrix x = check_matrix(lb, "logits", dt);
  const int64_t N = x.rows, V = x.cols;
  const py::buffer_info yb = request(labels_obj, "labels", false);
  std::vector<py::buffer_info> keep;
  keep.reserve(8);
  const RowVec inv_t_rows = check_inv_temperature_rows(inv_t_rows_obj, N, keep);
  const RowVec thr_rows = check_rowvec(thr_rows_obj, "threshold_rows", N, false, true, keep);
  fastpo::ForwardOut out;
  out.logp = check_rowvec(logp_obj, "logp", N, true, false, keep);
  out.row_max = check_rowvec(row_max_obj, "row_max", N, true, false, keep);
  out.log_norm = check_rowvec(log_norm_obj, "log_norm", N, true, false, keep);
  out.entropy = check_rowvec(entropy_obj, "entropy", N, true, true, keep);
  out.log_sum_sq = check_rowvec(log_sum_sq_obj, "log_sum_sq_probs", N, true, true, keep);
  out.is_top1 = check_rowvec(is_top1_obj, "is_top1", N, true, true, keep);
  out.mean = check_rowvec(mean_obj, "mean_logits", N, true, true, keep);
  const int64_t* y = check_labels(yb, N, V, ignore_index);

  py::gil_scoped_release nogil;
  switch (dt) {
    case DType::F32:
      fastpo::forward_rows<float>(static_cast<const float*>(x.ptr), N, V, x.row_stride, y, out, inv_temperature,
                                  ignore_index, logit_scale, logit_softcap, inv_t_rows, thr_rows);
      break;
    case DType::F64:
      fastpo::forward_rows<double>(static_cast<const double*>(x.ptr), N, V, x.row_stride, y, out, inv_temperature,
                                   ignore_index, logit_scale, logit_softcap, inv_t_rows, thr_rows);
      break;
    case DType::BF16:
      fastpo::forward_rows<fastpo::bf16>(static_cast<const fastpo::bf16*>(x.ptr), N, V, x.row_stride, y, out,
                                         inv_temperature, ignore_index, logit_scale, logit_softcap, inv_t_rows, thr_rows);
      break;
    case DType::F16:
      fastpo::forward_rows<fastpo::f16>(static_cast<const fastpo::f16*>(x.ptr), N, V, x.row_stride, y, out,
                                        inv_temperature, ignore_index, logit_scale, logit_softcap, inv_t_rows, thr_rows);
      break;
  }
}

void logprob_backward(const py::object& logits_obj, const py::object& labels_obj, const py::object& row_max_obj,
                      const py::object& log_norm_obj, const py::object& entropy_obj, const py::object& grad_logp_obj,
                      const py::object& grad_entropy_obj, const py::object& grad_logits_obj, double inv_temperature,
                      int64_t ignore_index, const std::string& dtype, double logit_scale, double logit_softcap,
                      const py::object& inv_t_rows_obj, const py::object& thr_rows_obj) {
  const DType dt = parse_dtype(dtype);
  check_inv_temperature(inv_temperature);
  check_logit_transform(logit_scale, logit_softcap);
  const py::buffer_info lb = request(logits_obj, "logits", false);
  const Matrix x = check_matrix(lb, "logits", dt);
  const int64_t N = x.rows, V = x.cols;
  const py::buffer_info gb = request(grad_logits_obj, "grad_logits", true);
  const Matrix gx = check_matrix(gb, "grad_logits", dt);
  if (gx.rows != N || gx.cols != V)
    throw py::value_error("grad_logits: expected shape (" + std::to_string(N) + ", " + std::to_string(V) +
                          ") to match logits, got " + shape_str(gb));
  // grad_logits may be logits itself (in-place backward), but must not partially overlap it.
  const bool same = gx.ptr == x.ptr && (gx.row_stride == x.row_stride || N <= 1);
  if (!same) {
    const auto a = extent(x), b = extent(gx);
    if (a.first < b.second && b.first < a.second)
      throw py::value_error(
          "grad_logits: overlaps logits without being the same array (in-place backward needs grad_logits to be "
          "exactly logits: same data pointer and row stride)");
  }
  const py::buffer_info yb = request(labels_obj, "labels", false);
  std::vector<py::buffer_info> keep;
  keep.reserve(6);
  const RowVec inv_t_rows = check_inv_temperature_rows(inv_t_rows_obj, N, keep);
  const RowVec thr_rows = check_rowvec(thr_rows_obj, "threshold_rows", N, false, true, keep);
  const RowVec row_max = check_rowvec(row_max_obj, "row_max", N, false, false, keep);
  const RowVec log_norm = check_rowvec(log_norm_obj, "log_norm", N, false, false, keep);
  const RowVec glp = check_rowvec(grad_logp_obj, "grad_logp", N, false, true, keep);
  const RowVec gent = check_rowvec(grad_entropy_obj, "grad_entropy", N, false, true, keep);
  const RowVec ent = check_rowvec(entropy_obj, "entropy", N, false, !gent.present(), keep);
  const int64_t* y = check_labels(yb, N, V, ignore_index);

  py::gil_scoped_release nogil;
  switch (dt) {
    case DType::F32:
      fastpo::backward_rows<float>(static_cast<const float*>(x.ptr), static_cast<float*>(gx.ptr), N, V,
                                   x.row_stride, gx.row_stride, y, row_max, log_norm, ent, glp, gent,
                                   inv_temperature, ignore_index, logit_scale, logit_softcap, inv_t_rows, thr_rows);
      break;
    case DType::F64:
      fastpo::backward_rows<double>(static_cast<const double*>(x.ptr), static_cast<double*>(gx.ptr), N, V,
                                    x.row_stride, gx.row_stride, y, row_max, log_norm, ent, glp, gent,
                                    inv_temperature, ignore_index, logit_scale, logit_softcap, inv_t_rows, thr_rows);
      break;
    case DType::BF16:
      fastpo::backward_rows<fastpo::bf16>(static_cast<const fastpo::bf16*>(x.ptr),
                                                 static_cast<fastpo::bf16*>(gx.ptr), N, V, x.row_stride, gx.row_stride,
                                                 y, row_max, log_norm, ent, glp, gent, inv_temperature,
                                                ignore_index, logit_scale, logit_softcap, inv_t_rows, thr_rows);
      break;
    case DType::F16:
      fastpo::backward_rows<fastpo::f16>(static_cast<const fastpo::f16*>(x.ptr),
                                                static_cast<fastpo::f16*>(gx.ptr), N, V, x.row_stride, gx.row_stride,
                                                y, row_max, log_norm, ent, glp, gent, inv_temperature,
                                                ignore_index, logit_scale, logit_softcap, inv_t_rows, thr_rows);
      break;
  }
}

}  // namespace

void bind_logprobs(py::module_& m) {
  m.def("logprob_forward", &logprob_forward, py::arg("logits"), py::arg("labels"), py::arg("logp"),
        py::arg("row_max"), py::arg("log_norm"), py::arg("entropy"), py::arg("inv_temperature"),
        py::arg("ignore_index"), py::arg("dtype"), py::arg("log_sum_sq_probs") = py::none(),
        py::arg("is_top1") = py::none(), py::arg("mean_logits") = py::none(), py::arg("logit_scale") = 1.0,
        py::arg("logit_softcap") = 0.0, py::arg("inv_temperature_rows") = py::none(),
        py::arg("threshold_rows") = py::none(),
        R"doc(Per-row log-prob and entropy of logits / temperature, and the backward's row statistics.

logits [N, V] (float32 | float64 | raw 16-bit patterns as int16/uint16 for bfloat16/float16; rows may be
strided, last dim contiguous), labels [N] int64. Writes logp [N], row_max [N] (max_j logits[i, j]),
log_norm [N] (log sum_j exp((logits[i, j] - row_max) * inv_temperature), so that logsumexp =
row_max * inv_temperature + log_norm) and entropy [N] (or skips the entropy when it is None); these
are float32 or float64, any element stride (accumulation is float64 for dtype 'float64',
float32 otherwise). The optional log_sum_sq_probs [N] (log sum_j p_j^2), is_top1 [N] (1.0 when the label
is the first argmax of the row, else 0.0) and mean_logits [N] (mean_j logits * inv_temperature) are
computed in the same pass when given, skipped when None. Rows with label == ignore_index get 0
everywhere. logit_scale k and logit_softcap c (0: none) transform each logit first, z = c tanh(k x / c)
(z = k x without a softcap), as TRL and Gemma do. inv_temperature_rows [N] (float32/float64, each finite > 0),
when given, replaces inv_temperature row by row (a per-token temperature). threshold_rows [N] (optional):
a per-row threshold on the raw logits (top-k / top-p truncation); entries below it count as -inf (a label
below it gets logp = -inf). Raises ValueError on bad input before writing anything.)doc");

  m.def("count_bad_labels", &count_bad_labels, py::arg("labels"), py::arg("vocab_size"), py::arg("ignore_index"),
        R"doc((count, first): how many of the contiguous int64 labels [N] lie outside [0, vocab_size) and are not
ignore_index, and the first such value (0 when none).)doc");

  m.def("logprob_backward", &logprob_backward, py::arg("logits"), py::arg("labels"), py::arg("row_max"),
        py::arg("log_norm"), py::arg("entropy"), py::arg("grad_logp"), py::arg("grad_entropy"), py::arg("grad_logits"),
        py::arg("inv_temperature"), py::arg("ignore_index"), py::arg("dtype"), py::arg("logit_scale") = 1.0,
        py::arg("logit_softcap") = 0.0, py::arg("inv_temperature_rows") = py::none(),
        py::arg("threshold_rows") = py::none(),
        R"doc(Gradient of the forward's (logp, entropy) with respect to the logits.

grad_logits[i, j] = (1/tau) * (g_l (1[j == y] - p_j) - g_H p_j (log p_j + H)), with
log p_j = (logits[i, j] - row_max) * inv_temperature - log_norm from the forward. grad_logits has the dtype and
layout rules of logits and may be the very same array (in-place backward). grad_logp / grad_entropy may
be None (zeros); entropy may be None only when grad_entropy is None. ignore_index rows get zeros. logit_scale / logit_softcap: the forward's logit transform (its derivative is applied). inv_temperature_rows:
the forward's per-row 1 / temperature (None: inv_temperature for every row). threshold_rows: the forward's
(entries below it get 0; a row whose label is below it drops grad_logp).)doc");

}

}  // namespace fastpo_bind
