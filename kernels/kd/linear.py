"""fused_linear_kd_loss: the language-model head and the distillation loss in one op, chunk by chunk.

    fused_linear_kd_loss(student_hidden, student_weight, *, student_bias=None,
                         teacher_logits=None | teacher_hidden=..., teacher_weight=..., teacher_bias=None,
                         divergence="forward_kl", temperature=1.0, t_squared=False, beta=0.5, alpha=0.1,
                         lam=0.5, labels=None, ignore_index=-100, hard_weight=0.0, soft_weight=1.0,
                         normalizer=None, softcap=None, teacher_softcap=None, chunk_size=None,
                         return_parts=False, backend=None)

The student's logits are z = softcap(h W^T + b) (softcap(z) = c tanh(z / c), Gemma 2's final-logit
soft-capping, when ``softcap`` = c is given); the teacher is either logits already in memory or its
own hidden states and head (any hidden size, never differentiated). The loss and every option are
those of ``kd_loss`` on z (the divergence on tempered logits, the hard-label CE on untempered ones,
masking, normalizer, T^2, parts). Returns the loss; the backward gives d/dh, d/dW and d/db.

Masked tokens (labels == ignore_index: prompt, padding) are dropped before the GEMMs when
``pack_valid`` (default on the CPU; on a GPU it costs a host sync, so it is opt-in), so they cost
nothing.

Memory: the tokens go through in chunks of ``chunk_size`` rows; per chunk the student logits (which
the row kernel overwrites with their gradient) and the teacher logits live in the compute dtype, so
the workspace is chunk x V x 4 bytes x (2, 3 with soft-capping), whatever the number of tokens; the
default chunk fills 64 MiB on the CPU and 512 MiB on a GPU. Nothing of size [tokens x V] is ever
allocated (the teacher's logits, when given, are the caller's).

Work per chunk of c tokens (H hidden, V vocabulary, Ht teacher hidden): the student projection 2cHV
flops, the teacher's 2cHtV, the row kernel (kd_loss's: reads the two logit rows, writes the gradient
in place), then dh = g W (2cHV) and dW += g^T h (2cHV); the gradients are computed in the forward
(so the backward only scales them by the upstream gradient) and the weight gradient is accumulated
in the compute dtype across chunks, then rounded once. The matmuls are torch's (BLAS / cuBLAS); the
row kernel is the backend's.

Precision: logits, their log-sum-exps and the gradient in float32 (float64 for float64 inputs)
whatever the input dtype; the logits are never rounded to 16 bits (the bf16-GEMM-then-cast loss of
precision the research notes warn about, llm_kd.md Sec. 2.1). A 16-bit head on CUDA multiplies in
16 bits with a float32 output (torch.mm's out_dtype; the gradient GEMMs take the logit gradient
rounded to the head's dtype, dW accumulates in float32); where that is not available (the CPU) the
head is widened to float32 once per call (V x H x 4 bytes of workspace). See _Head.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Optional

import torch
from torch import Tensor

from flashdistill.kernels import backends, checks, eager, grad_scale, native
from flashdistill.kernels.kd import (KINDS, VOCAB_MODES, check_options, finish, rows_cpu, rows_cuda, rows_reference,
                                     rows_triton, token_weights)
from flashdistill.kernels.kd import topk

OP = "fused_linear_kd_loss"
IMPLEMENTED = ("reference", "cpu", "triton", "cuda")  # the row kernel's backend; the matmuls are torch's
WORKSPACE_BYTES = {"cpu": 64 << 20, "cuda": 512 << 20}

# bits of the op's `need` argument: which gradients to compute
NEED_H, NEED_W, NEED_B = 1, 2, 4

__all__ = ["fused_linear_kd_loss"]


def fused_linear_kd_loss(student_hidden: Tensor, student_weight: Tensor, *, student_bias: Optional[Tensor] = None,
                         teacher_logits: Optional[Tensor] = None, teacher_hidden: Optional[Tensor] = None,
                         teacher_weight: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None,
                         teacher_ids: Optional[Tensor] = None, teacher_logprobs: Optional[Tensor] = None,
                         topk_mode: str = "tail_bucket", gen_temperature: Optional[float] = None,
                         vocab: str = "exact", divergence: str = "forward_kl", temperature: float = 1.0,
                         t_squared: bool = False,
                         beta: float = 0.5, alpha: float = 0.1, lam: float = 0.5, labels: Optional[Tensor] = None,
                         ignore_index: int = -100, hard_weight: float = 0.0, soft_weight: float = 1.0,
                         normalizer=None, softcap: Optional[float] = None, teacher_softcap: Optional[float] = None,
                         chunk_size: Optional[int] = None, pack_valid: Optional[bool] = None,
                         process_group=None, return_parts: bool = False, backend: Optional[str] = None):
    """Distillation loss of a linear head's logits against a teacher (see the module docstring).

    student_hidden [..., H], student_weight [V, H], student_bias [V]; the teacher as one of
    teacher_logits [..., V]; teacher_hidden [..., Ht] with teacher_weight [V, Ht] (and teacher_bias [V]);
    or a stored top-k teacher, teacher_ids [..., K] with teacher_logprobs [..., K] (topk_kd_loss's
    forward KL with ``topk_mode`` and ``gen_temperature``; divergence must be forward_kl). A teacher
    vocabulary Vt != V needs ``vocab`` = "truncate" or "pad" (kd_loss's). ``process_group``: a
    tensor-parallel LM head, each rank holding the rows [start_r, start_r + V_r) of the student's head
    (and of the teacher's head or logits) and the same hidden states; labels are global ids; every
    rank gets the loss, the full dh and its slice's dW, db. Returns the 0-d loss (float32; float64 for
    float64 inputs), or (loss, soft, hard) with ``return_parts``.
    """
    h, w, b = student_hidden, student_weight, student_bias
    checks.tensor(OP, "student_hidden", h, min_dim=1)
    checks.tensor(OP, "student_weight", w)
    if w.dim() != 2 or w.shape[1] != h.shape[-1]:
        raise ValueError(f"{OP}: student_weight must be [V, H] with H = student_hidden.shape[-1] = {h.shape[-1]}, "
                         f"got shape {tuple(w.shape)}")
    _same(OP, "student_weight", w, "student_hidden", h)
    V, H = w.shape
    tokens = h.shape[:-1]
    if b is not None:
        checks.tensor(OP, "student_bias", b)
        _same(OP, "student_bias", b, "student_hidden", h)
        if b.shape != (V,):
            raise ValueError(f"{OP}: student_bias must be [V] = ({V},), got shape {tuple(b.shape)}")
    forms = [name for name, t in (("teacher_logits", teacher_logits), ("teacher_weight", teacher_weight),
                                  ("teacher_ids", teacher_ids)) if t is not None]
    if len(forms) != 1:
        raise ValueError(f"{OP}: give the teacher as one of teacher_logits, teacher_hidden + teacher_weight, or "
                         f"teacher_ids + teacher_logprobs (got {' and '.join(forms) if forms else 'neither'})")
    tids = tlp = None
    topk_code, ratio = 0, 1.0
    if teacher_ids is not None:
        if teacher_hidden is not None or teacher_bias is not None:
            raise ValueError(f"{OP}: teacher_hidden / teacher_bias go with teacher_weight, not teacher_ids")
        if teacher_logprobs is None:
            raise ValueError(f"{OP}: teacher_ids needs teacher_logprobs")
        if divergence != "forward_kl":
            raise ValueError(f"{OP}: a top-k teacher supports divergence='forward_kl' only, got {divergence!r}")
        if teacher_softcap is not None:
            raise ValueError(f"{OP}: teacher_softcap does not apply to a top-k teacher's log-probs")
        K = topk.check_teacher(OP, teacher_ids, teacher_logprobs, tokens, V, h.device)
        topk_code, ratio = topk.topk_options(OP, topk_mode, temperature, gen_temperature, K, V, "topk_mode")
        tids = teacher_ids.reshape(-1, K)
        tlp = teacher_logprobs.reshape(-1, K).to(checks.compute_dtype(h.dtype))
        tl = th = tw = tb = None
    elif teacher_logprobs is not None:
        raise ValueError(f"{OP}: teacher_logprobs goes with teacher_ids")
    if teacher_logits is not None:
        checks.tensor(OP, "teacher_logits", teacher_logits)
        if teacher_hidden is not None or teacher_bias is not None:
            raise ValueError(f"{OP}: teacher_hidden / teacher_bias go with teacher_weight, not teacher_logits")
        Vt = teacher_logits.shape[-1] if teacher_logits.dim() == len(tokens) + 1 else -1
        if tuple(teacher_logits.shape[:-1]) != tuple(tokens) or teacher_logits.device != h.device \
                or (vocab == "exact" and Vt != V):
            raise ValueError(f"{OP}: teacher_logits must be [..., V] = {(*tokens, V)} on {h.device} (the student's "
                             f"tokens and vocabulary; another vocabulary size needs vocab='truncate' or 'pad'), got "
                             f"shape {tuple(teacher_logits.shape)} on {teacher_logits.device}")
        tl, th, tw, tb = teacher_logits.reshape(-1, Vt), None, None, None
    elif teacher_weight is not None:
        th, tw, tb = teacher_hidden, teacher_weight, teacher_bias
        if th is None:
            raise ValueError(f"{OP}: teacher_weight needs teacher_hidden")
        checks.tensor(OP, "teacher_hidden", th, min_dim=1)
        checks.tensor(OP, "teacher_weight", tw)
        if th.device != h.device or tuple(th.shape[:-1]) != tuple(tokens):
            raise ValueError(f"{OP}: teacher_hidden must be [..., Ht] over the student's tokens {tuple(tokens)} on "
                             f"{h.device}, got shape {tuple(th.shape)} on {th.device}")
        if tw.dim() != 2 or tw.shape[1] != th.shape[-1] or (vocab == "exact" and tw.shape[0] != V):
            raise ValueError(f"{OP}: teacher_weight must be [V, Ht] = {(V, th.shape[-1])} (the student's vocabulary, "
                             f"teacher_hidden's size; another vocabulary size needs vocab='truncate' or 'pad'), got "
                             f"shape {tuple(tw.shape)}")
        Vt = tw.shape[0]
        _same(OP, "teacher_weight", tw, "teacher_hidden", th)
        if tb is not None:
            checks.tensor(OP, "teacher_bias", tb)
            _same(OP, "teacher_bias", tb, "teacher_hidden", th)
            if tb.shape != (Vt,):
                raise ValueError(f"{OP}: teacher_bias must be [Vt] = ({Vt},), got shape {tuple(tb.shape)}")
        tl, th = None, th.reshape(-1, th.shape[-1])
    if vocab not in VOCAB_MODES:
        raise ValueError(f"{OP}: vocab={vocab!r} is not one of {', '.join(VOCAB_MODES)}")
    width = V if tids is not None or vocab == "exact" else (min if vocab == "truncate" else max)(V, Vt)
    for name, c in (("softcap", softcap), ("teacher_softcap", teacher_softcap)):
        if c is not None and (not isinstance(c, (int, float)) or isinstance(c, bool) or not math.isfinite(c)
                              or c <= 0):
            raise ValueError(f"{OP}: {name} must be None or a finite float > 0, got {c!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"{OP}: chunk_size must be None or an int >= 1, got {chunk_size!r}")
    if process_group is not None:
        return _parallel(h, w, b, tl, th, tw, tb, tids, vocab, divergence, temperature, t_squared, beta, alpha, lam,
                         labels, ignore_index, hard_weight, soft_weight, normalizer, softcap, teacher_softcap,
                         chunk_size, pack_valid, process_group, return_parts, backend)
    backend = backends.requested(OP, backend, h.device, _implemented(tids))
    check_options(OP, divergence, temperature, beta, alpha, lam, hard_weight, soft_weight)
    cd = checks.compute_dtype(h.dtype)
    row_w, hard_w, hard_labels, t2f, n = token_weights(
        OP, tokens, min(V, width), h.device, cd, labels=labels, ignore_index=ignore_index, hard_weight=hard_weight,
        soft_weight=soft_weight, normalizer=normalizer, temperature=temperature, t_squared=t_squared)
    h2 = h.reshape(-1, H)
    h2, row_w, hard_w, hard_labels, tl, th, tids, tlp = _pack(
        pack_valid, h.is_cuda, labels is not None, row_w, hard_w, h2, hard_labels, tl, th, tids, tlp)
    N = h2.shape[0]
    if chunk_size is None:
        n_buf = 1 + (tids is None and not _teacher_in_place(tl, cd, teacher_softcap)) + (softcap is not None)
        budget = WORKSPACE_BYTES["cuda" if h.is_cuda else "cpu"]
        chunk_size = max(1, budget // (max(V, width) * n_buf * torch.finfo(cd).bits // 8))
    chunk_size = min(chunk_size, N)
    lam_t = lam.reshape(()).to(cd) if isinstance(lam, Tensor) else None  # TAID's scheduled lam
    need = _need(h, w, b)
    loss, soft, hard, *_ = _fused_op(
        h2, w, b, tl, th, tw, tb, tids, tlp, topk_code if tids is not None else KINDS[divergence], width,
        float(ratio), float(temperature), float(beta), float(alpha), 0.5 if lam_t is not None else float(lam), lam_t,
        float(softcap or 0.0), float(teacher_softcap or 0.0), row_w, hard_labels, hard_w, chunk_size, need, backend)
    if return_parts:
        return loss, (soft * (t2f / n)).detach(), (hard / n).detach()
    return loss


def _parallel(h, w, b, tl, th, tw, tb, tids, vocab, divergence, temperature, t_squared, beta, alpha, lam, labels,
              ignore_index, hard_weight, soft_weight, normalizer, softcap, teacher_softcap, chunk_size, pack_valid,
              group, return_parts, backend):
    """fused_linear_kd_loss with a vocab-sliced head (see the docstring's process_group)."""
    from flashdistill.kernels.kd import parallel

    if backend not in (None, "auto", "reference"):
        raise ValueError(f"{OP}: with process_group the rows run in torch stages (backend 'reference'); the fused "
                         f"vocab-parallel row kernels are not implemented yet, got backend={backend!r}")
    if tids is not None or vocab != "exact":
        raise ValueError(f"{OP}: process_group takes the teacher as logits or a head sliced like the student's "
                         f"(no top-k teacher, vocab='exact')")
    check_options(OP, divergence, temperature, beta, alpha, lam, hard_weight, soft_weight)
    H, V_r = h.shape[-1], w.shape[0]
    start, V = parallel.slice_start(V_r, group)
    cd = checks.compute_dtype(h.dtype)
    row_w, hard_w, hard_labels, t2f, n = token_weights(
        OP, h.shape[:-1], V, h.device, cd, labels=labels, ignore_index=ignore_index, hard_weight=hard_weight,
        soft_weight=soft_weight, normalizer=normalizer, temperature=temperature, t_squared=t_squared)
    h2 = h.reshape(-1, H)
    h2, row_w, hard_w, hard_labels, tl, th = _pack(pack_valid, h.is_cuda, labels is not None, row_w, hard_w, h2,
                                                   hard_labels, tl, th)
    N = h2.shape[0]
    if chunk_size is None:
        chunk_size = max(1, WORKSPACE_BYTES["cuda" if h.is_cuda else "cpu"] // (V_r * 3 * torch.finfo(cd).bits // 8))
    need = _need(h, w, b)
    lam = lam.reshape(()).to(cd) if isinstance(lam, Tensor) else float(lam)
    loss, soft, hard = _FusedParallel.apply(h2, w, b, tl, th, tw, tb, KINDS[divergence], float(temperature),
                                            float(beta), float(alpha), lam, float(softcap or 0.0),
                                            float(teacher_softcap or 0.0), row_w, hard_labels, hard_w,
                                            min(chunk_size, N), need, group, start)
    if return_parts:
        return loss, (soft * (t2f / n)).detach(), (hard / n).detach()
    return loss


def _pack(pack_valid, on_gpu, has_labels, row_w, hard_w, *rows):
    """(row_w, hard_w, *rows) restricted to the tokens with a weight when packing applies (default on
    the CPU: finding them is free there, a host sync on a GPU): masked tokens (prompt, padding) then
    cost nothing, and autograd scatters dh back (zeros for them). With every token masked, nothing
    is dropped: the kernels' masked-row path gives the zeros."""
    pick = lambda x: x  # noqa: E731
    if (not on_gpu if pack_valid is None else pack_valid) and has_labels:
        keep = ((row_w != 0) if hard_w is None else ((row_w != 0) | (hard_w != 0))).nonzero().squeeze(-1)
        if 0 < keep.numel() < row_w.shape[0]:
            pick = lambda x: None if x is None else x.index_select(0, keep)  # noqa: E731
    row_w, hard_w = pick(row_w), pick(hard_w)
    return (pick(rows[0]), row_w, hard_w, *(pick(x) for x in rows[1:]))


def _need(h, w, b) -> int:
    """The NEED_* bits of the gradients autograd will ask for."""
    on = torch.is_grad_enabled()
    return ((NEED_H if on and h.requires_grad else 0) | (NEED_W if on and w.requires_grad else 0)
            | (NEED_B if on and b is not None and b.requires_grad else 0))


def _implemented(tids):
    """The backends with a row kernel for this teacher form."""
    return tuple(b for b in IMPLEMENTED if b in topk.IMPLEMENTED) if tids is not None else IMPLEMENTED


def _same(op, name, t, ref_name, ref):
    if t.dtype != ref.dtype or t.device != ref.device:
        raise ValueError(f"{op}: '{name}' must have the dtype and device of '{ref_name}' (no casting): '{name}' is "
                         f"{t.dtype} on {t.device}, '{ref_name}' {ref.dtype} on {ref.device}")


# ----------------------------------------------------------------------------------------------------
# the chunk loop, shared by the backends (they differ in the row kernel)

def _teacher_in_place(tl, cd, tcap):
    """Whether the row kernel can read the given teacher logits where they are (no chunk copy)."""
    return tl is not None and tl.dtype == cd and tl.stride(-1) == 1 and not tcap


def _widen(t, cd):
    """t in the compute dtype: itself when it already is (no copy), else one widened copy."""
    return None if t is None else (t if t.dtype == cd else t.to(cd))


def _capped(z, cap, keep):
    """z <- cap tanh(z / cap) in place; returns tanh(z / cap) in ``keep`` (the derivative's factor)."""
    torch.div(z, cap, out=keep).tanh_()
    torch.mul(keep, cap, out=z)
    return keep


_OUT_DTYPE_OK: dict = {}


def _out_dtype_gemm(device) -> bool:
    """Whether torch multiplies 16-bit matrices into a float32 output here (torch.mm(..., out_dtype=):
    CUDA in recent torch; cuBLAS accumulates in float32 anyway, so the logits lose nothing)."""
    key = str(device)
    if key not in _OUT_DTYPE_OK:
        try:
            a = torch.ones((2, 2), dtype=torch.bfloat16, device=device)
            _OUT_DTYPE_OK[key] = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError, NotImplementedError):
            _OUT_DTYPE_OK[key] = False
    return _OUT_DTYPE_OK[key]


class _Head:
    """A linear head W [V, H] (+ b) and its three GEMMs per chunk, logits in the compute dtype.

    A 16-bit head on a device with out_dtype GEMMs stays 16-bit: logits = x W^T with a float32 output,
    dh = g W and dW += g^T x with g rounded to the head's dtype once per chunk (dW accumulated in
    float32). Elsewhere (CPU, float32 / float64 heads, older torch) the head is widened to the compute
    dtype once per call and every GEMM runs in it."""

    def __init__(self, w, b, cd):
        self.cd = cd
        self.lowp = w.dtype in (torch.float16, torch.bfloat16) and w.is_cuda and _out_dtype_gemm(w.device)
        self.w = w if self.lowp else _widen(w, cd)
        self.b = _widen(b, cd)

    def operand(self, x):
        """x as the GEMMs take it (16-bit kept on the low-precision path, else widened)."""
        return x if self.lowp else _widen(x, self.cd)

    def project(self, x, out):
        """out = x W^T (+ b), x from operand()."""
        kw = {"out_dtype": self.cd} if self.lowp else {}
        if self.b is None:
            torch.mm(x, self.w.t(), out=out, **kw)
        else:
            torch.addmm(self.b, x, self.w.t(), out=out, **kw)
        return out

    def grad_operand(self, g):
        """The chunk's logit gradient as the backward GEMMs take it."""
        return g.to(self.w.dtype) if self.lowp else g

    def grad_input(self, gq, out):
        """out = g W (in out's dtype)."""
        if out.dtype == gq.dtype:
            torch.mm(gq, self.w, out=out)
        else:
            out.copy_(torch.mm(gq, self.w))

    def grad_weight(self, acc, gq, x):
        """acc += g^T x (acc in the compute dtype)."""
        if self.lowp:
            torch.addmm(acc, gq.t(), x, out_dtype=self.cd, out=acc)
        else:
            acc.addmm_(gq.t(), x)


def _teacher_chunk(tl, th, thead, tcap, i, j, direct, tbuf):
    """The teacher's logits of tokens [i, j) in the compute dtype: a view of the given logits, or a
    copy / projection into the chunk buffer (soft-capped when asked)."""
    if direct:
        return tl[i:j]
    t = tbuf[:j - i]
    if tl is not None:
        t.copy_(tl[i:j])
    else:
        thead.project(thead.operand(th[i:j]), t)
    if tcap:
        t.div_(tcap).tanh_().mul_(tcap)
    return t


def _run(h, w, b, tl, th, tw, tb, tids, tlp, kind, width, ratio, T, beta, alpha, lam, cap, tcap, row_w, labels,
         hard_w, chunk, need, backend, parallel=None):
    """The chunk loop. ``parallel`` = (process group, first id of this rank's slice): the head and the
    teacher are this rank's vocabulary slice; the rows go through parallel.rows (collectives per
    chunk) and dh, a partial sum over the slices, is all-reduced."""
    N, H = h.shape
    V = w.shape[0]
    cd = checks.compute_dtype(h.dtype)
    dev = h.device
    head = _Head(w, b, cd)
    thead = _Head(tw, tb, cd) if tw is not None else None
    soft_rows = native.empty((N,), cd, dev)
    hard_rows = native.empty((N,), cd, dev) if hard_w is not None else None
    grad_h = torch.empty((N, H), dtype=h.dtype, device=dev) if need & NEED_H else h.new_empty(0)
    grad_w = torch.zeros((V, H), dtype=cd, device=dev) if need & NEED_W else None
    grad_b = torch.zeros((V,), dtype=cd, device=dev) if need & NEED_B else None
    zbuf = torch.empty((chunk, V), dtype=cd, device=dev)
    direct = _teacher_in_place(tl, cd, tcap)
    Vt = tl.shape[1] if tl is not None else (tw.shape[0] if tw is not None else V)
    tbuf = None if direct or tids is not None else torch.empty((chunk, Vt), dtype=cd, device=dev)
    kbuf = torch.empty((chunk, V), dtype=cd, device=dev) if cap else None
    for i in range(0, N, chunk):
        j = min(N, i + chunk)
        c = j - i
        hc = head.operand(h[i:j])
        z = head.project(hc, zbuf[:c])
        th_cap = _capped(z, cap, kbuf[:c]) if cap else None
        masks = (row_w[i:j], None if labels is None else labels[i:j], None if hard_w is None else hard_w[i:j])
        if parallel is not None:
            teacher = (_teacher_chunk(tl, th, thead, tcap, i, j, direct, tbuf), _KIND_NAMES[kind], T, beta, alpha, lam)
            in_place, spec = {}, partial(_parallel_rows, group=parallel[0], start=parallel[1])
        elif tids is not None:
            teacher = (tids[i:j], tlp[i:j], kind, T, ratio)
            in_place = {"cpu": topk.rows_cpu, "triton": topk.rows_triton, "cuda": topk.rows_cuda}
            spec = topk.rows_reference
        else:
            teacher = (_teacher_chunk(tl, th, thead, tcap, i, j, direct, tbuf), kind, T, beta, alpha, lam)
            in_place = {"cpu": partial(rows_cpu, V=width), "triton": partial(rows_triton, V=width),
                        "cuda": partial(rows_cuda, V=width)}
            spec = partial(rows_reference, V=width)
        if backend in in_place:
            in_place[backend](z, *teacher, *masks, z, soft_rows[i:j], None if hard_rows is None else hard_rows[i:j])
            g = z  # the kernel wrote the gradient over the logits
        else:
            s_r, h_r, g = spec(z, *teacher, *masks)
            soft_rows[i:j] = s_r
            if hard_rows is not None:
                hard_rows[i:j] = h_r
        if cap:  # d cap tanh(x / cap) / dx = 1 - tanh^2
            g = g.mul_(th_cap.square_().neg_().add_(1.0))
        gq = head.grad_operand(g) if need & (NEED_H | NEED_W) else None
        if need & NEED_H:
            head.grad_input(gq, grad_h[i:j])
            if parallel is not None:  # dh = sum over the ranks' slices of g_r W_r
                _all_reduce_sum(grad_h[i:j], parallel[0])
        if grad_w is not None:
            head.grad_weight(grad_w, gq, hc)
        if grad_b is not None:
            grad_b += g.sum(0)
    loss, soft, hard = finish(soft_rows, hard_rows, row_w, hard_w)
    gw = w.new_empty(0) if grad_w is None else grad_w.to(w.dtype)
    gb = h.new_empty(0) if grad_b is None else grad_b.to(b.dtype)
    return loss, soft, hard, grad_h, gw, gb


_KIND_NAMES = {v: k for k, v in KINDS.items()}


def _parallel_rows(z, t, kind, T, beta, alpha, lam, row_w, labels, hard_w, *, group, start):
    from flashdistill.kernels.kd import parallel

    return parallel.rows(z, t, kind, T, beta, alpha, lam, row_w, labels, hard_w, group, start)


def _all_reduce_sum(t, group):
    import torch.distributed as dist

    buf = t.contiguous()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    if buf.data_ptr() != t.data_ptr():
        t.copy_(buf)


class _FusedParallel(torch.autograd.Function):
    """fused_linear_kd_loss over vocab-sliced heads: every rank the same loss; dh all-reduced, dW and
    db of the rank's slice; the backward scales the gradients computed in the forward."""

    @staticmethod
    def forward(ctx, h, w, b, tl, th, tw, tb, kind, T, beta, alpha, lam, cap, tcap, row_w, labels, hard_w, chunk,
                need, group, start):
        loss, soft, hard, gh, gw, gb = _run(h, w, b, tl, th, tw, tb, None, None, kind, w.shape[0], 1.0, T, beta,
                                            alpha, lam, cap, tcap, row_w, labels, hard_w, chunk, need, "reference",
                                            parallel=(group, start))
        ctx.need = need
        ctx.save_for_backward(gh, gw, gb)
        ctx.mark_non_differentiable(soft, hard)
        return loss, soft, hard

    @staticmethod
    def backward(ctx, grad_loss, _soft, _hard):
        gh, gw, gb = ctx.saved_tensors

        def scaled(g, bit):
            if not ctx.need & bit:
                return None
            cd = checks.compute_dtype(g.dtype)
            return (g.to(cd) * grad_loss.to(cd)).to(g.dtype)

        return (scaled(gh, NEED_H), scaled(gw, NEED_W), scaled(gb, NEED_B)) + (None,) * 18


def _validate(h, w, b, tl, th, tw, tb, tids, tlp, width, row_w, labels, hard_w, chunk):
    N = h.shape[0]
    cd = checks.compute_dtype(h.dtype)
    checks.per_sample(OP, "row_weight", row_w, N, cd, h.device)
    if hard_w is not None:
        checks.per_sample(OP, "hard_weight", hard_w, N, cd, h.device)
        if labels is None or labels.shape != (N,) or labels.dtype != torch.int64:
            raise ValueError(f"{OP}: labels must be int64 of shape ({N},) with hard_weight")
    if h.dim() != 2 or w.dim() != 2 or w.shape[1] != h.shape[1] or chunk < 1:
        raise ValueError(f"{OP}: hidden [N, H] and weight [V, H] expected, got {tuple(h.shape)}, {tuple(w.shape)}")
    if (tl is not None) + (tw is not None) + (tids is not None) != 1 or (tids is None) != (tlp is None):
        raise ValueError(f"{OP}: exactly one of teacher logits, teacher weight and teacher top-k")
    V = w.shape[0]
    Vt = tl.shape[1] if tl is not None else (tw.shape[0] if tw is not None else V)
    if width not in (V, Vt) or width < min(V, Vt):
        raise ValueError(f"{OP}: width {width} must be V = {V} or Vt = {Vt}, and >= min(V, Vt)")


@eager.custom_op("flashdistill::fused_linear_kd")
def _fused_op(h: Tensor, w: Tensor, b: Optional[Tensor], tl: Optional[Tensor], th: Optional[Tensor],
              tw: Optional[Tensor], tb: Optional[Tensor], tids: Optional[Tensor], tlp: Optional[Tensor], kind: int,
              width: int, ratio: float, temperature: float, beta: float, alpha: float,
              lam: float, lam_t: Optional[Tensor], softcap: float, teacher_softcap: float, row_w: Tensor,
              labels: Optional[Tensor],
              hard_w: Optional[Tensor], chunk: int, need: int,
              backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, soft sum, hard sum, dloss/dh, dloss/dW, dloss/db); an empty tensor for a gradient not
    asked for in ``need``. With a top-k teacher (tids, tlp), ``kind`` is the top-k mode code and
    ``ratio`` T_gen / T; otherwise kind is kd_loss's divergence code."""
    _validate(h, w, b, tl, th, tw, tb, tids, tlp, width, row_w, labels, hard_w, chunk)
    name = backends.resolve(OP, backend, h.device, _implemented(tids))
    if lam_t is not None:  # TAID: the cpu kernel takes a float (no sync on the CPU); the others the tensor
        lam = float(lam_t) if name == "cpu" else lam_t
    return _run(h, w, b, tl, th, tw, tb, tids, tlp, kind, width, ratio, temperature, beta, alpha, lam, softcap,
                teacher_softcap, row_w,
                labels, hard_w, chunk, need, name)


@_fused_op.register_fake
def _(h, w, b, tl, th, tw, tb, tids, tlp, kind, width, ratio, temperature, beta, alpha, lam, lam_t, softcap,
      teacher_softcap, row_w, labels, hard_w, chunk, need, backend):
    _validate(h, w, b, tl, th, tw, tb, tids, tlp, width, row_w, labels, hard_w, chunk)
    cd = checks.compute_dtype(h.dtype)
    scalar = h.new_empty((), dtype=cd)
    gh = torch.empty_like(h) if need & NEED_H else h.new_empty(0)
    gw = torch.empty_like(w) if need & NEED_W else w.new_empty(0)
    gb = torch.empty_like(b) if (need & NEED_B and b is not None) else h.new_empty(0)
    return scalar, h.new_empty((), dtype=cd), h.new_empty((), dtype=cd), gh, gw, gb


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the dh, dW, db outputs (see score_diff)
    ctx.save_for_backward(*output[3:])
    ctx.need = inputs[23]
    ctx.backend = inputs[-1]


def _backward(ctx, grad_loss, grad_soft, grad_hard, *_):
    gh, gw, gb = ctx.saved_tensors

    one = grad_loss is not None and eager.upstream_is_one(grad_loss)  # the gradients themselves: no pass

    def scaled(g, bit):
        if not ctx.need & bit or grad_loss is None:
            return None
        if one:
            return g
        return grad_scale.grad_scale(g, grad_loss.to(checks.compute_dtype(g.dtype)), 1.0, ctx.backend)

    return (scaled(gh, NEED_H), scaled(gw, NEED_W), scaled(gb, NEED_B)) + (None,) * 22


_fused_op.register_autograd(_backward, setup_context=_setup_context)
