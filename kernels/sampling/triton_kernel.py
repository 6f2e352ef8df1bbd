"""Triton twin of csrc/cpu/sampling.cpp (affine_step: the sampler steps and q_sample):
out = kx x + k0 (ax x + ap cfg(p, p_u, w)) + kh h + kz z per element of [B, D] rows, z given or drawn inline
from the Philox stream (kernels/rng/triton_kernel.py's generator and layout: element start + b D + d).
Each program a tile of BLOCK Philox blocks (4 flat elements each).

Traffic per element: read x and the predictions (+ a given z), write out (+ x0, + the drawn z);
~10 flops, + a quarter Philox block and half a Box-Muller pair when drawing.
"""

from __future__ import annotations

import triton
import triton.language as tl

from flashdistill.kernels import triton_utils
from flashdistill.kernels.rng.triton_kernel import _box_muller, _philox


@triton.jit
def _element(x_ptr, x_bs, p_ptr, p_bs, pu_ptr, pu_bs, h_ptr, h_bs, w_ptr, w_scalar, coef_ptr, noise_ptr, noise_bs,
             out_ptr, x0_ptr, nout_ptr, flat, z, n, D,
             HAS_P: tl.constexpr, HAS_PU: tl.constexpr, HAS_H: tl.constexpr, W_PTR: tl.constexpr,
             HAS_NOISE: tl.constexpr,
             WRITE_X0: tl.constexpr, WRITE_NOISE: tl.constexpr, C: tl.constexpr):
    mask = (flat >= 0) & (flat < n)
    f = tl.where(mask, flat, 0)
    b = f // D
    d = f - b * D
    ax = tl.load(coef_ptr + 8 * b, mask=mask, other=0.0).to(C)
    ap = tl.load(coef_ptr + 8 * b + 1, mask=mask, other=0.0).to(C)
    kx = tl.load(coef_ptr + 8 * b + 2, mask=mask, other=0.0).to(C)
    k0 = tl.load(coef_ptr + 8 * b + 3, mask=mask, other=0.0).to(C)
    kh = tl.load(coef_ptr + 8 * b + 4, mask=mask, other=0.0).to(C)
    kz = tl.load(coef_ptr + 8 * b + 5, mask=mask, other=0.0).to(C)
    x = tl.load(x_ptr + b * x_bs + d, mask=mask, other=0.0).to(C)
    p = tl.zeros_like(x)
    if HAS_P:
        p = tl.load(p_ptr + b * p_bs + d, mask=mask, other=0.0).to(C)
        if HAS_PU:
            w = triton_utils.weight(w_ptr, w_scalar, b, W_PTR, C)
            u = tl.load(pu_ptr + b * pu_bs + d, mask=mask, other=0.0).to(C)
            p = u + w * (p - u)
    if HAS_NOISE:
        z = tl.load(noise_ptr + b * noise_bs + d, mask=mask, other=0.0).to(C)
    x0 = ax * x + ap * p
    o = kx * x + k0 * x0 + kz * z
    if HAS_H:
        o = o + kh * tl.load(h_ptr + b * h_bs + d, mask=mask, other=0.0).to(C)
    triton_utils.store_rounded(out_ptr + f, o, mask)
    if WRITE_X0:  # the secondary output qx x + q0 x0
        qx = tl.load(coef_ptr + 8 * b + 6, mask=mask, other=0.0).to(C)
        q0 = tl.load(coef_ptr + 8 * b + 7, mask=mask, other=0.0).to(C)
        triton_utils.store_rounded(x0_ptr + f, qx * x + q0 * x0, mask)
    if WRITE_NOISE:
        triton_utils.store_rounded(nout_ptr + f, z, mask)


# seed words: never specialized (Triton makes an int argument equal to 1 a constant, which has no .to())
@triton.jit(do_not_specialize=["k0_in", "k1_in"])
def _step_kernel(x_ptr, x_bs, p_ptr, p_bs, pu_ptr, pu_bs, h_ptr, h_bs, w_ptr, w_scalar, coef_ptr, noise_ptr, noise_bs,
                 out_ptr, x0_ptr, nout_ptr, offset_ptr, n, D, start, first_block, k0_in, k1_in,
                 HAS_P: tl.constexpr, HAS_PU: tl.constexpr, HAS_H: tl.constexpr, W_PTR: tl.constexpr,
                 HAS_NOISE: tl.constexpr,
                 DRAW: tl.constexpr, WRITE_X0: tl.constexpr, WRITE_NOISE: tl.constexpr, C: tl.constexpr,
                 BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    blk = first_block + pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    z0 = tl.zeros([BLOCK], C)
    z1 = z0
    z2 = z0
    z3 = z0
    if DRAW:
        off = tl.load(offset_ptr)
        zero = tl.zeros([BLOCK], tl.uint32)
        w0, w1, w2, w3 = _philox((blk & 0xFFFFFFFF).to(tl.uint32), (blk >> 32).to(tl.uint32),
                                 zero + (off & 0xFFFFFFFF).to(tl.uint32),
                                 zero + ((off >> 32) & 0xFFFFFFFF).to(tl.uint32),
                                 zero + k0_in.to(tl.uint32), zero + k1_in.to(tl.uint32))
        z0, z1 = _box_muller(w0, w1, C)
        z2, z3 = _box_muller(w2, w3, C)
    base = blk * 4 - start  # flat index of the block's element 0
    _element(x_ptr, x_bs, p_ptr, p_bs, pu_ptr, pu_bs, h_ptr, h_bs, w_ptr, w_scalar, coef_ptr, noise_ptr, noise_bs,
             out_ptr, x0_ptr, nout_ptr, base + 0, z0, n, D, HAS_P, HAS_PU, HAS_H, W_PTR, HAS_NOISE, WRITE_X0,
             WRITE_NOISE, C)
    _element(x_ptr, x_bs, p_ptr, p_bs, pu_ptr, pu_bs, h_ptr, h_bs, w_ptr, w_scalar, coef_ptr, noise_ptr, noise_bs,
             out_ptr, x0_ptr, nout_ptr, base + 1, z1, n, D, HAS_P, HAS_PU, HAS_H, W_PTR, HAS_NOISE, WRITE_X0,
             WRITE_NOISE, C)
    _element(x_ptr, x_bs, p_ptr, p_bs, pu_ptr, pu_bs, h_ptr, h_bs, w_ptr, w_scalar, coef_ptr, noise_ptr, noise_bs,
             out_ptr, x0_ptr, nout_ptr, base + 2, z2, n, D, HAS_P, HAS_PU, HAS_H, W_PTR, HAS_NOISE, WRITE_X0,
             WRITE_NOISE, C)
    _element(x_ptr, x_bs, p_ptr, p_bs, pu_ptr, pu_bs, h_ptr, h_bs, w_ptr, w_scalar, coef_ptr, noise_ptr, noise_bs,
             out_ptr, x0_ptr, nout_ptr, base + 3, z3, n, D, HAS_P, HAS_PU, HAS_H, W_PTR, HAS_NOISE, WRITE_X0,
             WRITE_NOISE, C)


def affine_step(x, p, pu, h, w_t, w, coef, noise, draw, seed, offset, start, out, x0_out, noise_out):
    """x, p, pu, h, noise: [B, D] with unit-stride rows (all but x may be None); coef [B, 8] and w_t [B]
    of the compute dtype (w_t may be None: the scalar w); out, x0_out, noise_out contiguous [B, D]."""
    B, D = x.shape
    n = B * D
    if n == 0:
        return
    first = start // 4
    n_blocks = (start + n + 3) // 4 - first
    BLOCK = 256
    dummy = coef

    def ptr(t):
        return (t, t.stride(0)) if t is not None else (dummy, 0)

    with triton_utils.device_guard(x):
        _step_kernel[(triton.cdiv(n_blocks, BLOCK),)](
            x, x.stride(0), *ptr(p), *ptr(pu), *ptr(h), w_t if w_t is not None else dummy, float(w), coef, *ptr(noise),
            out, x0_out if x0_out is not None else dummy, noise_out if noise_out is not None else dummy, offset,
            n, D, start, first, seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF,
            HAS_P=p is not None, HAS_PU=pu is not None, HAS_H=h is not None, W_PTR=w_t is not None, HAS_NOISE=noise is not None,
            DRAW=draw, WRITE_X0=x0_out is not None, WRITE_NOISE=noise_out is not None,
            C=triton_utils.tl_compute(x.dtype), BLOCK=BLOCK, enable_fp_fusion=False)
