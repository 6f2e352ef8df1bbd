"""Triton kernels of attention and attention-map distillation (the GPU path; the spec is reference.py).

Layout [B, H, L, D] (as SDPA), head dim unit-stride, any batch/head/row strides; outputs contiguous.
Query head h reads key/value head h // GROUP (GROUP = Hq / Hk). Causal: key j visible to query i iff
j <= i (top-left). Everything is accumulated in the compute type C (float32; float64 for float64 inputs).

Attention forward (FlashAttention-2, Dao 2023, Alg. 1): grid (query blocks, Hq, B); a program keeps its
query block Q_i in registers and streams the key/value blocks of its kv head with the online softmax in
base 2 (log2 e folded into the scale, exp2):
    m' = max(m, rowmax(S2)),  l <- 2^(m - m') l + rowsum(2^(S2 - m')),  O <- 2^(m - m') O + P~ V,
    S2 = scale log2(e) Q K^T;  out = O / l,  lse = ln 2 (m + log2 l)  (natural log, stored in C).
Key blocks split into an unmasked part (no compare, no select) and a masked part: the causal diagonal
blocks and the key tail (Lk % BLOCK_N). Every row (padded ones too) sees key 0 in the first block it
visits, so the running max is finite after one block and -inf masking never makes a NaN.

Attention backward (FlashAttention-2, Alg. 2), atomics-free and deterministic (Triton tutorial
06-fused-attention): with P = exp(S - lse), Delta = rowsum(dO o O):
    dV = P^T dO,  dP = dO V^T,  dS = P o (dP - Delta),  dQ = scale dS K,  dK = scale dS^T Q.
  1. _attn_bwd_preprocess_kernel: Delta.
  2. _attn_bwd_dkdv_kernel, grid (key blocks, Hk, B): a program owns K_j, V_j and accumulates dK_j, dV_j
     in registers over every query head of its group and every query block (dK/dV summed over the group
     without atomics).
  3. _attn_bwd_dq_kernel, grid (query blocks, Hq, B): recomputes P and dP, accumulates dQ_i.
  That is 7 matmuls instead of FA2's 5 (P and dP recomputed for dQ) in exchange for no atomics,
  no fp32 dQ workspace and bit-reproducible gradients.

Attention-map KD (MiniLM; research notes attn_sampler.md Sec. 3.2): per query row, with t = scale_t
q_t k_t^T, s = scale_s q_s k_s^T (same mask), P = softmax(t), Q = softmax(s):
    KL_i = sum_j P_ij (t_ij - s_ij) - lse_t_i + lse_s_i,
  forward in one pass: online (m_t, l_t), (m_s, l_s) and u = sum_j 2^(t2_j - m_t) (t2_j - s2_j), rescaled
  by 2^(m_t,old - m_t,new) as O is (base-2 logits t2 = log2(e) t); KL = ln 2 (u / l_t + m_s - m_t +
  log2 l_s - log2 l_t). Two GEMMs and two exp2 per (i, j).
  backward: dS = g_i (Q - P), dq_s = scale_s dS k_s, dk_s = scale_s dS^T q_s (summed over a group),
  with the same dk-kernel / dq-kernel split as attention (no atomics). Student and teacher have their
  own head dims (Ds, Dt) and kv-head counts (Hks, Hkt).

Head dims: any D <= 256, padded to BLOCK_D = max(16, next_pow2(D)) with masked loads (EVEN_D compiles the
masks out). Sequence lengths: any >= 1; row tails masked. 16-bit inputs feed the tensor cores directly
(P and dS cast to the input dtype before their matmul, as FA2); float32 inputs use
tl.dot(input_precision="ieee") (matches float32 math, no TF32; FMA path on the GPU, so slower);
float64 inputs use float64 tl.dot (supported by Triton >= 3.0 in the interpreter and on NVIDIA GPUs).
Scales travel as float64 kernel arguments (annotated) and are cast to C in the kernel, and constants are
made in C with tl.full, so the float64 path is not rounded through float32.

FLOP counts (FA2 convention, non-causal; about half for causal): forward 4 N M D per (b, h) with N = Lq,
M = Lk; backward as run here 14 N M D (FA2 counts 10); KD forward 2 N M (Ds + Dt); KD backward
2 N M (4 Ds + 2 Dt). Byte counts: see each kernel.

Block sizes: a static table (_config) by kernel, head dim and dtype; the GPU entries are tuning for
H100/H200 (Hopper, 228 KB shared memory, 64K registers per SM) and do not affect correctness. CPU
tensors (TRITON_INTERPRET=1) get small blocks so tests stay fast and reach the multi-block paths.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from flashdistill.kernels import triton_utils
from flashdistill.kernels.triton_utils import store_rounded

LOG2E = 1.4426950408889634  # log2(e)
LN2 = 0.6931471805599453    # ln(2)
_LOG2E = tl.constexpr(LOG2E)  # the kernels' copies (jit code reads only constexpr globals)
_LN2 = tl.constexpr(LN2)


# ----------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------

# The interpreter's tl.dot mishandles bfloat16 operands (garbage, triton 3.6 and 3.9) and its fp32 -> bf16
# cast truncates: under it, bf16 operands are widened to fp32 for the dot (exact products, fp32 sums, as
# the tensor cores) and casts to bf16 round to nearest even (triton_utils.round_to), as on the GPU.
_INTERPRET = tl.constexpr(bool(triton.knobs.runtime.interpret))


@triton.jit
def _op(x, dtype: tl.constexpr):
    """x cast to a matmul operand dtype (round to nearest even)."""
    if _INTERPRET and dtype == tl.bfloat16:
        r = triton_utils.round_to(x, dtype)
    else:
        r = x.to(dtype)
    return r


@triton.jit
def _mm(a, b, acc, IEEE: tl.constexpr, C: tl.constexpr):
    """a @ b (+ acc) accumulated in C. IEEE: float32/float64 operands multiplied exactly (no TF32)."""
    if _INTERPRET and a.dtype == tl.bfloat16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        r = tl.dot(a, b, acc, input_precision="ieee", out_dtype=C)
    else:
        r = tl.dot(a, b, acc, out_dtype=C)
    return r


@triton.jit
def _load_tile(ptrs, rows, n_rows, offs_d, D, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """A [R, BLOCK_D] tile; rows >= n_rows (when MASK_ROWS) and columns >= D (unless EVEN_D) read as 0."""
    if MASK_ROWS:
        if EVEN_D:
            t = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            t = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < D), other=0.0)
    else:
        if EVEN_D:
            t = tl.load(ptrs)
        else:
            t = tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)
    return t


@triton.jit
def _load_rows(ptrs, rows, n_rows, other, MASK_ROWS: tl.constexpr):
    """A per-row vector; rows >= n_rows read as ``other`` when MASK_ROWS."""
    if MASK_ROWS:
        x = tl.load(ptrs, mask=rows < n_rows, other=other)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _visible(rows, cols, Lk, CAUSAL: tl.constexpr):
    """[R, N] mask of the (query, key) pairs that count: key in range and, when causal, j <= i."""
    keep = cols[None, :] < Lk
    if CAUSAL:
        keep = keep & (cols[None, :] <= rows[:, None])
    return keep


@triton.jit
def _query_stages(start_m, Lk, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(mid, hi) of a query block's key loop: keys [0, mid) unmasked, [mid, hi) masked (causal diagonal
    and key tail). Needs BLOCK_M % BLOCK_N == 0, so that [0, start_m) is whole key blocks."""
    n_full = (Lk // BLOCK_N) * BLOCK_N
    if CAUSAL:
        mid = tl.minimum(start_m, n_full)
        hi = tl.minimum(Lk, start_m + BLOCK_M)
    else:
        mid = n_full
        hi = Lk
    return mid, hi


# ----------------------------------------------------------------------------------------------------
# Attention forward
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, k_sl, v_sl, rows, ar_n, offs_d, lo, hi, Lk, D, sc,
                    MASK: tl.constexpr, CAUSAL: tl.constexpr, SCALE_POS: tl.constexpr, EVEN_D: tl.constexpr,
                    IEEE: tl.constexpr, C: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax over the key blocks [lo, hi) (k_base, v_base: the head's key 0); MASK: compare and select."""
    k_offs = ar_n[:, None] * k_sl + offs_d[None, :]
    v_offs = ar_n[:, None] * v_sl + offs_d[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + ar_n
        n64 = tl.cast(start_n, tl.int64)
        k = _load_tile(k_base + n64 * k_sl + k_offs, cols, Lk, offs_d, D, MASK, EVEN_D)
        qk = _mm(q, tl.trans(k), None, IEEE, C)
        if MASK:
            qk = tl.where(_visible(rows, cols, Lk, CAUSAL), qk * sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            qk = qk - m_new[:, None]
        else:
            if SCALE_POS:  # max commutes with a non-negative scale: one multiply per row, FMA below
                m_new = tl.maximum(m_i, tl.max(qk, 1) * sc)
            else:
                m_new = tl.maximum(m_i, tl.max(qk * sc, 1))
            qk = qk * sc - m_new[:, None]
        p = tl.math.exp2(qk)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base + n64 * v_sl + v_offs, cols, Lk, offs_d, D, MASK, EVEN_D)
        acc = acc * alpha[:, None]
        acc = _mm(_op(p, v.dtype), v, acc, IEEE, C)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    q_ptr, q_sb, q_sh, q_sl,                # data: q [B, Hq, Lq, D] and its strides (elements)
    k_ptr, k_sb, k_sh, k_sl,                # k [B, Hk, Lk, D]
    v_ptr, v_sb, v_sh, v_sl,                # v [B, Hk, Lk, D]
    o_ptr, lse_ptr,                         # out: [B, Hq, Lq, D] of q's dtype, [B, Hq, Lq] of C (contiguous)
    Hq, GROUP, Lq, Lk,                      # shapes; GROUP = Hq / Hk
    D: tl.constexpr,                        # head dim (constexpr: the D masks vectorize)
    qk_scale: tl.float64,                   # scale * log2(e)
    CAUSAL: tl.constexpr, SCALE_POS: tl.constexpr, EVEN_D: tl.constexpr, IEEE: tl.constexpr, C: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (cdiv(Lq, BLOCK_M), Hq, B): one query block of one head.

    Flops 4 BLOCK_M Lk D per program (about half of that on average when causal). Bytes (s = element
    size): q block read and out block written once (2 BLOCK_M D s), lse 4 or 8 per row; K and V of the kv
    head read once per query block, 2 Lk D s (from L2 after the first query block of the head: HBM
    traffic ~ 2 B Hk Lk D s + 2 B Hq Lq D s). Causal grids run the heaviest (last) query blocks first.
    """
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    hk = (h // GROUP).to(tl.int64)
    bh = b * Hq + h
    start_m = pid_m * BLOCK_M
    sc = tl.full([], qk_scale, C)

    ar_m = tl.arange(0, BLOCK_M)
    ar_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + ar_m
    q_base = q_ptr + b * q_sb + h.to(tl.int64) * q_sh + start_m.to(tl.int64) * q_sl
    q = _load_tile(q_base + ar_m[:, None] * q_sl + offs_d[None, :], rows, Lq, offs_d, D, True, EVEN_D)
    k_base = k_ptr + b * k_sb + hk * k_sh
    v_base = v_ptr + b * v_sb + hk * v_sh

    m_i = tl.full([BLOCK_M], float("-inf"), C)
    l_i = tl.zeros([BLOCK_M], C)
    acc = tl.zeros([BLOCK_M, BLOCK_D], C)
    mid, hi = _query_stages(start_m, Lk, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, k_sl, v_sl, rows, ar_n, offs_d, 0, mid,
                                    Lk, D, sc, False, CAUSAL, SCALE_POS, EVEN_D, IEEE, C, BLOCK_N)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, k_sl, v_sl, rows, ar_n, offs_d, mid, hi,
                                    Lk, D, sc, True, CAUSAL, SCALE_POS, EVEN_D, IEEE, C, BLOCK_N)

    acc = acc * (1.0 / l_i)[:, None]
    lse = (m_i + tl.log2(l_i)) * tl.full([], _LN2, C)
    tl.store(lse_ptr + bh * Lq + rows, lse, mask=rows < Lq)
    o_ptrs = o_ptr + (bh * Lq + start_m) * D + ar_m[:, None] * D + offs_d[None, :]
    store_rounded(o_ptrs, acc, (rows[:, None] < Lq) & (offs_d[None, :] < D))


# ----------------------------------------------------------------------------------------------------
# Attention backward
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _attn_bwd_preprocess_kernel(
    o_ptr, o_sb, o_sh, o_sl,                # data: out [B, Hq, Lq, D]
    do_ptr, do_sb, do_sh, do_sl,            # dout [B, Hq, Lq, D]
    delta_ptr,                              # out: [B, Hq, Lq] of C, Delta = rowsum(dO o O)
    Hq, Lq, D: tl.constexpr,
    C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (cdiv(Lq, BLOCK_M), Hq, B). Memory bound: reads 2 B Hq Lq D s, writes B Hq Lq x sizeof(C)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    ar_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = pid_m * BLOCK_M + ar_m
    mask = (rows[:, None] < Lq) & (offs_d[None, :] < D)
    r64 = rows.to(tl.int64)
    o = tl.load(o_ptr + b * o_sb + h * o_sh + r64[:, None] * o_sl + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(do_ptr + b * do_sb + h * do_sh + r64[:, None] * do_sl + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(do.to(C) * o.to(C), 1)
    tl.store(delta_ptr + (b * Hq + h) * Lq + rows, delta, mask=rows < Lq)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_b, q_sh, q_sl, do_b, do_sh, do_sl, lse_b, delta_b, h0, GROUP, cols, ar_m,
                         offs_d, lo, hi, Lq, D, sc, log2e,
                         MASK_CAUSAL: tl.constexpr, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr,
                         IEEE: tl.constexpr, C: tl.constexpr, BLOCK_M: tl.constexpr):
    """dK, dV of one key block += the query blocks [lo, hi) of each query head h0 .. h0 + GROUP - 1
    (transposed tiles [BLOCK_N, BLOCK_M]). One flat loop over (head, block): a head loop around a
    pipelined block loop cost ~60 more registers per thread at D = 128 (sm_90 compile)."""
    q_offs = ar_m[:, None] * q_sl + offs_d[None, :]
    do_offs = ar_m[:, None] * do_sl + offs_d[None, :]
    nblk = (tl.maximum(hi - lo, 0) + BLOCK_M - 1) // BLOCK_M
    for it in range(0, GROUP * nblk):
        g = it // nblk
        start_m = lo + (it - g * nblk) * BLOCK_M
        h = tl.cast(h0 + g, tl.int64)
        rows = start_m + ar_m
        m64 = tl.cast(start_m, tl.int64)
        q = _load_tile(q_b + h * q_sh + m64 * q_sl + q_offs, rows, Lq, offs_d, D, MASK_ROWS, EVEN_D)
        # padded rows: lse = +inf -> P = 0, Delta = 0, dO = 0: they add exactly zero
        lse2 = _load_rows(lse_b + h * Lq + rows, rows, Lq, float("inf"), MASK_ROWS) * log2e
        qkT = _mm(k, tl.trans(q), None, IEEE, C)
        pT = tl.math.exp2(qkT * sc - lse2[None, :])
        if MASK_CAUSAL:
            pT = tl.where(rows[None, :] >= cols[:, None], pT, 0.0)
        do = _load_tile(do_b + h * do_sh + m64 * do_sl + do_offs, rows, Lq, offs_d, D, MASK_ROWS, EVEN_D)
        dv = _mm(_op(pT, do.dtype), do, dv, IEEE, C)
        delta = _load_rows(delta_b + h * Lq + rows, rows, Lq, 0.0, MASK_ROWS)
        dpT = _mm(v, tl.trans(do), None, IEEE, C)
        dsT = pT * (dpT - delta[None, :])
        dk = _mm(_op(dsT, q.dtype), q, dk, IEEE, C)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, q_sb, q_sh, q_sl,                # data: q [B, Hq, Lq, D]
    k_ptr, k_sb, k_sh, k_sl,                # k [B, Hk, Lk, D]
    v_ptr, v_sb, v_sh, v_sl,                # v [B, Hk, Lk, D]
    do_ptr, do_sb, do_sh, do_sl,            # dout [B, Hq, Lq, D]
    lse_ptr, delta_ptr,                     # [B, Hq, Lq] of C (contiguous)
    dk_ptr, dv_ptr,                         # out: [B, Hk, Lk, D] of k's dtype (contiguous)
    Hq, Hk, GROUP, Lq, Lk, D: tl.constexpr,
    qk_scale: tl.float64, scale: tl.float64,
    CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, IEEE: tl.constexpr, C: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (cdiv(Lk, BLOCK_N), Hk, B): dK, dV of one key block, summed over the GROUP query heads.

    Flops 8 BLOCK_N Lq D GROUP per program (QK^T, P^T dO, V dO^T, dS^T Q; causal skips the query blocks
    above the diagonal). Bytes: K, V block read and dK, dV written once (4 BLOCK_N D s); per head of the
    group, Q and dO (2 Lq D s) and lse, Delta re-read for each key block (from L2 when the head's rows fit).
    Stages: causal diagonal (masked), full query blocks (no mask), query tail (row mask).
    Needs BLOCK_N % BLOCK_M == 0 (the causal diagonal is whole query blocks).
    """
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    start_n = pid_n * BLOCK_N
    sc = tl.full([], qk_scale, C)
    log2e = tl.full([], _LOG2E, C)

    ar_m = tl.arange(0, BLOCK_M)
    ar_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    cols = start_n + ar_n
    kv_off = start_n.to(tl.int64)
    k = _load_tile(k_ptr + b * k_sb + hk.to(tl.int64) * k_sh + kv_off * k_sl + ar_n[:, None] * k_sl + offs_d[None, :],
                   cols, Lk, offs_d, D, True, EVEN_D)
    v = _load_tile(v_ptr + b * v_sb + hk.to(tl.int64) * v_sh + kv_off * v_sl + ar_n[:, None] * v_sl + offs_d[None, :],
                   cols, Lk, offs_d, D, True, EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], C)
    dv = tl.zeros([BLOCK_N, BLOCK_D], C)
    h0 = hk * GROUP
    q_b = q_ptr + b * q_sb
    do_b = do_ptr + b * do_sb
    lse_b = lse_ptr + b * Hq * Lq
    delta_b = delta_ptr + b * Hq * Lq
    m_full = (Lq // BLOCK_M) * BLOCK_M
    if CAUSAL:
        # diagonal: query rows [start_n, start_n + BLOCK_N) see part of the block
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_b, q_sh, q_sl, do_b, do_sh, do_sl, lse_b, delta_b, h0, GROUP,
                                      cols, ar_m, offs_d, start_n, tl.minimum(start_n + BLOCK_N, Lq), Lq, D, sc, log2e,
                                      True, True, EVEN_D, IEEE, C, BLOCK_M)
        lo = start_n + BLOCK_N
    else:
        lo = 0
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_b, q_sh, q_sl, do_b, do_sh, do_sl, lse_b, delta_b, h0, GROUP,
                                  cols, ar_m, offs_d, lo, m_full, Lq, D, sc, log2e,
                                  False, False, EVEN_D, IEEE, C, BLOCK_M)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_b, q_sh, q_sl, do_b, do_sh, do_sl, lse_b, delta_b, h0, GROUP,
                                  cols, ar_m, offs_d, tl.maximum(lo, m_full), Lq, Lq, D, sc, log2e,
                                  False, True, EVEN_D, IEEE, C, BLOCK_M)

    out_off = ((b * Hk + hk) * Lk + start_n) * D + ar_n[:, None] * D + offs_d[None, :]
    mask = (cols[:, None] < Lk) & (offs_d[None, :] < D)
    store_rounded(dk_ptr + out_off, dk * tl.full([], scale, C), mask)
    store_rounded(dv_ptr + out_off, dv, mask)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, k_sl, v_sl, rows, ar_n, offs_d, lo, hi, Lk, D, sc,
                       MASK: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, IEEE: tl.constexpr,
                       C: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of one query block += the key blocks [lo, hi)."""
    k_offs = ar_n[:, None] * k_sl + offs_d[None, :]
    v_offs = ar_n[:, None] * v_sl + offs_d[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + ar_n
        n64 = tl.cast(start_n, tl.int64)
        k = _load_tile(k_base + n64 * k_sl + k_offs, cols, Lk, offs_d, D, MASK, EVEN_D)
        v = _load_tile(v_base + n64 * v_sl + v_offs, cols, Lk, offs_d, D, MASK, EVEN_D)
        qk = _mm(q, tl.trans(k), None, IEEE, C)
        p = tl.math.exp2(qk * sc - lse2[:, None])
        if MASK:  # also the key tail: exp of a padded key's logit may overflow, and 0 * inf is NaN
            p = tl.where(_visible(rows, cols, Lk, CAUSAL), p, 0.0)
        dp = _mm(do, tl.trans(v), None, IEEE, C)
        ds = p * (dp - delta[:, None])
        dq = _mm(_op(ds, k.dtype), k, dq, IEEE, C)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, q_sb, q_sh, q_sl,                # data: q [B, Hq, Lq, D]
    k_ptr, k_sb, k_sh, k_sl,                # k [B, Hk, Lk, D]
    v_ptr, v_sb, v_sh, v_sl,                # v [B, Hk, Lk, D]
    do_ptr, do_sb, do_sh, do_sl,            # dout [B, Hq, Lq, D]
    lse_ptr, delta_ptr,                     # [B, Hq, Lq] of C (contiguous)
    dq_ptr,                                 # out: [B, Hq, Lq, D] of q's dtype (contiguous)
    Hq, GROUP, Lq, Lk, D: tl.constexpr,
    qk_scale: tl.float64, scale: tl.float64,
    CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, IEEE: tl.constexpr, C: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (cdiv(Lq, BLOCK_M), Hq, B): dQ of one query block (P and dP recomputed; no atomics).

    Flops 6 BLOCK_M Lk D per program (QK^T, dO V^T, dS K). Bytes: Q, dO block read and dQ written once
    (3 BLOCK_M D s), K and V of the kv head read per query block (2 Lk D s, mostly from L2).
    Needs BLOCK_M % BLOCK_N == 0.
    """
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    hk = (h // GROUP).to(tl.int64)
    bh = b * Hq + h
    start_m = pid_m * BLOCK_M
    sc = tl.full([], qk_scale, C)

    ar_m = tl.arange(0, BLOCK_M)
    ar_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + ar_m
    q_base = q_ptr + b * q_sb + h.to(tl.int64) * q_sh + start_m.to(tl.int64) * q_sl
    do_base = do_ptr + b * do_sb + h.to(tl.int64) * do_sh + start_m.to(tl.int64) * do_sl
    q = _load_tile(q_base + ar_m[:, None] * q_sl + offs_d[None, :], rows, Lq, offs_d, D, True, EVEN_D)
    do = _load_tile(do_base + ar_m[:, None] * do_sl + offs_d[None, :], rows, Lq, offs_d, D, True, EVEN_D)
    lse2 = tl.load(lse_ptr + bh * Lq + rows, mask=rows < Lq, other=float("inf")) * tl.full([], _LOG2E, C)
    delta = tl.load(delta_ptr + bh * Lq + rows, mask=rows < Lq, other=0.0)
    k_base = k_ptr + b * k_sb + hk * k_sh
    v_base = v_ptr + b * v_sb + hk * v_sh

    dq = tl.zeros([BLOCK_M, BLOCK_D], C)
    mid, hi = _query_stages(start_m, Lk, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, k_sl, v_sl, rows, ar_n, offs_d, 0, mid, Lk, D,
                            sc, False, CAUSAL, EVEN_D, IEEE, C, BLOCK_N)
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, k_sl, v_sl, rows, ar_n, offs_d, mid, hi, Lk, D,
                            sc, True, CAUSAL, EVEN_D, IEEE, C, BLOCK_N)
    dq_ptrs = dq_ptr + (bh * Lq + start_m) * D + ar_m[:, None] * D + offs_d[None, :]
    store_rounded(dq_ptrs, dq * tl.full([], scale, C), (rows[:, None] < Lq) & (offs_d[None, :] < D))


# ----------------------------------------------------------------------------------------------------
# Attention-map KD forward
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _kd_fwd_inner(ms, ls, mt, lt, u, qs, qt, ks_base, kt_base, ks_sl, kt_sl, rows, ar_n, offs_ds, offs_dt,
                  lo, hi, Lk, Ds, Dt, cs, ct,
                  MASK: tl.constexpr, CAUSAL: tl.constexpr, EVEN_DS: tl.constexpr, EVEN_DT: tl.constexpr,
                  IEEE: tl.constexpr, C: tl.constexpr, BLOCK_N: tl.constexpr):
    """Both online softmaxes and u over the key blocks [lo, hi) (base-2 logits)."""
    ks_offs = ar_n[:, None] * ks_sl + offs_ds[None, :]
    kt_offs = ar_n[:, None] * kt_sl + offs_dt[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + ar_n
        n64 = tl.cast(start_n, tl.int64)
        ks = _load_tile(ks_base + n64 * ks_sl + ks_offs, cols, Lk, offs_ds, Ds, MASK, EVEN_DS)
        kt = _load_tile(kt_base + n64 * kt_sl + kt_offs, cols, Lk, offs_dt, Dt, MASK, EVEN_DT)
        s = _mm(qs, tl.trans(ks), None, IEEE, C) * cs
        t = _mm(qt, tl.trans(kt), None, IEEE, C) * ct
        d = t - s  # finite everywhere (padded keys read as 0); weighted by P = 0 where masked
        if MASK:
            keep = _visible(rows, cols, Lk, CAUSAL)
            s = tl.where(keep, s, float("-inf"))
            t = tl.where(keep, t, float("-inf"))
        ms_new = tl.maximum(ms, tl.max(s, 1))
        mt_new = tl.maximum(mt, tl.max(t, 1))
        ps = tl.math.exp2(s - ms_new[:, None])
        pt = tl.math.exp2(t - mt_new[:, None])
        alpha_t = tl.math.exp2(mt - mt_new)
        ls = ls * tl.math.exp2(ms - ms_new) + tl.sum(ps, 1)
        lt = lt * alpha_t + tl.sum(pt, 1)
        u = u * alpha_t + tl.sum(pt * d, 1)
        ms = ms_new
        mt = mt_new
    return ms, ls, mt, lt, u


@triton.jit
def _kd_fwd_kernel(
    qs_ptr, qs_sb, qs_sh, qs_sl,            # data: student q [B, H, Lq, Ds]
    ks_ptr, ks_sb, ks_sh, ks_sl,            # student k [B, Hks, Lk, Ds]
    qt_ptr, qt_sb, qt_sh, qt_sl,            # teacher q [B, H, Lq, Dt]
    kt_ptr, kt_sb, kt_sh, kt_sl,            # teacher k [B, Hkt, Lk, Dt]
    kl_ptr, lse_s_ptr, lse_t_ptr,           # out: [B, H, Lq] of C each (contiguous)
    H, GROUP_S, GROUP_T, Lq, Lk,            # GROUP_S = H / Hks, GROUP_T = H / Hkt
    Ds: tl.constexpr, Dt: tl.constexpr,     # head dims
    cs: tl.float64, ct: tl.float64,         # scale_s log2(e), scale_t log2(e)
    CAUSAL: tl.constexpr, EVEN_DS: tl.constexpr, EVEN_DT: tl.constexpr, IEEE: tl.constexpr, C: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
):
    """Grid (cdiv(Lq, BLOCK_M), H, B): KL, lse_s, lse_t of one query block, one pass over the keys.

    Flops 2 BLOCK_M Lk (Ds + Dt) per program, 2 exp2 per (i, j) (exp-bound at D <= 64 on an H100, research
    notes Sec. 3.3). Bytes: q_s, q_t block read once (BLOCK_M (Ds + Dt) s), k_s, k_t read per query block
    (Lk (Ds + Dt) s, mostly from L2), 3 values of C written per row. No [Lq, Lk] matrix anywhere.
    Needs BLOCK_M % BLOCK_N == 0.
    """
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    hks = (h // GROUP_S).to(tl.int64)
    hkt = (h // GROUP_T).to(tl.int64)
    bh = b * H + h
    start_m = pid_m * BLOCK_M
    cs_c = tl.full([], cs, C)
    ct_c = tl.full([], ct, C)

    ar_m = tl.arange(0, BLOCK_M)
    ar_n = tl.arange(0, BLOCK_N)
    offs_ds = tl.arange(0, BLOCK_DS)
    offs_dt = tl.arange(0, BLOCK_DT)
    rows = start_m + ar_m
    m64 = start_m.to(tl.int64)
    h64 = h.to(tl.int64)
    qs = _load_tile(qs_ptr + b * qs_sb + h64 * qs_sh + m64 * qs_sl + ar_m[:, None] * qs_sl + offs_ds[None, :],
                    rows, Lq, offs_ds, Ds, True, EVEN_DS)
    qt = _load_tile(qt_ptr + b * qt_sb + h64 * qt_sh + m64 * qt_sl + ar_m[:, None] * qt_sl + offs_dt[None, :],
                    rows, Lq, offs_dt, Dt, True, EVEN_DT)
    ks_base = ks_ptr + b * ks_sb + hks * ks_sh
    kt_base = kt_ptr + b * kt_sb + hkt * kt_sh

    ms = tl.full([BLOCK_M], float("-inf"), C)
    mt = tl.full([BLOCK_M], float("-inf"), C)
    ls = tl.zeros([BLOCK_M], C)
    lt = tl.zeros([BLOCK_M], C)
    u = tl.zeros([BLOCK_M], C)
    mid, hi = _query_stages(start_m, Lk, CAUSAL, BLOCK_M, BLOCK_N)
    ms, ls, mt, lt, u = _kd_fwd_inner(ms, ls, mt, lt, u, qs, qt, ks_base, kt_base, ks_sl, kt_sl, rows, ar_n,
                                      offs_ds, offs_dt, 0, mid, Lk, Ds, Dt, cs_c, ct_c,
                                      False, CAUSAL, EVEN_DS, EVEN_DT, IEEE, C, BLOCK_N)
    ms, ls, mt, lt, u = _kd_fwd_inner(ms, ls, mt, lt, u, qs, qt, ks_base, kt_base, ks_sl, kt_sl, rows, ar_n,
                                      offs_ds, offs_dt, mid, hi, Lk, Ds, Dt, cs_c, ct_c,
                                      True, CAUSAL, EVEN_DS, EVEN_DT, IEEE, C, BLOCK_N)

    ln2 = tl.full([], _LN2, C)
    log2_ls = tl.log2(ls)
    log2_lt = tl.log2(lt)
    # KL = A - lse_t + lse_s with A = u / l_t, grouped so that equal student and teacher give exactly 0
    kl = (u / lt + (ms - mt) + (log2_ls - log2_lt)) * ln2
    out = bh * Lq + rows
    rmask = rows < Lq
    tl.store(kl_ptr + out, kl, mask=rmask)
    tl.store(lse_s_ptr + out, (ms + log2_ls) * ln2, mask=rmask)
    tl.store(lse_t_ptr + out, (mt + log2_lt) * ln2, mask=rmask)


# ----------------------------------------------------------------------------------------------------
# Attention-map KD backward
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _kd_bwd_dk_inner(dks, ks, kt, qs_b, qs_sh, qs_sl, qt_b, qt_sh, qt_sl, lse_s_b, lse_t_b, g_b, h0, NH,
                     cols, ar_m, offs_ds, offs_dt, lo, hi, Lq, Ds, Dt, cs, ct, log2e,
                     MASK_CAUSAL: tl.constexpr, MASK_ROWS: tl.constexpr, EVEN_DS: tl.constexpr,
                     EVEN_DT: tl.constexpr, IEEE: tl.constexpr, C: tl.constexpr, BLOCK_M: tl.constexpr):
    """dk_s of one key block += the query blocks [lo, hi) of the query heads h0 .. h0 + NH - 1, which share
    the teacher key block kt; one flat loop over (head, block) as _attn_bwd_dkdv_inner."""
    qs_offs = ar_m[:, None] * qs_sl + offs_ds[None, :]
    qt_offs = ar_m[:, None] * qt_sl + offs_dt[None, :]
    nblk = (tl.maximum(hi - lo, 0) + BLOCK_M - 1) // BLOCK_M
    for it in range(0, NH * nblk):
        g = it // nblk
        start_m = lo + (it - g * nblk) * BLOCK_M
        h = tl.cast(h0 + g, tl.int64)
        rows = start_m + ar_m
        m64 = tl.cast(start_m, tl.int64)
        qs = _load_tile(qs_b + h * qs_sh + m64 * qs_sl + qs_offs, rows, Lq, offs_ds, Ds, MASK_ROWS, EVEN_DS)
        qt = _load_tile(qt_b + h * qt_sh + m64 * qt_sl + qt_offs, rows, Lq, offs_dt, Dt, MASK_ROWS, EVEN_DT)
        # padded rows: g = 0 and both lse = +inf, so dS = 0 exactly
        lse_s2 = _load_rows(lse_s_b + h * Lq + rows, rows, Lq, float("inf"), MASK_ROWS) * log2e
        lse_t2 = _load_rows(lse_t_b + h * Lq + rows, rows, Lq, float("inf"), MASK_ROWS) * log2e
        gv = _load_rows(g_b + h * Lq + rows, rows, Lq, 0.0, MASK_ROWS)
        sT = _mm(ks, tl.trans(qs), None, IEEE, C)
        tT = _mm(kt, tl.trans(qt), None, IEEE, C)
        dsT = gv[None, :] * (tl.math.exp2(sT * cs - lse_s2[None, :]) - tl.math.exp2(tT * ct - lse_t2[None, :]))
        if MASK_CAUSAL:
            dsT = tl.where(rows[None, :] >= cols[:, None], dsT, 0.0)
        dks = _mm(_op(dsT, qs.dtype), qs, dks, IEEE, C)
    return dks


@triton.jit
def _kd_bwd_dk_kernel(
    qs_ptr, qs_sb, qs_sh, qs_sl,            # data: student q [B, H, Lq, Ds]
    ks_ptr, ks_sb, ks_sh, ks_sl,            # student k [B, Hks, Lk, Ds]
    qt_ptr, qt_sb, qt_sh, qt_sl,            # teacher q [B, H, Lq, Dt]
    kt_ptr, kt_sb, kt_sh, kt_sl,            # teacher k [B, Hkt, Lk, Dt]
    lse_s_ptr, lse_t_ptr, g_ptr,            # [B, H, Lq] of C (contiguous)
    dks_ptr,                                # out: [B, Hks, Lk, Ds] of the student's dtype (contiguous)
    H, Hks, GROUP_S, GROUP_T, Lq, Lk, Ds: tl.constexpr, Dt: tl.constexpr,
    cs: tl.float64, ct: tl.float64, scale_s: tl.float64,
    CAUSAL: tl.constexpr, EVEN_DS: tl.constexpr, EVEN_DT: tl.constexpr, IEEE: tl.constexpr, C: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
):
    """Grid (cdiv(Lk, BLOCK_N), Hks, B): dk_s of one key block, summed over the GROUP_S query heads.

    Flops 2 BLOCK_N Lq (2 Ds + Dt) GROUP_S per program (S^T, T^T recomputed, dS^T q_s), 2 exp2 per (i, j).
    Bytes: k_s block read and dk_s written once, k_t's block once per teacher kv head met; per head q_s,
    q_t (Lq (Ds + Dt) s) and lse_s, lse_t, g re-read for each key block (mostly from L2).
    Needs BLOCK_N % BLOCK_M == 0.
    """
    pid_n = tl.program_id(0)
    hks = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    start_n = pid_n * BLOCK_N
    cs_c = tl.full([], cs, C)
    ct_c = tl.full([], ct, C)
    log2e = tl.full([], _LOG2E, C)

    ar_m = tl.arange(0, BLOCK_M)
    ar_n = tl.arange(0, BLOCK_N)
    offs_ds = tl.arange(0, BLOCK_DS)
    offs_dt = tl.arange(0, BLOCK_DT)
    cols = start_n + ar_n
    n64 = start_n.to(tl.int64)
    ks = _load_tile(ks_ptr + b * ks_sb + hks.to(tl.int64) * ks_sh + n64 * ks_sl + ar_n[:, None] * ks_sl
                    + offs_ds[None, :], cols, Lk, offs_ds, Ds, True, EVEN_DS)
    kt_b = kt_ptr + b * kt_sb + n64 * kt_sl + ar_n[:, None] * kt_sl + offs_dt[None, :]
    dks = tl.zeros([BLOCK_N, BLOCK_DS], C)
    h0 = hks * GROUP_S
    qs_b = qs_ptr + b * qs_sb
    qt_b = qt_ptr + b * qt_sb
    lse_s_b = lse_s_ptr + b * H * Lq
    lse_t_b = lse_t_ptr + b * H * Lq
    g_b = g_ptr + b * H * Lq
    m_full = (Lq // BLOCK_M) * BLOCK_M
    if CAUSAL:
        lo = start_n + BLOCK_N
    else:
        lo = 0
    # the group's heads in runs that share a teacher kv head (one run unless Hkt > Hks)
    for th in range(h0 // GROUP_T, (h0 + GROUP_S - 1) // GROUP_T + 1):
        h_lo = tl.maximum(h0, th * GROUP_T)
        nh = tl.minimum(h0 + GROUP_S, (th + 1) * GROUP_T) - h_lo
        kt = _load_tile(kt_b + tl.cast(th, tl.int64) * kt_sh, cols, Lk, offs_dt, Dt, True, EVEN_DT)
        if CAUSAL:
            dks = _kd_bwd_dk_inner(dks, ks, kt, qs_b, qs_sh, qs_sl, qt_b, qt_sh, qt_sl, lse_s_b, lse_t_b, g_b, h_lo,
                                   nh, cols, ar_m, offs_ds, offs_dt, start_n, tl.minimum(start_n + BLOCK_N, Lq), Lq,
                                   Ds, Dt, cs_c, ct_c, log2e, True, True, EVEN_DS, EVEN_DT, IEEE, C, BLOCK_M)
        dks = _kd_bwd_dk_inner(dks, ks, kt, qs_b, qs_sh, qs_sl, qt_b, qt_sh, qt_sl, lse_s_b, lse_t_b, g_b, h_lo,
                               nh, cols, ar_m, offs_ds, offs_dt, lo, m_full, Lq,
                               Ds, Dt, cs_c, ct_c, log2e, False, False, EVEN_DS, EVEN_DT, IEEE, C, BLOCK_M)
        dks = _kd_bwd_dk_inner(dks, ks, kt, qs_b, qs_sh, qs_sl, qt_b, qt_sh, qt_sl, lse_s_b, lse_t_b, g_b, h_lo,
                               nh, cols, ar_m, offs_ds, offs_dt, tl.maximum(lo, m_full), Lq, Lq,
                               Ds, Dt, cs_c, ct_c, log2e, False, True, EVEN_DS, EVEN_DT, IEEE, C, BLOCK_M)

    out_off = ((b * Hks + hks) * Lk + start_n) * Ds + ar_n[:, None] * Ds + offs_ds[None, :]
    store_rounded(dks_ptr + out_off, dks * tl.full([], scale_s, C), (cols[:, None] < Lk) & (offs_ds[None, :] < Ds))


@triton.jit
def _kd_bwd_dq_inner(dqs, qs, qt, lse_s2, lse_t2, gv, ks_base, kt_base, ks_sl, kt_sl, rows, ar_n, offs_ds, offs_dt,
                     lo, hi, Lk, Ds, Dt, cs, ct,
                     MASK: tl.constexpr, CAUSAL: tl.constexpr, EVEN_DS: tl.constexpr, EVEN_DT: tl.constexpr,
                     IEEE: tl.constexpr, C: tl.constexpr, BLOCK_N: tl.constexpr):
    """dq_s of one query block += the key blocks [lo, hi)."""
    ks_offs = ar_n[:, None] * ks_sl + offs_ds[None, :]
    kt_offs = ar_n[:, None] * kt_sl + offs_dt[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + ar_n
        n64 = tl.cast(start_n, tl.int64)
        ks = _load_tile(ks_base + n64 * ks_sl + ks_offs, cols, Lk, offs_ds, Ds, MASK, EVEN_DS)
        kt = _load_tile(kt_base + n64 * kt_sl + kt_offs, cols, Lk, offs_dt, Dt, MASK, EVEN_DT)
        s = _mm(qs, tl.trans(ks), None, IEEE, C)
        t = _mm(qt, tl.trans(kt), None, IEEE, C)
        ds = gv[:, None] * (tl.math.exp2(s * cs - lse_s2[:, None]) - tl.math.exp2(t * ct - lse_t2[:, None]))
        if MASK:
            ds = tl.where(_visible(rows, cols, Lk, CAUSAL), ds, 0.0)
        dqs = _mm(_op(ds, ks.dtype), ks, dqs, IEEE, C)
    return dqs


@triton.jit
def _kd_bwd_dq_kernel(
    qs_ptr, qs_sb, qs_sh, qs_sl,            # data: student q [B, H, Lq, Ds]
    ks_ptr, ks_sb, ks_sh, ks_sl,            # student k [B, Hks, Lk, Ds]
    qt_ptr, qt_sb, qt_sh, qt_sl,            # teacher q [B, H, Lq, Dt]
    kt_ptr, kt_sb, kt_sh, kt_sl,            # teacher k [B, Hkt, Lk, Dt]
    lse_s_ptr, lse_t_ptr, g_ptr,            # [B, H, Lq] of C (contiguous)
    dqs_ptr,                                # out: [B, H, Lq, Ds] of the student's dtype (contiguous)
    H, GROUP_S, GROUP_T, Lq, Lk, Ds: tl.constexpr, Dt: tl.constexpr,
    cs: tl.float64, ct: tl.float64, scale_s: tl.float64,
    CAUSAL: tl.constexpr, EVEN_DS: tl.constexpr, EVEN_DT: tl.constexpr, IEEE: tl.constexpr, C: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
):
    """Grid (cdiv(Lq, BLOCK_M), H, B): dq_s of one query block.

    Flops 2 BLOCK_M Lk (2 Ds + Dt) per program, 2 exp2 per (i, j). Bytes: q_s, q_t read and dq_s written
    once per block; k_s, k_t read per query block (Lk (Ds + Dt) s, mostly from L2). Needs BLOCK_M % BLOCK_N == 0.
    """
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    hks = (h // GROUP_S).to(tl.int64)
    hkt = (h // GROUP_T).to(tl.int64)
    bh = b * H + h
    start_m = pid_m * BLOCK_M
    cs_c = tl.full([], cs, C)
    ct_c = tl.full([], ct, C)
    log2e = tl.full([], _LOG2E, C)

    ar_m = tl.arange(0, BLOCK_M)
    ar_n = tl.arange(0, BLOCK_N)
    offs_ds = tl.arange(0, BLOCK_DS)
    offs_dt = tl.arange(0, BLOCK_DT)
    rows = start_m + ar_m
    rmask = rows < Lq
    m64 = start_m.to(tl.int64)
    h64 = h.to(tl.int64)
    qs = _load_tile(qs_ptr + b * qs_sb + h64 * qs_sh + m64 * qs_sl + ar_m[:, None] * qs_sl + offs_ds[None, :],
                    rows, Lq, offs_ds, Ds, True, EVEN_DS)
    qt = _load_tile(qt_ptr + b * qt_sb + h64 * qt_sh + m64 * qt_sl + ar_m[:, None] * qt_sl + offs_dt[None, :],
                    rows, Lq, offs_dt, Dt, True, EVEN_DT)
    lse_s2 = tl.load(lse_s_ptr + bh * Lq + rows, mask=rmask, other=float("inf")) * log2e
    lse_t2 = tl.load(lse_t_ptr + bh * Lq + rows, mask=rmask, other=float("inf")) * log2e
    gv = tl.load(g_ptr + bh * Lq + rows, mask=rmask, other=0.0)
    ks_base = ks_ptr + b * ks_sb + hks * ks_sh
    kt_base = kt_ptr + b * kt_sb + hkt * kt_sh

    dqs = tl.zeros([BLOCK_M, BLOCK_DS], C)
    mid, hi = _query_stages(start_m, Lk, CAUSAL, BLOCK_M, BLOCK_N)
    dqs = _kd_bwd_dq_inner(dqs, qs, qt, lse_s2, lse_t2, gv, ks_base, kt_base, ks_sl, kt_sl, rows, ar_n, offs_ds,
                           offs_dt, 0, mid, Lk, Ds, Dt, cs_c, ct_c,
                           False, CAUSAL, EVEN_DS, EVEN_DT, IEEE, C, BLOCK_N)
    dqs = _kd_bwd_dq_inner(dqs, qs, qt, lse_s2, lse_t2, gv, ks_base, kt_base, ks_sl, kt_sl, rows, ar_n, offs_ds,
                           offs_dt, mid, hi, Lk, Ds, Dt, cs_c, ct_c,
                           True, CAUSAL, EVEN_DS, EVEN_DT, IEEE, C, BLOCK_N)
    out_off = (bh * Lq + start_m) * Ds + ar_m[:, None] * Ds + offs_ds[None, :]
    store_rounded(dqs_ptr + out_off, dqs * tl.full([], scale_s, C), rmask[:, None] & (offs_ds[None, :] < Ds))


# ----------------------------------------------------------------------------------------------------
# Launch configuration (static table; GPU entries are tuning only)
# ----------------------------------------------------------------------------------------------------

class Config(NamedTuple):
    BLOCK_M: int    # query rows per tile
    BLOCK_N: int    # key rows per tile
    num_warps: int
    num_stages: int


MAX_HEAD_DIM = 256

# Small tiles for the interpreter (CPU tensors, TRITON_INTERPRET=1): fast, and Lq, Lk = 97 already cross
# several blocks, the causal diagonal spans two key (query) blocks of a query (key) block.
_INTERPRET_Q = Config(32, 16, 1, 1)    # query-stationary kernels: fwd, dq, kd fwd, kd dq
_INTERPRET_K = Config(16, 32, 1, 1)    # key-stationary kernels: dkdv, kd dk


def _interpreted(t: torch.Tensor) -> bool:
    return bool(triton.knobs.runtime.interpret) or not t.is_cuda


# GPU tiles by (kind, operand class, padded head dim <= 64 / 128 / 256): (BLOCK_M, BLOCK_N, warps, stages).
# Tuning only (correctness does not depend on them), chosen for H100/H200 (sm_90: 228 KB shared memory,
# 64K registers per SM) from sm_90 compiles (registers, spills, shared memory), not yet from timings:
# at D = 64, 96, 128, 256, causal or not, the 16-bit and float64 entries compile without register spills
# (triton 3.6 and 3.9, ptxas for sm_90); a float32 kd_dk and the 16-bit dkdv at D = 40 spill <= 16 bytes.
#   16-bit: forward 128 x 64 (FA2 / Triton tutorial), 8 warps (2 warpgroups of 64 rows; 4 warps also fit
#     at D = 64: 204 registers), 3 stages of K, V (96 KB at D = 128, 165 registers). dK/dV own a large key
#     block (64 or 32 x 128, 8 warps: dK + dV are 2 x 128 x D fp32); dQ 128 x 64. The KD forward holds two
#     Q tiles but no [BLOCK_M, D] output accumulator, so the same tiles fit.
#   float32 (ieee: FMA dots, no tensor cores, every operand in registers) and float64: small tiles.
_GPU_CONFIGS = {
    ("fwd", 16): {64: (128, 64, 8, 3), 128: (128, 64, 8, 3), 256: (128, 32, 8, 2)},
    ("dq", 16): {64: (128, 64, 8, 3), 128: (128, 64, 8, 2), 256: (128, 32, 8, 2)},
    ("dkdv", 16): {64: (64, 128, 8, 2), 128: (32, 128, 8, 2), 256: (16, 32, 4, 2)},
    ("kd_fwd", 16): {64: (128, 64, 8, 3), 128: (128, 64, 8, 2), 256: (128, 32, 8, 2)},
    ("kd_dq", 16): {64: (128, 64, 8, 3), 128: (128, 64, 8, 2), 256: (128, 32, 8, 2)},
    ("kd_dk", 16): {64: (32, 128, 8, 3), 128: (32, 128, 8, 2), 256: (32, 32, 4, 2)},
    ("fwd", 32): {64: (32, 32, 4, 2), 128: (32, 16, 4, 2), 256: (16, 16, 8, 2)},
    ("dq", 32): {64: (32, 32, 4, 2), 128: (32, 16, 4, 2), 256: (16, 16, 8, 2)},
    ("dkdv", 32): {64: (32, 32, 8, 2), 128: (16, 32, 8, 2), 256: (16, 16, 8, 2)},
    ("kd_fwd", 32): {64: (32, 32, 4, 2), 128: (16, 16, 8, 2), 256: (16, 16, 8, 2)},
    ("kd_dq", 32): {64: (32, 32, 4, 2), 128: (32, 32, 8, 2), 256: (16, 16, 8, 2)},
    ("kd_dk", 32): {64: (32, 32, 4, 2), 128: (16, 32, 8, 2), 256: (16, 16, 8, 2)},
}
for _kind in ("fwd", "dq", "dkdv", "kd_fwd", "kd_dq", "kd_dk"):
    _GPU_CONFIGS[(_kind, 64)] = {64: (32, 32, 4, 1), 128: (16, 16, 4, 1), 256: (16, 16, 8, 1)}
_GPU_CONFIGS[("kd_fwd", 64)][64] = (16, 16, 4, 1)  # 32 x 32 spilled (two float64 Q tiles in registers)


def _config(kind: str, block_d: int, dtype: torch.dtype, interpreted: bool) -> Config:
    """Tiles of kernel ``kind`` ('fwd', 'dq', 'dkdv', 'kd_fwd', 'kd_dq', 'kd_dk') for the padded head dim
    ``block_d`` (the larger of the two for the KD kernels). Query-stationary kernels need
    BLOCK_M % BLOCK_N == 0, key-stationary ones (dkdv, kd_dk) BLOCK_N % BLOCK_M == 0."""
    if interpreted:
        return _INTERPRET_K if kind in ("dkdv", "kd_dk") else _INTERPRET_Q
    bits = 64 if dtype == torch.float64 else 32 if dtype == torch.float32 else 16
    return Config(*_GPU_CONFIGS[(kind, bits)][max(64, block_d)])


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _check_head_dim(op: str, *dims: int) -> None:
    for d in dims:
        if d > MAX_HEAD_DIM:
            raise ValueError(f"{op} (triton): head dim {d} > {MAX_HEAD_DIM} is not supported")


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _flags(dtype: torch.dtype) -> dict:
    """IEEE: float32/float64 dots exact (no TF32); C: the compute type."""
    return dict(IEEE=dtype in (torch.float32, torch.float64), C=triton_utils.tl_compute(dtype))


def _batches(B: int):
    """(b0, b1) batch ranges of at most 65535 (gridDim.z limit), one launch each."""
    return triton_utils.row_batches(B)


# ----------------------------------------------------------------------------------------------------
# Host functions (inputs validated by the op layer)
# ----------------------------------------------------------------------------------------------------

def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float):
    """(out [B, Hq, Lq, D] of q.dtype, lse [B, Hq, Lq] of the compute dtype, natural log)."""
    B, Hq, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    _check_head_dim("attention_forward", D)
    cd = triton_utils.compute_dtype(q.dtype)
    out = torch.empty((B, Hq, Lq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Lq), dtype=cd, device=q.device)
    bd = _block_d(D)
    cfg = _config("fwd", bd, q.dtype, _interpreted(q))
    with triton_utils.device_guard(q):
        for b0, b1 in _batches(B):
            grid = (triton.cdiv(Lq, cfg.BLOCK_M), Hq, b1 - b0)
            _attn_fwd_kernel[grid](
                q[b0:b1], *_strides(q), k[b0:b1], *_strides(k), v[b0:b1], *_strides(v),
                out[b0:b1], lse[b0:b1],
                Hq, Hq // Hk, Lq, Lk, D, float(scale) * LOG2E,
                CAUSAL=bool(causal), SCALE_POS=scale >= 0, EVEN_D=D == bd, **_flags(q.dtype),
                BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_D=bd,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse


def backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
             lse: torch.Tensor, causal: bool, scale: float):
    """(dq [B, Hq, Lq, D], dk, dv [B, Hk, Lk, D] summed over each group's query heads), in the inputs' dtype.

    Three launches: Delta (preprocess), dK/dV per key block, dQ per query block; no atomics, deterministic.
    out and dout may be strided like q; lse (the forward's) is read contiguous (copied only if it is not).
    """
    B, Hq, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    _check_head_dim("attention_backward", D)
    lse = lse.contiguous()
    cd = triton_utils.compute_dtype(q.dtype)
    dq = torch.empty((B, Hq, Lq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Hk, Lk, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, Hk, Lk, D), dtype=v.dtype, device=q.device)
    delta = torch.empty((B, Hq, Lq), dtype=cd, device=q.device)
    bd = _block_d(D)
    interp = _interpreted(q)
    cfg_k = _config("dkdv", bd, q.dtype, interp)
    cfg_q = _config("dq", bd, q.dtype, interp)
    pre_m = 16 if interp else max(16, min(128, 8192 // bd))  # tuning: ~8K elements of each input per program
    flags = _flags(q.dtype)
    qk_scale = float(scale) * LOG2E
    with triton_utils.device_guard(q):
        for b0, b1 in _batches(B):
            nb = b1 - b0
            args_q = (q[b0:b1], *_strides(q))
            args_k = (k[b0:b1], *_strides(k))
            args_v = (v[b0:b1], *_strides(v))
            args_do = (dout[b0:b1], *_strides(dout))
            _attn_bwd_preprocess_kernel[(triton.cdiv(Lq, pre_m), Hq, nb)](
                out[b0:b1], *_strides(out), *args_do, delta[b0:b1], Hq, Lq, D,
                C=flags["C"], BLOCK_M=pre_m, BLOCK_D=bd, num_warps=4)
            _attn_bwd_dkdv_kernel[(triton.cdiv(Lk, cfg_k.BLOCK_N), Hk, nb)](
                *args_q, *args_k, *args_v, *args_do, lse[b0:b1], delta[b0:b1], dk[b0:b1], dv[b0:b1],
                Hq, Hk, Hq // Hk, Lq, Lk, D, qk_scale, float(scale),
                CAUSAL=bool(causal), EVEN_D=D == bd, **flags,
                BLOCK_M=cfg_k.BLOCK_M, BLOCK_N=cfg_k.BLOCK_N, BLOCK_D=bd,
                num_warps=cfg_k.num_warps, num_stages=cfg_k.num_stages)
            _attn_bwd_dq_kernel[(triton.cdiv(Lq, cfg_q.BLOCK_M), Hq, nb)](
                *args_q, *args_k, *args_v, *args_do, lse[b0:b1], delta[b0:b1], dq[b0:b1],
                Hq, Hq // Hk, Lq, Lk, D, qk_scale, float(scale),
                CAUSAL=bool(causal), EVEN_D=D == bd, **flags,
                BLOCK_M=cfg_q.BLOCK_M, BLOCK_N=cfg_q.BLOCK_N, BLOCK_D=bd,
                num_warps=cfg_q.num_warps, num_stages=cfg_q.num_stages)
    return dq, dk, dv


def kd_forward(qs: torch.Tensor, ks: torch.Tensor, qt: torch.Tensor, kt: torch.Tensor, causal: bool,
               scale_s: float, scale_t: float):
    """(kl, lse_s, lse_t), each [B, H, Lq] of the compute dtype: per query row KL(P_teacher || Q_student).

    qs [B, H, Lq, Ds], ks [B, Hks, Lk, Ds], qt [B, H, Lq, Dt], kt [B, Hkt, Lk, Dt], all of one dtype."""
    B, H, Lq, Ds = qs.shape
    Hks, Lk = ks.shape[1], ks.shape[2]
    Hkt, Dt = kt.shape[1], qt.shape[3]
    _check_head_dim("attention_kd_forward", Ds, Dt)
    cd = triton_utils.compute_dtype(qs.dtype)
    kl = torch.empty((B, H, Lq), dtype=cd, device=qs.device)
    lse_s = torch.empty_like(kl)
    lse_t = torch.empty_like(kl)
    bds, bdt = _block_d(Ds), _block_d(Dt)
    cfg = _config("kd_fwd", max(bds, bdt), qs.dtype, _interpreted(qs))
    with triton_utils.device_guard(qs):
        for b0, b1 in _batches(B):
            grid = (triton.cdiv(Lq, cfg.BLOCK_M), H, b1 - b0)
            _kd_fwd_kernel[grid](
                qs[b0:b1], *_strides(qs), ks[b0:b1], *_strides(ks), qt[b0:b1], *_strides(qt), kt[b0:b1], *_strides(kt),
                kl[b0:b1], lse_s[b0:b1], lse_t[b0:b1],
                H, H // Hks, H // Hkt, Lq, Lk, Ds, Dt, float(scale_s) * LOG2E, float(scale_t) * LOG2E,
                CAUSAL=bool(causal), EVEN_DS=Ds == bds, EVEN_DT=Dt == bdt, **_flags(qs.dtype),
                BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_DS=bds, BLOCK_DT=bdt,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return kl, lse_s, lse_t


def kd_backward(qs: torch.Tensor, ks: torch.Tensor, qt: torch.Tensor, kt: torch.Tensor, lse_s: torch.Tensor,
                lse_t: torch.Tensor, g: torch.Tensor, causal: bool, scale_s: float, scale_t: float):
    """(dqs [B, H, Lq, Ds], dks [B, Hks, Lk, Ds]) in the student's dtype, for upstream per-row gradient g.

    dS = g (softmax(s) - softmax(t)) from the saved log-sum-exps; two launches (dk per key block, dq per
    query block), no atomics, deterministic. lse_s, lse_t, g: [B, H, Lq] of the compute dtype.
    """
    B, H, Lq, Ds = qs.shape
    Hks, Lk = ks.shape[1], ks.shape[2]
    Hkt, Dt = kt.shape[1], qt.shape[3]
    _check_head_dim("attention_kd_backward", Ds, Dt)
    lse_s, lse_t, g = lse_s.contiguous(), lse_t.contiguous(), g.contiguous()
    dqs = torch.empty((B, H, Lq, Ds), dtype=qs.dtype, device=qs.device)
    dks = torch.empty((B, Hks, Lk, Ds), dtype=ks.dtype, device=qs.device)
    bds, bdt = _block_d(Ds), _block_d(Dt)
    interp = _interpreted(qs)
    cfg_k = _config("kd_dk", max(bds, bdt), qs.dtype, interp)
    cfg_q = _config("kd_dq", max(bds, bdt), qs.dtype, interp)
    flags = _flags(qs.dtype)
    cs, ct = float(scale_s) * LOG2E, float(scale_t) * LOG2E
    with triton_utils.device_guard(qs):
        for b0, b1 in _batches(B):
            nb = b1 - b0
            args = (qs[b0:b1], *_strides(qs), ks[b0:b1], *_strides(ks), qt[b0:b1], *_strides(qt),
                    kt[b0:b1], *_strides(kt), lse_s[b0:b1], lse_t[b0:b1], g[b0:b1])
            consts = dict(CAUSAL=bool(causal), EVEN_DS=Ds == bds, EVEN_DT=Dt == bdt, **flags,
                          BLOCK_DS=bds, BLOCK_DT=bdt)
            _kd_bwd_dk_kernel[(triton.cdiv(Lk, cfg_k.BLOCK_N), Hks, nb)](
                *args, dks[b0:b1], H, Hks, H // Hks, H // Hkt, Lq, Lk, Ds, Dt, cs, ct, float(scale_s),
                **consts, BLOCK_M=cfg_k.BLOCK_M, BLOCK_N=cfg_k.BLOCK_N,
                num_warps=cfg_k.num_warps, num_stages=cfg_k.num_stages)
            _kd_bwd_dq_kernel[(triton.cdiv(Lq, cfg_q.BLOCK_M), H, nb)](
                *args, dqs[b0:b1], H, H // Hks, H // Hkt, Lq, Lk, Ds, Dt, cs, ct, float(scale_s),
                **consts, BLOCK_M=cfg_q.BLOCK_M, BLOCK_N=cfg_q.BLOCK_N,
                num_warps=cfg_q.num_warps, num_stages=cfg_q.num_stages)
    return dqs, dks
