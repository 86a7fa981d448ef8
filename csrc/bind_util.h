// bind_util.h -- buffer-protocol argument checks shared by the fastpo._C bindings.
//
// Arrays arrive through the buffer protocol (callers pass tensor.numpy() views, which share memory;
// bfloat16/float16 tensors as t.view(torch.int16).numpy(), i.e. raw 16-bit patterns), so the
// extension links against nothing but pybind11. Every check raises ValueError (TypeError for an
// object that is not an array at all) naming the argument and the shape seen.
#pragma once

#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <iterator>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "logprobs.h"

namespace py = pybind11;

namespace fastpo_bind {

using fastpo::RowVec;

enum class DType { F32, F64, BF16, F16 };

inline DType parse_dtype(const std::string& s) {
  if (s == "float32") return DType::F32;
  if (s == "float64") return DType::F64;
  if (s == "bfloat16") return DType::BF16;
  if (s == "float16") return DType::F16;
  throw py::value_error("dtype: expected one of 'float32', 'float64', 'bfloat16', 'float16', got '" + s + "'");
}

inline std::string shape_str(const py::buffer_info& b) {
  std::ostringstream os;
  os << "(";
  for (size_t k = 0; k < b.shape.size(); ++k) os << (k ? ", " : "") << b.shape[k];
  if (b.shape.size() == 1) os << ",";
  os << ")";
  return os.str();
}

// The format character of a buffer, without a byte-order / alignment prefix.
inline char format_char(const py::buffer_info& b) {
  std::string f = b.format;
  size_t k = 0;
  while (k < f.size() && (f[k] == '@' || f[k] == '=' || f[k] == '<' || f[k] == '|')) ++k;
  return (k + 1 == f.size()) ? f[k] : '?';
}

inline bool is_f32(const py::buffer_info& b) { return b.itemsize == 4 && format_char(b) == 'f'; }
inline bool is_f64(const py::buffer_info& b) { return b.itemsize == 8 && format_char(b) == 'd'; }
inline bool is_i64(const py::buffer_info& b) {
  const char c = format_char(b);
  return b.itemsize == 8 && (c == 'l' || c == 'q');
}
inline bool is_raw16(const py::buffer_info& b) {
  const char c = format_char(b);
  return b.itemsize == 2 && (c == 'h' || c == 'H' || c == 'e');
}

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::F32: return "float32";
    case DType::F64: return "float64";
    case DType::BF16: return "bfloat16";
    case DType::F16: return "float16";
  }
  return "?";
}

// Request the buffer of `obj` (named `name` in messages); writable buffers must accept writes.
inline py::buffer_info request(const py::object& obj, const char* name, bool writable) {
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

inline Matrix check_matrix(const py::buffer_info& b, const char* name, DType dt) {
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
inline RowVec check_rowvec(const py::object& obj, const char* name, int64_t N, bool writable, bool allow_none,
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
inline const int64_t* check_labels(const py::buffer_info& b, int64_t N, int64_t V, int64_t ignore_index) {
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
inline void check_inv_temperature(double inv_t) {
  if (!(inv_t > 0.0) || !std::isfinite(inv_t))
    throw py::value_error("inv_temperature: must be a finite number > 0 (1 / temperature), got " + std::to_string(inv_t));
}

// Byte range [lo, hi) touched by a matrix.
inline std::pair<uintptr_t, uintptr_t> extent(const Matrix& m) {
  const uintptr_t lo = reinterpret_cast<uintptr_t>(m.ptr);
  const int64_t span = m.rows > 0 ? ((m.rows - 1) * m.row_stride + m.cols) * m.itemsize : 0;
  return {lo, lo + static_cast<uintptr_t>(span)};
}

// ---------------------------------------------------------------------------------------------

// logit_scale finite and non-zero; logit_softcap 0 (none) or finite and > 0.
inline void check_logit_transform(double logit_scale, double logit_softcap) {
  if (!std::isfinite(logit_scale) || logit_scale == 0.0)
    throw py::value_error("logit_scale: must be finite and non-zero, got " + std::to_string(logit_scale));
  if (!std::isfinite(logit_softcap) || logit_softcap < 0.0)
    throw py::value_error("logit_softcap: must be finite and > 0 (0: no softcap), got " + std::to_string(logit_softcap));
}

// A contiguous 1-D array of N elements (float32/float64 when `floating`, else bool/uint8) whose
// length must match the array named `like`.
inline const void* check_vector(const py::buffer_info& b, const char* name, int64_t N, bool floating, const char* like) {
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
inline const int64_t* check_cu_seqlens(const py::buffer_info& cb, int64_t N) {
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
inline std::pair<uintptr_t, uintptr_t> byte_range(const py::buffer_info& b) {
  const uintptr_t lo = reinterpret_cast<uintptr_t>(b.ptr);
  const int64_t n = b.ndim == 1 ? b.shape[0] : 0;
  return {lo, lo + static_cast<uintptr_t>(n * b.itemsize)};
}

// Outputs must overlap neither each other nor any input (the kernels read inputs they have passed).
inline void check_disjoint(std::initializer_list<Named> outputs, std::initializer_list<Named> inputs) {
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

}  // namespace fastpo_bind
