"""Sampler steps and noising in plain PyTorch, written as their papers state them: the spec of the
affine_step kernel (tests check every public step against these, not against the affine form).

Notation (attn_sampler.md Sec. 4, score_distill.md Sec. 1): x_t = alpha_t x0 + sigma_t eps; x0_hat is
the model's output converted to a data prediction (kernels/params.py); guidance is applied to the
model output before the conversion.
"""

from __future__ import annotations

import torch


def _b(v, x):
    """A per-sample [B] tensor shaped to broadcast against x [B, ...]."""
    return v.reshape((-1,) + (1,) * (x.dim() - 1))


def q_sample(x0, alpha, sigma, eps):
    """x_t = alpha x0 + sigma eps (DDPM's forward process, Ho et al. 2020 Eq. 4, in alpha / sigma form)."""
    return _b(alpha, x0) * x0 + _b(sigma, x0) * eps


def ddim_step(x, x0_hat, abar_t, abar_prev, eta, z):
    """DDIM (Song, Meng & Ermon 2021, Eq. 12): x_prev = sqrt(abar_prev) x0_hat
    + sqrt(1 - abar_prev - s^2) eps_hat + s z with eps_hat = (x - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t),
    s = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev) (Eq. 16)."""
    s = eta * torch.sqrt((1 - abar_prev) / (1 - abar_t)) * torch.sqrt(1 - abar_t / abar_prev)
    eps_hat = (x - _b(abar_t.sqrt(), x) * x0_hat) / _b((1 - abar_t).sqrt(), x)
    return (_b(abar_prev.sqrt(), x) * x0_hat + _b(torch.sqrt(1 - abar_prev - s**2), x) * eps_hat
            + _b(s, x) * z)


def euler_step(x, x0_hat, sigma, sigma_next):
    """Euler (Karras et al. 2022, Alg. 1 without the Heun correction; VE form x = x0 + sigma eps):
    d = (x - x0_hat) / sigma, x_next = x + (sigma_next - sigma) d."""
    d = (x - x0_hat) / _b(sigma, x)
    return x + _b(sigma_next - sigma, x) * d


def flow_euler_step(x, v_hat, sigma, sigma_next):
    """Rectified-flow Euler (SD3 / Flux samplers): x_next = x + (sigma_next - sigma) v_hat, v the
    predicted velocity eps - x0."""
    return x + _b(sigma_next - sigma, x) * v_hat
