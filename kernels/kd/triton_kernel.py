"""Triton row kernel of kd_loss (the GPU path; the cpu twin is csrc/cpu/kd.cpp, the math reference.py).

One program per row of V logits, three passes over the row, every sum in the compute type C
(float32; float64 for float64 logits):
  A  the maxima and sums of exp of u = z / T and v = t / T (and of the untempered z for the hard CE),
     tile by tile with the running maximum rescaling the sum (one exp per element and side);
  B  the divergence's row sums with the exact log-probabilities log q = u - LSE(u), log p = v - LSE(v)
     (and log m, recomputed, for jsd and the skew KLs);
  C  the gradient, written once: (rw / T) dD/du + hw (softmax(z) - onehot(y)).
Nothing is stored between passes but the row's scalars, so passes B and C re-read the row: traffic
per row (s = element size) 3 x 2 V s read + V s written = 7 V s against the floor of 3 V s (read
both, write the gradient). On an H100 a 128k-vocabulary fp32 row pair is 1 MB and hundreds of rows
are in flight, more than the 50 MB L2, so the re-reads come from HBM: predicted ~2.3x the floor for
the kinds that need pass B (jsd, tvd, skew KL) -- the research notes' 2-pass forward KL (its sums
carried online through pass A) is the next step and would give 5 V s.
Flops per element: ~6 exps/logs in A-C for forward KL, ~10 with a log m (jsd, skew): far below an
H100's ~60 flops per byte, so memory bound.

Deterministic: each program walks its row in a fixed tile order; tile sums are tl.sum (a fixed tree);
no atomics. Columns past a side's width read as -inf (kd_loss's ``vocab`` padding; a truncated
student's columns past V get a zero gradient).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashdistill.kernels import triton_utils

FKL, RKL, JSD, JSD_N, TVD, SKEW_F, SKEW_R, MIXED, TAID = range(9)
# the kernels' copies: a GPU compile reads only constexpr globals (the interpreter reads any)
_FKL, _RKL, _JSD, _JSD_N, _TVD, _SKEW_F, _SKEW_R, _MIXED, _TAID = (tl.constexpr(i) for i in range(9))


@triton.jit
def _logaddexp(a, b):
    """log(exp(a) + exp(b)) elementwise; -inf when both are -inf."""
    mx = tl.maximum(a, b)
    d = tl.where(a > b, b - a, a - b)
    r = mx + tl.log(1.0 + tl.exp(d))
    return tl.where(mx == float("-inf"), mx, r)


@triton.jit
def _tempered(ptr, offs, lim, T, T_ONE: tl.constexpr, C: tl.constexpr):
    """(x, x / T) of the row's tile: x in C, -inf past ``lim``."""
    x = tl.load(ptr + offs, mask=offs < lim, other=float("-inf")).to(C)
    if T_ONE:
        xt = x
    else:
        xt = triton_utils.div_rn(x, T, C)
    return x, xt


@triton.jit
def _teacher(t_row, offs, t_lim, u, T, lam, T_ONE: tl.constexpr, MIX: tl.constexpr, C: tl.constexpr):
    """v = t / T, or TAID's lam v + (1 - lam) u when MIX."""
    _, v = _tempered(t_row, offs, t_lim, T, T_ONE, C)
    if MIX:  # the endpoints exactly (no 0 * inf from -inf padding)
        v = tl.where(lam == 0.0, u, tl.where(lam == 1.0, v, lam * v + (1.0 - lam) * u))
    return v


@triton.jit
def _log_probs(s_row, t_row, offs, s_lim, t_lim, T, lam, lse_u, lse_v, T_ONE: tl.constexpr, MIX: tl.constexpr,
               C: tl.constexpr):
    """(z, log q, log p, q, p) of a tile, given the row's global log-sum-exps (passes B and C)."""
    z, u = _tempered(s_row, offs, s_lim, T, T_ONE, C)
    v = _teacher(t_row, offs, t_lim, u, T, lam, T_ONE, MIX, C)
    lq = u - lse_u
    lp = v - lse_v
    return z, lq, lp, tl.exp(lq), tl.exp(lp)


@triton.jit
def _row_weights(rw_ptr, lab_ptr, hw_ptr, r, HAS_LABELS: tl.constexpr, HAS_HARD: tl.constexpr, C: tl.constexpr):
    """(soft weight, label (-1: none), hard weight, whether the row has a hard-CE gradient) of row r."""
    rw = tl.load(rw_ptr + r).to(C)
    if HAS_LABELS:
        y = tl.load(lab_ptr + r)
    else:
        y = -1
    if HAS_HARD:
        hw = tl.load(hw_ptr + r).to(C)
    else:
        hw = tl.zeros([], C)
    return rw, y, hw, (y >= 0) & (hw != 0.0)


@triton.jit
def _masked_row(soft_ptr, hard_ptr, g_row, r, width, WRITE_HARD: tl.constexpr, C: tl.constexpr,
                BLOCK: tl.constexpr):
    """A row with no weight: D = CE = 0 and a zero gradient row of ``width`` elements."""
    tl.store(soft_ptr + r, tl.zeros([], C))
    if WRITE_HARD:
        tl.store(hard_ptr + r, tl.zeros([], C))
    ar = tl.arange(0, BLOCK)
    for i in range(0, width, BLOCK):
        triton_utils.store_rounded(g_row + i + ar, tl.zeros([BLOCK], C), i + ar < width)


@triton.jit
def _online(m, s, x):
    """Running (max, sum of exp(x - max)) updated with the tile x."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    scale = tl.where(m_new == float("-inf"), 0.0, tl.exp(m - m_new))
    e = tl.where(x == float("-inf"), 0.0, tl.exp(x - m_new))
    return m_new, s * scale + tl.sum(e, axis=0)


@triton.jit
def _kd_rows_kernel(
    s_ptr, s_stride, s_lim, s_width,        # student [N, *] (s_lim = min(s_width, V)); grad [N, s_width]
    t_ptr, t_stride, t_lim,                 # teacher [N, *]
    g_ptr,
    rw_ptr, lab_ptr, hw_ptr,                # [N] row weight, labels (-1: none), hard weight
    soft_ptr, hard_ptr,                     # out [N]: divergence, CE
    V, T, beta, log_b, log_1b, f_jsd, alpha, log_a, log_1a, lam, lam_ptr,
    KIND: tl.constexpr, MIX: tl.constexpr, LAM_PTR: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_HARD: tl.constexpr, WRITE_HARD: tl.constexpr,
    T_ONE: tl.constexpr, C: tl.constexpr, BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + r * s_stride
    t_row = t_ptr + r * t_stride
    g_row = g_ptr + r * s_width
    ar = tl.arange(0, BLOCK)
    rw, y, hw, hard_grad = _row_weights(rw_ptr, lab_ptr, hw_ptr, r, HAS_LABELS, HAS_HARD, C)
    zero_tile = tl.zeros([BLOCK], C)
    if LAM_PTR:  # TAID's lam from device memory (a tensor the caller schedules: no host sync)
        lam = tl.load(lam_ptr).to(C)

    if (rw == 0.0) & (hard_grad == 0):
        _masked_row(soft_ptr, hard_ptr, g_row, r, s_width, WRITE_HARD, C, BLOCK)
    else:
        # ---- A: maxima and sums of exp ----
        mu = tl.full([], float("-inf"), C)
        su = tl.zeros([], C)
        mv = tl.full([], float("-inf"), C)
        sv = tl.zeros([], C)
        mz = tl.full([], float("-inf"), C)
        sz = tl.zeros([], C)
        for i in range(0, V, BLOCK):
            offs = i + ar
            z, u = _tempered(s_row, offs, s_lim, T, T_ONE, C)
            v = _teacher(t_row, offs, t_lim, u, T, lam, T_ONE, MIX, C)
            mu, su = _online(mu, su, u)
            mv, sv = _online(mv, sv, v)
            if not T_ONE:
                mz, sz = _online(mz, sz, z)
        lse_u = mu + tl.log(su)
        lse_v = mv + tl.log(sv)
        if T_ONE:
            lse_z = lse_u
        else:
            lse_z = mz + tl.log(sz)
        if WRITE_HARD:
            zy = tl.load(s_row + tl.maximum(y, 0)).to(C)
            tl.store(hard_ptr + r, tl.where(y >= 0, lse_z - zy, 0.0))

        # ---- B: the kind's row sums ----
        acc0 = zero_tile
        acc1 = zero_tile
        for i in range(0, V, BLOCK):
            offs = i + ar
            _, lq, lp, q, p = _log_probs(s_row, t_row, offs, s_lim, t_lim, T, lam, lse_u, lse_v, T_ONE, MIX, C)
            if KIND == _FKL or KIND == _TAID:
                acc0 += tl.where(p > 0.0, p * (lp - lq), 0.0)
            elif KIND == _RKL:
                acc0 += tl.where(q > 0.0, q * (lq - lp), 0.0)
            elif KIND == _JSD or KIND == _JSD_N:
                lm = _logaddexp(lp + log_b, lq + log_1b)
                acc0 += tl.where(p > 0.0, p * (lp - lm), 0.0)
                acc1 += tl.where(q > 0.0, q * (lq - lm), 0.0)
            elif KIND == _TVD:
                sg = 0.5 * ((q > p).to(C) - (q < p).to(C))
                acc0 += tl.abs(q - p)
                acc1 += q * sg
            elif KIND == _SKEW_F:
                lm = _logaddexp(lp + log_a, lq + log_1a)
                pm = tl.where(p > 0.0, tl.exp(lp - lm), 0.0)
                acc0 += tl.where(p > 0.0, p * (lp - lm), 0.0)
                acc1 += q * pm
            elif KIND == _SKEW_R:
                x = lq - _logaddexp(lp + log_1a, lq + log_a)
                av = tl.where(q > 0.0, x - alpha * tl.exp(x), 0.0)
                acc0 += tl.where(q > 0.0, q * x, 0.0)
                acc1 += q * av
            else:  # MIXED
                d = lq - lp
                acc0 += tl.where(p > 0.0, -p * d, 0.0)
                acc1 += tl.where(q > 0.0, q * d, 0.0)
        s0 = tl.sum(acc0, axis=0)
        s1 = tl.sum(acc1, axis=0)
        if KIND == _FKL or KIND == _RKL or KIND == _TAID:
            D = s0
        elif KIND == _JSD:
            D = beta * s0 + (1.0 - beta) * s1
        elif KIND == _JSD_N:
            D = (beta * s0 + (1.0 - beta) * s1) / (beta * (1.0 - beta))
        elif KIND == _TVD:
            D = 0.5 * s0
        elif KIND == _SKEW_F or KIND == _SKEW_R:
            D = s0
        else:
            D = lam * s0 + (1.0 - lam) * s1
        tl.store(soft_ptr + r, D)

        # ---- C: the gradient ----
        cs = rw / T
        for i in range(0, V, BLOCK):
            offs = i + ar
            z, lq, lp, q, p = _log_probs(s_row, t_row, offs, s_lim, t_lim, T, lam, lse_u, lse_v, T_ONE, MIX, C)
            if KIND == _FKL or KIND == _TAID:
                gs = q - p
            elif KIND == _RKL:
                gs = tl.where(q > 0.0, q * ((lq - lp) - s0), 0.0)
            elif KIND == _JSD or KIND == _JSD_N:
                lm = _logaddexp(lp + log_b, lq + log_1b)
                gs = tl.where(q > 0.0, f_jsd * (q * ((lq - lm) - s1)), 0.0)
            elif KIND == _TVD:
                sg = 0.5 * ((q > p).to(C) - (q < p).to(C))
                gs = q * (sg - s1)
            elif KIND == _SKEW_F:
                lm = _logaddexp(lp + log_a, lq + log_1a)
                pm = tl.where(p > 0.0, tl.exp(lp - lm), 0.0)
                gs = (1.0 - alpha) * (q * (s1 - pm))
            elif KIND == _SKEW_R:
                x = lq - _logaddexp(lp + log_1a, lq + log_a)
                av = tl.where(q > 0.0, x - alpha * tl.exp(x), 0.0)
                gs = q * (av - s1)
            else:
                r2 = tl.where(q > 0.0, q * ((lq - lp) - s1), 0.0)
                gs = lam * (q - p) + (1.0 - lam) * r2
            g = tl.where(rw != 0.0, cs * gs, 0.0)
            if HAS_HARD:
                ce = tl.exp(z - lse_z) - (offs == y).to(C)
                g = g + tl.where(hard_grad, hw * ce, 0.0)
            triton_utils.store_rounded(g_row + offs, g, offs < s_lim)
        for i in range(V, s_width, BLOCK):  # a truncated student: zero past V
            triton_utils.store_rounded(g_row + i + ar, zero_tile, i + ar < s_width)


_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float64: tl.float64}
MAX_BLOCK = 2048  # tuning: elements per tile of a row


def kd_rows(s2, t2, kind, T, beta, alpha, lam, row_w, labels, hard_w, grad, soft_rows, hard_rows, V=None):
    """kd_loss's row kernel into given buffers (the cpu rows_cpu's contract: grad [N, Vs] may be s2
    itself, s2 [N, Vs] and t2 [N, Vt] unit-stride rows of one dtype, the divergence over V columns).
    ``lam`` is a float, or for TAID a 0-d tensor on the device (read by the kernel)."""
    import math

    N, Vs = s2.shape
    Vt = t2.shape[1]
    V = Vs if V is None else V
    if N == 0:
        return
    if kind in (JSD, JSD_N) and beta == 0.0:
        kind = FKL
    elif kind in (JSD, JSD_N) and beta == 1.0:
        kind = RKL
    safe = lambda x: math.log(x) if x > 0 else float("-inf")  # noqa: E731
    lam_ptr = isinstance(lam, torch.Tensor)
    lam_f = 0.5 if lam_ptr else float(lam)
    BLOCK = min(MAX_BLOCK, max(128, triton.next_power_of_2(V)))
    dummy = row_w
    with triton_utils.device_guard(s2):
        _kd_rows_kernel[(N,)](
            s2, s2.stride(0), min(Vs, V), Vs, t2, t2.stride(0), min(Vt, V), grad,
            row_w, labels if labels is not None else dummy, hard_w if hard_w is not None else dummy,
            soft_rows, hard_rows if hard_rows is not None else soft_rows,
            V, float(T), float(beta), safe(beta), safe(1.0 - beta),
            (1.0 / beta if kind == JSD_N else 1.0 - beta) if 0.0 < beta < 1.0 else 1.0,
            float(alpha), safe(alpha), safe(1.0 - alpha), lam_f, lam if lam_ptr else dummy,
            KIND=kind, MIX=kind == TAID and not (lam_f == 1.0 and not lam_ptr), LAM_PTR=lam_ptr, HAS_LABELS=labels is not None, HAS_HARD=hard_w is not None,
            WRITE_HARD=hard_rows is not None, T_ONE=T == 1.0, C=triton_utils.tl_compute(s2.dtype), BLOCK=BLOCK,
            num_warps=8 if BLOCK >= 2048 else 4, enable_fp_fusion=False)


# ----------------------------------------------------------------------------------------------------
# topk_kd_loss: forward KL to a stored top-k teacher (the cpu twin: kd.cpp "top-k teacher")
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _members(ids, i0, BLOCK: tl.constexpr):
    """Which positions of the tile [i0, i0 + BLOCK) are among the row's ids (a [KB] vector, -1 where
    absent): a histogram of the ids' offsets in the tile, in registers (no scratch, O(K + BLOCK))."""
    rel = ids - i0
    inside = (rel >= 0) & (rel < BLOCK)
    h = tl.histogram(tl.where(inside, rel, 0).to(tl.int32), BLOCK)
    outside = tl.sum((inside == 0).to(tl.int32), axis=0)
    return (h - tl.where(tl.arange(0, BLOCK) == 0, outside, 0)) > 0


@triton.jit
def _topk_rows_kernel(
    s_ptr, s_stride, g_ptr, ids_ptr, lp_ptr,        # student [N, V] (grad [N, V] may alias it); [N, K] teacher
    rw_ptr, lab_ptr, hw_ptr, soft_ptr, hard_ptr,
    V, K, T, ratio,
    MODE: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_HARD: tl.constexpr, WRITE_HARD: tl.constexpr,
    T_ONE: tl.constexpr, C: tl.constexpr, BLOCK: tl.constexpr, KB: tl.constexpr,
):
    """One program per row. Passes: A the student's LSE, its tail LSE (off the ids, summed over the
    complement: no cancellation) and the untempered LSE for the hard CE; then the teacher's K terms in
    registers; C the gradient off the ids (dense, one write), then the K on-id values scattered. The
    K student logits on the ids are read once, before any write, so grad may alias the logits.
    Traffic per row: 2 reads of V (A, C) + 1 write of V, + K ids and log-probs."""
    r = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + r * s_stride
    g_row = g_ptr + r * V
    ar = tl.arange(0, BLOCK)
    kk = tl.arange(0, KB)
    kin = kk < K
    ids = tl.load(ids_ptr + r * K + kk, mask=kin, other=-1)
    lp = tl.load(lp_ptr + r * K + kk, mask=kin, other=float("-inf")).to(C)
    rw, y, hw, hard_grad = _row_weights(rw_ptr, lab_ptr, hw_ptr, r, HAS_LABELS, HAS_HARD, C)
    zero_tile = tl.zeros([BLOCK], C)
    NEG = float("-inf")

    if (rw == 0.0) & (hard_grad == 0):
        _masked_row(soft_ptr, hard_ptr, g_row, r, V, WRITE_HARD, C, BLOCK)
    else:
        zS, uS = _tempered(s_row, tl.maximum(ids, 0), tl.where(kin, V, 0), T, T_ONE, C)
        # ---- A ----
        mu = tl.full([], NEG, C)
        su = tl.zeros([], C)
        mt = tl.full([], NEG, C)
        st = tl.zeros([], C)
        mz = tl.full([], NEG, C)
        sz = tl.zeros([], C)
        for i in range(0, V, BLOCK):
            offs = i + ar
            z, u = _tempered(s_row, offs, V, T, T_ONE, C)
            mu, su = _online(mu, su, u)
            mt, st = _online(mt, st, tl.where(_members(ids, i, BLOCK), NEG, u))
            if not T_ONE:
                mz, sz = _online(mz, sz, z)
        lse_u = mu + tl.log(su)
        log_tail = tl.where(st > 0.0, mt + tl.log(st), NEG)  # log sum over the complement of exp(u)
        if T_ONE:
            lse_z = lse_u
        else:
            lse_z = mz + tl.log(sz)
        if WRITE_HARD:
            zy = tl.load(s_row + tl.maximum(y, 0)).to(C)
            tl.store(hard_ptr + r, tl.where(y >= 0, lse_z - zy, 0.0))
        # ---- the teacher and the soft term, in registers ----
        PS = tl.sum(tl.where(kin, tl.exp(lp), 0.0), axis=0)
        ltp = tl.where(PS < 1.0, tl.log(1.0 - PS), NEG) * ratio  # the stored tail mass, re-tempered
        lpr = lp * ratio
        if MODE == 2:
            lmax = tl.maximum(tl.max(lpr, axis=0), ltp)
            zsum = tl.sum(tl.exp(lpr - lmax), axis=0) + tl.where(ltp > NEG, tl.exp(ltp - lmax), 0.0)
        else:
            lmax = tl.max(lpr, axis=0)
            zsum = tl.sum(tl.exp(lpr - lmax), axis=0)
        lZ = lmax + tl.log(zsum)
        pk = tl.where(kin, tl.exp(lpr - lZ), 0.0)
        mS = tl.max(tl.where(kin, uS, NEG), axis=0)
        lse_S = mS + tl.log(tl.sum(tl.where(kin, tl.exp(uS - mS), 0.0), axis=0))
        if MODE == 1:
            lqS = uS - lse_S
        else:
            lqS = uS - lse_u
        D = tl.sum(tl.where(pk > 0.0, pk * ((lpr - lZ) - lqS), 0.0), axis=0)
        p_tail = tl.zeros([], C)
        if MODE == 2:
            p_tail = tl.where(ltp > NEG, tl.exp(ltp - lZ), 0.0)
            D += tl.where(p_tail > 0.0, p_tail * ((ltp - lZ) - (log_tail - lse_u)), 0.0)
        tl.store(soft_ptr + r, D)
        # ---- C: off the ids (dense), then on them (scattered) ----
        if MODE == 0:
            c_off = tl.full([], 1.0, C)
        elif MODE == 1:
            c_off = tl.zeros([], C)
        else:  # P_S - p_tail Q_S / q_tail, Q_S / q_tail = exp(LSE_S - log tail)
            c_off = tl.sum(pk, axis=0) - tl.where(log_tail > NEG, p_tail * tl.exp(lse_S - log_tail), 0.0)
        cs = rw / T
        for i in range(0, V, BLOCK):
            offs = i + ar
            z, u = _tempered(s_row, offs, V, T, T_ONE, C)
            g = tl.where(rw != 0.0, cs * (c_off * tl.exp(u - lse_u)), 0.0)
            if HAS_HARD:
                g = g + tl.where(hard_grad, hw * (tl.exp(z - lse_z) - (offs == y).to(C)), 0.0)
            triton_utils.store_rounded(g_row + offs, g, (offs < V) & (_members(ids, i, BLOCK) == 0))
        if MODE == 1:
            gS = tl.exp(lqS) - pk
        else:
            gS = tl.exp(uS - lse_u) - pk
        gS = tl.where(rw != 0.0, cs * gS, 0.0)
        if HAS_HARD:
            gS = gS + tl.where(hard_grad, hw * (tl.exp(zS - lse_z) - (ids == y).to(C)), 0.0)
        triton_utils.store_rounded(g_row + tl.maximum(ids, 0), gS, kin)


def topk_rows(z, ids, lp, mode, T, ratio, row_w, labels, hard_w, grad, soft_rows, hard_rows):
    """topk_kd_loss's row kernel into given buffers (the cpu topk.rows_cpu's contract; grad [N, V]
    may be z itself). ids [N, K] int64 distinct in [0, V) (checked by the caller), lp [N, K] of the
    compute dtype."""
    N, V = z.shape
    K = ids.shape[1]
    if N == 0:
        return
    BLOCK = min(MAX_BLOCK, max(128, triton.next_power_of_2(V)))
    KB = max(16, triton.next_power_of_2(K))
    dummy = row_w
    with triton_utils.device_guard(z):
        _topk_rows_kernel[(N,)](
            z, z.stride(0), grad, ids, lp, row_w, labels if labels is not None else dummy,
            hard_w if hard_w is not None else dummy, soft_rows, hard_rows if hard_rows is not None else soft_rows,
            V, K, float(T), float(ratio),
            MODE=mode, HAS_LABELS=labels is not None, HAS_HARD=hard_w is not None, WRITE_HARD=hard_rows is not None,
            T_ONE=T == 1.0, C=triton_utils.tl_compute(z.dtype), BLOCK=BLOCK, KB=KB,
            num_warps=8 if BLOCK >= 2048 else 4, enable_fp_fusion=False)
