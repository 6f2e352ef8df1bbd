// Entry points of the CPU extension module flashdistill._C, one per op; module.cpp binds each with
// one m.def. Arguments follow the ABI in csrc/README.md: data pointers as integers, sizes and
// strides in elements, a dtype code (common.h::DType). The functions trust their arguments (the
// Python side validates them) and throw std::invalid_argument only for an unknown dtype code.
#pragma once

#include <cstdint>

namespace flashdistill {
namespace cpu {

// Fused DMD loss forward (math: include/flashdistill/dmd.h). Writes g [B, D] (contiguous, dtype)
// and loss (one value of the compute type). workspace and stream are unused on the CPU.
void dmd_forward(int64_t dtype, int64_t B, int64_t D,
                 uintptr_t x, int64_t x_bstride,
                 uintptr_t real, int64_t real_bstride,
                 uintptr_t fake, int64_t fake_bstride,
                 uintptr_t real_uncond, int64_t real_uncond_bstride,
                 uintptr_t guidance, double guidance_scale, double eps,
                 uintptr_t g, uintptr_t loss,
                 uintptr_t workspace, int64_t workspace_bytes,
                 uintptr_t stream);

// Scratch bytes dmd_forward needs from the caller: 0 on the CPU (it allocates its own few bytes).
int64_t dmd_workspace_bytes(int64_t dtype, int64_t B, int64_t D);

// dst[i] = src[i] * (scale[0] * factor) in the compute type, rounded once (grad_scale.cpp): the
// backward of losses that save dloss/dx up to the upstream scalar. scale points to one value of the
// compute type.
void grad_scale(int64_t dtype, int64_t n, uintptr_t src, uintptr_t dst, uintptr_t scale, double factor);

}  // namespace cpu
}  // namespace flashdistill
