// The native kernels' one translation unit and Python module: each kernel is a header with its
// own namespace and ``bind``, so that the build (morphnas/native/__init__.py) parses torch's
// headers, most of its time, once for all of them.

#include "common.h"
#include "darts_cell.h"
#include "darts_supernet.h"
#include "two_input_cell.h"
#include "two_input_supernet.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "morphnas' native kernels (loaded by morphnas.native)";
  morphnas_native::darts_supernet::bind(
      m.def_submodule("darts_supernet", "the DARTS search cell's sequence kernel"));
  morphnas_native::darts_cell::bind(
      m.def_submodule("darts_cell", "the derived DARTS cell's sequence kernel"));
  morphnas_native::two_input_cell::bind(
      m.def_submodule("two_input_cell", "the derived two-input cell's time loops"));
  morphnas_native::two_input_supernet::bind(
      m.def_submodule("two_input_supernet", "the two-input search cell's time loops"));
  m.def_submodule("testing", "hooks for the tests of in_parts and PartPool")
      .def("pooled_rounds", &morphnas_native::pooled_rounds);
}
