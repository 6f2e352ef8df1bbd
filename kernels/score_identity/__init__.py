"""Score identity losses (the K2 skeleton): gradient to x and through both networks' predictions.

Public ops, 0-d losses in the compute dtype (float32; float64 for float64 inputs):

    sid_loss(x, real, fake, ...)   Score identity Distillation (Zhou et al. 2024), SiD-LSG guidance
    sim_loss(x, real, fake, ...)   Score Implicit Matching, pseudo-Huber (Luo et al. 2024)
    sfd_loss(x, real, fake, ...)   Score Forgetting Distillation (Chen et al. 2025): sid_loss with the
                                   teacher queried at a remapped "safe" class

The math and citations are in ``reference.py`` (the spec). real and fake are x0 predictions of the
teacher and the fake score network at x_t, computed *with autograd* through their inputs (the
networks' parameters frozen): the loss returns gradients to x, real, fake (and real_uncond,
fake_uncond under guidance), and autograd carries those through the networks back to x. Convert eps,
v or flow outputs with ``flashdistill.to_x0`` first (differentiable). No gradient reaches the
guidance scales or the per-sample normaliser (a stop-gradient in SiD).

One kernel pair serves all three (csrc/README.md, "K2"): the forward reads x, real, fake (+ the
unconditional twins) once and returns three sums per sample, (sum|x - r|, sum (r - f)^2,
sum (r - f)(f - x)); the loss is a formula of those [B] values (differentiable PyTorch here); the
backward reads the inputs again and writes each wanted gradient once, from two per-sample
coefficients. Traffic per element (s bytes, k inputs = 3 to 5): forward k s, backward (k + k) s.

NaN policy (``nan_policy``): "propagate" (default) lets a non-finite sample make the loss NaN;
"drop" gives a sample whose loss term is not finite zero loss and exact zero gradients, like SiD's
NaN filter, but the loss still divides by the full batch (the batch size never changes silently).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from flashdistill.kernels import backends, checks, eager, native, params
from flashdistill.kernels.score_identity import reference

OP = "score_identity"
NAN_POLICIES = ("propagate", "drop")

__all__ = ["sfd_loss", "sid_loss", "sim_loss"]


# ----------------------------------------------------------------------------------------------------
# public ops

def sid_loss(x: Tensor, real: Tensor, fake: Tensor, *, real_uncond: Optional[Tensor] = None, guidance=None,
             fake_uncond: Optional[Tensor] = None, fake_guidance=None, cfg: str = "ho", alpha: float = 1.2,
             eps: float = 1e-5, scale: Optional[float] = None, nan_policy: str = "propagate",
             backend: Optional[str] = None) -> Tensor:
    """SiD generator loss: scale * sum_b [(1 - alpha) Q_b + A_b] / w_b, w_b = sg(max(mean|x - r|, eps)).

    alpha: SiD's alpha (1.2 in the paper's runs; 1.0 in SiD-LSG); scale: defaults to 1/B (SiD sums
    over elements and divides by the batch; multiply by the loss scaling, e.g. 100 for fp16, yourself).
    """
    op = "sid_loss"
    for name, v in (("alpha", alpha), ("eps", eps)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise ValueError(f"{op}: {name} must be a finite float, got {v!r}")
    if eps < 0:
        raise ValueError(f"{op}: eps must be >= 0, got {eps}")
    S = _sums(op, x, real, real_uncond, guidance, fake, fake_uncond, fake_guidance, cfg, backend)
    D = x[0].numel()
    w = (S[:, 0].detach() / D).clamp_min(eps)
    per = ((1.0 - alpha) * S[:, 1] + S[:, 2]) / w
    return _total(op, per, scale, nan_policy, x)


def sim_loss(x: Tensor, real: Tensor, fake: Tensor, *, real_uncond: Optional[Tensor] = None, guidance=None,
             fake_uncond: Optional[Tensor] = None, fake_guidance=None, cfg: str = "ho", a=1.0, c=1.0,
             scale: Optional[float] = None, nan_policy: str = "propagate", backend: Optional[str] = None) -> Tensor:
    """SIM pseudo-Huber surrogate: scale * sum_b a_b A_b / sqrt(a_b Q_b + c_b^2).

    a: the x0-to-score factor per sample (alpha_t^2 / sigma_t^4 for VP, 1 / sigma^4 for EDM); c: the
    pseudo-Huber constant; each a float or a [B] tensor of the compute dtype. scale: 1/B by default.
    """
    op = "sim_loss"
    S = _sums(op, x, real, real_uncond, guidance, fake, fake_uncond, fake_guidance, cfg, backend)
    a_t, c_t = params.per_sample_arg(op, "a", a, x), params.per_sample_arg(op, "c", c, x)
    per = a_t * S[:, 2] / torch.sqrt(a_t * S[:, 1] + c_t * c_t)
    return _total(op, per, scale, nan_policy, x)


def sfd_loss(x: Tensor, real_safe: Tensor, fake: Tensor, **kwargs) -> Tensor:
    """Score Forgetting Distillation's forget term: ``sid_loss`` where the teacher prediction comes
    from the remapped safe class (the kernel is SiD's; weight it, e.g. by 0.01, and add the remain term
    ``sid_loss`` on the other classes)."""
    return sid_loss(x, real_safe, fake, **kwargs)


def _total(op, per, scale, nan_policy, x):
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"{op}: nan_policy={nan_policy!r} is not one of {', '.join(NAN_POLICIES)}")
    if nan_policy == "drop":
        per = torch.where(torch.isfinite(per), per, torch.zeros((), dtype=per.dtype, device=per.device))
    s = 1.0 / x.shape[0] if scale is None else float(scale)
    return s * per.sum()


def _sums(op, x, real, real_uncond, guidance, fake, fake_uncond, fake_guidance, cfg, backend):
    checks.tensor(op, "x", x, min_dim=2)
    backend = backends.requested(op, backend, x.device)
    wr_t, wr = params.guidance_arg(op, "guidance", guidance, real_uncond, "real_uncond", cfg, x)
    wf_t, wf = params.guidance_arg(op, "fake_guidance", fake_guidance, fake_uncond, "fake_uncond", cfg, x)
    _validate(op, _USER_NAMES, x, real, real_uncond, wr_t, fake, fake_uncond, wf_t)
    return _sums_op(x, real, real_uncond, wr_t, wr, fake, fake_uncond, wf_t, wf, backend)


_USER_NAMES = ("real", "real_uncond", "fake", "fake_uncond")
_NAMES = ("r", "r_u", "f", "f_u")


def _validate(op, names, x, r, r_u, wr_t, f, f_u, wf_t):
    checks.tensor(op, "x", x, min_dim=2)
    for name, t in zip(names, (r, r_u, f, f_u)):
        if t is not None:
            checks.like(op, name, t, "x", x)
    cd = checks.compute_dtype(x.dtype)
    for name, t in (("guidance", wr_t), ("fake_guidance", wf_t)):
        if t is not None:
            checks.per_sample(op, name, t, x.shape[0], cd, x.device)


# ----------------------------------------------------------------------------------------------------
# backends

def _w(t, v):
    return t if t is not None else v


def _ref_sums(x, r, r_u, wr_t, wr, f, f_u, wf_t, wf):
    return reference.sums(x, r, r_u, _w(wr_t, wr), f, f_u, _w(wf_t, wf))


def _ref_grads(x, r, r_u, wr_t, wr, f, f_u, wf_t, wf, coef, need):
    return reference.grads(x, r, r_u, _w(wr_t, wr), f, f_u, _w(wf_t, wf), coef, need)


def _native_args(x, r, r_u, wr_t, wr, f, f_u, wf_t, wf):
    """The (B, D, rows and guidance) part of the K2 ABI, and the tensors that must stay alive."""
    x2, r2, ru2, f2, fu2 = native.rows_of(x, r, r_u, f, f_u)
    wr_t, wf_t = native.contiguous(wr_t), native.contiguous(wf_t)
    args = (*x2.shape, *native.row_arg(x2), *native.row_arg(r2), *native.row_arg(ru2), native.ptr(wr_t), wr,
            *native.row_arg(f2), *native.row_arg(fu2), native.ptr(wf_t), wf)
    return args, (x2, r2, ru2, f2, fu2, wr_t, wf_t)


def _native_sums(mod, x, r, r_u, wr_t, wr, f, f_u, wf_t, wf):
    args, _alive = _native_args(x, r, r_u, wr_t, wr, f, f_u, wf_t, wf)
    code, (B, D) = native.DTYPE_CODES[x.dtype], args[:2]
    sums = native.empty((B, 3), checks.compute_dtype(x.dtype), x.device)
    ws_bytes = mod.score_identity_workspace_bytes(code, B, D)
    ws = native.workspace(ws_bytes, x.device)
    mod.score_identity_forward(code, *args, sums.data_ptr(), native.ptr(ws), ws_bytes, native.stream_of(x))
    return sums


def _native_grads(mod, x, r, r_u, wr_t, wr, f, f_u, wf_t, wf, coef, need):
    args, _alive = _native_args(x, r, r_u, wr_t, wr, f, f_u, wf_t, wf)
    B, D = args[:2]
    outs = [native.empty((B, D), x.dtype, x.device) if n and p else None for n, p in zip(need, _present(r_u, f_u))]
    coef = coef.contiguous()
    mod.score_identity_backward(native.DTYPE_CODES[x.dtype], *args, coef.data_ptr(), *(native.ptr(o) for o in outs),
                                native.stream_of(x))
    return tuple(o.view(x.shape) if o is not None else None for o in outs)


def _triton_sums(x, r, r_u, wr_t, wr, f, f_u, wf_t, wf):
    from flashdistill.kernels.score_identity import triton_kernel

    x2, r2, ru2, f2, fu2 = native.rows_of(x, r, r_u, f, f_u)
    return triton_kernel.forward(x2, r2, ru2, native.contiguous(wr_t), wr, f2, fu2, native.contiguous(wf_t), wf)


def _triton_grads(x, r, r_u, wr_t, wr, f, f_u, wf_t, wf, coef, need):
    from flashdistill.kernels.score_identity import triton_kernel

    x2, r2, ru2, f2, fu2 = native.rows_of(x, r, r_u, f, f_u)
    c = native.contiguous
    outs = triton_kernel.backward(x2, r2, ru2, c(wr_t), wr, f2, fu2, c(wf_t), wf, coef.contiguous(), tuple(need))
    return tuple(o.view(x.shape) if o is not None else None for o in outs)


_SUMS = {"reference": _ref_sums, "cpu": native.on_cpu_module(_native_sums),
         "cuda": native.on_cuda_module(_native_sums), "triton": _triton_sums}
_GRADS = {"reference": _ref_grads, "cpu": native.on_cpu_module(_native_grads),
          "cuda": native.on_cuda_module(_native_grads), "triton": _triton_grads}


# ----------------------------------------------------------------------------------------------------
# torch.library registration: the forward sums, and the backward as its own op (so that compiled
# graphs and opcheck see both)

@eager.custom_op("flashdistill::score_identity_sums")
def _sums_op(x: Tensor, r: Tensor, r_u: Optional[Tensor], wr_t: Optional[Tensor], wr: float, f: Tensor,
             f_u: Optional[Tensor], wf_t: Optional[Tensor], wf: float, backend: str) -> Tensor:
    _validate(OP, _NAMES, x, r, r_u, wr_t, f, f_u, wf_t)
    return _SUMS[backends.resolve(OP, backend, x.device)](x, r, r_u, wr_t, wr, f, f_u, wf_t, wf)


@_sums_op.register_fake
def _(x, r, r_u, wr_t, wr, f, f_u, wf_t, wf, backend):
    _validate(OP, _NAMES, x, r, r_u, wr_t, f, f_u, wf_t)
    return x.new_empty((x.shape[0], 3), dtype=checks.compute_dtype(x.dtype))


@eager.custom_op("flashdistill::score_identity_grads")
def _grads_op(x: Tensor, r: Tensor, r_u: Optional[Tensor], wr_t: Optional[Tensor], wr: float, f: Tensor,
              f_u: Optional[Tensor], wf_t: Optional[Tensor], wf: float, coef: Tensor, need: list[bool],
              backend: str) -> list[Tensor]:
    """The wanted ones of (gx, gr, gr_u, gf, gf_u), in that order, from per-sample coef = (P, Q): the
    entries of ``need`` that are true and whose input exists (r_u, f_u may be absent)."""
    _validate(OP, _NAMES, x, r, r_u, wr_t, f, f_u, wf_t)
    outs = _GRADS[backends.resolve(OP, backend, x.device)](x, r, r_u, wr_t, wr, f, f_u, wf_t, wf, coef, tuple(need))
    return [o for o in outs if o is not None]


@_grads_op.register_fake
def _(x, r, r_u, wr_t, wr, f, f_u, wf_t, wf, coef, need, backend):
    return [torch.empty(x.shape, dtype=x.dtype, device=x.device) for n, p in zip(need, _present(r_u, f_u)) if n and p]


def _present(r_u, f_u):
    return (True, True, r_u is not None, True, f_u is not None)


def _setup_context(ctx, inputs, output):
    x, r, r_u, wr_t, wr, f, f_u, wf_t, wf, backend = inputs
    ctx.save_for_backward(x, r, r_u, wr_t, f, f_u, wf_t)
    ctx.wr, ctx.wf, ctx.backend = wr, wf, backend


def _backward(ctx, grad_sums):
    x, r, r_u, wr_t, f, f_u, wf_t = ctx.saved_tensors
    n = ctx.needs_input_grad
    need = [bool(v and p) for v, p in zip((n[0], n[1], n[2], n[5], n[6]), _present(r_u, f_u))]
    # sums = (S_abs, Q, A): Q = sum y^2, A = sum y u with y = r - f, u = f - x. dL/dy = 2 gQ y + gA u,
    # dL/du = gA y, so P = gA and Q = 2 gQ in the kernel's Gx = -P y, Gr = P u + Q y. S_abs (the
    # normaliser) carries no gradient.
    coef = torch.stack([grad_sums[:, 2], 2.0 * grad_sums[:, 1]], dim=1).contiguous()
    got = iter(_grads_op(
        x, r, r_u, wr_t, ctx.wr, f, f_u, wf_t, ctx.wf, coef, need, ctx.backend))
    gx, gr, gru, gf, gfu = (next(got) if v else None for v in need)
    return gx, gr, gru, None, None, gf, gfu, None, None, None


_sums_op.register_autograd(_backward, setup_context=_setup_context)
