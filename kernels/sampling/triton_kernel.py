"""Triton twin of csrc/cpu/sampling.cpp (q_sample): x_t = alpha_b x0 + sigma_b eps, eps read or drawn
inline from the Philox stream (kernels/rng/triton_kernel.py's generator and layout: element
start + b * D + d). Each program a tile of BLOCK Philox blocks (4 flat elements each).

Traffic per element: read x0, write x_t (+ read eps, or write the drawn eps when asked); ~25 flops
and half a Box-Muller pair when drawing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashdistill.kernels import triton_utils
from flashdistill.kernels.rng.triton_kernel import _box_muller, _philox


@triton.jit
def _one(x0_ptr, x0_bs, a_ptr, s_ptr, noise_ptr, noise_bs, xt_ptr, nout_ptr, flat, eps, n, D,
         HAS_NOISE: tl.constexpr, WRITE_NOISE: tl.constexpr, C: tl.constexpr):
    mask = (flat >= 0) & (flat < n)
    f = tl.where(mask, flat, 0)
    b = f // D
    d = f - b * D
    a = tl.load(a_ptr + b, mask=mask, other=0.0).to(C)
    s = tl.load(s_ptr + b, mask=mask, other=0.0).to(C)
    x = tl.load(x0_ptr + b * x0_bs + d, mask=mask, other=0.0).to(C)
    if HAS_NOISE:
        eps = tl.load(noise_ptr + b * noise_bs + d, mask=mask, other=0.0).to(C)
    triton_utils.store_rounded(xt_ptr + f, a * x + s * eps, mask)
    if WRITE_NOISE:
        triton_utils.store_rounded(nout_ptr + f, eps, mask)


@triton.jit
def _q_sample_kernel(x0_ptr, x0_bs, a_ptr, s_ptr, noise_ptr, noise_bs, xt_ptr, nout_ptr, offset_ptr,
                     n, D, start, first_block, k0_in, k1_in,
                     HAS_NOISE: tl.constexpr, WRITE_NOISE: tl.constexpr, C: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    blk = first_block + pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    if HAS_NOISE:
        e0 = tl.zeros([BLOCK], C)
        e1 = e0
        e2 = e0
        e3 = e0
    else:
        off = tl.load(offset_ptr)
        zero = tl.zeros([BLOCK], tl.uint32)
        w0, w1, w2, w3 = _philox((blk & 0xFFFFFFFF).to(tl.uint32), (blk >> 32).to(tl.uint32),
                                 zero + (off & 0xFFFFFFFF).to(tl.uint32), zero + ((off >> 32) & 0xFFFFFFFF).to(tl.uint32),
                                 zero + k0_in.to(tl.uint32), zero + k1_in.to(tl.uint32))
        e0, e1 = _box_muller(w0, w1, C)
        e2, e3 = _box_muller(w2, w3, C)
    base = blk * 4 - start  # flat index of the block's element 0
    _one(x0_ptr, x0_bs, a_ptr, s_ptr, noise_ptr, noise_bs, xt_ptr, nout_ptr, base, e0, n, D, HAS_NOISE, WRITE_NOISE, C)
    _one(x0_ptr, x0_bs, a_ptr, s_ptr, noise_ptr, noise_bs, xt_ptr, nout_ptr, base + 1, e1, n, D, HAS_NOISE,
         WRITE_NOISE, C)
    _one(x0_ptr, x0_bs, a_ptr, s_ptr, noise_ptr, noise_bs, xt_ptr, nout_ptr, base + 2, e2, n, D, HAS_NOISE,
         WRITE_NOISE, C)
    _one(x0_ptr, x0_bs, a_ptr, s_ptr, noise_ptr, noise_bs, xt_ptr, nout_ptr, base + 3, e3, n, D, HAS_NOISE,
         WRITE_NOISE, C)


def q_sample(x0, alpha, sigma, noise, seed, offset, start, xt, noise_out):
    """x0 [B, D] (unit-stride rows), alpha / sigma [B] of the compute dtype, noise [B, D] or None."""
    B, D = x0.shape
    n = B * D
    if n == 0:
        return
    first = start // 4
    n_blocks = (start + n + 3) // 4 - first
    BLOCK = 256
    dummy = alpha
    with triton_utils.device_guard(x0):
        _q_sample_kernel[(triton.cdiv(n_blocks, BLOCK),)](
            x0, x0.stride(0), alpha, sigma, noise if noise is not None else dummy,
            noise.stride(0) if noise is not None else 0, xt, noise_out if noise_out is not None else dummy,
            offset, n, D, start, first, seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF,
            HAS_NOISE=noise is not None, WRITE_NOISE=noise_out is not None,
            C=triton_utils.tl_compute(x0.dtype), BLOCK=BLOCK, enable_fp_fusion=False)
