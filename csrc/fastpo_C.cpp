// fastpo_C.cpp -- the pybind11 module fastpo._C: one binding function per kernel family.
//
// Each bind_*.cpp checks its arguments (shapes, strides, dtypes, writability, label range, aliasing)
// before any output is written and dispatches on the dtype (bind_util.h has the shared checks).
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace fastpo_bind {
void bind_logprobs(py::module_& m);
void bind_rl(py::module_& m);
void bind_rollout(py::module_& m);
void bind_selection(py::module_& m);
}  // namespace fastpo_bind

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastpo C++ CPU kernels (pybind11; arrays through the buffer protocol)";
  fastpo_bind::bind_logprobs(m);
  fastpo_bind::bind_rl(m);
  fastpo_bind::bind_rollout(m);
  fastpo_bind::bind_selection(m);
}
