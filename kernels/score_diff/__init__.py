"""Score-difference losses (the K1 skeleton): gradient to the generator output x only.

Public ops, all 0-d losses in the compute dtype (float32; float64 for float64 inputs) whose gradient
reaches x alone (every prediction is treated as a constant, as the methods do under no_grad):

    dmd_loss(x, real, fake, ...)   DMD / DMD2 (Yin et al. 2024a, 2024b), f-distill (weight=fdiv_weight(...))
    sds_loss(x, pred, noise, ...)  DreamFusion SDS (Poole et al. 2023)
    vsd_loss(x, real, fake, ...)   ProlificDreamer VSD (Wang et al. 2023), SwiftBrush (guidance on both)

The math and citations are in ``reference.py`` (the spec). Each loss is the surrogate
0.5 kappa sum (x - sg(x - g))^2 whose gradient is kappa g: its value is not a divergence, do not
monitor it as one. kappa = 1/N (N = x.numel(), "mean", as DMD2 and SwiftBrush) or 1/B ("batch", as
threestudio). All three run one kernel (csrc/README.md, "K1"), which computes, per sample b,

    g = clip(nan_to_num(s_b (cfg(a) - cfg(b)) / n_b)),   n_b = max(mean |x - r|, eps) (DMD) or 1

with classifier-free guidance fused (``cfg="ho"``: u + w (c - u), the default; ``cfg="offset"``:
c + w (c - u)), per-sample weights s_b, and for DMD the conversion of eps / v / flow predictions to
x0 at x_t (``space=``, ``x_t=``, ``alpha=``, ``sigma=``) fused too. Guidance scales and weights are
floats or per-sample [B] tensors of the compute dtype (a float is baked into a compiled graph; pass a
tensor when it changes between steps).

Layout: rows of the inputs (one sample each) must be contiguous inside; any batch stride is free
(``t[::2]``, ``t[:, :4]`` of a contiguous tensor); other layouts are copied once before the kernel.

Traffic of the fused forward per element (s = bytes of the dtype, k = number of prediction tensors,
2 to 4, +1 with x_t): DMD reads x and the teacher twice (the second time from cache while a sample
fits), the rest once, and writes g: (k + 1 + 1) s; SDS / VSD read k tensors and write g: (k + 1) s.
The backward reads g and writes dloss/dx: 2 s. In an eager CPU call that will be differentiated the
kernel stores kappa g (d loss / d x at upstream gradient 1) and ``loss.backward()`` takes it as it is:
no backward pass at all (``_OnePass``; NOTES "score diff v2").
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from flashdistill.kernels import backends, checks, eager, grad_scale, native, params
from flashdistill.kernels.score_diff import reference

OP = "score_diff"
REDUCTIONS = ("mean", "batch")

__all__ = ["dmd_loss", "fdiv_weight", "sds_loss", "vsd_loss"]


# ----------------------------------------------------------------------------------------------------
# public ops

def dmd_loss(x: Tensor, real: Tensor, fake: Tensor, *, real_uncond: Optional[Tensor] = None,
             guidance=None, cfg: str = "ho", weight=None, eps: float = 0.0, space: str = "x0",
             x_t: Optional[Tensor] = None, alpha=None, sigma=None, sigma_data: float = 0.5,
             clip: Optional[float] = None, backend: Optional[str] = None) -> Tensor:
    """DMD / DMD2 generator loss; differentiable with respect to x only.

    real, fake: the teacher's and the fake score's predictions at x_t, in ``space`` ("x0" by default;
    "eps", "v", "flow" or "trigflow" need x_t, alpha and sigma, and are converted to x0 in the kernel).
    real_uncond + guidance: classifier-free guidance on the teacher. weight: per-sample h_b
    (f-distill: ``fdiv_weight(logits)``). eps: floor of the per-sample normaliser (DMD2: 0).
    """
    op = "dmd_loss"
    _check_x(op, x)
    wb_t, wb = params.guidance_arg(op, "guidance", guidance, real_uncond, "real_uncond", cfg, x)
    coef = None
    if space != "x0":
        if x_t is None:
            raise ValueError(f"{op}: space={space!r} needs x_t (and alpha, sigma) to convert the predictions to x0")
        checks.like(op, "x_t", x_t, "x", x)
        A, C = params.x0_coefficients(op, space, alpha, sigma, x.shape[0], x.device, sigma_data=sigma_data)
        coef = torch.stack([A, C], dim=1).to(checks.compute_dtype(x.dtype))
    elif x_t is not None:
        raise ValueError(f"{op}: x_t is only used with space='eps', 'v', 'flow' or 'trigflow' (got space='x0')")
    scale = params.per_sample_arg(op, "weight", weight, x)
    return _call(op, x, fake, None, None, 1.0, real, real_uncond, wb_t, wb, x_t if coef is not None else None,
                 coef, scale, True, eps, clip, 1.0 / x.numel(), backend)


def sds_loss(x: Tensor, pred: Tensor, noise: Tensor, *, pred_uncond: Optional[Tensor] = None, guidance=None,
             cfg: str = "ho", weight=None, clip: Optional[float] = None, reduction: str = "mean",
             backend: Optional[str] = None) -> Tensor:
    """DreamFusion SDS: gradient kappa nan_to_num(w_b (cfg(pred) - noise)) to x.

    pred (+ pred_uncond, guidance): the teacher's noise prediction at x_t = alpha x + sigma noise;
    noise: the exact eps used to make x_t; weight: w(t) per sample (e.g. sigma_t^2).
    reduction: "mean" (kappa = 1/N) or "batch" (kappa = 1/B, threestudio).
    """
    op = "sds_loss"
    _check_x(op, x)
    wa_t, wa = params.guidance_arg(op, "guidance", guidance, pred_uncond, "pred_uncond", cfg, x)
    scale = params.per_sample_arg(op, "weight", weight, x)
    return _call(op, x, pred, pred_uncond, wa_t, wa, noise, None, None, 1.0, None, None, scale, False, 0.0,
                 clip, _kappa(op, reduction, x), backend)


def vsd_loss(x: Tensor, real: Tensor, fake: Tensor, *, real_uncond: Optional[Tensor] = None, guidance=None,
             fake_uncond: Optional[Tensor] = None, fake_guidance=None, cfg: str = "ho", weight=None,
             space: str = "eps", clip: Optional[float] = None, reduction: str = "mean",
             backend: Optional[str] = None) -> Tensor:
    """ProlificDreamer VSD / SwiftBrush: gradient kappa nan_to_num(w_b (real - fake)) to x (eps, v, flow
    predictions; fake - real for space="x0"), guidance on the teacher and optionally on the fake."""
    op = "vsd_loss"
    _check_x(op, x)
    if space not in params.SPACES:
        raise ValueError(f"{op}: space={space!r} is not one of {', '.join(params.SPACES)}")
    wr_t, wr = params.guidance_arg(op, "guidance", guidance, real_uncond, "real_uncond", cfg, x)
    wf_t, wf = params.guidance_arg(op, "fake_guidance", fake_guidance, fake_uncond, "fake_uncond", cfg, x)
    scale = params.per_sample_arg(op, "weight", weight, x)
    first, second = ((fake, fake_uncond, wf_t, wf), (real, real_uncond, wr_t, wr))
    if space != "x0":
        first, second = second, first
    return _call(op, x, *first, *second, None, None, scale, False, 0.0, clip, _kappa(op, reduction, x), backend)


def fdiv_weight(logits: Tensor, divergence: str = "js", *, logit_clip: float = 10.0, ratio_clip=(0.1, 20.0),
                normalize: bool = True) -> Tensor:
    """f-distill per-sample weights for ``dmd_loss(weight=...)`` from discriminator logits [B, ...]:
    r_b = clamp(exp(clamp(mean_b logits, +-logit_clip)), *ratio_clip), h_b = f(r_b) for the divergence
    (rkl, kl, js, sf, neyman, sh, jf), divided by mean(h) + 1e-6 when normalize; float32, detached.
    Under data parallelism normalise by the global mean yourself (normalize=False, then all-reduce)."""
    op = "fdiv_weight"
    checks.tensor(op, "logits", logits, min_dim=1)
    if divergence not in reference.FDIV_WEIGHTS:
        raise ValueError(f"{op}: divergence={divergence!r} is not one of {', '.join(reference.FDIV_WEIGHTS)}")
    lo, hi = ratio_clip
    if not (0 < lo <= hi and math.isfinite(hi) and logit_clip > 0):
        raise ValueError(f"{op}: need 0 < ratio_clip[0] <= ratio_clip[1] < inf and logit_clip > 0, "
                         f"got ratio_clip={ratio_clip}, logit_clip={logit_clip}")
    return reference.fdiv_weight(logits, divergence, logit_clip=logit_clip, ratio_clip=ratio_clip,
                                 normalize=normalize)


def _check_x(op, x):
    checks.tensor(op, "x", x, min_dim=2)


def _kappa(op, reduction, x):
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction={reduction!r} is not one of {', '.join(REDUCTIONS)}")
    return 1.0 / x.numel() if reduction == "mean" else 1.0 / x.shape[0]


def _call(op, x, a, a_u, wa_t, wa, b, b_u, wb_t, wb, x_t, coef, scale, norm, eps, clip, loss_factor, backend):
    backend = backends.requested(op, backend, x.device)
    if clip is not None and not clip > 0.0:
        raise ValueError(f"{op}: clip must be a finite number > 0 or None, got {clip}")
    clip = 0.0 if clip is None else float(clip)
    names = _NAMES[op]
    _validate(op, names, x, a, a_u, wa_t, wa, b, b_u, wb_t, wb, x_t, coef, scale, float(eps), clip)
    args = (x, a, a_u, wa_t, wa, b, b_u, wb_t, wb, x_t, coef, scale, norm, float(eps), clip, loss_factor)
    if eager.cpu_one_pass(op, backend, x, args):
        return _OnePass.apply(*args)
    loss, _ = _score_diff_op(*args, backend)
    return loss


HANDOUTS = [0]  # _OnePass backwards that returned the forward's gradient untouched (tests read it)


class _OnePass(torch.autograd.Function):
    """K1 on the CPU in eager mode (NOTES "score diff v2"): the kernel stores g times the loss factor,
    i.e. d loss / d x at upstream gradient 1, so the backward hands it to autograd untouched in the
    common case (loss.backward() on this loss: the bits of the custom op's backward, which scales the
    stored g by grad * factor in a second pass), scales it in place otherwise, and recomputes it from
    the saved inputs if the graph is run backward a second time (retain_graph)."""

    @staticmethod
    def forward(ctx, x, a, a_u, wa_t, wa, b, b_u, wb_t, wb, x_t, coef, scale, norm, eps, clip, loss_factor):
        loss, g = _native_forward(native.cpu_module()[0], x, a, a_u, wa_t, wa, b, b_u, wb_t, wb, x_t, coef, scale,
                                  norm, eps, clip, loss_factor, g_scale=loss_factor)
        ctx.save_for_backward(x, a, a_u, wa_t, b, b_u, wb_t, x_t, coef, scale)
        ctx.args, ctx.g = (wa, wb, norm, eps, clip, loss_factor), g
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        g, ctx.g = ctx.g, None
        if g is None:  # a second backward through a retained graph: the first g is autograd's now
            x, a, a_u, wa_t, b, b_u, wb_t, x_t, coef, scale = ctx.saved_tensors
            wa, wb, norm, eps, clip, lf = ctx.args
            _, g = _native_forward(native.cpu_module()[0], x, a, a_u, wa_t, wa, b, b_u, wb_t, wb, x_t, coef, scale,
                                   norm, eps, clip, lf, g_scale=lf)
        elif eager.upstream_is_one(grad_loss):
            HANDOUTS[0] += 1
            return (g,) + (None,) * 15
        return (g.mul_(grad_loss),) + (None,) * 15


# argument names as the user wrote them, for error messages: (a, a_u, b, b_u)
_NAMES = {
    "dmd_loss": ("fake", None, "real", "real_uncond"),
    "sds_loss": ("pred", "pred_uncond", "noise", None),
    "vsd_loss": ("real", "real_uncond", "fake", "fake_uncond"),
    OP: ("a", "a_u", "b", "b_u"),
}


# ----------------------------------------------------------------------------------------------------
# validation (shared by the real and the fake implementation)

def _validate(op, names, x, a, a_u, wa_t, wa, b, b_u, wb_t, wb, x_t, coef, scale, eps, clip):
    checks.tensor(op, "x", x, min_dim=2)
    for name, t in zip(names, (a, a_u, b, b_u)):
        if t is not None:
            checks.like(op, name or "a_u", t, "x", x)
    if x_t is not None:
        checks.like(op, "x_t", x_t, "x", x)
    cd, B = checks.compute_dtype(x.dtype), x.shape[0]
    for name, t in (("guidance", wa_t), ("guidance", wb_t), ("weight", scale)):
        if t is not None:
            checks.per_sample(op, name, t, B, cd, x.device)
    if coef is not None and (coef.shape != (B, 2) or coef.dtype != cd or coef.device != x.device):
        raise ValueError(f"{op}: coef must be ({B}, 2) {cd} on {x.device}, got {tuple(coef.shape)} {coef.dtype}")
    if (coef is None) != (x_t is None):
        raise ValueError(f"{op}: x_t and coef go together")
    for name, w in (("guidance", wa), ("guidance", wb)):
        if not math.isfinite(w):
            raise ValueError(f"{op}: {name} must be finite, got {w}")
    if not (math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps}")
    if not (math.isfinite(clip) and clip >= 0.0):
        raise ValueError(f"{op}: clip must be a finite number > 0 or None, got {clip}")


# ----------------------------------------------------------------------------------------------------
# backends: each returns (loss in the compute dtype, g shaped like x in x.dtype)

def _reference(x, a, a_u, wa_t, wa, b, b_u, wb_t, wb, x_t, coef, scale, norm, eps, clip, loss_factor):
    return reference.score_diff_forward(x, a, a_u, wa if wa_t is None else wa_t, b, b_u,
                                        wb if wb_t is None else wb_t, x_t, coef, scale, norm, eps, clip,
                                        loss_factor)


def _native_forward(mod, x, a, a_u, wa_t, wa, b, b_u, wb_t, wb, x_t, coef, scale, norm, eps, clip, loss_factor,
                    g_scale=None):
    x2, a2, au2, b2, bu2, xt2 = native.rows_of(x if norm else None, a, a_u, b, b_u, x_t)
    B, D = a2.shape
    code = native.DTYPE_CODES[x.dtype]
    g = native.empty((B, D), x.dtype, x.device)
    loss = native.empty((), checks.compute_dtype(x.dtype), x.device)
    ws_bytes = mod.score_diff_workspace_bytes(code, B, D)
    ws = native.workspace(ws_bytes, x.device)
    wa_t, wb_t, coef, scale = (native.contiguous(t) for t in (wa_t, wb_t, coef, scale))
    mod.score_diff_forward(
        code, B, D, *native.row_arg(x2), *native.row_arg(a2), *native.row_arg(au2), native.ptr(wa_t), wa,
        *native.row_arg(b2), *native.row_arg(bu2), native.ptr(wb_t), wb, *native.row_arg(xt2), native.ptr(coef),
        native.ptr(scale), int(norm), eps, clip, loss_factor, g.data_ptr(), loss.data_ptr(),
        native.ptr(ws), ws_bytes, native.stream_of(x), *(() if g_scale is None else (g_scale,)))
    return loss, g.view(x.shape)


def _triton(x, a, a_u, wa_t, wa, b, b_u, wb_t, wb, x_t, coef, scale, norm, eps, clip, loss_factor):
    from flashdistill.kernels.score_diff import triton_kernel

    x2, a2, au2, b2, bu2, xt2 = native.rows_of(x if norm else None, a, a_u, b, b_u, x_t)
    c = native.contiguous
    loss, g = triton_kernel.forward(x2, a2, au2, c(wa_t), wa, b2, bu2, c(wb_t), wb, xt2, c(coef), c(scale), norm,
                                    eps, clip, loss_factor)
    return loss, g.view(x.shape)


_IMPLS = {"reference": _reference, "cpu": native.on_cpu_module(_native_forward), "triton": _triton,
          "cuda": native.on_cuda_module(_native_forward)}


# ----------------------------------------------------------------------------------------------------
# torch.library registration

@eager.custom_op("flashdistill::score_diff")
def _score_diff_op(x: Tensor, a: Tensor, a_u: Optional[Tensor], wa_t: Optional[Tensor], wa: float, b: Tensor,
                   b_u: Optional[Tensor], wb_t: Optional[Tensor], wb: float, x_t: Optional[Tensor],
                   coef: Optional[Tensor], scale: Optional[Tensor], norm: bool, eps: float, clip: float,
                   loss_factor: float, backend: str) -> tuple[Tensor, Tensor]:
    _validate(OP, _NAMES[OP], x, a, a_u, wa_t, wa, b, b_u, wb_t, wb, x_t, coef, scale, eps, clip)
    name = backends.resolve(OP, backend, x.device)
    return _IMPLS[name](x, a, a_u, wa_t, wa, b, b_u, wb_t, wb, x_t, coef, scale, norm, eps, clip, loss_factor)


@_score_diff_op.register_fake
def _(x, a, a_u, wa_t, wa, b, b_u, wb_t, wb, x_t, coef, scale, norm, eps, clip, loss_factor, backend):
    _validate(OP, _NAMES[OP], x, a, a_u, wa_t, wa, b, b_u, wb_t, wb, x_t, coef, scale, eps, clip)
    loss = x.new_empty((), dtype=checks.compute_dtype(x.dtype))
    return loss, torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _setup_context(ctx, inputs, output):
    # g is an output only so that the forward can hand it to the backward: no one differentiates it,
    # and without this autograd would allocate and zero-fill a [B, D] gradient for it every backward
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1])
    ctx.loss_factor = inputs[15]
    ctx.backend = inputs[-1]


def _backward(ctx, grad_loss, grad_g):
    (g,) = ctx.saved_tensors
    if grad_loss is None:  # the loss is not in the graph being differentiated
        return (None,) * 17
    # dloss/dx = g * grad_loss * loss_factor: one read of g, one write, the factor kept in the compute
    # dtype and read on the device (no host sync).
    grad_x = grad_scale.grad_scale(g, grad_loss, ctx.loss_factor, ctx.backend)
    return (grad_x,) + (None,) * 16


_score_diff_op.register_autograd(_backward, setup_context=_setup_context)
