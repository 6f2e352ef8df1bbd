"""Sampler steps and noising (issue #5). So far: schedules (schedules.py) and ``q_sample``.

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

from flashdistill.kernels import backends, checks, native, params
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
    xt, eps = torch.ops.flashdistill.q_sample(x0, a, s, noise, seed, off, start, return_noise, backend)
    if source is not None:
        source.offset.add_(1)
    return (xt, eps) if return_noise else xt


# ----------------------------------------------------------------------------------------------------
# backends: (x_t, eps or an empty tensor)

def _reference(x0, a, s, noise, seed, offset, start, want_noise):
    cd = checks.compute_dtype(x0.dtype)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    if noise is None:
        eps = rng_reference.normal(x0.numel(), seed, int(offset), start, cd).to(x0.device).reshape(x0.shape)
    else:
        eps = noise.to(cd)
    xt = (a.reshape(shape) * x0.to(cd) + s.reshape(shape) * eps).to(x0.dtype)
    return xt, (eps.to(x0.dtype) if want_noise else x0.new_empty(0))


def _native(x0, a, s, noise, seed, offset, start, want_noise, launch):
    x2 = native.rows(x0)
    n2 = native.rows(noise) if noise is not None else None
    xt = native.empty(x2.shape, x0.dtype, x0.device)
    eps = native.empty(x2.shape, x0.dtype, x0.device) if want_noise else None
    launch(x2, a, s, n2, seed, offset, start, xt, eps)
    return xt.view(x0.shape), (eps.view(x0.shape) if eps is not None else x0.new_empty(0))


def _cpu_launch(x2, a, s, n2, seed, offset, start, xt, eps):
    B, D = x2.shape
    native.cpu_module()[0].q_sample_forward(
        native.DTYPE_CODES[x2.dtype], B, D, *native.row_arg(x2), a.data_ptr(), s.data_ptr(), *native.row_arg(n2),
        seed, offset.data_ptr(), start, xt.data_ptr(), native.ptr(eps))


def _cuda_launch(x2, a, s, n2, seed, offset, start, xt, eps):
    B, D = x2.shape
    with torch.cuda.device(x2.device):
        native.cuda_module()[0].q_sample_forward(
            native.DTYPE_CODES[x2.dtype], B, D, *native.row_arg(x2), a.data_ptr(), s.data_ptr(),
            *native.row_arg(n2), seed, offset.data_ptr(), start, xt.data_ptr(), native.ptr(eps), native.stream_of(x2))


def _triton_launch(x2, a, s, n2, seed, offset, start, xt, eps):
    from flashdistill.kernels.sampling import triton_kernel

    triton_kernel.q_sample(x2, a, s, n2, seed, offset, start, xt, eps)


_IMPLS = {"reference": _reference,
          "cpu": lambda *args: _native(*args, _cpu_launch),
          "triton": lambda *args: _native(*args, _triton_launch),
          "cuda": lambda *args: _native(*args, _cuda_launch)}


def _validate(x0, a, s, noise):
    checks.tensor(OP, "x0", x0, min_dim=2)
    cd, B = checks.compute_dtype(x0.dtype), x0.shape[0]
    checks.per_sample(OP, "alpha", a, B, cd, x0.device)
    checks.per_sample(OP, "sigma", s, B, cd, x0.device)
    if noise is not None:
        checks.like(OP, "noise", noise, "x0", x0)


@torch.library.custom_op("flashdistill::q_sample", mutates_args=())
def _q_sample_op(x0: Tensor, alpha: Tensor, sigma: Tensor, noise: Optional[Tensor], seed: int, offset: Tensor,
                 start: int, want_noise: bool, backend: str) -> tuple[Tensor, Tensor]:
    """(alpha x0 + sigma eps, eps if want_noise else an empty tensor)."""
    _validate(x0, alpha, sigma, noise)
    name = backends.resolve(OP, backend, x0.device, IMPLEMENTED)
    return _IMPLS[name](x0, alpha, sigma, noise, seed, offset, start, want_noise)


@_q_sample_op.register_fake
def _(x0, alpha, sigma, noise, seed, offset, start, want_noise, backend):
    _validate(x0, alpha, sigma, noise)
    return torch.empty_like(x0), (torch.empty_like(x0) if want_noise else x0.new_empty(0))


def _setup_context(ctx, inputs, output):
    x0, alpha, sigma, noise = inputs[:4]
    ctx.save_for_backward(alpha, sigma)
    ctx.has_noise = noise is not None
    ctx.dim = x0.dim()
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_xt, grad_eps):
    alpha, sigma = ctx.saved_tensors
    if grad_xt is None:
        return (None,) * 9
    shape = (-1,) + (1,) * (ctx.dim - 1)
    cd = alpha.dtype
    gx = (alpha.reshape(shape) * grad_xt.to(cd)).to(grad_xt.dtype)
    gn = (sigma.reshape(shape) * grad_xt.to(cd)).to(grad_xt.dtype) if ctx.has_noise else None
    return gx, None, None, gn, None, None, None, None, None


_q_sample_op.register_autograd(_backward, setup_context=_setup_context)
