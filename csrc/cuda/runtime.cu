// CUDA runtime queries for flashdistill._C_cuda: device count, why CUDA is unusable, build facts.
// Compiled by nvcc so that module.cpp (g++) needs no CUDA header. This module links the CUDA runtime
// statically: the errors below come from its own runtime instance, which no other library touches.

#include <cuda_runtime.h>

#include <string>

#include "ops.h"

// The architectures compiled: by default nvcc's own __CUDA_ARCH_LIST__ (nvcc >= 11.5; e.g. "800,900"
// for -gencode ...sm_80 -gencode ...sm_90), so the build needs to pass nothing. FD_CUDA_ARCHS, when
// defined, overrides it: bare tokens, stringified here, joined with '+' rather than ',' because nvcc
// splits -D values at commas (-DFD_CUDA_ARCHS=sm_80+sm_90 gives "sm_80+sm_90").
#define FD_STR_(...) #__VA_ARGS__
#define FD_STR(...) FD_STR_(__VA_ARGS__)
#if defined(FD_CUDA_ARCHS)
#define FD_ARCHS_STRING FD_STR(FD_CUDA_ARCHS)
#elif defined(__CUDA_ARCH_LIST__)
#define FD_ARCHS_STRING FD_STR(__CUDA_ARCH_LIST__)
#else
#define FD_ARCHS_STRING "unknown"
#endif

namespace flashdistill {
namespace gpu {
namespace {

std::string version_string(int v) {  // 12040 -> "12.4"
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

}  // namespace

int device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // leave no error behind for the next launch check
    return 0;
  }
  return n;
}

int driver_version() noexcept {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) {  // 0 and success when no driver is installed
    (void)cudaGetLastError();
    return 0;
  }
  return v;
}

std::string runtime_error_string() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e == cudaSuccess) return n > 0 ? std::string() : std::string("no CUDA device visible");
  (void)cudaGetLastError();
  std::string msg = std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
  const int drv = driver_version();
  msg += drv == 0 ? std::string(" (no CUDA driver found")
                  : " (the driver supports CUDA " + version_string(drv);
  msg += "; this module was built with CUDA " + version_string(CUDART_VERSION) + ")";
  return msg;
}

BuildInfo build_info() {
  return BuildInfo{FD_STR(__CUDACC_VER_MAJOR__) "." FD_STR(__CUDACC_VER_MINOR__) "." FD_STR(__CUDACC_VER_BUILD__),
                   CUDART_VERSION, FD_ARCHS_STRING};
}

}  // namespace gpu
}  // namespace flashdistill
