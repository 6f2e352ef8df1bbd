"""K3/K5 regression sums and gradient in Triton (LCM, CM, iCT, ECT, DSM): deterministic, no atomics.

The math (csrc/README.md "K3/K5" and ``reference.sums`` / ``reference.grad`` are the spec)
---------------------------------------------------------------------------------------
For each sample b of [B, D] rows, in the compute type C (float32 for float32/float16/bfloat16 inputs,
float64 for float64 inputs):

    τ = t1                           without coef
    τ = c1_b t1 (+ c2_b t2)          with coef [B, 2] = (c1_b, c2_b); the t2 term only when t2 is given
    d = pred - τ
    forward:   sums[b] = sum_i d_i^2                       kind 0 (l2) and 2 (per-sample pseudo-Huber)
               sums[b] = sum_i (sqrt(d_i^2 + c^2) - c)     kind 1 (elementwise pseudo-Huber)
    backward:  gpred_i = k_b d_i                            kind 0 and 2
               gpred_i = k_b d_i / sqrt(d_i^2 + c^2)        kind 1

The Python side folds the reduction, the per-sample weight and grad_loss into k ([B] of C); gpred is
stored rounded to pred's dtype.

Passes
------
    forward   _k3_partials  grid (n_chunks, B): the partial sum over one chunk of row b -> ws[b, chunk]
              reduce_rows   grid (B,): each row of n_chunks partials summed in one fixed order (skipped
                            when n_chunks == 1: the partials are the sums; triton_utils.reduce_rows)
    backward  _k3_grad      grid (tiles, B): elementwise, one BLOCK per program
Every reduction runs in a fixed order for a given (B, D, dtype): deterministic run to run.

Memory traffic (s = bytes per element of the input dtype; T2 = 1 with coef and t2)
---------------------------------------------------------------------------------
    forward reads pred, t1, (t2):                  (2 + T2) s bytes/element; fp32 l2 8 B/elem
    backward reads pred, t1, (t2), writes gpred:   (3 + T2) s bytes/element; fp32 l2 12 B/elem
Flops per element, roughly: τ 0-3, d 1, square-add 2 (kind 1: + add, sqrt, sub ~4); backward k 1,
kind 1 + square-add, sqrt, div ~4: at most ~10, i.e. ~1 flop/byte in fp32: memory bound; kind 1's
IEEE sqrt and division (tens of instructions each on NVIDIA) stay below the memory time at fp32 rates.

Numerics
--------
Loads are upcast to C before any arithmetic; accumulators are in C; the operation order is the
reference's (``sqrt(d*d + c*c) - c`` with c*c formed in float64 on the host and rounded once to C, as
torch does with a Python scalar; ``(k d) / sqrt(...)``). sqrt and division are IEEE round-to-nearest
(``triton_utils.sqrt_rn`` and ``div_rn`` for fp32: plain ``tl.sqrt`` and ``/`` lower to approximate
instructions on NVIDIA; fp64 ``sqrt`` and ``/`` are already correctly rounded). bfloat16 stores round
to nearest even by hand (``triton_utils.round_out``), NaN passed through. Every launch passes enable_fp_fusion=False:
no c1 t1 + c2 t2 or d d + c^2 contracted into an FMA (Triton's default, as nvcc's), so each operation
rounds as in the reference. Offsets are int64 (b * batch_stride can exceed 2^31).

No host synchronization: shapes and flags alone decide the launch configuration.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashdistill.kernels import native, triton_utils

__all__ = ["forward", "backward"]


# ----------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _diff(pred_row, t1_row, t2_row, offs, mask, c1, c2,
          HAS_COEF: tl.constexpr, HAS_T2: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """d = pred - τ in the compute type (τ = t1, or c1 t1 (+ c2 t2))."""
    pred = tl.load(pred_row + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    tau = tl.load(t1_row + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    if HAS_COEF:
        tau = c1 * tau
        if HAS_T2:
            t2 = tl.load(t2_row + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
            tau = tau + c2 * t2
    return pred - tau


@triton.jit
def _coefs(coef_ptr, b, HAS_COEF: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """(c1_b, c2_b) in the compute type: coef[b] when given, else (1, 0) (unused then)."""
    c1 = tl.full([], 1.0, COMPUTE_DTYPE)
    c2 = tl.full([], 0.0, COMPUTE_DTYPE)
    if HAS_COEF:
        c1 = tl.load(coef_ptr + 2 * b).to(COMPUTE_DTYPE)
        c2 = tl.load(coef_ptr + 2 * b + 1).to(COMPUTE_DTYPE)
    return c1, c2


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _k3_partials(
    # data (each [B, D] pointer followed by its batch stride, in elements; rows are unit-stride)
    pred_ptr, pred_bstride,
    t1_ptr, t1_bstride,
    t2_ptr, t2_bstride,                     # unused unless HAS_T2
    coef_ptr,                               # [B, 2] (c1_b, c2_b), unused unless HAS_COEF
    ws_ptr,                                 # out: [B, n_chunks] partial sums
    # scalars
    c: tl.float64, cc: tl.float64,          # kind 1's c and c * c (host float64)
    # shapes
    D, chunk_size, n_chunks,                # row length; elements per program (multiple of BLOCK)
    # compile-time
    HAS_COEF: tl.constexpr, HAS_T2: tl.constexpr,
    KIND: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)

    c1, c2 = _coefs(coef_ptr, b, HAS_COEF, COMPUTE_DTYPE)
    c_c = tl.full([], c, COMPUTE_DTYPE)
    cc_c = tl.full([], cc, COMPUTE_DTYPE)
    pred_row = pred_ptr + b * pred_bstride
    t1_row = t1_ptr + b * t1_bstride
    t2_row = t2_ptr + b * t2_bstride

    start = chunk * chunk_size
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=COMPUTE_DTYPE)
    for t in range(0, chunk_size, BLOCK):
        offs = start + t + cols
        mask = offs < D
        d = _diff(pred_row, t1_row, t2_row, offs, mask, c1, c2, HAS_COEF, HAS_T2, COMPUTE_DTYPE)
        if KIND == 1:
            v = triton_utils.sqrt_rn(d * d + cc_c, COMPUTE_DTYPE) - c_c
        else:
            v = d * d
        acc += tl.where(mask, v, 0.0)
    tl.store(ws_ptr + b * n_chunks + chunk, tl.sum(acc, axis=0))


@triton.jit
def _k3_grad(
    # data (each [B, D] pointer followed by its batch stride, in elements; rows are unit-stride)
    pred_ptr, pred_bstride,
    t1_ptr, t1_bstride,
    t2_ptr, t2_bstride,                     # unused unless HAS_T2
    coef_ptr,                               # [B, 2] (c1_b, c2_b), unused unless HAS_COEF
    k_ptr,                                  # [B] k_b
    g_ptr,                                  # out: contiguous [B, D] of pred's dtype
    # scalars
    cc: tl.float64,                         # kind 1's c * c (host float64)
    # shapes
    D,
    # compile-time
    HAS_COEF: tl.constexpr, HAS_T2: tl.constexpr,
    KIND: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    tile = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)

    c1, c2 = _coefs(coef_ptr, b, HAS_COEF, COMPUTE_DTYPE)
    k = tl.load(k_ptr + b).to(COMPUTE_DTYPE)

    offs = tile * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    d = _diff(pred_ptr + b * pred_bstride, t1_ptr + b * t1_bstride, t2_ptr + b * t2_bstride, offs, mask,
              c1, c2, HAS_COEF, HAS_T2, COMPUTE_DTYPE)
    g = k * d
    if KIND == 1:
        g = triton_utils.div_rn(g, triton_utils.sqrt_rn(d * d + tl.full([], cc, COMPUTE_DTYPE), COMPUTE_DTYPE),
                                COMPUTE_DTYPE)
    triton_utils.store_rounded(g_ptr + b * D + offs, g, mask)


# ----------------------------------------------------------------------------------------------------
# Launchers (launch heuristic: triton_utils' defaults)
# ----------------------------------------------------------------------------------------------------

_OP = "regression"
_KINDS = (0, 1, 2)


def _check(pred2, t12, t22, coef, kind, k=None):
    triton_utils.check_lead(_OP, "pred", pred2)
    if kind not in _KINDS:
        raise ValueError(f"regression (triton): kind must be one of {_KINDS}, got {kind!r}")
    for name, t in (("pred", pred2), ("t1", t12), ("t2", t22)):
        triton_utils.check_rows(_OP, name, t, "pred", pred2)
    B = pred2.shape[0]
    cdt = triton_utils.compute_dtype(pred2.dtype)
    for name, t, shape in (("coef", coef, (B, 2)), ("k", k, (B,))):
        triton_utils.check_per_sample(_OP, name, t, shape, cdt, pred2.device)
    return cdt


def forward(pred2, t12, t22, coef, kind: int, c: float) -> torch.Tensor:
    """sums [B] of the compute dtype: sum d^2 (kind 0, 2) or sum sqrt(d^2 + c^2) - c (kind 1).

    [B, D] inputs with unit-stride rows (any stride(0)); ``t22`` and ``coef`` ([B, 2] of the compute
    dtype) may be None; t2 counts only with coef. Launch-only: no host synchronization.
    """
    cdt = _check(pred2, t12, t22, coef, kind)
    B, D = pred2.shape
    sums = native.empty((B,), cdt, pred2.device)
    if B == 0 or D == 0:  # shape-only branch: sums over no elements
        return sums.zero_()

    block, chunk_size, n_chunks = triton_utils.launch_config(B, D)
    ws = sums.view(B, 1) if n_chunks == 1 else torch.empty((B, n_chunks), dtype=cdt, device=pred2.device)
    has_coef = coef is not None
    has_t2 = has_coef and t22 is not None
    t2 = t22 if has_t2 else None
    c = float(c)
    rows, vec = triton_utils.rows, triton_utils.vec  # absent inputs -> dummy pointers pred2, ws, never read
    with triton_utils.device_guard(pred2):
        for b0, b1 in triton_utils.row_batches(B):  # more than one launch only when B > 65535
            _k3_partials[(n_chunks, b1 - b0)](
                *rows(pred2, b0, b1, pred2), *rows(t12, b0, b1, pred2), *rows(t2, b0, b1, pred2),
                vec(coef, b0, b1, ws), ws[b0:b1],
                c, c * c,
                D, chunk_size, n_chunks,
                HAS_COEF=has_coef, HAS_T2=has_t2, KIND=int(kind), COMPUTE_DTYPE=triton_utils.tl_compute(cdt),
                BLOCK=block, num_warps=triton_utils.NUM_WARPS, enable_fp_fusion=False,
            )
        if n_chunks > 1:
            triton_utils.sum_partials(ws, sums, B, n_chunks)
    return sums


def backward(pred2, t12, t22, coef, kind: int, c: float, k) -> torch.Tensor:
    """gpred: a new contiguous [B, D] tensor of pred's dtype; k is [B] of the compute dtype.

    Launch-only: no host synchronization.
    """
    _check(pred2, t12, t22, coef, kind, k)
    B, D = pred2.shape
    g = native.empty((B, D), pred2.dtype, pred2.device)
    if B == 0 or D == 0:
        return g

    block = triton_utils.block_size(D)
    has_coef = coef is not None
    has_t2 = has_coef and t22 is not None
    t2 = t22 if has_t2 else None
    c = float(c)
    rows, vec = triton_utils.rows, triton_utils.vec  # absent inputs -> dummy pointers pred2, k, never read
    with triton_utils.device_guard(pred2):
        for b0, b1 in triton_utils.row_batches(B):  # more than one launch only when B > 65535
            _k3_grad[(triton_utils.cdiv(D, block), b1 - b0)](
                *rows(pred2, b0, b1, pred2), *rows(t12, b0, b1, pred2), *rows(t2, b0, b1, pred2),
                vec(coef, b0, b1, k), k[b0:b1], g[b0:b1],
                c * c,
                D,
                HAS_COEF=has_coef, HAS_T2=has_t2, KIND=int(kind), COMPUTE_DTYPE=triton_utils.tl_compute(pred2.dtype),
                BLOCK=block, num_warps=triton_utils.NUM_WARPS, enable_fp_fusion=False,
            )
    return g
