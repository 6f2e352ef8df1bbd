"""topk_kd_loss: distillation from a stored top-k teacher (ids and log-probs per token).

    topk_kd_loss(student_logits, teacher_ids, teacher_logprobs, *, mode="tail_bucket", temperature=1.0,
                 gen_temperature=None, t_squared=False, labels=None, ignore_index=-100, hard_weight=0.0,
                 soft_weight=1.0, normalizer=None, return_parts=False, backend=None)

Offline distillation stores, per token, the teacher's K most likely ids and their log-probabilities
(at the generation temperature T_gen), not its [tokens x V] logits. The soft term is the forward KL
from that teacher to the tempered student over the K ids, the missing mass 1 - P_S handled by
``mode`` (reference.topk_forward_kl; llm_kd.md Sec. 1.1):

    renorm_teacher  the teacher renormalised over its K ids; the student's full softmax
    renorm_both     both renormalised over the K ids (the gradient is zero off the K ids)
    tail_bucket     a (K + 1)-th bucket with the teacher's missing mass against the student's

``gen_temperature``: the stored log-probs were taken at T_gen; at the distillation temperature T the
teacher is p ∝ p_gen^(T_gen / T) (its tail mass raised to the same power), renormalised. Every other
option (hard-label CE on untempered logits, masking, normalizer, T^2, parts) is kd_loss's. The ids of
a row must be distinct and in [0, V): checked on CPU tensors (an error names the row; on a GPU that
check would cost a host sync). With K = V there is no tail, and tail_bucket is renorm_teacher (the
stored log-probs' rounding would otherwise put a spurious mass in an empty bucket).

Traffic per token: read the V student logits and K (id, log-prob) pairs, write V gradients: about
two thirds of kd_loss's bytes, with one exp per element instead of two.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from flashdistill.kernels import backends, checks, eager, native
from flashdistill.kernels.kd import finish, register_logits_autograd, run_rows, token_weights
from flashdistill.kernels.kd import reference

OP = "topk_kd_loss"
IMPLEMENTED = ("reference", "cpu", "triton", "cuda")
MODES = {name: i for i, name in enumerate(reference.TOPK_MODES)}  # renorm_teacher, renorm_both, tail_bucket

__all__ = ["topk_kd_loss"]


def topk_kd_loss(student_logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor, *,
                 mode: str = "tail_bucket", temperature: float = 1.0, gen_temperature: Optional[float] = None,
                 t_squared: bool = False, labels: Optional[Tensor] = None, ignore_index: int = -100,
                 hard_weight: float = 0.0, soft_weight: float = 1.0, normalizer=None, return_parts: bool = False,
                 backend: Optional[str] = None):
    """Forward KL to a stored top-k teacher (see the module docstring).

    student_logits [..., V]; teacher_ids [..., K] int64; teacher_logprobs [..., K] (any float dtype,
    K <= V). Returns the 0-d loss (float32; float64 for float64 logits), or (loss, soft, hard) with
    ``return_parts``.
    """
    s = student_logits
    checks.tensor(OP, "student_logits", s, min_dim=1)
    V = s.shape[-1]
    tokens = s.shape[:-1]
    K = check_teacher(OP, teacher_ids, teacher_logprobs, tokens, V, s.device)
    mode_code, ratio = topk_options(OP, mode, temperature, gen_temperature, K, V)
    for name, v in (("hard_weight", hard_weight), ("soft_weight", soft_weight)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise ValueError(f"{OP}: {name} must be a finite float, got {v!r}")
    backend = backends.requested(OP, backend, s.device, IMPLEMENTED)
    ids2 = teacher_ids.reshape(-1, K)
    cd = checks.compute_dtype(s.dtype)
    row_w, hard_w, hard_labels, t2f, n = token_weights(
        OP, tokens, V, s.device, cd, labels=labels, ignore_index=ignore_index, hard_weight=hard_weight,
        soft_weight=soft_weight, normalizer=normalizer, temperature=temperature, t_squared=t_squared)
    loss, soft, hard, _ = _topk_op(
        s.reshape(-1, V), ids2, teacher_logprobs.reshape(-1, K).to(cd), mode_code, float(temperature),
        float(ratio), row_w, hard_labels, hard_w, backend)
    if return_parts:
        return loss, (soft * (t2f / n)).detach(), (hard / n).detach()
    return loss


def topk_options(op, mode, temperature, gen_temperature, K, V, mode_name: str = "mode"):
    """(mode code, ratio T_gen / T) from the user's options, validated; ``mode_name``: what the caller's
    argument is called (fused_linear_kd_loss: topk_mode)."""
    if mode not in MODES:
        raise ValueError(f"{op}: {mode_name}={mode!r} is not one of {', '.join(MODES)}")
    for name, v in (("temperature", temperature),) + \
            ((("gen_temperature", gen_temperature),) if gen_temperature is not None else ()):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise ValueError(f"{op}: {name} must be a finite float, got {v!r}")
    if temperature <= 0 or (gen_temperature is not None and gen_temperature <= 0):
        raise ValueError(f"{op}: temperature and gen_temperature must be > 0, got {temperature}, {gen_temperature}")
    if K == V and mode == "tail_bucket":  # the ids are the whole vocabulary: no tail, whatever rounding says
        mode = "renorm_teacher"
    return MODES[mode], 1.0 if gen_temperature is None else gen_temperature / temperature


def check_teacher(op, ids, lp, tokens, V, device) -> int:
    """Validates a top-k teacher (ids [..., K] int64 over ``tokens``, log-probs of the same shape) and
    returns K. On CPU tensors also the ids' range and distinctness (a host sync on a GPU)."""
    if not isinstance(ids, Tensor) or ids.dtype != torch.int64 or ids.dim() != len(tokens) + 1 \
            or tuple(ids.shape[:-1]) != tuple(tokens) or ids.device != device:
        got = type(ids).__name__ if not isinstance(ids, Tensor) else \
            f"{ids.dtype} of shape {tuple(ids.shape)} on {ids.device}"
        raise ValueError(f"{op}: teacher_ids must be int64 [..., K] over the student's tokens {tuple(tokens)} on "
                         f"{device}, got {got}")
    K = ids.shape[-1]
    if not 1 <= K <= V:
        raise ValueError(f"{op}: teacher_ids has K = {K} ids per token; K must be in [1, V = {V}]")
    checks.tensor(op, "teacher_logprobs", lp)
    if lp.shape != ids.shape or lp.device != device:
        raise ValueError(f"{op}: teacher_logprobs must have teacher_ids' shape {tuple(ids.shape)} on "
                         f"{device}, got shape {tuple(lp.shape)} on {lp.device}")
    ids2 = ids.reshape(-1, K)
    if ids2.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = (ids2 < 0) | (ids2 >= V)
        if bool(bad.any()):
            r, k = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"{op}: teacher_ids[{r}, {k}] (flattened tokens) = {int(ids2[r, k])} is outside [0, {V})")
        srt = ids2.sort(-1).values
        rep = srt[:, 1:] == srt[:, :-1]
        if bool(rep.any()):
            r = int(rep.nonzero()[0, 0])
            raise ValueError(f"{op}: teacher_ids row {r} (flattened tokens) repeats id {int(srt[r][1:][rep[r]][0])} "
                             f"(ids must be distinct)")
    return K


# ----------------------------------------------------------------------------------------------------
# backends: (loss, soft sum, hard sum, dloss/dz)

def rows_reference(z, ids, lp, mode, T, ratio, row_w, labels, hard_w):
    """(soft_rows, hard_rows, grad) in closed form (the kernel's formulas, cpu kd.cpp "top-k teacher";
    the tests check them against autograd of reference.topk_forward_kl)."""
    cd = checks.compute_dtype(z.dtype)
    zc = z.to(cd)
    name = reference.TOPK_MODES[mode]
    soft_rows = reference.topk_forward_kl(zc, ids, lp, mode=name, temperature=T,
                                          gen_temperature=None if ratio == 1.0 else ratio * T)
    logq = torch.log_softmax(zc / T, -1)
    q = logq.exp()
    # the normalized teacher p on its ids, and p_tail
    lpr = ratio * lp
    log_tail = torch.log1p(-lp.exp().sum(-1).clamp(max=1.0)) * ratio
    if name == "tail_bucket":
        lz = torch.logsumexp(torch.cat([lpr, log_tail.unsqueeze(-1)], -1), -1, keepdim=True)
    else:
        lz = torch.logsumexp(lpr, -1, keepdim=True)
    p = (lpr - lz).exp()
    p_tail = (log_tail - lz.squeeze(-1)).exp()
    onS = torch.zeros_like(q, dtype=torch.bool).scatter_(-1, ids, True)
    P = torch.zeros_like(q).scatter_(-1, ids, p)
    qS = q.gather(-1, ids).sum(-1, keepdim=True)
    if name == "renorm_teacher":
        g = q - P
    elif name == "renorm_both":
        g = torch.where(onS, q / qS - P, torch.zeros_like(q))
    else:
        q_tail = torch.where(onS, torch.zeros_like(q), q).sum(-1, keepdim=True)
        ratio_tail = torch.where(q_tail > 0, p_tail.unsqueeze(-1) * qS / q_tail, torch.zeros_like(q_tail))
        g = torch.where(onS, q - P, q * (p.sum(-1, keepdim=True) - ratio_tail))
    zero = torch.zeros((), dtype=cd, device=z.device)
    soft_rows = torch.where(row_w != 0, soft_rows, zero)
    grad = torch.where((row_w == 0).unsqueeze(-1), zero, (row_w / T).unsqueeze(-1) * g)
    hard_rows = torch.zeros_like(soft_rows)
    if hard_w is not None:
        has = labels >= 0
        safe = torch.where(has, labels, torch.zeros_like(labels))
        hard_rows = torch.where(has, torch.nn.functional.cross_entropy(zc, safe, reduction="none"), zero)
        g_ce = torch.softmax(zc, -1) - torch.nn.functional.one_hot(safe, zc.shape[-1]).to(cd)
        grad = grad + torch.where(has.unsqueeze(-1), hard_w.unsqueeze(-1) * g_ce, zero)
    return soft_rows, hard_rows, grad.to(z.dtype)


def rows_cpu(z, ids, lp, mode, T, ratio, row_w, labels, hard_w, grad, soft_rows, hard_rows):
    """The CPU row kernel into given buffers (grad may be z itself, as for kd_loss's)."""
    mod = native.cpu_module()[0]
    N, V = z.shape
    ids, lp = ids.contiguous(), lp.contiguous()
    row_w, labels, hard_w = row_w.contiguous(), native.contiguous(labels), native.contiguous(hard_w)
    mod.topk_kd_forward(native.DTYPE_CODES[z.dtype], N, V, z.data_ptr(), z.stride(0), ids.shape[1], ids.data_ptr(),
                        lp.data_ptr(), mode, T, ratio, row_w.data_ptr(), native.ptr(labels), native.ptr(hard_w),
                        grad.data_ptr(), soft_rows.data_ptr(), native.ptr(hard_rows))


def rows_triton(z, ids, lp, mode, T, ratio, row_w, labels, hard_w, grad, soft_rows, hard_rows):
    """rows_cpu's contract, the Triton kernel (triton_kernel.topk_rows)."""
    from flashdistill.kernels.kd import triton_kernel

    triton_kernel.topk_rows(z, ids.contiguous(), lp.contiguous(), mode, T, ratio, row_w.contiguous(),
                            native.contiguous(labels), native.contiguous(hard_w), grad, soft_rows, hard_rows)


def _reference(z, ids, lp, mode, T, ratio, row_w, labels, hard_w):
    soft_rows, hard_rows, grad = rows_reference(z, ids, lp, mode, T, ratio, row_w, labels, hard_w)
    return (*finish(soft_rows, hard_rows, row_w, hard_w), grad)


def rows_cuda(z, ids, lp, mode, T, ratio, row_w, labels, hard_w, grad, soft_rows, hard_rows):
    """rows_cpu's contract, the CUDA kernel (csrc/cuda/kd.cu topk_rows_kernel)."""
    mod = native.cuda_module()[0]
    N, V = z.shape
    ids, lp = ids.contiguous(), lp.contiguous()
    row_w, labels, hard_w = row_w.contiguous(), native.contiguous(labels), native.contiguous(hard_w)
    with torch.cuda.device(z.device):
        mod.topk_kd_forward(native.DTYPE_CODES[z.dtype], N, V, z.data_ptr(), z.stride(0), ids.shape[1],
                            ids.data_ptr(), lp.data_ptr(), mode, T, ratio, row_w.data_ptr(), native.ptr(labels),
                            native.ptr(hard_w), grad.data_ptr(), soft_rows.data_ptr(), native.ptr(hard_rows),
                            native.stream_of(z))


def _native_rows(rows_fn):
    def run(z, ids, lp, mode, T, ratio, row_w, labels, hard_w):
        return run_rows(rows_fn, native.rows(z), row_w, labels, hard_w, ids, lp, mode, T, ratio)
    return run


_IMPLS = {"reference": _reference, "cpu": _native_rows(rows_cpu), "triton": _native_rows(rows_triton),
          "cuda": _native_rows(rows_cuda)}


def _validate(z, ids, lp, row_w, labels, hard_w):
    checks.tensor(OP, "student_logits", z, min_dim=2)
    cd, N = checks.compute_dtype(z.dtype), z.shape[0]
    if ids.dtype != torch.int64 or ids.dim() != 2 or ids.shape[0] != N or lp.shape != ids.shape or lp.dtype != cd:
        raise ValueError(f"{OP}: ids int64 [N, K] and log-probs [N, K] of {cd} expected")
    checks.per_sample(OP, "row_weight", row_w, N, cd, z.device)
    if hard_w is not None:
        checks.per_sample(OP, "hard_weight", hard_w, N, cd, z.device)
        if labels is None or labels.shape != (N,) or labels.dtype != torch.int64:
            raise ValueError(f"{OP}: labels must be int64 of shape ({N},) with hard_weight")


@eager.custom_op("flashdistill::topk_kd_loss")
def _topk_op(z: Tensor, ids: Tensor, lp: Tensor, mode: int, temperature: float, ratio: float, row_w: Tensor,
             labels: Optional[Tensor], hard_w: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, soft sum, hard sum, d loss / d student) for [N, V] logits and a [N, K] top-k teacher."""
    _validate(z, ids, lp, row_w, labels, hard_w)
    name = backends.resolve(OP, backend, z.device, IMPLEMENTED)
    return _IMPLS[name](z, ids, lp, mode, temperature, ratio, row_w, labels, hard_w)


@_topk_op.register_fake
def _(z, ids, lp, mode, temperature, ratio, row_w, labels, hard_w, backend):
    _validate(z, ids, lp, row_w, labels, hard_w)
    cd = checks.compute_dtype(z.dtype)
    return z.new_empty((), dtype=cd), z.new_empty((), dtype=cd), z.new_empty((), dtype=cd), torch.empty_like(z)


register_logits_autograd(_topk_op, 10)
