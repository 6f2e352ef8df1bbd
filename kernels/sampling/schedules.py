"""Noise schedules as small objects whose tables live on the device (issue #5).

A schedule maps a per-sample time to the forward process's coefficients, x_t = alpha_t x0 + sigma_t eps
(score_distill.md Sec. 1, attn_sampler.md Sec. 4.1), as [B] tensors on the device, by indexing or
arithmetic on the device: no host synchronization, so a training step that noises at random times is
capturable as a graph.

    VPSchedule(num_train_timesteps=1000, beta_schedule="linear" | "scaled_linear" | "cosine")
        DDPM (Ho et al. 2020): betas linear in [beta_start, beta_end]; "scaled_linear" (Stable
        Diffusion): linear in sqrt(beta); "cosine" (Nichol & Dhariwal 2021): alpha_bar(t) =
        cos^2((t / T + s) / (1 + s) pi / 2) / alpha_bar(0), s = 0.008, betas clipped at 0.999.
        t: int64 timesteps [B]; alpha = sqrt(alpha_bar_t), sigma = sqrt(1 - alpha_bar_t).
    EDMSchedule(sigma_min=0.002, sigma_max=80, rho=7, sigma_data=0.5)
        Karras et al. 2022: x = x0 + sigma eps (alpha = 1); karras_sigmas(n) is the rho-spaced grid.
        t: sigma [B].
    FlowSchedule(shift=1.0)
        Rectified flow (Liu et al. 2023; SD3's shift, Esser et al. 2024): sigma' = s t / (1 + (s - 1) t),
        alpha = 1 - sigma'. t in [0, 1] [B].
    TrigFlowSchedule()
        TrigFlow (Lu & Song 2024): alpha = cos t, sigma = sin t, t in [0, pi / 2] [B].

Timestep samplers (on the device, from a NoiseSource's Philox stream): ``uniform_timesteps`` (ints
in [low, high)), ``lognormal_sigmas`` (EDM training, ln sigma ~ N(P_mean, P_std)),
``logit_normal_times`` (SD3's t = sigmoid(N(m, s))).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")


class VPSchedule:
    """DDPM / Stable Diffusion discrete VP schedule; ``alphas_cumprod`` (float64) on ``device``."""

    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = "linear", beta_start: float = 1e-4,
                 beta_end: float = 0.02, device=None):
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"VPSchedule: beta_schedule={beta_schedule!r} is not one of {', '.join(BETA_SCHEDULES)}")
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
            raise ValueError(f"VPSchedule: num_train_timesteps must be an int >= 2, got {num_train_timesteps!r}")
        T = num_train_timesteps
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
        else:
            s = 0.008
            f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
            betas = torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)], dtype=torch.float64)
        self.num_train_timesteps = T
        self.beta_schedule = beta_schedule
        self.betas = betas.to(device)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, 0).to(device)

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha, sigma) float64 [B] for int64 timesteps t [B] on the schedule's device."""
        _check_times("VPSchedule", t, self.alphas_cumprod.device, integer=True)
        ab = self.alphas_cumprod.gather(0, t)
        return ab.sqrt(), (1.0 - ab).sqrt()


class EDMSchedule:
    """Karras et al. 2022 (VE form x = x0 + sigma eps)."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, sigma_data: float = 0.5):
        if not 0 < sigma_min < sigma_max or rho <= 0:
            raise ValueError(f"EDMSchedule: need 0 < sigma_min < sigma_max and rho > 0, got {sigma_min}, {sigma_max}, "
                             f"{rho}")
        self.sigma_min, self.sigma_max, self.rho, self.sigma_data = sigma_min, sigma_max, rho, sigma_data

    def karras_sigmas(self, n: int, device=None) -> Tensor:
        """sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i < n,
        then 0 appended (Karras et al. 2022, Eq. 5): [n + 1] float64."""
        ramp = torch.linspace(0, 1, n, dtype=torch.float64, device=device)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        sig = (hi + ramp * (lo - hi)) ** self.rho
        return torch.cat([sig, sig.new_zeros(1)])

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        _check_times("EDMSchedule", sigma, sigma.device, integer=False)
        s = sigma.to(torch.float64)
        return torch.ones_like(s), s


class FlowSchedule:
    """Rectified flow with SD3's shift: sigma' = s t / (1 + (s - 1) t), alpha = 1 - sigma'."""

    def __init__(self, shift: float = 1.0):
        if not shift > 0:
            raise ValueError(f"FlowSchedule: shift must be > 0, got {shift}")
        self.shift = shift

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        _check_times("FlowSchedule", t, t.device, integer=False)
        t = t.to(torch.float64)
        s = self.shift * t / (1 + (self.shift - 1) * t)
        return 1.0 - s, s


class TrigFlowSchedule:
    """TrigFlow (sCM): alpha = cos t, sigma = sin t."""

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        _check_times("TrigFlowSchedule", t, t.device, integer=False)
        t = t.to(torch.float64)
        return torch.cos(t), torch.sin(t)


def _check_times(name, t, device, *, integer: bool):
    if not isinstance(t, Tensor) or t.dim() != 1 or t.device != device or \
            (t.dtype != torch.int64 if integer else not t.is_floating_point()):
        want = "int64" if integer else "floating"
        got = f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name}.coefficients: times must be a 1-d {want} tensor on {device}, got {got}")


# ---- timestep samplers: on the device, from a NoiseSource (no host sync) ---------------------------

def uniform_timesteps(source, batch: int, low: int, high: int) -> Tensor:
    """int64 [batch] uniform in [low, high) (floor of a 24-bit uniform times the range)."""
    if not 0 <= low < high:
        raise ValueError(f"uniform_timesteps: need 0 <= low < high, got {low}, {high}")
    u = source.rand((batch,), dtype=torch.float64)
    return (low + torch.floor(u * (high - low))).to(torch.int64).clamp_(max=high - 1)


def lognormal_sigmas(source, batch: int, p_mean: float = -1.2, p_std: float = 1.2) -> Tensor:
    """EDM training's sigma = exp(P_mean + P_std n), n ~ N(0, 1) (Karras et al. 2022, Table 1)."""
    return torch.exp(p_mean + p_std * source.randn((batch,), dtype=torch.float64))


def logit_normal_times(source, batch: int, mean: float = 0.0, std: float = 1.0) -> Tensor:
    """SD3's t = sigmoid(mean + std n) in (0, 1) (Esser et al. 2024)."""
    return torch.sigmoid(mean + std * source.randn((batch,), dtype=torch.float64))
