"""Logit knowledge distillation (issue #4): ``kd_loss`` on logits already in memory here,
``fused_linear_kd_loss`` (linear.py) and ``topk_kd_loss`` (topk.py); reference and cpu backends (the
Triton and CUDA row kernels follow).

    kd_loss(student_logits, teacher_logits, *, divergence="forward_kl", temperature=1.0,
            t_squared=False, beta=0.5, alpha=0.1, lam=0.5, labels=None, ignore_index=-100,
            hard_weight=0.0, soft_weight=1.0, normalizer=None, vocab="exact", process_group=None,
            return_parts=False, backend=None)

Logits are [..., V] (tokens first, vocabulary last), student and teacher of one dtype and device
and of one shape, except with ``vocab`` (below); argument order is always (student, teacher), and "forward" KL is KL(teacher || student). The
divergence is taken between the tempered distributions (times T^2 with ``t_squared``); the hard-label
cross-entropy (``hard_weight`` > 0, with ``labels``) on the untempered student logits, in the same
pass. Tokens whose label is ``ignore_index`` count in neither term. The loss is
(soft_weight * sum soft + hard_weight * sum hard) / normalizer, the normalizer being the number of
valid tokens or a given tensor (e.g. the global count for gradient accumulation), and 0 with zero
gradients when every token is masked; no host synchronization. The math and its sources are in
``reference.py``.

``process_group``: vocab-parallel logits (tensor parallelism: each rank holds the same tokens and a
slice of the vocabulary, ranks in order); labels are global ids; every rank gets the loss and the
gradient of its slice (parallel.py).

Vocabularies of different size (a student whose embedding was padded to a multiple of 64, a teacher
with extra special tokens): ``vocab="truncate"`` takes the divergence over the first min(Vs, Vt)
ids of both (the student's extra columns get a zero gradient); ``vocab="pad"`` over max(Vs, Vt),
the narrower side padded with -inf (probability 0: the student's extra ids are pushed towards 0
under forward KL; a teacher's extra ids with mass make forward KL infinite, as they should). Never
zeros, which would give the padded ids mass exp(-LSE) (Liger #634). Labels must be below the
student's effective width. No copy is made: the kernel reads past-the-width columns as -inf.

The CPU kernel makes one pass over memory per row (the row's later passes hit cache) and writes
dloss/dstudent in the forward (with the per-row weights folded in); the backward scales it by the
upstream gradient (grad_scale). Traffic: read student and teacher, write the gradient, once each.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from flashdistill.kernels import backends, checks, eager, grad_scale, native
from flashdistill.kernels.kd import reference

OP = "kd_loss"
KINDS = {name: i for i, name in enumerate(("forward_kl", "reverse_kl", "jsd", "jsd_normalized", "tvd",
                                           "skew_forward_kl", "skew_reverse_kl", "mixed", "taid"))}
IMPLEMENTED = ("reference", "cpu", "triton", "cuda")

__all__ = ["kd_loss", "fused_linear_kd_loss", "topk_kd_loss"]


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, *, divergence: str = "forward_kl",
            temperature: float = 1.0, t_squared: bool = False, beta: float = 0.5, alpha: float = 0.1,
            lam: float = 0.5, labels: Optional[Tensor] = None, ignore_index: int = -100, hard_weight: float = 0.0,
            soft_weight: float = 1.0, normalizer=None, vocab: str = "exact", process_group=None,
            return_parts: bool = False, backend: Optional[str] = None):
    """Distillation loss between student and teacher logits (see the module docstring).

    Returns the 0-d loss (float32; float64 for float64 logits), or (loss, soft, hard) with
    ``return_parts`` (the two terms, each already divided by the normalizer, detached).
    """
    s, t = student_logits, teacher_logits
    checks.tensor(OP, "student_logits", s, min_dim=1)
    if process_group is not None:
        return _vocab_parallel(s, t, divergence, temperature, t_squared, beta, alpha, lam, labels, ignore_index,
                               hard_weight, soft_weight, normalizer, vocab, process_group, return_parts, backend)
    V = vocab_width(OP, vocab, s, t, "student_logits", "teacher_logits")
    backend = backends.requested(OP, backend, s.device, IMPLEMENTED)
    check_options(OP, divergence, temperature, beta, alpha, lam, hard_weight, soft_weight)
    s2, t2 = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    row_w, hard_w, hard_labels, t2f, n = token_weights(
        OP, s.shape[:-1], min(V, s.shape[-1]), s.device, checks.compute_dtype(s.dtype), labels=labels, ignore_index=ignore_index,
        hard_weight=hard_weight, soft_weight=soft_weight, normalizer=normalizer, temperature=temperature,
        t_squared=t_squared)
    lam_f, lam_t = (0.5, lam.reshape(()).to(checks.compute_dtype(s.dtype))) if isinstance(lam, Tensor) else \
        (float(lam), None)
    loss, soft, hard, _ = _kd_op(s2, t2, KINDS[divergence], V, float(temperature), float(beta), float(alpha),
                                 lam_f, lam_t, row_w, hard_labels, hard_w, backend)
    if return_parts:
        return loss, (soft * (t2f / n)).detach(), (hard / n).detach()
    return loss


def _vocab_parallel(s, t, divergence, temperature, t_squared, beta, alpha, lam, labels, ignore_index, hard_weight,
                    soft_weight, normalizer, vocab, group, return_parts, backend):
    """kd_loss on vocab-sliced logits (parallel.py): the same options; labels are global ids."""
    from flashdistill.kernels.kd import parallel

    if backend not in (None, "auto", "reference"):
        raise ValueError(f"{OP}: with process_group the stages run in torch (backend 'reference'); the fused "
                         f"vocab-parallel row kernels are not implemented yet, got backend={backend!r}")
    if vocab != "exact":
        raise ValueError(f"{OP}: vocab={vocab!r} does not combine with process_group (slice both vocabularies alike)")
    checks.like(OP, "teacher_logits", t, "student_logits", s)
    check_options(OP, divergence, temperature, beta, alpha, lam, hard_weight, soft_weight)
    _, V = parallel.slice_start(s.shape[-1], group)
    cd = checks.compute_dtype(s.dtype)
    row_w, hard_w, hard_labels, t2f, n = token_weights(
        OP, s.shape[:-1], V, s.device, cd, labels=labels, ignore_index=ignore_index, hard_weight=hard_weight,
        soft_weight=soft_weight, normalizer=normalizer, temperature=temperature, t_squared=t_squared)
    lam = lam.reshape(()).to(cd) if isinstance(lam, Tensor) else float(lam)
    loss, soft, hard = parallel.kd_loss_parallel(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]), divergence,
                                                 float(temperature), float(beta), float(alpha), lam, row_w,
                                                 hard_labels, hard_w, group)
    if return_parts:
        return loss, (soft * (t2f / n)).detach(), (hard / n).detach()
    return loss


VOCAB_MODES = ("exact", "truncate", "pad")


def vocab_width(op, vocab, s, t, s_name, t_name) -> int:
    """The width the divergence is over for student and teacher tensors [..., Vs], [..., Vt] (same
    leading shape, dtype and device), per ``vocab``."""
    if vocab not in VOCAB_MODES:
        raise ValueError(f"{op}: vocab={vocab!r} is not one of {', '.join(VOCAB_MODES)}")
    if vocab == "exact":
        checks.like(op, t_name, t, s_name, s)
        return s.shape[-1]
    checks.tensor(op, t_name, t)
    if t.shape[:-1] != s.shape[:-1] or t.dtype != s.dtype or t.device != s.device:
        raise ValueError(f"{op}: '{t_name}' must match '{s_name}' in every dimension but the last, in dtype and in "
                         f"device: '{t_name}' has shape {tuple(t.shape)}, {t.dtype}, {t.device}; '{s_name}' "
                         f"{tuple(s.shape)}, {s.dtype}, {s.device}")
    return (min if vocab == "truncate" else max)(s.shape[-1], t.shape[-1])


def check_options(op, divergence, temperature, beta, alpha, lam, hard_weight, soft_weight):
    """The float options every KD op shares: finite, in range, a known divergence."""
    if divergence not in KINDS:
        raise ValueError(f"{op}: divergence={divergence!r} is not one of {', '.join(KINDS)}")
    if isinstance(lam, Tensor):  # TAID's scheduled lam: a one-element tensor (no host sync on a GPU)
        if divergence != "taid" or lam.numel() != 1 or not lam.is_floating_point():
            raise ValueError(f"{op}: lam may be a tensor only for divergence='taid', and then one float element; got "
                             f"{tuple(lam.shape)} {lam.dtype} for {divergence!r}")
        if lam.device.type == "cpu" and not torch.compiler.is_compiling() and not 0.0 <= float(lam) <= 1.0:
            raise ValueError(f"{op}: lam must be in [0, 1], got {float(lam)}")
        lam = 0.5  # checked
    for name, v in (("temperature", temperature), ("beta", beta), ("alpha", alpha), ("lam", lam),
                    ("hard_weight", hard_weight), ("soft_weight", soft_weight)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise ValueError(f"{op}: {name} must be a finite float, got {v!r}")
    if temperature <= 0:
        raise ValueError(f"{op}: temperature must be > 0, got {temperature}")
    for name, v in (("beta", beta), ("alpha", alpha), ("lam", lam)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{op}: {name} must be in [0, 1], got {v}")
    if divergence.startswith("skew") and alpha == 1.0:
        raise ValueError(f"{op}: alpha must be < 1 for {divergence} (alpha = 1 makes it identically 0)")


def token_weights(op, token_shape, V, device, cd, *, labels, ignore_index, hard_weight, soft_weight, normalizer,
                  temperature, t_squared):
    """Per-token weights of the kernels' ABI from the user's masking and normalization options.

    Returns (row_w [N], hard_w [N] or None, hard_labels [N] or None, T^2 factor, normalizer n): the loss
    is sum row_w * D + sum hard_w * CE, masked tokens have weight 0 (and label -1), n > 0. No host sync
    (labels on the CPU are range-checked).
    """
    N = math.prod(token_shape)
    if labels is not None:
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != tuple(token_shape) \
                or labels.device != device:
            got = type(labels).__name__ if not isinstance(labels, Tensor) else \
                (tuple(labels.shape), labels.dtype, labels.device)
            raise ValueError(f"{op}: labels must be an int64 tensor of shape {tuple(token_shape)} on {device}, "
                             f"got {got}")
        labels = labels.reshape(-1)
        valid = labels != ignore_index
        if labels.device.type == "cpu" and not torch.compiler.is_compiling():  # no device sync there
            bad = valid & ((labels < 0) | (labels >= V))
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                raise ValueError(f"{op}: labels[{i}] = {int(labels[i])} is outside [0, {V}) and is not "
                                 f"ignore_index={ignore_index}")
    else:
        if hard_weight != 0.0:
            raise ValueError(f"{op}: hard_weight={hard_weight} needs labels")
        valid = torch.ones(N, dtype=torch.bool, device=device)
    if normalizer is None:
        n = valid.sum().to(cd)
    else:
        if isinstance(normalizer, Tensor):
            if normalizer.numel() != 1 or normalizer.device != device:
                raise ValueError(f"{op}: normalizer must be a float or a one-element tensor on {device}")
            n = normalizer.reshape(()).to(cd)
        else:
            n = torch.tensor(float(normalizer), dtype=cd, device=device)
    n = torch.where(n > 0, n, torch.ones_like(n))  # every token masked: loss 0, not 0 / 0
    t2f = temperature**2 if t_squared else 1.0
    zero = torch.zeros((), dtype=cd, device=device)
    row_w = torch.where(valid, soft_weight * t2f / n, zero)
    hard_w = torch.where(valid, hard_weight / n, zero) if hard_weight != 0.0 else None
    hard_labels = torch.where(valid, labels, -1) if hard_w is not None else None
    return row_w, hard_w, hard_labels, t2f, n


# ----------------------------------------------------------------------------------------------------
# backends: (loss, soft_sum, hard_sum, grad) with loss = sum row_w soft_rows + sum hard_w hard_rows,
# soft_sum = sum over valid rows of the divergence, hard_sum likewise of the cross-entropy

_NAMES = {v: k for k, v in KINDS.items()}


def finish(soft_rows, hard_rows, row_w, hard_w):
    """(loss, soft sum, hard sum) from the per-row terms (hard_rows may be None)."""
    loss = (row_w * soft_rows).sum()
    soft = torch.where(row_w != 0, soft_rows, torch.zeros_like(soft_rows)).sum()
    hard = torch.zeros_like(loss)
    if hard_w is not None and hard_rows is not None:
        loss = loss + (hard_w * hard_rows).sum()
        hard = torch.where(hard_w != 0, hard_rows, torch.zeros_like(hard_rows)).sum()
    return loss, soft, hard


def rows_cpu(s2, t2, kind, T, beta, alpha, lam, row_w, labels, hard_w, grad, soft_rows, hard_rows, V=None):
    """The CPU row kernel into given buffers: grad [N, Vs] (may be s2 itself: each row is read before
    its gradient is written), soft_rows and hard_rows (or None) [N] of the compute dtype. s2 [N, Vs]
    and t2 [N, Vt] share a dtype; each has unit stride along the vocabulary; the divergence is over V
    columns (default Vs; see ``vocab``)."""
    mod = native.cpu_module()[0]
    N, Vs = s2.shape
    V = Vs if V is None else V
    assert grad.stride() == (Vs, 1) and t2.dtype == s2.dtype
    row_w, labels, hard_w = row_w.contiguous(), native.contiguous(labels), native.contiguous(hard_w)
    mod.kd_forward(native.DTYPE_CODES[s2.dtype], N, V, s2.data_ptr(), s2.stride(0), Vs, t2.data_ptr(), t2.stride(0),
                   t2.shape[1], kind, T, beta, alpha, lam, row_w.data_ptr(), native.ptr(labels), native.ptr(hard_w),
                   grad.data_ptr(), soft_rows.data_ptr(), native.ptr(hard_rows))


def _to_width(x, V):
    """[N, V] from [N, W]: the first V columns, or -inf columns appended."""
    W = x.shape[-1]
    if W >= V:
        return x[:, :V]
    return torch.cat([x, x.new_full((x.shape[0], V - W), float("-inf"))], -1)


def rows_reference(s2, t2, kind, T, beta, alpha, lam, row_w, labels, hard_w, V=None):
    """(soft_rows, hard_rows, grad) of the spec for [N, Vs] student and [N, Vt] teacher logits over V
    columns (default Vs; the narrower side padded with -inf, the wider truncated); grad [N, Vs] in
    s2's dtype."""
    Vs = s2.shape[1]
    V = Vs if V is None else V
    if V != Vs or t2.shape[1] != V:
        soft_rows, hard_rows, grad = rows_reference(_to_width(s2, V), _to_width(t2, V), kind, T, beta, alpha, lam,
                                                    row_w, labels, hard_w)
        grad = grad[:, :Vs] if V >= Vs else torch.cat([grad, grad.new_zeros((grad.shape[0], Vs - V))], -1)
        return soft_rows, hard_rows, grad
    cd = checks.compute_dtype(s2.dtype)
    z = s2.to(cd)
    zero = torch.zeros((), dtype=cd, device=s2.device)
    kw = dict(temperature=T, beta=beta, alpha=alpha, lam=lam)
    masked = (row_w == 0).unsqueeze(-1)
    soft_rows = torch.where(row_w != 0, reference.token_divergence(z, t2, _NAMES[kind], **kw), zero)
    grad = torch.where(masked, zero, row_w.unsqueeze(-1) * reference.token_grad(z, t2, _NAMES[kind], **kw))
    hard_rows = torch.zeros_like(soft_rows)
    if hard_w is not None:
        has = labels >= 0
        safe = torch.where(has, labels, torch.zeros_like(labels))
        hard_rows = torch.where(has, torch.nn.functional.cross_entropy(z, safe, reduction="none"), zero)
        onehot = torch.nn.functional.one_hot(safe, z.shape[-1]).to(cd)
        g_ce = torch.softmax(z, -1) - onehot
        grad = grad + torch.where(has.unsqueeze(-1), hard_w.unsqueeze(-1) * g_ce, zero)
    return soft_rows, hard_rows, grad.to(s2.dtype)


def _reference(s2, t2, kind, V, T, beta, alpha, lam, row_w, labels, hard_w):
    # lam: a float, or TAID's 0-d tensor
    soft_rows, hard_rows, grad = rows_reference(s2, t2, kind, T, beta, alpha, lam, row_w, labels, hard_w, V)
    return (*finish(soft_rows, hard_rows, row_w, hard_w), grad)


def rows_triton(s2, t2, kind, T, beta, alpha, lam, row_w, labels, hard_w, grad, soft_rows, hard_rows, V=None):
    """rows_cpu's contract, the Triton kernel (triton_kernel.kd_rows)."""
    from flashdistill.kernels.kd import triton_kernel

    triton_kernel.kd_rows(s2, t2, kind, T, beta, alpha, lam, row_w.contiguous(), native.contiguous(labels),
                          native.contiguous(hard_w), grad, soft_rows, hard_rows, V)


def rows_cuda(s2, t2, kind, T, beta, alpha, lam, row_w, labels, hard_w, grad, soft_rows, hard_rows, V=None):
    """rows_cpu's contract, the CUDA kernel (csrc/cuda/kd.cu); ``lam`` a float or TAID's 0-d tensor."""
    mod = native.cuda_module()[0]
    N, Vs = s2.shape
    V = Vs if V is None else V
    assert grad.stride() == (Vs, 1) and t2.dtype == s2.dtype
    row_w, labels, hard_w = row_w.contiguous(), native.contiguous(labels), native.contiguous(hard_w)
    lam_t = lam if isinstance(lam, Tensor) else None
    with torch.cuda.device(s2.device):
        mod.kd_forward(native.DTYPE_CODES[s2.dtype], N, V, s2.data_ptr(), s2.stride(0), Vs, t2.data_ptr(),
                       t2.stride(0), t2.shape[1], kind, T, beta, alpha, 0.5 if lam_t is not None else float(lam),
                       native.ptr(lam_t), row_w.data_ptr(), native.ptr(labels), native.ptr(hard_w), grad.data_ptr(),
                       soft_rows.data_ptr(), native.ptr(hard_rows), native.stream_of(s2))


def run_rows(rows_fn, z, row_w, labels, hard_w, *teacher, **kw):
    """(loss, soft, hard, grad) of a row kernel called as rows_fn(z, *teacher, row_w, labels, hard_w,
    grad, soft_rows, hard_rows, **kw) into fresh buffers: the native backends of the KD ops."""
    N = z.shape[0]
    cd = checks.compute_dtype(z.dtype)
    grad = native.empty(z.shape, z.dtype, z.device)
    soft_rows = native.empty((N,), cd, z.device)
    hard_rows = native.empty((N,), cd, z.device) if hard_w is not None else None
    rows_fn(z, *teacher, row_w, labels, hard_w, grad, soft_rows, hard_rows, **kw)
    return (*finish(soft_rows, hard_rows, row_w, hard_w), grad)


def _native_rows(rows_fn):
    def run(s2, t2, kind, V, T, beta, alpha, lam, row_w, labels, hard_w):
        return run_rows(rows_fn, native.rows(s2), row_w, labels, hard_w, native.rows(t2), kind, T, beta, alpha, lam,
                        V=V)
    return run


_IMPLS = {"reference": _reference, "cpu": _native_rows(rows_cpu), "triton": _native_rows(rows_triton),
          "cuda": _native_rows(rows_cuda)}


def _validate(s2, t2, V, row_w, labels, hard_w):
    checks.tensor(OP, "student_logits", s2, min_dim=2)
    Vs, Vt = s2.shape[-1], t2.shape[-1]
    if V not in (Vs, Vt) or V < min(Vs, Vt) or t2.dim() != 2 or t2.shape[0] != s2.shape[0] or t2.dtype != s2.dtype:
        raise ValueError(f"{OP}: student [N, Vs] and teacher [N, Vt] of one dtype with V = Vs or Vt, V >= min(Vs, Vt)")
    cd, N = checks.compute_dtype(s2.dtype), s2.shape[0]
    checks.per_sample(OP, "row_weight", row_w, N, cd, s2.device)
    if hard_w is not None:
        checks.per_sample(OP, "hard_weight", hard_w, N, cd, s2.device)
        if labels is None or labels.shape != (N,) or labels.dtype != torch.int64:
            raise ValueError(f"{OP}: labels must be int64 of shape ({N},) with hard_weight")


@eager.custom_op("flashdistill::kd_loss")
def _kd_op(s2: Tensor, t2: Tensor, kind: int, V: int, temperature: float, beta: float, alpha: float, lam: float,
           lam_t: Optional[Tensor], row_w: Tensor, labels: Optional[Tensor], hard_w: Optional[Tensor],
           backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, soft sum, hard sum, d loss / d student) for [N, Vs] and [N, Vt] logits, the divergence
    over V columns; lam_t (a 0-d tensor of the compute dtype) replaces lam when given (TAID)."""
    _validate(s2, t2, V, row_w, labels, hard_w)
    name = backends.resolve(OP, backend, s2.device, IMPLEMENTED)
    if lam_t is not None:
        if lam_t.shape != () or lam_t.dtype != checks.compute_dtype(s2.dtype) or lam_t.device != s2.device:
            raise ValueError(f"{OP}: lam_t must be a 0-d {checks.compute_dtype(s2.dtype)} tensor on {s2.device}")
        # the cpu kernel takes a float (reading a CPU tensor is no sync); the others read the tensor
        lam = float(lam_t) if name == "cpu" else lam_t
    return _IMPLS[name](s2, t2, kind, V, temperature, beta, alpha, lam, row_w, labels, hard_w)


@_kd_op.register_fake
def _(s2, t2, kind, V, temperature, beta, alpha, lam, lam_t, row_w, labels, hard_w, backend):
    _validate(s2, t2, V, row_w, labels, hard_w)
    cd = checks.compute_dtype(s2.dtype)
    scalar = s2.new_empty((), dtype=cd)
    return scalar, s2.new_empty((), dtype=cd), s2.new_empty((), dtype=cd), torch.empty_like(s2)


HANDOUTS = [0]  # backwards that returned the forward's gradient untouched (upstream 1; tests read it)


def register_logits_autograd(op, n_inputs: int) -> None:
    """The autograd of an op returning (loss, soft, hard, dloss/dlogits) whose first input is the
    student's logits: the backward scales the gradient computed in the forward by the upstream one
    (grad_scale); only the loss is differentiable (kd_loss returns soft and hard detached)."""
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # no [N, V] zero-filled gradient for the grad output (see score_diff)
        ctx.save_for_backward(output[3])
        ctx.backend = inputs[-1]

    def backward(ctx, grad_loss, grad_soft, grad_hard, grad_grad):
        (g,) = ctx.saved_tensors
        if grad_loss is None:  # only soft / hard reached the backward
            return (None,) * n_inputs
        if eager.upstream_is_one(grad_loss):  # g is the gradient itself: no [N, V] pass (g * 1 is g's bits)
            HANDOUTS[0] += 1
            return (g,) + (None,) * (n_inputs - 1)
        return (grad_scale.grad_scale(g, grad_loss, 1.0, ctx.backend),) + (None,) * (n_inputs - 1)

    op.register_autograd(backward, setup_context=setup_context)


register_logits_autograd(_kd_op, 13)


from flashdistill.kernels.kd.linear import fused_linear_kd_loss  # noqa: E402  (uses the helpers above)
from flashdistill.kernels.kd.topk import topk_kd_loss  # noqa: E402
