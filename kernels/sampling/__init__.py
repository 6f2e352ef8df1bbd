"""Sampler steps and noising (issue #5): schedules (schedules.py), ``q_sample`` and the first-order
steps (steps.py), all on one kernel, ``affine_step`` (below; csrc/cpu/sampling.cpp's top comment).

    q_sample(x0, t=None, schedule=None, *, alpha=None, sigma=None, noise=None, seed=None, offset=0,
             source=None, start=0, return_noise=False, backend=None)

x_t = alpha_t x0 + sigma_t eps with per-sample coefficients, from ``schedule.coefficients(t)`` or given
as ``alpha`` / ``sigma`` (floats or [B] tensors). eps is ``noise`` if given, else drawn inside the kernel
from the Philox stream: ``source`` (a NoiseSource: its seed and device-side offset, which is then
advanced on the device) or ``seed`` with ``offset``; eps's element (b, i) is element start + b D + i of
that stream, i.e. exactly ``flashdistill.randn(x0.shape, seed=..., offset=...)`` (normals within
rounding), so the same seed noises alike on every backend. With ``return_noise`` the drawn eps is
returned too (a DSM / score-distillation loss needs it), written by the same kernel.

The gradient flows to x0 (alpha_b g) and to a given noise (sigma_b g); the coefficients get none.
Traffic: read x0, write x_t (+ eps read or written): 2-3 passes against eager's 4-6 (randn_like, two
multiplies, an add); no host synchronization, so it captures in a graph.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from flashdistill.kernels import backends, checks, eager, native, params
from flashdistill.kernels.rng import reference as rng_reference
from flashdistill.kernels.rng import NoiseSource, _offset_tensor
from flashdistill.kernels.sampling.schedules import (EDMSchedule, FlowSchedule, TrigFlowSchedule, VPSchedule,
                                                     logit_normal_times, lognormal_sigmas, uniform_timesteps)

OP = "q_sample"
IMPLEMENTED = ("reference", "cpu", "triton", "cuda")

__all__ = ["q_sample", "VPSchedule", "EDMSchedule", "FlowSchedule", "TrigFlowSchedule", "uniform_timesteps",
           "lognormal_sigmas", "logit_normal_times"]


def q_sample(x0: Tensor, t: Optional[Tensor] = None, schedule=None, *, alpha=None, sigma=None,
             noise: Optional[Tensor] = None, seed: Optional[int] = None, offset=0, source: Optional[NoiseSource] = None,
             start: int = 0, return_noise: bool = False, backend: Optional[str] = None):
    """x_t (and eps with ``return_noise``); see the module docstring."""
    checks.tensor(OP, "x0", x0, min_dim=2)
    B = x0.shape[0]
    if schedule is not None:
        if t is None or alpha is not None or sigma is not None:
            raise ValueError(f"{OP}: give either t with schedule, or alpha and sigma")
        alpha, sigma = schedule.coefficients(t)
    elif t is not None:
        raise ValueError(f"{OP}: t needs a schedule")
    if alpha is None or sigma is None:
        raise ValueError(f"{OP}: needs a schedule and t, or alpha and sigma")
    cd = checks.compute_dtype(x0.dtype)
    a = params.per_sample_schedule(OP, "alpha", alpha, B, x0.device).to(cd)
    s = params.per_sample_schedule(OP, "sigma", sigma, B, x0.device).to(cd)
    forms = (noise is not None) + (seed is not None) + (source is not None)
    if forms != 1:
        raise ValueError(f"{OP}: give exactly one of noise, seed (with offset) or source (got {forms})")
    if noise is not None:
        checks.like(OP, "noise", noise, "x0", x0)
        if return_noise:
            raise ValueError(f"{OP}: return_noise is for drawn noise; the given noise is yours already")
        seed, off = 0, torch.zeros((), dtype=torch.int64, device=x0.device)
    elif source is not None:
        seed, off = source.seed, source.offset
        if off.device != x0.device:
            raise ValueError(f"{OP}: the source's offset is on {off.device}, x0 on {x0.device}")
    else:
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            raise ValueError(f"{OP}: seed must be an int in [0, 2^63), got {seed!r}")
        off = _offset_tensor(offset, x0.device)
    if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start < 2**62:
        raise ValueError(f"{OP}: start must be an int in [0, 2^62), got {start!r}")
    backend = backends.requested(OP, backend, x0.device, IMPLEMENTED)
    zero = torch.zeros_like(a)
    coef = torch.stack([zero, zero, a, zero, zero, s, zero, zero], 1)  # out = alpha x + sigma z
    xt, _, eps = _step_op(x0, None, None, None, None, 0.0, coef, noise, noise is None, seed, off, start, False,
                          return_noise, backend)
    if source is not None:
        source.offset.add_(1)
    return (xt, eps) if return_noise else xt


# ----------------------------------------------------------------------------------------------------
# the affine_step op: out = kx x + k0 (ax x + ap cfg(p, p_u, w)) + kh h + kz z; (out, x0 or empty, z or empty)

STEP = "affine_step"


def _reference(x, p, pu, h, w_t, w, coef, noise, draw, seed, offset, start, want_x0, want_noise):
    cd = checks.compute_dtype(x.dtype)
    shape = (-1,) + (1,) * (x.dim() - 1)
    ax, ap, kx, k0, kh, kz, qx, q0 = (c.reshape(shape) for c in coef.to(cd).unbind(1))
    pv = torch.zeros((), dtype=cd, device=x.device)
    if p is not None:
        pv = p.to(cd)
        if pu is not None:
            wv = w_t.to(cd).reshape(shape) if w_t is not None else w
            pv = pu.to(cd) + wv * (pv - pu.to(cd))
    x0 = ax * x.to(cd) + ap * pv
    if noise is not None:
        z = noise.to(cd)
    elif draw:
        z = rng_reference.normal(x.numel(), seed, int(offset), start, cd).to(x.device).reshape(x.shape)
    else:
        z = torch.zeros((), dtype=cd, device=x.device)
    out = kx * x.to(cd) + k0 * x0 + kz * z
    if h is not None:
        out = out + kh * h.to(cd)
    out = out.to(x.dtype)
    return (out, (qx * x.to(cd) + q0 * x0).to(x.dtype) if want_x0 else x.new_empty(0),
            z.expand(x.shape).to(x.dtype) if want_noise else x.new_empty(0))


def _native(x, p, pu, h, w_t, w, coef, noise, draw, seed, offset, start, want_x0, want_noise, launch):
    x2, p2, pu2, h2, n2 = native.rows_of(x, p, pu, h, noise)
    out = native.empty(x2.shape, x.dtype, x.device)
    x0 = native.empty(x2.shape, x.dtype, x.device) if want_x0 else None
    z = native.empty(x2.shape, x.dtype, x.device) if want_noise else None
    launch(x2, p2, pu2, h2, native.contiguous(w_t), w, coef.contiguous(), n2, draw, seed, offset, start, out, x0, z)
    return (out.view(x.shape), x0.view(x.shape) if x0 is not None else x.new_empty(0),
            z.view(x.shape) if z is not None else x.new_empty(0))


def _cpu_launch(x2, p2, pu2, h2, w_t, w, coef, n2, draw, seed, offset, start, out, x0, z):
    B, D = x2.shape
    native.cpu_module()[0].affine_step(
        native.DTYPE_CODES[x2.dtype], B, D, *native.row_arg(x2), *native.row_arg(p2), *native.row_arg(pu2),
        *native.row_arg(h2), native.ptr(w_t), w, coef.data_ptr(), *native.row_arg(n2), draw, seed, offset.data_ptr(), start,
        out.data_ptr(), native.ptr(x0), native.ptr(z))


def _cuda_launch(x2, p2, pu2, h2, w_t, w, coef, n2, draw, seed, offset, start, out, x0, z):
    B, D = x2.shape
    with torch.cuda.device(x2.device):
        native.cuda_module()[0].affine_step(
            native.DTYPE_CODES[x2.dtype], B, D, *native.row_arg(x2), *native.row_arg(p2), *native.row_arg(pu2),
            *native.row_arg(h2), native.ptr(w_t), w, coef.data_ptr(), *native.row_arg(n2), draw, seed, offset.data_ptr(), start,
            out.data_ptr(), native.ptr(x0), native.ptr(z), native.stream_of(x2))


def _triton_launch(x2, p2, pu2, h2, w_t, w, coef, n2, draw, seed, offset, start, out, x0, z):
    from flashdistill.kernels.sampling import triton_kernel

    triton_kernel.affine_step(x2, p2, pu2, h2, w_t, w, coef, n2, draw, seed, offset, start, out, x0, z)


_IMPLS = {"reference": _reference,
          "cpu": lambda *args: _native(*args, _cpu_launch),
          "triton": lambda *args: _native(*args, _triton_launch),
          "cuda": lambda *args: _native(*args, _cuda_launch)}


def _validate(x, p, pu, h, w_t, coef, noise, draw):
    checks.tensor(STEP, "x", x, min_dim=2)
    cd, B = checks.compute_dtype(x.dtype), x.shape[0]
    for name, t in (("pred", p), ("pred_uncond", pu), ("hist", h), ("noise", noise)):
        if t is not None:
            checks.like(STEP, name, t, "x", x)
    if pu is not None and p is None:
        raise ValueError(f"{STEP}: pred_uncond needs pred")
    if w_t is not None:
        checks.per_sample(STEP, "guidance", w_t, B, cd, x.device)
    if coef.shape != (B, 8) or coef.dtype != cd or coef.device != x.device:
        raise ValueError(f"{STEP}: coef must be [{B}, 8] {cd} on {x.device}, got {tuple(coef.shape)} {coef.dtype}")
    if draw and noise is not None:
        raise ValueError(f"{STEP}: draw and a given noise are exclusive")


@eager.custom_op("flashdistill::affine_step")
def _step_op(x: Tensor, pred: Optional[Tensor], pred_uncond: Optional[Tensor], hist: Optional[Tensor],
             w_t: Optional[Tensor], w: float, coef: Tensor, noise: Optional[Tensor], draw: bool, seed: int, offset: Tensor, start: int,
             want_x0: bool, want_noise: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(kx x + k0 x0 + kh hist + kz z, qx x + q0 x0 or empty, z or empty), x0 = ax x + ap cfg(pred,
    pred_uncond, w); coef [B, 8] = (ax, ap, kx, k0, kh, kz, qx, q0)."""
    _validate(x, pred, pred_uncond, hist, w_t, coef, noise, draw)
    name = backends.resolve(STEP, backend, x.device, IMPLEMENTED)
    return _IMPLS[name](x, pred, pred_uncond, hist, w_t, w, coef, noise, draw, seed, offset, start, want_x0,
                        want_noise)


@_step_op.register_fake
def _(x, pred, pred_uncond, hist, w_t, w, coef, noise, draw, seed, offset, start, want_x0, want_noise, backend):
    _validate(x, pred, pred_uncond, hist, w_t, coef, noise, draw)
    return (torch.empty_like(x), torch.empty_like(x) if want_x0 else x.new_empty(0),
            torch.empty_like(x) if want_noise else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, p, pu, h, w_t, w, coef, noise = inputs[:8]
    ctx.save_for_backward(coef, w_t)
    ctx.w, ctx.dim = w, x.dim()
    ctx.has = (p is not None, pu is not None, h is not None, noise is not None)
    ctx.set_materialize_grads(False)


def _backward(ctx, g_out, g_x0, g_z):
    """Per-sample scales (g2 the gradient of the secondary output qx x + q0 x0): dL/dx0 = k0 g + q0 g2;
    dL/dx = kx g + qx g2 + ax dL/dx0; dL/dp_hat = ap dL/dx0, split over p_c and p_u by the guidance;
    dL/dhist = kh g; dL/dnoise = kz g. The coefficients get none."""
    coef, w_t = ctx.saved_tensors
    has_p, has_pu, has_h, has_noise = ctx.has
    if g_out is None and g_x0 is None:
        return (None,) * 15
    shape = (-1,) + (1,) * (ctx.dim - 1)
    cd = coef.dtype
    ax, ap, kx, k0, kh, kz, qx, q0 = (c.reshape(shape) for c in coef.unbind(1))
    g = g_out.to(cd) if g_out is not None else None
    g2 = g_x0.to(cd) if g_x0 is not None else None
    d0 = (k0 * g if g is not None else 0) + (q0 * g2 if g2 is not None else 0)
    dtype = (g_out if g_out is not None else g_x0).dtype
    gx = ((kx * g if g is not None else 0) + (qx * g2 if g2 is not None else 0) + ax * d0).to(dtype)
    gp = gpu = None
    if has_p:
        dp = ap * d0
        if has_pu:
            w = w_t.reshape(shape) if w_t is not None else ctx.w
            gp, gpu = (w * dp).to(dtype), ((1 - w) * dp).to(dtype)
        else:
            gp = dp.to(dtype)
    gn = (kz * g).to(dtype) if has_noise and g is not None else None
    gh = (kh * g).to(dtype) if has_h and g is not None else None
    return gx, gp, gpu, gh, None, None, None, gn, None, None, None, None, None, None, None


_step_op.register_autograd(_backward, setup_context=_setup_context)


from flashdistill.kernels.sampling.steps import (ddim_step, ddpm_step, dpmpp_2m_step, euler_step,  # noqa: E402
                                                 flow_euler_step, heun_step, lcm_step)

from flashdistill.kernels.sampling.loop import sample  # noqa: E402

__all__ += ["ddim_step", "ddpm_step", "dpmpp_2m_step", "euler_step", "flow_euler_step", "heun_step", "lcm_step",
            "sample"]
