// fastpo_C.cpp -- the pybind11 module fastpo._C: argument checking and dtype dispatch.
//
// Arrays arrive through the buffer protocol (callers pass tensor.numpy() views, which share memory;
// bfloat16/float16 tensors as t.view(torch.int16).numpy(), i.e. raw 16-bit patterns), so the
// extension links against nothing but pybind11. Every argument is checked -- shapes, strides,
// dtypes, writability, label range, aliasing -- before any output is written; violations raise
// ValueError (TypeError for an object that is not an array at all). The compute runs with the GIL
// released, parallel over rows with OpenMP when available.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

#include "advantages.h"
#include "logprobs.h"
#include "policy_loss.h"

namespace py = pybind11;

namespace {

using fastpo::RowVec;

enum class DType { F32, F64, BF16, F16 };

DType parse_dtype(const std::string& s) {
  if (s == "float32") return DType::F32;
  if (s == "float64") return DType::F64;
  if (s == "bfloat16") return DType::BF16;
  if (s == "float16") return DType::F16;
  throw py::value_error("dtype: expected one of 'float32', 'float64', 'bfloat16', 'float16', got '" + s + "'");
}

std::string shape_str(const py::buffer_info& b) {
  std::ostringstream os;
  os << "(";
  for (size_t k = 0; k < b.shape.size(); ++k) os << (k ? ", " : "") << b.shape[k];
  if (b.shape.size() == 1) os << ",";
  os << ")";
  return os.str();
}

// The format character of a buffer, without a byte-order / alignment prefix.
char format_char(const py::buffer_info& b) {
  std::string f = b.format;
  size_t k = 0;
  while (k < f.size() && (f[k] == '@' || f[k] == '=' || f[k] == '<' || f[k] == '|')) ++k;
  return (k + 1 == f.size()) ? f[k] : '?';
}

bool is_f32(const py::buffer_info& b) { return b.itemsize == 4 && format_char(b) == 'f'; }
bool is_f64(const py::buffer_info& b) { return b.itemsize == 8 && format_char(b) == 'd'; }
bool is_i64(const py::buffer_info& b) {
  const char c = format_char(b);
  return b.itemsize == 8 && (c == 'l' || c == 'q');
}
bool is_raw16(const py::buffer_info& b) {
  const char c = format_char(b);
  return b.itemsize == 2 && (c == 'h' || c == 'H' || c == 'e');
}

const char* dtype_name(DType d) {
  switch (d) {
    case DType::F32: return "float32";
    case DType::F64: return "float64";
    case DType::BF16: return "bfloat16";
    case DType::F16: return "float16";
  }
  return "?";
}

// Request the buffer of `obj` (named `name` in messages); writable buffers must accept writes.
py::buffer_info request(const py::object& obj, const char* name, bool writable) {
  if (!PyObject_CheckBuffer(obj.ptr()))
    throw py::type_error(std::string(name) + ": expected an array supporting the buffer protocol (e.g. tensor.numpy()), got " +
                         std::string(py::str(py::type::of(obj).attr("__name__"))));
  try {
    return py::reinterpret_borrow<py::buffer>(obj).request(writable);
  } catch (py::error_already_set& e) {
    throw py::value_error(std::string(name) + (writable ? ": must be a writable array (" : ": unreadable buffer (") +
                          std::string(py::str(e.value())) + ")");
  }
}

// A 2-D [N, V] logits-like array: last dim contiguous, rows at a non-negative stride >= V.
struct Matrix {
  void* ptr;
  int64_t rows, cols, row_stride;  // row_stride in elements
  int64_t itemsize;
};

Matrix check_matrix(const py::buffer_info& b, const char* name, DType dt) {
  if (b.ndim != 2)
    throw py::value_error(std::string(name) + ": expected a 2-D array [N, V], got ndim=" + std::to_string(b.ndim) +
                          " with shape " + shape_str(b));
  const bool ok_type = dt == DType::F32 ? is_f32(b) : dt == DType::F64 ? is_f64(b) : is_raw16(b);
  if (!ok_type)
    throw py::value_error(std::string(name) + ": dtype '" + dtype_name(dt) + "' needs " +
                          (dt == DType::F32   ? "a float32 array"
                           : dt == DType::F64 ? "a float64 array"
                                              : "an int16/uint16 array of raw 16-bit patterns (t.view(torch.int16).numpy())") +
                          ", got format '" + b.format + "' itemsize " + std::to_string(b.itemsize));
  Matrix m;
  m.ptr = b.ptr;
  m.rows = b.shape[0];
  m.cols = b.shape[1];
  m.itemsize = b.itemsize;
  if (m.cols < 1)
    throw py::value_error(std::string(name) + ": the vocabulary dimension V must be >= 1, got shape " + shape_str(b));
  if (m.cols > 1 && b.strides[1] != b.itemsize)
    throw py::value_error(std::string(name) + ": the last dimension must be contiguous (stride " +
                          std::to_string(b.itemsize) + " bytes), got strides (" + std::to_string(b.strides[0]) + ", " +
                          std::to_string(b.strides[1]) + ") bytes for shape " + shape_str(b));
  if (m.rows > 1) {
    if (b.strides[0] % b.itemsize != 0 || b.strides[0] / b.itemsize < m.cols)
      throw py::value_error(std::string(name) + ": rows must not overlap (row stride >= V elements), got strides (" +
                            std::to_string(b.strides[0]) + ", " + std::to_string(b.strides[1]) + ") bytes for shape " +
                            shape_str(b));
    m.row_stride = b.strides[0] / b.itemsize;
  } else {
    m.row_stride = m.cols;
  }
  return m;
}

// A 1-D [N] per-row float vector (float32 or float64, any element stride), or absent (None).
RowVec check_rowvec(const py::object& obj, const char* name, int64_t N, bool writable, bool allow_none,
                    std::vector<py::buffer_info>& keep) {
  RowVec v;
  if (obj.is_none()) {
    if (!allow_none) throw py::value_error(std::string(name) + ": must be an array of shape (" + std::to_string(N) + ",), got None");
    return v;
  }
  keep.push_back(request(obj, name, writable));
  const py::buffer_info& b = keep.back();
  if (b.ndim != 1 || b.shape[0] != N)
    throw py::value_error(std::string(name) + ": expected shape (" + std::to_string(N) + ",) to match logits rows, got " +
                          shape_str(b));
  if (!is_f32(b) && !is_f64(b))
    throw py::value_error(std::string(name) + ": expected float32 or float64, got format '" + b.format + "' itemsize " +
                          std::to_string(b.itemsize));
  if (b.strides[0] % b.itemsize != 0)
    throw py::value_error(std::string(name) + ": stride not a multiple of the item size");
  v.ptr = b.ptr;
  v.is_double = is_f64(b);
  v.stride = N > 1 ? b.strides[0] / b.itemsize : 1;
  if (writable && N > 1 && v.stride == 0)
    throw py::value_error(std::string(name) + ": output has stride 0 (a broadcast view); pass a real array");
  return v;
}

// labels [N] int64, contiguous; every value in [0, V) or == ignore_index. Returns the data pointer.
const int64_t* check_labels(const py::buffer_info& b, int64_t N, int64_t V, int64_t ignore_index) {
  if (b.ndim != 1 || b.shape[0] != N)
    throw py::value_error("labels: expected shape (" + std::to_string(N) + ",) to match logits rows, got " + shape_str(b));
  if (!is_i64(b))
    throw py::value_error("labels: expected int64, got format '" + b.format + "' itemsize " + std::to_string(b.itemsize));
  if (N > 1 && b.strides[0] != 8)
    throw py::value_error("labels: must be contiguous, got stride " + std::to_string(b.strides[0]) + " bytes");
  const int64_t* y = static_cast<const int64_t*>(b.ptr);
  for (int64_t i = 0; i < N; ++i) {
    if (y[i] != ignore_index && (y[i] < 0 || y[i] >= V))
      throw py::value_error("labels: value " + std::to_string(y[i]) + " at index " + std::to_string(i) +
                            " is outside [0, " + std::to_string(V) + ") and is not ignore_index (" +
                            std::to_string(ignore_index) + ")");
  }
  return y;
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

void check_inv_temperature(double inv_t) {
  if (!(inv_t > 0.0) || !std::isfinite(inv_t))
    throw py::value_error("inv_temperature: must be a finite number > 0 (1 / temperature), got " + std::to_string(inv_t));
}

// Byte range [lo, hi) touched by a matrix.
std::pair<uintptr_t, uintptr_t> extent(const Matrix& m) {
  const uintptr_t lo = reinterpret_cast<uintptr_t>(m.ptr);
  const int64_t span = m.rows > 0 ? ((m.rows - 1) * m.row_stride + m.cols) * m.itemsize : 0;
  return {lo, lo + static_cast<uintptr_t>(span)};
}

// ---------------------------------------------------------------------------------------------

// logit_scale finite and non-zero; logit_softcap 0 (none) or finite and > 0.
void check_logit_transform(double logit_scale, double logit_softcap) {
  if (!std::isfinite(logit_scale) || logit_scale == 0.0)
    throw py::value_error("logit_scale: must be finite and non-zero, got " + std::to_string(logit_scale));
  if (!std::isfinite(logit_softcap) || logit_softcap < 0.0)
    throw py::value_error("logit_softcap: must be finite and > 0 (0: no softcap), got " + std::to_string(logit_softcap));
}

void logprob_forward(const py::object& logits_obj, const py::object& labels_obj, const py::object& logp_obj,
                     const py::object& row_max_obj, const py::object& log_norm_obj, const py::object& entropy_obj,
                     double inv_temperature, int64_t ignore_index, const std::string& dtype,
                     const py::object& log_sum_sq_obj, const py::object& is_top1_obj, const py::object& mean_obj,
                     double logit_scale, double logit_softcap) {
  const DType dt = parse_dtype(dtype);
  check_inv_temperature(inv_temperature);
  check_logit_transform(logit_scale, logit_softcap);
  const py::buffer_info lb = request(logits_obj, "logits", false);
  const Matrix x = check_matrix(lb, "logits", dt);
  const int64_t N = x.rows, V = x.cols;
  const py::buffer_info yb = request(labels_obj, "labels", false);
  std::vector<py::buffer_info> keep;
  keep.reserve(7);
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
                                  ignore_index, logit_scale, logit_softcap);
      break;
    case DType::F64:
      fastpo::forward_rows<double>(static_cast<const double*>(x.ptr), N, V, x.row_stride, y, out, inv_temperature,
                                   ignore_index, logit_scale, logit_softcap);
      break;
    case DType::BF16:
      fastpo::forward_rows<fastpo::bf16>(static_cast<const fastpo::bf16*>(x.ptr), N, V, x.row_stride, y, out,
                                         inv_temperature, ignore_index, logit_scale, logit_softcap);
      break;
    case DType::F16:
      fastpo::forward_rows<fastpo::f16>(static_cast<const fastpo::f16*>(x.ptr), N, V, x.row_stride, y, out,
                                        inv_temperature, ignore_index, logit_scale, logit_softcap);
      break;
  }
}

void logprob_backward(const py::object& logits_obj, const py::object& labels_obj, const py::object& row_max_obj,
                      const py::object& log_norm_obj, const py::object& entropy_obj, const py::object& grad_logp_obj,
                      const py::object& grad_entropy_obj, const py::object& grad_logits_obj, double inv_temperature,
                      int64_t ignore_index, const std::string& dtype, double logit_scale, double logit_softcap) {
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
  keep.reserve(5);
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
                                   inv_temperature, ignore_index, logit_scale, logit_softcap);
      break;
    case DType::F64:
      fastpo::backward_rows<double>(static_cast<const double*>(x.ptr), static_cast<double*>(gx.ptr), N, V,
                                    x.row_stride, gx.row_stride, y, row_max, log_norm, ent, glp, gent,
                                    inv_temperature, ignore_index, logit_scale, logit_softcap);
      break;
    case DType::BF16:
      fastpo::backward_rows<fastpo::bf16>(static_cast<const fastpo::bf16*>(x.ptr),
                                                 static_cast<fastpo::bf16*>(gx.ptr), N, V, x.row_stride, gx.row_stride,
                                                 y, row_max, log_norm, ent, glp, gent, inv_temperature,
                                                ignore_index, logit_scale, logit_softcap);
      break;
    case DType::F16:
      fastpo::backward_rows<fastpo::f16>(static_cast<const fastpo::f16*>(x.ptr),
                                                static_cast<fastpo::f16*>(gx.ptr), N, V, x.row_stride, gx.row_stride,
                                                y, row_max, log_norm, ent, glp, gent, inv_temperature,
                                                ignore_index, logit_scale, logit_softcap);
      break;
  }
}

// ---------------------------------------------------------------------------------------------
// GAE

// A contiguous 1-D array of N elements (float32/float64 when `floating`, else bool/uint8) whose
// length must match the array named `like`.
const void* check_vector(const py::buffer_info& b, const char* name, int64_t N, bool floating, const char* like) {
  if (b.ndim != 1 || b.shape[0] != N)
    throw py::value_error(std::string(name) + ": expected shape (" + std::to_string(N) + ",) to match " + like +
                          ", got " + shape_str(b));
  const char c = format_char(b);
  const bool ok = floating ? (is_f32(b) || is_f64(b)) : (b.itemsize == 1 && (c == '?' || c == 'B'));
  if (!ok)
    throw py::value_error(std::string(name) + ": expected " + (floating ? "float32 or float64" : "bool or uint8") +
                          ", got format '" + b.format + "' itemsize " + std::to_string(b.itemsize));
  if (N > 1 && b.strides[0] != b.itemsize)
    throw py::value_error(std::string(name) + ": must be contiguous, got stride " + std::to_string(b.strides[0]) +
                          " bytes");
  return b.ptr;
}

// cu_seqlens: contiguous int64 [B+1], 0 = cu[0] <= ... <= cu[B] = N. Returns the data pointer.
const int64_t* check_cu_seqlens(const py::buffer_info& cb, int64_t N) {
  if (cb.ndim != 1 || cb.shape[0] < 1 || !is_i64(cb) || (cb.shape[0] > 1 && cb.strides[0] != 8))
    throw py::value_error("cu_seqlens: expected a contiguous 1-D int64 array [B+1], got shape " + shape_str(cb) +
                          " format '" + cb.format + "'");
  const int64_t* cu = static_cast<const int64_t*>(cb.ptr);
  const int64_t B = cb.shape[0] - 1;
  for (int64_t i = 0; i < B; ++i)
    if (cu[i + 1] < cu[i])
      throw py::value_error("cu_seqlens: must be non-decreasing, got " + std::to_string(cu[i]) + " then " +
                            std::to_string(cu[i + 1]) + " at index " + std::to_string(i));
  if (cu[0] != 0 || cu[B] != N)
    throw py::value_error("cu_seqlens: must start at 0 and end at N=" + std::to_string(N) + ", got first " +
                          std::to_string(cu[0]) + " and last " + std::to_string(cu[B]));
  return cu;
}

// A named contiguous buffer, for the overlap checks.
struct Named {
  const py::buffer_info* buf;
  const char* name;
};

// Byte range [lo, hi) of a contiguous 1-D buffer.
std::pair<uintptr_t, uintptr_t> byte_range(const py::buffer_info& b) {
  const uintptr_t lo = reinterpret_cast<uintptr_t>(b.ptr);
  const int64_t n = b.ndim == 1 ? b.shape[0] : 0;
  return {lo, lo + static_cast<uintptr_t>(n * b.itemsize)};
}

// Outputs must overlap neither each other nor any input (the kernels read inputs they have passed).
void check_disjoint(std::initializer_list<Named> outputs, std::initializer_list<Named> inputs) {
  auto overlaps = [](const py::buffer_info& a, const py::buffer_info& b) {
    const auto x = byte_range(a), y = byte_range(b);
    return x.first < y.second && y.first < x.second;
  };
  for (auto o = outputs.begin(); o != outputs.end(); ++o) {
    if (!o->buf) continue;
    for (auto p = std::next(o); p != outputs.end(); ++p)
      if (p->buf && overlaps(*o->buf, *p->buf))
        throw py::value_error(std::string(o->name) + ": overlaps " + p->name + "; pass separate arrays");
    for (const Named& in : inputs)
      if (in.buf && overlaps(*o->buf, *in.buf))
        throw py::value_error(std::string(o->name) + ": overlaps an input (" + in.name + ")");
  }
}

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

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastpo C++ CPU kernels (pybind11; arrays through the buffer protocol)";

  m.def("logprob_forward", &logprob_forward, py::arg("logits"), py::arg("labels"), py::arg("logp"),
        py::arg("row_max"), py::arg("log_norm"), py::arg("entropy"), py::arg("inv_temperature"),
        py::arg("ignore_index"), py::arg("dtype"), py::arg("log_sum_sq_probs") = py::none(),
        py::arg("is_top1") = py::none(), py::arg("mean_logits") = py::none(), py::arg("logit_scale") = 1.0,
        py::arg("logit_softcap") = 0.0,
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
(z = k x without a softcap), as TRL and Gemma do. Raises ValueError on bad input before writing anything.)doc");

  m.def("count_bad_labels", &count_bad_labels, py::arg("labels"), py::arg("vocab_size"), py::arg("ignore_index"),
        R"doc((count, first): how many of the contiguous int64 labels [N] lie outside [0, vocab_size) and are not
ignore_index, and the first such value (0 when none).)doc");

  m.def("logprob_backward", &logprob_backward, py::arg("logits"), py::arg("labels"), py::arg("row_max"),
        py::arg("log_norm"), py::arg("entropy"), py::arg("grad_logp"), py::arg("grad_entropy"), py::arg("grad_logits"),
        py::arg("inv_temperature"), py::arg("ignore_index"), py::arg("dtype"), py::arg("logit_scale") = 1.0,
        py::arg("logit_softcap") = 0.0,
        R"doc(Gradient of the forward's (logp, entropy) with respect to the logits.

grad_logits[i, j] = (1/tau) * (g_l (1[j == y] - p_j) - g_H p_j (log p_j + H)), with
log p_j = (logits[i, j] - row_max) * inv_temperature - log_norm from the forward. grad_logits has the dtype and
layout rules of logits and may be the very same array (in-place backward). grad_logp / grad_entropy may
be None (zeros); entropy may be None only when grad_entropy is None. ignore_index rows get zeros. logit_scale / logit_softcap: the forward's logit transform (its derivative is applied).)doc");

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
