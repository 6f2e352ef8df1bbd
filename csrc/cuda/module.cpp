// flashdistill._C_cuda: the CUDA backend's Python module. Compiled by g++ (not nvcc): it includes
// only pybind11 and ops.h, never a CUDA or torch header (csrc/README.md). Every entry point takes
// plain integers and floats and releases the GIL. Adding an op: one wrapper and one m.def below.

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "ops.h"

namespace py = pybind11;
namespace gpu = flashdistill::gpu;

namespace {

template <typename P> P* ptr(uintptr_t v) { return reinterpret_cast<P*>(v); }

void dmd_forward(int64_t dtype, int64_t B, int64_t D,
                 uintptr_t x, int64_t x_bstride, uintptr_t real, int64_t real_bstride,
                 uintptr_t fake, int64_t fake_bstride, uintptr_t real_uncond, int64_t real_uncond_bstride,
                 uintptr_t guidance, double guidance_scale, double eps,
                 uintptr_t g, uintptr_t loss, uintptr_t workspace, int64_t workspace_bytes,
                 uintptr_t stream) {
  gpu::dmd_forward_cuda(dtype, B, D, ptr<const void>(x), x_bstride, ptr<const void>(real), real_bstride,
                        ptr<const void>(fake), fake_bstride, ptr<const void>(real_uncond), real_uncond_bstride,
                        ptr<const void>(guidance), guidance_scale, eps, ptr<void>(g), ptr<void>(loss),
                        ptr<void>(workspace), workspace_bytes, ptr<CUstream_st>(stream));
}

void grad_scale(int64_t dtype, int64_t n, uintptr_t src, uintptr_t dst, uintptr_t scale, double factor,
                uintptr_t stream) {
  gpu::grad_scale_cuda(dtype, n, ptr<const void>(src), ptr<void>(dst), ptr<const void>(scale), factor,
                       ptr<CUstream_st>(stream));
}

py::dict build_info() {
  const gpu::BuildInfo b = gpu::build_info();
  py::dict d;
  d["nvcc"] = b.nvcc;
  d["cuda_runtime"] = b.cuda_runtime;
  d["cudart"] = "static";
  d["archs"] = b.archs;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "flashdistill CUDA kernels (ABI: csrc/README.md). Pointers, sizes and strides in, no torch types.";
  using release = py::call_guard<py::gil_scoped_release>;

  // ---- runtime ----
  m.def("device_count", &gpu::device_count, release(),
        "Visible CUDA devices; 0 (no exception) without a driver or device.");
  m.def("runtime_error_string", &gpu::runtime_error_string, release(),
        "Why CUDA is unusable ('' when a device is usable).");
  m.def("driver_version", &gpu::driver_version, release(),
        "CUDA version the driver supports (e.g. 12040), 0 without a driver.");
  m.def("build_info", &build_info, "How this module was compiled: nvcc, CUDA runtime, GPU architectures.");

  // ---- ops ----
  m.def("dmd_workspace_bytes", &gpu::dmd_workspace_bytes, py::arg("dtype"), py::arg("B"), py::arg("D"),
        release(), "Scratch bytes dmd_forward needs for (dtype, B, D).");
  m.def("dmd_forward", &dmd_forward,
        py::arg("dtype"), py::arg("B"), py::arg("D"),
        py::arg("x"), py::arg("x_bstride"), py::arg("real"), py::arg("real_bstride"),
        py::arg("fake"), py::arg("fake_bstride"), py::arg("real_uncond"), py::arg("real_uncond_bstride"),
        py::arg("guidance"), py::arg("guidance_scale"), py::arg("eps"),
        py::arg("g"), py::arg("loss"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"),
        release(), "DMD loss forward: writes g [B, D] (dtype) and loss (compute type); enqueued on stream.");
  m.def("grad_scale", &grad_scale, py::arg("dtype"), py::arg("n"), py::arg("src"), py::arg("dst"),
        py::arg("scale"), py::arg("factor"), py::arg("stream"), release(),
        "dst = src * (scale[0] * factor) in the compute type, rounded once; enqueued on stream.");
}
