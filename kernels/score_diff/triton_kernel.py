"""DMD / DMD2 generator loss and gradient in Triton: two deterministic passes, no atomics.

The math (csrc/README.md and ``kernels/score_diff/reference.py`` are the spec; this backend computes the same)
-----------------------------------------------------------------------------------------------------
Distribution Matching Distillation (Yin et al. 2023, Eq. 8), as kept by DMD2 (Yin et al. 2024). For
each sample b of x, real, fake (and real_uncond), viewed as B rows of D elements, in the compute type
(float32 for float32/float16/bfloat16 inputs, float64 for float64 inputs):

    r    = real_uncond + w_b (real - real_uncond)   when guided (classifier-free guidance, Ho & Salimans
                                                    2022); w_b = guidance[b] or guidance_scale
    r    = real                                     otherwise
    n_b  = max(mean_i |x - r|, eps)                 NaN passes through (a NaN mean stays NaN)
    g    = nan_to_num((fake - r) / n_b)             as torch.nan_to_num in the compute type:
                                                    NaN -> 0, +-inf -> +-FLT_MAX (DBL_MAX for fp64)
    loss = 0.5 * sum(g^2) / N,  N = B * D           g^2 of the unrounded g

g is stored rounded to x's dtype (so +-FLT_MAX becomes +-inf in float16/bfloat16, as the C++ backends
do); the loss comes back as a 0-d tensor of the compute type.

Why two passes
--------------
n_b is a reduction over the whole row and every g of the row divides by it, so n_b must be final
before the first g is written. A single pass would have to either keep the row on chip (impossible for
large D) or write the unscaled fake - r into g and rescale it afterwards: that is still a second pass
(a read+write of g instead of a read of real/fake), and it rounds twice, to x's dtype and again after
the division, so g and the nan_to_num of (fake - r) / n_b (inf only from the final quotient) would no
longer be the spec's. So:

    kernel 1  _dmd_norm_partials  grid (n_chunks, B): partial sums of |x - r| over one chunk of row b
                                  -> ws1[b, chunk]
    kernel 2  _dmd_grad           grid (n_chunks, B): n_b = max(sum(ws1[b, :]) / D, eps) (every program
                                  of row b reduces the same partials in the same order, so all agree
                                  bit for bit), then g for its chunk -> g, and sum(g^2) -> ws2[b, chunk]
    torch                         loss = ws2.sum() * (0.5 / N)

Both reductions run in a fixed order for a given (B, D, dtype), so results are deterministic run to
run (they may differ in the last bits from the C++ backends, which sum in another order).

Memory traffic (s = bytes per element of the input dtype; U = 1 with real_uncond, else 0)
-----------------------------------------------------------------------------------------
    kernel 1 reads x, real, (uncond):            (2 + U) s bytes/element
    kernel 2 reads real, (uncond), fake, writes g: (3 + U) s bytes/element
    total (5 + 2U) s: fp32 guided 28 B/elem, fp32 unguided 20 B/elem, bf16 guided 14 B/elem.
    The workspaces (2 * B * n_chunks values) and the n_chunks partials each kernel-2 program re-reads
    (from L2) are kept small relative to this by the launch heuristic (CHUNK >= 8 * n_chunks).
Flops per element, roughly: r 3 (guided, in each kernel), kernel 1 |x - r| + add 3, kernel 2
sub + div + 3 compare/selects for nan_to_num + square-add 2: ~10-16 per element, i.e. ~0.5 flop/byte
in fp32 and ~1 in bf16, far below the ~20 flop/byte at which an H100's fp32 (non-tensor-core) math
would become the limit: both kernels are memory bound. Kernel 2 recomputes r from
real and uncond (2s bytes/element when guided) rather than having kernel 1 store r for it (a write and
a read, also 2s): the same traffic, without a [B, D] scratch buffer.

Numerics
--------
Loads are upcast to the compute type before any arithmetic; accumulators are in the compute type.
Divisions use IEEE round-to-nearest (``tl.math.div_rn`` for fp32: a plain ``/`` lowers to the
approximate ``div.full.f32`` on NVIDIA; fp64 ``/`` is already ``div.rn.f64``). eps and guidance_scale
are passed as float64 kernel arguments and rounded once to the compute type inside the kernels.
g is rounded to x's dtype to nearest even (bfloat16 by hand, see ``triton_utils.round_to``). On a GPU the compiler
may contract uncond + w (real - uncond) into one FMA (Triton's default, as nvcc's), so r can differ
from an unfused evaluation in its last bit.
Offsets are int64 (b * batch_stride can exceed 2^31).

No host synchronization: shapes alone decide the launch configuration, so ``dmd_forward`` can be
captured in a CUDA graph (after a warm-up call has compiled the kernels).
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from flashdistill.kernels import native, triton_utils

__all__ = ["dmd_forward"]


# ----------------------------------------------------------------------------------------------------
# Device helpers (inlined into both kernels, so that both compute r identically)
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _guidance_weight(guidance_ptr, guidance_stride, guidance_scale, b,
                     PER_SAMPLE_GUIDANCE: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """w_b in the compute type: guidance[b] if per-sample, else the scalar guidance_scale."""
    if PER_SAMPLE_GUIDANCE:
        w = tl.load(guidance_ptr + b * guidance_stride).to(COMPUTE_DTYPE)
    else:
        w = tl.full([], guidance_scale, COMPUTE_DTYPE)
    return w


@triton.jit
def _target(real_row, uncond_row, offs, mask, w,
            HAS_UNCOND: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """r = uncond + w (real - uncond) when guided, else real; in the compute type."""
    real = tl.load(real_row + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    if HAS_UNCOND:
        uncond = tl.load(uncond_row + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        r = uncond + w * (real - uncond)
    else:
        r = real
    return r


@triton.jit
def _dmd_norm_partials(
    # data (each pointer followed by its batch stride, in elements; rows are unit-stride)
    x_ptr, x_bstride,
    real_ptr, real_bstride,
    uncond_ptr, uncond_bstride,             # unused unless HAS_UNCOND
    guidance_ptr, guidance_stride,          # unused unless PER_SAMPLE_GUIDANCE
    ws1_ptr, ws1_bstride,                   # out: [B, n_chunks] partial sums of |x - r|
    # scalars
    guidance_scale: tl.float64,             # w when not PER_SAMPLE_GUIDANCE
    # shapes
    D, chunk_size,                          # row length; elements per program (multiple of BLOCK)
    # compile-time
    HAS_UNCOND: tl.constexpr,
    PER_SAMPLE_GUIDANCE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)

    w = _guidance_weight(guidance_ptr, guidance_stride, guidance_scale, b, PER_SAMPLE_GUIDANCE, COMPUTE_DTYPE)
    x_row = x_ptr + b * x_bstride
    real_row = real_ptr + b * real_bstride
    uncond_row = uncond_ptr + b * uncond_bstride

    start = chunk * chunk_size
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=COMPUTE_DTYPE)
    for t in range(0, chunk_size, BLOCK):
        offs = start + t + cols
        mask = offs < D
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        r = _target(real_row, uncond_row, offs, mask, w, HAS_UNCOND, COMPUTE_DTYPE)
        acc += tl.where(mask, tl.abs(x - r), 0.0)
    tl.store(ws1_ptr + b * ws1_bstride + chunk, tl.sum(acc, axis=0))


@triton.jit
def _dmd_grad(
    # data (each pointer followed by its batch stride, in elements; rows are unit-stride)
    real_ptr, real_bstride,
    uncond_ptr, uncond_bstride,             # unused unless HAS_UNCOND
    fake_ptr, fake_bstride,
    guidance_ptr, guidance_stride,          # unused unless PER_SAMPLE_GUIDANCE
    ws1_ptr, ws1_bstride,                   # in: [B, n_chunks] from _dmd_norm_partials
    g_ptr, g_bstride,                       # out: g in x's dtype
    ws2_ptr, ws2_bstride,                   # out: [B, n_chunks] partial sums of g^2 (unrounded g)
    # scalars
    guidance_scale: tl.float64,             # w when not PER_SAMPLE_GUIDANCE
    eps: tl.float64,                        # floor of n_b
    # shapes
    D, chunk_size, n_chunks,                # row length; elements per program; programs per row
    # compile-time
    HAS_UNCOND: tl.constexpr,
    PER_SAMPLE_GUIDANCE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNKS_POW2: tl.constexpr,              # power of two >= n_chunks
):
    chunk = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)

    # n_b: every program of row b sums the same partials in the same order -> identical n_b.
    ci = tl.arange(0, CHUNKS_POW2)
    parts = tl.load(ws1_ptr + b * ws1_bstride + ci, mask=ci < n_chunks, other=0.0)
    total = tl.sum(parts, axis=0)
    mean = triton_utils.div_rn(total, tl.full([], D, COMPUTE_DTYPE), COMPUTE_DTYPE)
    eps_c = tl.full([], eps, COMPUTE_DTYPE)
    n_b = tl.where(mean < eps_c, eps_c, mean)  # max(mean, eps), NaN passes through

    w = _guidance_weight(guidance_ptr, guidance_stride, guidance_scale, b, PER_SAMPLE_GUIDANCE, COMPUTE_DTYPE)
    real_row = real_ptr + b * real_bstride
    uncond_row = uncond_ptr + b * uncond_bstride
    fake_row = fake_ptr + b * fake_bstride
    g_row = g_ptr + b * g_bstride

    start = chunk * chunk_size
    cols = tl.arange(0, BLOCK)
    n_vec = tl.full([BLOCK], 0.0, COMPUTE_DTYPE) + n_b
    acc = tl.zeros([BLOCK], dtype=COMPUTE_DTYPE)
    for t in range(0, chunk_size, BLOCK):
        offs = start + t + cols
        mask = offs < D
        r = _target(real_row, uncond_row, offs, mask, w, HAS_UNCOND, COMPUTE_DTYPE)
        fake = tl.load(fake_row + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        g = triton_utils.nan_to_num(triton_utils.div_rn(fake - r, n_vec, COMPUTE_DTYPE), COMPUTE_DTYPE)
        tl.store(g_row + offs, triton_utils.round_to(g, g_ptr.dtype.element_ty), mask=mask)
        acc += tl.where(mask, g * g, 0.0)
    tl.store(ws2_ptr + b * ws2_bstride + chunk, tl.sum(acc, axis=0))


# ----------------------------------------------------------------------------------------------------
# Launch heuristic (static: depends only on B and D; the constants are tuning unless marked otherwise)
# ----------------------------------------------------------------------------------------------------

_MAX_BLOCK = 1024        # tuning: elements per tile (8 per thread at 4 warps: 16-byte loads for 16-bit)
_MIN_BLOCK = 128         # tuning: one element per thread at 4 warps
_NUM_WARPS = 4           # tuning
_TARGET_PROGRAMS = 528   # tuning: ~4 programs per SM on a 132-SM H100, summed over the B rows
_MAX_CHUNKS = 1024       # cap on programs per row (kernel 2 re-reads all n_chunks partials of its row)
_MAX_GRID_Y = 65535      # CUDA limit on gridDim.y (rows per launch); correctness, not tuning


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _launch_config(B: int, D: int) -> tuple[int, int, int]:
    """(BLOCK, chunk_size, n_chunks) for B rows of D elements; chunk_size is a multiple of BLOCK."""
    block = min(_MAX_BLOCK, max(_MIN_BLOCK, triton.next_power_of_2(D)))
    tiles = _cdiv(D, block)
    tiles_per_chunk = max(
        _cdiv(tiles, _cdiv(_TARGET_PROGRAMS, B)),  # enough programs to fill the GPU, no more
        _cdiv(tiles, _MAX_CHUNKS),
        # keep the chunk >= 8 * n_chunks elements so that kernel 2's re-read of the row's n_chunks
        # partials stays a few percent of its traffic: tpc * block >= 8 * tiles / tpc
        math.isqrt(max(_cdiv(8 * tiles, block), 1) - 1) + 1,
    )
    n_chunks = _cdiv(tiles, tiles_per_chunk)
    return block, tiles_per_chunk * block, n_chunks


# ----------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_rows(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    if t.dim() != 2 or t.shape != x.shape or t.dtype != x.dtype or t.device != x.device:
        raise ValueError(f"dmd_forward (triton): '{name}' must be [B, D] like x {tuple(x.shape)} {x.dtype} "
                         f"{x.device}; got {tuple(t.shape)} {t.dtype} {t.device}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"dmd_forward (triton): '{name}' rows must be unit-stride (stride(1) == 1); "
                         f"got strides {t.stride()}")


def dmd_forward(x: torch.Tensor, real: torch.Tensor, fake: torch.Tensor,
                real_uncond: torch.Tensor | None, guidance: torch.Tensor | None,
                guidance_scale: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, g) of the DMD forward for [B, D] inputs whose rows are unit-stride (any stride(0)).

    ``real_uncond`` enables guidance with w = ``guidance`` (a [B] tensor of the compute dtype) or, when
    ``guidance`` is None, the float ``guidance_scale``. Returns the loss as a 0-d tensor of the compute
    dtype and g as a new contiguous [B, D] tensor of x's dtype. Launch-only: no host synchronization.
    """
    if x.dtype not in _DTYPES or x.dim() != 2:
        raise ValueError(f"dmd_forward (triton): x must be a 2-D float tensor, got {tuple(x.shape)} {x.dtype}")
    for name, t in (("x", x), ("real", real), ("fake", fake)):
        _check_rows(name, t, x)
    if real_uncond is not None:
        _check_rows("real_uncond", real_uncond, x)
    B, D = x.shape
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    if guidance is not None:
        if real_uncond is None:
            raise ValueError("dmd_forward (triton): per-sample guidance needs real_uncond")
        if guidance.shape != (B,) or guidance.dtype != cdt or guidance.device != x.device:
            raise ValueError(f"dmd_forward (triton): guidance must be [{B}] of {cdt} on {x.device}; got "
                             f"{tuple(guidance.shape)} {guidance.dtype} {guidance.device}")

    g = native.empty((B, D), x.dtype, x.device)
    if B == 0 or D == 0:  # shape-only branch; the reference's mean over nothing is NaN
        return torch.full((), float("nan"), dtype=cdt, device=x.device), g

    block, chunk_size, n_chunks = _launch_config(B, D)
    ws = torch.empty((2, B, n_chunks), dtype=cdt, device=x.device)
    ws1, ws2 = ws[0], ws[1]

    has_uncond = real_uncond is not None
    per_sample = guidance is not None
    uncond = real_uncond if has_uncond else x          # dummy pointer, never read
    gvec = guidance if per_sample else ws1             # dummy pointer, never read
    gstride = guidance.stride(0) if per_sample else 0
    compute = tl.float64 if cdt == torch.float64 else tl.float32
    scale = float(guidance_scale)
    eps = float(eps)

    guard = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with guard:
        for b0 in range(0, B, _MAX_GRID_Y):  # more than one launch pair only when B > 65535
            b1 = min(B, b0 + _MAX_GRID_Y)
            grid = (n_chunks, b1 - b0)
            xs, rs, fs, us = x[b0:b1], real[b0:b1], fake[b0:b1], uncond[b0:b1]
            gs = gvec[b0:b1] if per_sample else gvec
            w1, w2, go = ws1[b0:b1], ws2[b0:b1], g[b0:b1]
            _dmd_norm_partials[grid](
                xs, xs.stride(0), rs, rs.stride(0), us, us.stride(0) if has_uncond else 0,
                gs, gstride, w1, w1.stride(0),
                scale,
                D, chunk_size,
                HAS_UNCOND=has_uncond, PER_SAMPLE_GUIDANCE=per_sample, COMPUTE_DTYPE=compute,
                BLOCK=block, num_warps=_NUM_WARPS,
            )
            _dmd_grad[grid](
                rs, rs.stride(0), us, us.stride(0) if has_uncond else 0, fs, fs.stride(0),
                gs, gstride, w1, w1.stride(0), go, go.stride(0), w2, w2.stride(0),
                scale, eps,
                D, chunk_size, n_chunks,
                HAS_UNCOND=has_uncond, PER_SAMPLE_GUIDANCE=per_sample, COMPUTE_DTYPE=compute,
                BLOCK=block, CHUNKS_POW2=triton.next_power_of_2(n_chunks), num_warps=_NUM_WARPS,
            )
    loss = ws2.sum() * (0.5 / (B * D))
    return loss, g
