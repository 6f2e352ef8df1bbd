"""K2 score-identity sums and gradients in Triton (SiD, SIM, SFD): deterministic, no atomics.

The math (csrc/README.md "K2" and ``reference.sums`` / ``reference.grads`` are the spec)
------------------------------------------------------------------------------------
For each sample b of [B, D] rows, in the compute type C (float32 for float32/float16/bfloat16 inputs,
float64 for float64 inputs), with classifier-free guidance (Ho & Salimans 2022) on either prediction:

    r̄ = r_u + wr_b (r - r_u)  with r_u, else r;   f̄ likewise (w_b = w_t[b] if given, else the float)
    y = r̄ - f̄,   u = f̄ - x
    forward:   sums[b] = (sum_i |x_i - r̄_i|,  sum_i y_i^2,  sum_i y_i u_i)        [B, 3] of C
    backward:  Gx = -P_b y,   Gr = P_b u + Q_b y,   Gf = -(Gx + Gr)   (coef [B, 2] = (P_b, Q_b))
               gx = Gx;  gr = Gr, or with r_u: gr = wr_b Gr, gr_u = (1 - wr_b) Gr;  gf, gf_u alike
               a sample with P_b = Q_b = 0 (dropped) writes exact zeros, whatever its inputs hold

The Python side turns the sums into the loss and (P_b, Q_b) with [B]-sized tensor ops; the gradients
are stored rounded to x's dtype.

Passes
------
    forward   _k2_partials  grid (n_chunks, B): the three partial sums over one chunk of row b
                            -> ws[b, k, chunk]
              reduce_rows   grid (3 B,): each [b, k] row of n_chunks partials summed in one fixed order
                            (skipped when n_chunks == 1: the partials are the sums; triton_utils.reduce_rows)
    backward  _k2_grads     grid (tiles, B): elementwise, one BLOCK per program
Every reduction runs in a fixed order for a given (B, D, dtype): deterministic run to run.

Memory traffic (s = bytes per element of the input dtype; Ur, Uf = 1 with r_u, f_u; n = outputs wanted)
------------------------------------------------------------------------------------------------------
    forward reads x, r, (r_u), f, (f_u):             (3 + Ur + Uf) s bytes/element; unguided fp32 12 B
    backward reads r, (r_u), f, (f_u), x (unless only gx is wanted), writes n of 5 outputs:
                                                     (3 + Ur + Uf + n) s; SiD-LSG fp32 (all 5) 40 B/elem,
                                                     unguided fp32 with gx, gr, gf 24 B/elem
Flops per element, roughly: forward 2 cfg 6, sub 2, abs-add 2, 2 fma-adds 4: ~14; backward cfg 6,
y, u 2, Gx 1, Gr 3, Gf 2, w splits 2-4, dropped selects 5: ~20. At most ~1 flop/byte in fp32 and ~2 in
bf16: memory bound on any GPU.

Numerics
--------
Loads are upcast to C before any arithmetic; accumulators are in C; the operation order is the
reference's. The scalar guidance w and its complement 1 - w are computed in float64 on the host and
rounded once to C in the kernel (the reference's ``(1 - w) * G`` with a Python float w); a per-sample
w gives 1 - w in C. bfloat16 stores round to nearest even by hand (``triton_utils.round_out``), NaN
passed through. Every launch passes enable_fp_fusion=False: no product and sum contracted into an
FMA (Triton's default, as nvcc's), so each operation rounds as in the reference (with cancellation in
y or in P u + Q y an FMA would move the result by many ulps of it). Offsets are int64
(b * batch_stride can exceed 2^31).

No host synchronization: shapes and flags alone decide the launch configuration.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashdistill.kernels import native, triton_utils

__all__ = ["forward", "backward"]


# ----------------------------------------------------------------------------------------------------
# Device helpers (the shared ones, guidance and rounding, are in triton_utils)
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _store(ptrs, v, dropped, mask):
    """v (exact zeros for a dropped sample) rounded to the output's dtype."""
    triton_utils.store_rounded(ptrs, tl.where(dropped, 0.0, v), mask)


@triton.jit
def _weight_c(w, w_c, PER_SAMPLE: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """1 - w_b: in the compute type from a per-sample w_b, else the host's float64 1 - w rounded once."""
    if PER_SAMPLE:
        c = 1 - w
    else:
        c = tl.full([], w_c, COMPUTE_DTYPE)
    return c


@triton.jit
def _store_split(g_ptr, gu_ptr, out, G, w, w_c, dropped, mask,
                 HAS_U: tl.constexpr, NEED_G: tl.constexpr, NEED_GU: tl.constexpr):
    """The gradient G of a guided prediction split over p and p_u: w G and (1 - w) G; G itself unguided."""
    if NEED_G:
        v = G
        if HAS_U:
            v = w * G
        _store(g_ptr + out, v, dropped, mask)
    if NEED_GU:
        _store(gu_ptr + out, w_c * G, dropped, mask)


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _k2_partials(
    # data (each [B, D] pointer followed by its batch stride, in elements; rows are unit-stride)
    x_ptr, x_bstride,
    r_ptr, r_bstride,
    ru_ptr, ru_bstride,                     # unused unless HAS_RU
    wr_ptr,                                 # [B], unused unless PER_SAMPLE_WR
    f_ptr, f_bstride,
    fu_ptr, fu_bstride,                     # unused unless HAS_FU
    wf_ptr,                                 # [B], unused unless PER_SAMPLE_WF
    ws_ptr,                                 # out: [B, 3, n_chunks] partial sums
    # scalars
    wr: tl.float64, wf: tl.float64,         # w of r, f when not per-sample
    # shapes
    D, chunk_size, n_chunks,                # row length; elements per program (multiple of BLOCK)
    # compile-time
    HAS_RU: tl.constexpr, PER_SAMPLE_WR: tl.constexpr,
    HAS_FU: tl.constexpr, PER_SAMPLE_WF: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)

    wrv = triton_utils.weight(wr_ptr, wr, b, PER_SAMPLE_WR, COMPUTE_DTYPE)
    wfv = triton_utils.weight(wf_ptr, wf, b, PER_SAMPLE_WF, COMPUTE_DTYPE)
    x_row = x_ptr + b * x_bstride
    r_row = r_ptr + b * r_bstride
    ru_row = ru_ptr + b * ru_bstride
    f_row = f_ptr + b * f_bstride
    fu_row = fu_ptr + b * fu_bstride

    start = chunk * chunk_size
    cols = tl.arange(0, BLOCK)
    acc_abs = tl.zeros([BLOCK], dtype=COMPUTE_DTYPE)
    acc_yy = tl.zeros([BLOCK], dtype=COMPUTE_DTYPE)
    acc_yu = tl.zeros([BLOCK], dtype=COMPUTE_DTYPE)
    for t in range(0, chunk_size, BLOCK):
        offs = start + t + cols
        mask = offs < D
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        rb = triton_utils.cfg(r_row, ru_row, offs, mask, wrv, HAS_RU, COMPUTE_DTYPE)
        fb = triton_utils.cfg(f_row, fu_row, offs, mask, wfv, HAS_FU, COMPUTE_DTYPE)
        y = rb - fb
        u = fb - x
        acc_abs += tl.where(mask, tl.abs(x - rb), 0.0)
        acc_yy += tl.where(mask, y * y, 0.0)
        acc_yu += tl.where(mask, y * u, 0.0)
    base = ws_ptr + b * 3 * n_chunks + chunk
    tl.store(base, tl.sum(acc_abs, axis=0))
    tl.store(base + n_chunks, tl.sum(acc_yy, axis=0))
    tl.store(base + 2 * n_chunks, tl.sum(acc_yu, axis=0))


@triton.jit
def _k2_grads(
    # data (each [B, D] pointer followed by its batch stride, in elements; rows are unit-stride)
    x_ptr, x_bstride,                       # unused when only gx is wanted
    r_ptr, r_bstride,
    ru_ptr, ru_bstride,                     # unused unless HAS_RU
    wr_ptr,                                 # [B], unused unless PER_SAMPLE_WR
    f_ptr, f_bstride,
    fu_ptr, fu_bstride,                     # unused unless HAS_FU
    wf_ptr,                                 # [B], unused unless PER_SAMPLE_WF
    coef_ptr,                               # [B, 2] (P_b, Q_b)
    gx_ptr, gr_ptr, gru_ptr, gf_ptr, gfu_ptr,  # out: contiguous [B, D] of x's dtype, each if NEED_*
    # scalars
    wr: tl.float64, wr_c: tl.float64,       # w of r and 1 - w (host float64) when not per-sample
    wf: tl.float64, wf_c: tl.float64,       # the same for f
    # shapes
    D,
    # compile-time
    HAS_RU: tl.constexpr, PER_SAMPLE_WR: tl.constexpr,
    HAS_FU: tl.constexpr, PER_SAMPLE_WF: tl.constexpr,
    NEED_GX: tl.constexpr, NEED_GR: tl.constexpr, NEED_GRU: tl.constexpr,
    NEED_GF: tl.constexpr, NEED_GFU: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    tile = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)

    P = tl.load(coef_ptr + 2 * b).to(COMPUTE_DTYPE)
    Q = tl.load(coef_ptr + 2 * b + 1).to(COMPUTE_DTYPE)
    dropped = (P == 0) & (Q == 0)
    wrv = triton_utils.weight(wr_ptr, wr, b, PER_SAMPLE_WR, COMPUTE_DTYPE)
    wfv = triton_utils.weight(wf_ptr, wf, b, PER_SAMPLE_WF, COMPUTE_DTYPE)
    wr_cv = _weight_c(wrv, wr_c, PER_SAMPLE_WR, COMPUTE_DTYPE)
    wf_cv = _weight_c(wfv, wf_c, PER_SAMPLE_WF, COMPUTE_DTYPE)

    offs = tile * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    rb = triton_utils.cfg(r_ptr + b * r_bstride, ru_ptr + b * ru_bstride, offs, mask, wrv, HAS_RU, COMPUTE_DTYPE)
    fb = triton_utils.cfg(f_ptr + b * f_bstride, fu_ptr + b * fu_bstride, offs, mask, wfv, HAS_FU, COMPUTE_DTYPE)
    y = rb - fb
    Gx = -P * y
    out = b * D + offs
    if NEED_GX:
        _store(gx_ptr + out, Gx, dropped, mask)
    if NEED_GR or NEED_GRU or NEED_GF or NEED_GFU:
        x = tl.load(x_ptr + b * x_bstride + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        u = fb - x
        Gr = P * u + Q * y
        _store_split(gr_ptr, gru_ptr, out, Gr, wrv, wr_cv, dropped, mask, HAS_RU, NEED_GR, NEED_GRU)
        Gf = -(Gx + Gr)
        _store_split(gf_ptr, gfu_ptr, out, Gf, wfv, wf_cv, dropped, mask, HAS_FU, NEED_GF, NEED_GFU)


# ----------------------------------------------------------------------------------------------------
# Launchers (launch heuristic: triton_utils' defaults)
# ----------------------------------------------------------------------------------------------------

_OP = "score_identity"


def _check(x2, r2, r_u2, wr_t, f2, f_u2, wf_t, coef=None):
    triton_utils.check_lead(_OP, "x", x2)
    for name, t in (("x", x2), ("r", r2), ("r_u", r_u2), ("f", f2), ("f_u", f_u2)):
        triton_utils.check_rows(_OP, name, t, "x", x2)
    B = x2.shape[0]
    cdt = triton_utils.compute_dtype(x2.dtype)
    for name, t, shape in (("wr", wr_t, (B,)), ("wf", wf_t, (B,)), ("coef", coef, (B, 2))):
        triton_utils.check_per_sample(_OP, name, t, shape, cdt, x2.device)
    return cdt


def forward(x2, r2, r_u2, wr_t, wr, f2, f_u2, wf_t, wf) -> torch.Tensor:
    """sums [B, 3] of the compute dtype: (sum |x - r̄|, sum y^2, sum y u) per sample.

    [B, D] inputs with unit-stride rows (any stride(0)); absent inputs are None; ``wr_t``/``wf_t`` ([B]
    of the compute dtype) override the floats ``wr``/``wf`` and matter only with ``r_u2``/``f_u2``.
    Launch-only: no host synchronization.
    """
    cdt = _check(x2, r2, r_u2, wr_t, f2, f_u2, wf_t)
    B, D = x2.shape
    sums = native.empty((B, 3), cdt, x2.device)
    if B == 0 or D == 0:  # shape-only branch: sums over no elements
        return sums.zero_()

    block, chunk_size, n_chunks = triton_utils.launch_config(B, D)
    # one chunk per row: the partials are the sums ([B, 3, 1] is sums' own layout)
    ws = sums.view(B, 3, 1) if n_chunks == 1 else torch.empty((B, 3, n_chunks), dtype=cdt, device=x2.device)
    has_ru, has_fu = r_u2 is not None, f_u2 is not None
    rows, vec = triton_utils.rows, triton_utils.vec  # absent inputs -> dummy pointers x2, ws, never read
    with triton_utils.device_guard(x2):
        for b0, b1 in triton_utils.row_batches(B):  # more than one launch only when B > 65535
            _k2_partials[(n_chunks, b1 - b0)](
                *rows(x2, b0, b1, x2), *rows(r2, b0, b1, x2), *rows(r_u2, b0, b1, x2),
                vec(wr_t, b0, b1, ws), *rows(f2, b0, b1, x2), *rows(f_u2, b0, b1, x2),
                vec(wf_t, b0, b1, ws), ws[b0:b1],
                float(wr), float(wf),
                D, chunk_size, n_chunks,
                HAS_RU=has_ru, PER_SAMPLE_WR=has_ru and wr_t is not None,
                HAS_FU=has_fu, PER_SAMPLE_WF=has_fu and wf_t is not None,
                COMPUTE_DTYPE=triton_utils.tl_compute(cdt), BLOCK=block, num_warps=triton_utils.NUM_WARPS,
                enable_fp_fusion=False,
            )
        if n_chunks > 1:
            triton_utils.sum_partials(ws, sums, 3 * B, n_chunks)
    return sums


def backward(x2, r2, r_u2, wr_t, wr, f2, f_u2, wf_t, wf, coef, need):
    """(gx, gr, gr_u, gf, gf_u): new contiguous [B, D] tensors of x's dtype, or None.

    ``need`` is 5 bools in that order; gr_u exists only with ``r_u2``, gf_u only with ``f_u2``.
    ``coef`` is [B, 2] (P_b, Q_b) of the compute dtype. Launch-only: no host synchronization.
    """
    _check(x2, r2, r_u2, wr_t, f2, f_u2, wf_t, coef)
    if len(need) != 5:
        raise ValueError(f"score_identity (triton): need must be 5 bools, got {need!r}")
    B, D = x2.shape
    has_ru, has_fu = r_u2 is not None, f_u2 is not None
    want = (bool(need[0]), bool(need[1]), bool(need[2]) and has_ru, bool(need[3]), bool(need[4]) and has_fu)
    outs = tuple(native.empty((B, D), x2.dtype, x2.device) if w else None for w in want)
    if not any(want) or B == 0 or D == 0:
        return outs

    block = triton_utils.block_size(D)
    ps_wr, ps_wf = has_ru and wr_t is not None, has_fu and wf_t is not None
    wr_f, wf_f = float(wr), float(wf)
    rows, vec = triton_utils.rows, triton_utils.vec  # absent inputs -> dummy pointers x2, coef, never read
    with triton_utils.device_guard(x2):
        for b0, b1 in triton_utils.row_batches(B):  # more than one launch only when B > 65535
            # absent outputs point at the first wanted one (never written); all share its dtype
            first = next(o for o in outs if o is not None)[b0:b1]
            gouts = [o[b0:b1] if o is not None else first for o in outs]
            _k2_grads[(triton_utils.cdiv(D, block), b1 - b0)](
                *rows(x2, b0, b1, x2), *rows(r2, b0, b1, x2), *rows(r_u2, b0, b1, x2),
                vec(wr_t, b0, b1, coef), *rows(f2, b0, b1, x2), *rows(f_u2, b0, b1, x2),
                vec(wf_t, b0, b1, coef), coef[b0:b1], *gouts,
                wr_f, 1.0 - wr_f, wf_f, 1.0 - wf_f,
                D,
                HAS_RU=has_ru, PER_SAMPLE_WR=ps_wr, HAS_FU=has_fu, PER_SAMPLE_WF=ps_wf,
                NEED_GX=want[0], NEED_GR=want[1], NEED_GRU=want[2], NEED_GF=want[3], NEED_GFU=want[4],
                COMPUTE_DTYPE=triton_utils.tl_compute(x2.dtype), BLOCK=block, num_warps=triton_utils.NUM_WARPS,
                enable_fp_fusion=False,
            )
    return outs
