// Host entry points of the CUDA backend (flashdistill._C_cuda), in plain C++ types: module.cpp is
// compiled by g++ and includes no CUDA header. The ABI and the math are in csrc/README.md.
//
// Adding an op: declare its launcher here, define it in cuda/<op>.cu, add one m.def in module.cpp.
#pragma once

#include <cstdint>
#include <string>

// cudaStream_t is `CUstream_st*`; the forward declaration lets this header name it without
// <cuda_runtime.h>. A stream handle from Python (torch.cuda.current_stream().cuda_stream) converts
// with reinterpret_cast; 0 is the legacy default stream.
struct CUstream_st;

namespace flashdistill {
namespace gpu {

// ---- runtime (runtime.cu) -----------------------------------------------------------------------

// Number of visible CUDA devices; 0, never an exception, when there is no driver or no device.
int device_count() noexcept;

// Why CUDA is unusable, for `flashdistill info`: "" when at least one device is usable, else the
// CUDA runtime's error name and text (e.g. "cudaErrorInsufficientDriver: CUDA driver version is
// insufficient for CUDA runtime version") with the driver's and this build's CUDA versions.
std::string runtime_error_string();

// CUDA version the installed driver supports (e.g. 12040 for 12.4), 0 when no driver is found.
int driver_version() noexcept;

// How this module was built (module.cpp turns it into a dict, like the CPU module's build_info).
struct BuildInfo {
  std::string nvcc;       // nvcc version, e.g. "13.0.88"
  int cuda_runtime;       // CUDART_VERSION linked (statically), e.g. 13000; needs a driver for it
  std::string archs;      // GPU architectures compiled: FD_CUDA_ARCHS, else nvcc's list, e.g. "800,900"
};
BuildInfo build_info();

// ---- dmd_forward (dmd.cu) -----------------------------------------------------------------------

// Scratch bytes dmd_forward_cuda needs for (dtype, B, D): two arrays of B * n_chunks partial sums in
// the compute type. Depends on nothing else (no device query), so Python can size the workspace
// before the call. Throws std::invalid_argument for an unknown dtype or negative sizes.
int64_t dmd_workspace_bytes(int64_t dtype, int64_t B, int64_t D);

// The DMD loss forward (csrc/README.md, "dmd_forward"). Pointers are device pointers; real_uncond
// and guidance may be null; strides are in elements. Enqueues three kernels on `stream` and returns
// without synchronizing. Throws std::invalid_argument for arguments it can check (dtype, sizes,
// null pointers, a workspace that is too small or misaligned) and std::runtime_error naming the
// kernel when a launch fails (including "no driver / no device").
void dmd_forward_cuda(int64_t dtype, int64_t B, int64_t D,
                      const void* x, int64_t x_bstride,
                      const void* real, int64_t real_bstride,
                      const void* fake, int64_t fake_bstride,
                      const void* real_uncond, int64_t real_uncond_bstride,
                      const void* guidance, double guidance_scale, double eps,
                      void* g, void* loss,
                      void* workspace, int64_t workspace_bytes,
                      CUstream_st* stream);

// ---- grad_scale (grad_scale.cu) ------------------------------------------------------------------

// dst[i] = src[i] * (scale[0] * factor) in the compute type, rounded once (the CUDA twin of
// csrc/cpu/grad_scale.cpp); scale points to one value of the compute type, on the device.
void grad_scale_cuda(int64_t dtype, int64_t n, const void* src, void* dst, const void* scale, double factor,
                     CUstream_st* stream);

}  // namespace gpu
}  // namespace flashdistill
