"""Prediction parameterizations, classifier-free guidance conventions and per-sample arguments.

Shared by the score losses. Conventions (../shared/research/score_distill.md Sec. 1):

* forward process x_t = alpha_t x0 + sigma_t eps, alpha and sigma per sample;
* a network predicts one of
  ``"x0"`` (EDM denoiser D),
  ``"eps"`` (Ho et al. 2020):               x0 = (x_t - sigma eps) / alpha,
  ``"v"`` (Salimans & Ho 2022; needs alpha^2 + sigma^2 = 1, VP or TrigFlow):  x0 = alpha x_t - sigma v,
  ``"flow"`` (rectified flow, Liu et al. 2023; alpha = 1 - sigma, u = eps - x0): x0 = x_t - sigma u,
  ``"trigflow"`` (Lu & Song 2024, sCM; alpha = cos t, sigma = sin t, network F scaled by sigma_data):
                                            x0 = cos t x_t - sin t sigma_data F;
  every conversion is affine per sample, x0 = A x_t + C pred, so it fuses into a kernel as two
  per-sample coefficients (computed here in float64: x0 from eps divides by alpha ~ 0.07 at the end of
  a VP schedule);
* classifier-free guidance (Ho & Salimans 2022): ``cfg="ho"`` (default) u + w (c - u);
  ``cfg="offset"`` c + w (c - u), which is "ho" with w + 1 (threestudio SDS, diffusers' LCM script).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flashdistill.kernels import checks

SPACES = ("x0", "eps", "v", "flow", "trigflow")
CFG_CONVENTIONS = ("ho", "offset")


def per_sample_schedule(op: str, name: str, v, B: int, device) -> Tensor:
    """alpha / sigma as a float64 [B] tensor: from a float, or a float32/float64 [B] tensor (exact)."""
    if isinstance(v, Tensor):
        if v.shape != (B,) or v.dtype not in (torch.float32, torch.float64) or v.device != device:
            raise ValueError(f"{op}: argument '{name}' must be a float or a per-sample tensor of shape ({B},), "
                             f"dtype float32 or float64, device {device}; got shape {tuple(v.shape)}, "
                             f"dtype {v.dtype}, device {v.device}")
        return v.to(torch.float64)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return torch.full((B,), float(v), dtype=torch.float64, device=device)
    raise TypeError(f"{op}: argument '{name}' must be a finite float or a per-sample tensor, got {v!r}")


def x0_coefficients(op: str, space: str, alpha, sigma, B: int, device, *, sigma_data: float = 0.5):
    """(A, C), float64 [B] tensors with x0 = A x_t + C pred for predictions in ``space``."""
    if space not in SPACES:
        raise ValueError(f"{op}: space={space!r} is not one of {', '.join(SPACES)}")
    if alpha is None or sigma is None:
        raise ValueError(f"{op}: space={space!r} needs alpha and sigma (per-sample floats or [B] tensors)")
    a, s = per_sample_schedule(op, "alpha", alpha, B, device), per_sample_schedule(op, "sigma", sigma, B, device)
    if space == "x0":
        return torch.zeros_like(a), torch.ones_like(a)
    if space == "eps":
        return 1.0 / a, -s / a
    if space == "v":
        return a, -s
    if space == "flow":
        return torch.ones_like(a), -s
    return a, -s * sigma_data  # trigflow


def to_x0(pred: Tensor, x_t: Tensor, *, space: str, alpha=None, sigma=None, sigma_data: float = 0.5) -> Tensor:
    """x0 estimate from a prediction in ``space`` (differentiable; computed in the compute dtype or better)."""
    op = "to_x0"
    checks.tensor(op, "pred", pred, min_dim=1)
    checks.like(op, "x_t", x_t, "pred", pred)
    A, C = x0_coefficients(op, space, alpha, sigma, pred.shape[0], pred.device, sigma_data=sigma_data)
    cd = checks.compute_dtype(pred.dtype)
    shape = (-1,) + (1,) * (pred.dim() - 1)
    return A.to(cd).reshape(shape) * x_t.to(cd) + C.to(cd).reshape(shape) * pred.to(cd)


def convert(pred: Tensor, x_t: Tensor, *, src: str, dst: str, alpha=None, sigma=None,
            sigma_data: float = 0.5) -> Tensor:
    """A prediction in ``src`` space expressed in ``dst`` space at the same (x_t, alpha, sigma).

    Via x0: eps = (x_t - alpha x0) / sigma; v = (alpha x_t - x0) / sigma (alpha^2 + sigma^2 = 1);
    flow = (x_t - x0) / sigma; trigflow F = (alpha x_t - x0) / (sigma sigma_data). Returned in the
    compute dtype (float32, float64 for float64 inputs).
    """
    op = "convert"
    x0 = to_x0(pred, x_t, space=src, alpha=alpha, sigma=sigma, sigma_data=sigma_data)
    if dst not in SPACES:
        raise ValueError(f"{op}: dst={dst!r} is not one of {', '.join(SPACES)}")
    if dst == "x0":
        return x0
    cd = x0.dtype
    shape = (-1,) + (1,) * (pred.dim() - 1)
    a = per_sample_schedule(op, "alpha", alpha, pred.shape[0], pred.device).to(cd).reshape(shape)
    s = per_sample_schedule(op, "sigma", sigma, pred.shape[0], pred.device).to(cd).reshape(shape)
    xt = x_t.to(cd)
    if dst == "eps":
        return (xt - a * x0) / s
    if dst == "v":
        return (a * xt - x0) / s
    if dst == "flow":
        return (xt - x0) / s
    return (a * xt - x0) / (s * sigma_data)


def guidance_arg(op: str, name: str, w, uncond, uncond_name: str, convention: str, x: Tensor):
    """(tensor or None, float) for the kernels' (w_ptr, w): Ho convention, validated.

    ``w`` is None (no guidance; then ``uncond`` must be None too), a float, or a per-sample [B] tensor
    of the compute dtype on x's device.
    """
    if convention not in CFG_CONVENTIONS:
        raise ValueError(f"{op}: cfg={convention!r} is not one of {', '.join(CFG_CONVENTIONS)}")
    if w is None:
        if uncond is not None:
            raise ValueError(f"{op}: {uncond_name} is given but {name} is None; pass the guidance scale "
                             f"(a float or a per-sample tensor)")
        return None, 1.0
    if uncond is None:
        raise ValueError(f"{op}: {name} is given but {uncond_name} is None; classifier-free guidance needs "
                         f"the unconditional prediction")
    shift = 1.0 if convention == "offset" else 0.0
    if isinstance(w, Tensor):
        checks.per_sample(op, name, w, x.shape[0], checks.compute_dtype(x.dtype), x.device)
        return (w + shift if shift else w), 1.0
    if isinstance(w, (int, float)) and not isinstance(w, bool):
        if not math.isfinite(w):
            raise ValueError(f"{op}: {name} must be finite, got {w}")
        return None, float(w) + shift
    raise TypeError(f"{op}: {name} must be a float or a per-sample tensor, got {type(w).__name__}")


def per_sample_arg(op: str, name: str, v, x: Tensor):
    """None, or a [B] tensor of the compute dtype (a float becomes one)."""
    if v is None:
        return None
    cd = checks.compute_dtype(x.dtype)
    if isinstance(v, Tensor):
        return checks.per_sample(op, name, v, x.shape[0], cd, x.device)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return torch.full((x.shape[0],), float(v), dtype=cd, device=x.device)
    raise TypeError(f"{op}: {name} must be a finite float or a per-sample tensor, got {v!r}")
