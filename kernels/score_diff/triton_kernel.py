"""K1 score-difference loss and gradient in Triton: deterministic passes, no atomics.

The math (csrc/README.md "K1" and ``reference.score_diff_forward`` are the spec; this backend computes the same)
-----------------------------------------------------------------------------------------------------
One skeleton serves SDS, VSD, SwiftBrush, DMD/DMD2 and f-distill. For each sample b of [B, D] rows, in
the compute type C (float32 for float32/float16/bfloat16 inputs, float64 for float64 inputs):

    ā    = a_u + wa_b (a - a_u)   with a_u (classifier-free guidance, Ho & Salimans 2022), else a
    b̄    = b_u + wb_b (b - b_u)   likewise; w_b = w_t[b] when the [B] tensor is given, else the float
    d    = ā - b̄                  without xt;  C_b (ā - b̄) with xt (coef [B, 2] = (A_b, C_b): a
                                  prediction p stands for A_b xt + C_b p, and the A_b xt terms cancel)
    r    = b̄                      without xt;  A_b xt + C_b b̄ with xt
    n_b  = max(mean_i |x - r|, eps) when norm (NaN passes through), else 1
    g    = nan_to_num(s_b d / n_b) (s_b = scale[b], 1 without scale): NaN -> 0, +-inf -> +-max finite of C
    g    = min(max(g, -clip), clip) when clip > 0
    loss = loss_factor * 0.5 * sum_{b,i} g^2   (the unrounded g)

g is stored rounded to a's dtype (so +-FLT_MAX becomes +-inf in float16/bfloat16, as the C++ backends
do); the loss comes back as a 0-d tensor of C. DMD: a = fake, b = real (+ real_uncond), norm, loss_factor
= 1 / (B D). The backward is grad_scale(g, grad_loss, loss_factor); nothing here is differentiated.

Why two passes with norm, one without
-------------------------------------
n_b is a reduction over the whole row and every g of the row divides by it, so n_b must be final
before the first g is written. A single pass would have to either keep the row on chip (impossible for
large D) or write the unscaled d into g and rescale it afterwards: that is still a second pass (a
read+write of g instead of a read of the predictions), and it rounds twice, so g would no longer be the
spec's nan_to_num of one quotient. So, with norm:

    kernel 1  _k1_norm_partials  grid (n_chunks, B): partial sums of |x - r| over one chunk of row b
                                 -> ws1[b, chunk]
    kernel 2  _k1_grad           grid (n_chunks, B): n_b = max(sum(ws1[b, :]) / D, eps) (every program
                                 of row b reduces the same partials in the same order, so all agree bit
                                 for bit), then g for its chunk -> g, and sum(g^2) -> ws2[b, chunk]
    torch                        loss = ws2.sum() * (loss_factor * 0.5)

Without norm, kernel 2 alone (NORM=False: n_b = 1, the division skipped, x never read). Both
reductions run in a fixed order for a given (B, D, dtype), so results are deterministic run to run
(they may differ in the last bits from the C++ backends, which sum in another order).

Memory traffic (s = bytes per element of the input dtype; Ua, Ub = 1 with a_u, b_u; X = 1 with xt)
-----------------------------------------------------------------------------------------------
    kernel 1 reads x, b, (b_u), (xt):                (2 + Ub + X) s bytes/element    (norm only)
    kernel 2 reads a, (a_u), b, (b_u), writes g:      (3 + Ua + Ub) s bytes/element
    norm:     (5 + Ua + 2 Ub + X) s; DMD guided fp32 28 B/elem, unguided fp32 20, guided bf16 14.
    no norm:  (3 + Ua + Ub) s;       SDS/VSD guided fp32 16 B/elem (the minimum: read 3, write 1).
    The workspaces (2 * B * n_chunks values) and the n_chunks partials each kernel-2 program re-reads
    (from L2) are kept small relative to this by the launch heuristic (CHUNK >= 8 * n_chunks).
Flops per element, roughly: each cfg 3; kernel 1 (xt: 3) |x - r| + add 3; kernel 2 sub 1, C 1, s 1,
div 1 (norm), nan_to_num 3 compare/selects, clip 2, square-add 2: 6-20 per element, i.e. at most ~1
flop/byte in fp32 and ~2 in bf16, far below the ~20 flop/byte at which an H100's fp32 (non-tensor-core)
math would become the limit: both kernels are memory bound. Kernel 2 recomputes b̄ from b and b_u
(2s bytes/element when guided) rather than having kernel 1 store it (a write and a read, also 2s): the
same traffic, without a [B, D] scratch buffer.

Numerics
--------
Loads are upcast to C before any arithmetic; accumulators are in C. The operation order is the
reference's: d = ā - b̄, then C_b d, then s_b (C_b d), then / n_b. Divisions use IEEE round-to-nearest
(``triton_utils.div_rn``: a plain fp32 ``/`` lowers to the approximate ``div.full.f32`` on NVIDIA).
Float arguments (wa, wb, eps, clip) are passed as float64 and rounded once to C inside the kernels, as
torch rounds a Python scalar to the tensor's dtype. g is rounded to a's dtype to nearest even
(bfloat16 by hand, ``triton_utils.round_to``). Every launch passes enable_fp_fusion=False: Triton
(like nvcc) would otherwise contract u + w (p - u) or A xt + C b̄ into one FMA, so ā, b̄, r would differ
from the reference in their last bit, and with cancellation in ā - b̄ by far more relative to g.
Offsets are int64 (b * batch_stride can exceed 2^31).

No host synchronization: shapes and flags alone decide the launch configuration, so ``forward`` can be
captured in a CUDA graph (after a warm-up call has compiled the kernels).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashdistill.kernels import native, triton_utils

__all__ = ["forward"]


# ----------------------------------------------------------------------------------------------------
# Kernels (both form b̄ and r with triton_utils.weight and triton_utils.cfg, inlined: identically)
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _k1_norm_partials(
    # data (each [B, D] pointer followed by its batch stride, in elements; rows are unit-stride)
    x_ptr, x_bstride,
    b_ptr, b_bstride,
    bu_ptr, bu_bstride,                     # unused unless HAS_BU
    wb_ptr,                                 # [B], unused unless PER_SAMPLE_WB
    xt_ptr, xt_bstride,                     # unused unless HAS_XT
    coef_ptr,                               # [B, 2] (A_b, C_b), unused unless HAS_XT
    ws1_ptr,                                # out: [B, n_chunks] partial sums of |x - r|
    # scalars
    wb: tl.float64,                         # w of b when not PER_SAMPLE_WB
    # shapes
    D, chunk_size, n_chunks,                # row length; elements per program (multiple of BLOCK)
    # compile-time
    HAS_BU: tl.constexpr,
    PER_SAMPLE_WB: tl.constexpr,
    HAS_XT: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)

    wbv = triton_utils.weight(wb_ptr, wb, b, PER_SAMPLE_WB, COMPUTE_DTYPE)
    if HAS_XT:
        A = tl.load(coef_ptr + 2 * b).to(COMPUTE_DTYPE)
        C = tl.load(coef_ptr + 2 * b + 1).to(COMPUTE_DTYPE)
    x_row = x_ptr + b * x_bstride
    b_row = b_ptr + b * b_bstride
    bu_row = bu_ptr + b * bu_bstride
    xt_row = xt_ptr + b * xt_bstride

    start = chunk * chunk_size
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=COMPUTE_DTYPE)
    for t in range(0, chunk_size, BLOCK):
        offs = start + t + cols
        mask = offs < D
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        r = triton_utils.cfg(b_row, bu_row, offs, mask, wbv, HAS_BU, COMPUTE_DTYPE)
        if HAS_XT:
            xt = tl.load(xt_row + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
            r = A * xt + C * r
        acc += tl.where(mask, tl.abs(x - r), 0.0)
    tl.store(ws1_ptr + b * n_chunks + chunk, tl.sum(acc, axis=0))


@triton.jit
def _k1_grad(
    # data (each [B, D] pointer followed by its batch stride, in elements; rows are unit-stride)
    a_ptr, a_bstride,
    au_ptr, au_bstride,                     # unused unless HAS_AU
    wa_ptr,                                 # [B], unused unless PER_SAMPLE_WA
    b_ptr, b_bstride,
    bu_ptr, bu_bstride,                     # unused unless HAS_BU
    wb_ptr,                                 # [B], unused unless PER_SAMPLE_WB
    coef_ptr,                               # [B, 2] (A_b, C_b), unused unless HAS_XT
    scale_ptr,                              # [B] s_b, unused unless HAS_SCALE
    ws1_ptr,                                # in: [B, n_chunks] from _k1_norm_partials (NORM only)
    g_ptr,                                  # out: contiguous [B, D] g in a's dtype
    ws2_ptr,                                # out: [B, n_chunks] partial sums of g^2 (unrounded g)
    # scalars
    wa: tl.float64,                         # w of a when not PER_SAMPLE_WA
    wb: tl.float64,                         # w of b when not PER_SAMPLE_WB
    eps: tl.float64,                        # floor of n_b (NORM only)
    clip: tl.float64,                       # bound of |g| (CLIP only)
    # shapes
    D, chunk_size, n_chunks,                # row length; elements per program; programs per row
    # compile-time
    HAS_AU: tl.constexpr,
    PER_SAMPLE_WA: tl.constexpr,
    HAS_BU: tl.constexpr,
    PER_SAMPLE_WB: tl.constexpr,
    HAS_XT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    NORM: tl.constexpr,
    CLIP: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNKS_POW2: tl.constexpr,              # power of two >= n_chunks (NORM only)
):
    chunk = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK)

    if NORM:
        # n_b: every program of row b sums the same partials in the same order -> identical n_b.
        ci = tl.arange(0, CHUNKS_POW2)
        parts = tl.load(ws1_ptr + b * n_chunks + ci, mask=ci < n_chunks, other=0.0)
        total = tl.sum(parts, axis=0)
        mean = triton_utils.div_rn(total, tl.full([], D, COMPUTE_DTYPE), COMPUTE_DTYPE)
        eps_c = tl.full([], eps, COMPUTE_DTYPE)
        n_b = tl.where(mean < eps_c, eps_c, mean)  # max(mean, eps), NaN passes through
        n_vec = tl.full([BLOCK], 0.0, COMPUTE_DTYPE) + n_b
    if HAS_XT:
        C = tl.load(coef_ptr + 2 * b + 1).to(COMPUTE_DTYPE)
    if HAS_SCALE:
        s = tl.load(scale_ptr + b).to(COMPUTE_DTYPE)
    if CLIP:
        hi = tl.full([], clip, COMPUTE_DTYPE)
        lo = -hi

    wav = triton_utils.weight(wa_ptr, wa, b, PER_SAMPLE_WA, COMPUTE_DTYPE)
    wbv = triton_utils.weight(wb_ptr, wb, b, PER_SAMPLE_WB, COMPUTE_DTYPE)
    a_row = a_ptr + b * a_bstride
    au_row = au_ptr + b * au_bstride
    b_row = b_ptr + b * b_bstride
    bu_row = bu_ptr + b * bu_bstride
    g_row = g_ptr + b * D

    start = chunk * chunk_size
    acc = tl.zeros([BLOCK], dtype=COMPUTE_DTYPE)
    for t in range(0, chunk_size, BLOCK):
        offs = start + t + cols
        mask = offs < D
        abar = triton_utils.cfg(a_row, au_row, offs, mask, wav, HAS_AU, COMPUTE_DTYPE)
        bbar = triton_utils.cfg(b_row, bu_row, offs, mask, wbv, HAS_BU, COMPUTE_DTYPE)
        d = abar - bbar
        if HAS_XT:
            d = C * d
        if HAS_SCALE:
            d = s * d
        if NORM:
            d = triton_utils.div_rn(d, n_vec, COMPUTE_DTYPE)
        g = triton_utils.nan_to_num(d, COMPUTE_DTYPE)
        if CLIP:
            g = tl.where(g < lo, lo, g)
            g = tl.where(g > hi, hi, g)
        tl.store(g_row + offs, triton_utils.round_to(g, g_ptr.dtype.element_ty), mask=mask)
        acc += tl.where(mask, g * g, 0.0)
    tl.store(ws2_ptr + b * n_chunks + chunk, tl.sum(acc, axis=0))


# ----------------------------------------------------------------------------------------------------
# Launch heuristic (triton_utils' "Launch heuristic", with this op's own cap and chunk floor)
# ----------------------------------------------------------------------------------------------------

_MAX_CHUNKS = 1024       # cap on programs per row (kernel 2 re-reads all n_chunks partials of its row)
# keep the chunk >= 8 * n_chunks elements so that kernel 2's re-read of the row's n_chunks partials
# stays a few percent of its traffic
_CHUNK_PER_PARTIAL = 8


def _launch_config(B: int, D: int) -> tuple[int, int, int]:
    """(BLOCK, chunk_size, n_chunks) for B rows of D elements; chunk_size is a multiple of BLOCK."""
    return triton_utils.launch_config(B, D, max_chunks=_MAX_CHUNKS, chunk_per_partial=_CHUNK_PER_PARTIAL)


# ----------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------

_OP = "score_diff"


def forward(x2, a2, a_u2, wa_t, wa: float, b2, b_u2, wb_t, wb: float, xt2, coef, scale,
            norm: bool, eps: float, clip: float, loss_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, g) of the K1 skeleton for [B, D] inputs whose rows are unit-stride (any stride(0)).

    Absent inputs are None. ``wa_t``/``wb_t`` ([B] of the compute dtype) override the floats ``wa``/``wb``
    and matter only with ``a_u2``/``b_u2``; ``coef`` ([B, 2]: A_b, C_b) comes with ``xt2``; ``scale`` is
    [B]; ``x2`` is read only when ``norm`` (may be None otherwise); ``clip <= 0`` means none. Returns the
    loss as a 0-d tensor of the compute dtype and g as a new contiguous [B, D] tensor of a2's dtype.
    Launch-only: no host synchronization.
    """
    triton_utils.check_lead(_OP, "a", a2)
    for name, t in (("a", a2), ("b", b2), ("a_u", a_u2), ("b_u", b_u2), ("xt", xt2), ("x", x2 if norm else None)):
        triton_utils.check_rows(_OP, name, t, "a", a2)
    if norm and x2 is None:
        raise ValueError("score_diff (triton): norm needs x")
    if (xt2 is None) != (coef is None):
        raise ValueError("score_diff (triton): xt and coef come together")
    B, D = a2.shape
    dev = a2.device
    cdt = triton_utils.compute_dtype(a2.dtype)
    for name, t, shape in (("wa", wa_t, (B,)), ("wb", wb_t, (B,)), ("coef", coef, (B, 2)), ("scale", scale, (B,))):
        triton_utils.check_per_sample(_OP, name, t, shape, cdt, dev)

    g = native.empty((B, D), a2.dtype, dev)
    if B == 0 or D == 0:  # shape-only branch: the sum over no elements
        return torch.zeros((), dtype=cdt, device=dev), g

    block, chunk_size, n_chunks = _launch_config(B, D)
    ws = torch.empty((2, B, n_chunks), dtype=cdt, device=dev)
    ws1, ws2 = ws[0], ws[1]

    has_au, has_bu = a_u2 is not None, b_u2 is not None
    ps_wa, ps_wb = has_au and wa_t is not None, has_bu and wb_t is not None
    has_xt, has_scale, do_clip = xt2 is not None, scale is not None, clip > 0
    flags = dict(HAS_BU=has_bu, PER_SAMPLE_WB=ps_wb, HAS_XT=has_xt, COMPUTE_DTYPE=triton_utils.tl_compute(cdt),
                 BLOCK=block, num_warps=triton_utils.NUM_WARPS, enable_fp_fusion=False)
    rows, vec = triton_utils.rows, triton_utils.vec  # absent inputs -> dummy pointers a2, ws1, never read

    with triton_utils.device_guard(a2):
        for b0, b1 in triton_utils.row_batches(B):  # more than one launch per kernel only when B > 65535
            grid = (n_chunks, b1 - b0)
            a_s, au_s, b_s, bu_s = (rows(t, b0, b1, a2) for t in (a2, a_u2, b2, b_u2))
            wa_s, wb_s, coef_s, scale_s = (vec(t, b0, b1, ws1) for t in (wa_t, wb_t, coef, scale))
            w1, w2, g_s = ws1[b0:b1], ws2[b0:b1], g[b0:b1]
            if norm:
                x_s, xt_s = rows(x2, b0, b1, a2), rows(xt2, b0, b1, a2)
                _k1_norm_partials[grid](
                    *x_s, *b_s, *bu_s, wb_s, *xt_s, coef_s, w1,
                    float(wb),
                    D, chunk_size, n_chunks,
                    **flags,
                )
            _k1_grad[grid](
                *a_s, *au_s, wa_s, *b_s, *bu_s, wb_s, coef_s, scale_s, w1, g_s, w2,
                float(wa), float(wb), float(eps), float(clip),
                D, chunk_size, n_chunks,
                HAS_AU=has_au, PER_SAMPLE_WA=ps_wa, HAS_SCALE=has_scale, NORM=bool(norm), CLIP=do_clip,
                CHUNKS_POW2=triton.next_power_of_2(n_chunks), **flags,
            )
    loss = ws2.sum() * (float(loss_factor) * 0.5)
    return loss, g

