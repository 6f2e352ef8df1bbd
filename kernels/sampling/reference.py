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


def ddpm_step(x, x0_hat, abar_t, abar_prev, z):
    """DDPM ancestral step (Ho et al. 2020, Eq. 6-7, with alpha_t = abar_t / abar_prev for strided
    timesteps as diffusers does): mu = sqrt(abar_prev) beta / (1 - abar_t) x0_hat
    + sqrt(alpha_t) (1 - abar_prev) / (1 - abar_t) x, x_prev = mu + sigma z, sigma^2 = (1 - abar_prev)
    / (1 - abar_t) beta ("fixed_small"), beta = 1 - alpha_t."""
    alpha_t = abar_t / abar_prev
    beta = 1 - alpha_t
    mu = (_b(abar_prev.sqrt() * beta / (1 - abar_t), x) * x0_hat
          + _b(alpha_t.sqrt() * (1 - abar_prev) / (1 - abar_t), x) * x)
    return mu + _b(torch.sqrt((1 - abar_prev) / (1 - abar_t) * beta), x) * z


def lcm_step(x, x0_hat, t, abar_prev, z, *, timestep_scaling=10.0, sigma_data=0.5):
    """LCM multistep (Luo et al. 2023; the boundary-condition scalings of consistency models, Song et al.
    2023): denoised = c_skip x + c_out x0_hat with c_skip = sigma_d^2 / ((s t)^2 + sigma_d^2), c_out =
    s t / sqrt((s t)^2 + sigma_d^2); x_prev = sqrt(abar_prev) denoised + sqrt(1 - abar_prev) z."""
    st = timestep_scaling * t.to(torch.float64)
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / torch.sqrt(st**2 + sigma_data**2)
    denoised = _b(c_skip, x) * x + _b(c_out, x) * x0_hat
    return _b(abar_prev.sqrt(), x) * denoised + _b((1 - abar_prev).sqrt(), x) * z


def dpmpp_2m_step(x, x0_hat, x0_prev, abar_t, abar_prev, abar_last):
    """DPM-Solver++(2M), data prediction (Lu et al. 2022, "DPM-Solver++", Alg. 2), midpoint form:
    lambda = log(alpha / sigma), h = lambda_prev - lambda_t, r0 = (lambda_t - lambda_last) / h,
    D0 = x0_hat, D1 = (x0_hat - x0_prev) / r0, x_next = (sigma_prev / sigma_t) x
    - alpha_prev (e^-h - 1) D0 - 0.5 alpha_prev (e^-h - 1) D1; first order (x0_prev None): D1 = 0."""
    lam = lambda ab: torch.log(ab.sqrt() / (1 - ab).sqrt())  # noqa: E731
    h = lam(abar_prev) - lam(abar_t)
    a_p, s_p, s_t = abar_prev.sqrt(), (1 - abar_prev).sqrt(), (1 - abar_t).sqrt()
    out = _b(s_p / s_t, x) * x - _b(a_p * torch.expm1(-h), x) * x0_hat
    if x0_prev is not None:
        r0 = (lam(abar_t) - lam(abar_last)) / h
        out = out - 0.5 * _b(a_p * torch.expm1(-h), x) * (x0_hat - x0_prev) / _b(r0, x)
    return out


def heun_step(x, x0_hat, sigma, sigma_next, x0_hat_mid):
    """Heun (Karras et al. 2022, Alg. 1, lines 5-8): d = (x - x0_hat) / sigma, x' = x + (sigma_next -
    sigma) d, d' = (x' - x0_hat_mid) / sigma_next, x_next = x + (sigma_next - sigma)(d + d') / 2; x0_hat_mid
    is a function of x' (the model evaluated there)."""
    d = (x - x0_hat) / _b(sigma, x)
    xp = x + _b(sigma_next - sigma, x) * d
    dp = (xp - x0_hat_mid(xp)) / _b(sigma_next, x)
    return x + _b(sigma_next - sigma, x) * (d + dp) / 2
